"""Native PGP engine: loading keys (the same facts as the gnupg loader), sealing, opening,
rotation, many keys, the route option; and the helpers the other test_openpgp modules share."""

from __future__ import annotations

import bz2
import dataclasses
import os
import subprocess
import textwrap
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import openpgp
from gateway.config import KeyState, PgpOptions, load_config
from gateway.envelope import CONTENT_TYPES
from gateway.errors import ConfigError, NoKeyError, SignatureError, TooLargeError, UnknownKeyError
from gateway.keys import Key, Keyset
from gateway.openpgp import NativePgpEnvelope, load_native_keyset
from gateway.pgp import load_pgp_keyset
from tests.pgp_fixtures import PGP_KEY_NAMES, GpgPeer, KeyEntries, PgpKeys, b64url, unb64url

PLAINTEXT = b'{"requestHeader": {"requestId": "r-1"}, "clientMessage": "h\xc3\xa9llo"}'
MakeNative = Callable[..., NativePgpEnvelope]
INTEROP = Path(__file__).parent / "interop"


# Shared fixtures (imported by the other test_openpgp modules).


@pytest.fixture(scope="module")
def native_keyset(pgp_keys: PgpKeys) -> Callable[..., Keyset]:
    """native_keyset(name, entries, now=None) -> Keyset, each key parsed once per module by
    load_native_keyset (states, places and the clock set per call)."""
    loaded: dict[tuple[str, str], Key] = {}

    def build(name: str, entries: KeyEntries, now: Callable[[], Any] | None = None) -> Keyset:
        keys = []
        for i, (key_name, kind, state) in enumerate(entries):
            if (key_name, kind) not in loaded:
                single = pgp_keys.keyset_config("one", [(key_name, kind, "active")])
                loaded[key_name, kind] = load_native_keyset(single).keys[0]
            keys.append(dataclasses.replace(
                loaded[key_name, kind], state=KeyState(state), place=f"keysets.{name}.keys[{i}]"
            ))
        if now is None:
            return Keyset(name=name, type="pgp", keys=tuple(keys))
        return Keyset(name=name, type="pgp", keys=tuple(keys), now=now)

    return build


@pytest.fixture(scope="module")
def native_envelope(native_keyset: Callable[..., Keyset]) -> MakeNative:
    """native_envelope(own, peer, options=PgpOptions(), limit=1 MiB) -> NativePgpEnvelope;
    own and peer are Keysets or entry lists."""

    def make(
        own: Keyset | KeyEntries,
        peer: Keyset | KeyEntries,
        options: PgpOptions = PgpOptions(),  # noqa: B008
        *,
        limit: int = 1 << 20,
    ) -> NativePgpEnvelope:
        own_set = own if isinstance(own, Keyset) else native_keyset("own", own)
        peer_set = peer if isinstance(peer, Keyset) else native_keyset("peer", peer)
        return NativePgpEnvelope(own_set, peer_set, options, max_plaintext_bytes=limit)

    return make


class Craft:
    """Builds OpenPGP messages packet by packet (with the native engine's own writers), for the
    shapes ordinary implementations never make. Secret keys come from the session's files."""

    def __init__(self, keys: PgpKeys) -> None:
        self.keys = keys
        self._loaded: dict[str, Key] = {}
        self.now = int(time.time())

    def key(self, name: str) -> Key:
        if name not in self._loaded:
            config = self.keys.keyset_config("craft", [(name, "sec", "active")])
            self._loaded[name] = load_native_keyset(config).keys[0]
        return self._loaded[name]

    def part(self, name: str, use: str) -> Any:
        """The part of key `name` that signs (`use` "sign") or decrypts ("encrypt")."""
        parts = self.key(name).material.parts
        return max((p for p in parts if getattr(p, f"can_{use}")), key=lambda p: p.created)

    def sig(self, name: str, data: bytes, *, hash_id: int = 9, sig_type: int = 0,
            created: int | None = None, damage: bool = False, part: Any = None) -> bytes:
        """A signature packet by key `name`'s signing part (or by `part`, whatever it is)."""
        body = bytearray(openpgp._make_sig(
            part or self.part(name, "sign"), sig_type, hash_id, openpgp._hash_of(hash_id, data),
            self.now if created is None else created,
        ))
        if damage:
            body[-3] ^= 0x01
        return openpgp._packet(2, bytes(body))

    def ops(self, name: str, *, hash_id: int = 9, last: bool = True, sig_type: int = 0,
            part: Any = None) -> bytes:
        keyid = (part or self.part(name, "sign")).keyid
        body = bytes([3, sig_type, hash_id, 1]) + keyid + bytes([last])
        return openpgp._packet(4, body)

    @staticmethod
    def literal(data: bytes, mode: bytes = b"b") -> bytes:
        return openpgp._packet(11, mode + b"\x00" + bytes(4) + data)

    def signed(self, data: bytes, signers: Sequence[str], *, hash_id: int = 9,
               mode: bytes = b"b", one_pass: bool = True) -> bytes:
        """OPS... literal SIG... as gpg writes them (one_pass) or SIG... literal."""
        sigs = [self.sig(n, data, hash_id=hash_id) for n in signers]
        if not one_pass:
            return b"".join(sigs) + self.literal(data, mode)
        ops = [self.ops(n, hash_id=hash_id, last=i == 0) for i, n in enumerate(signers)]
        return b"".join(reversed(ops)) + self.literal(data, mode) + b"".join(sigs)

    @staticmethod
    def compressed(algo: int, inner: bytes) -> bytes:
        data = {0: lambda d: d, 1: lambda d: zlib.compress(d)[2:-4], 2: zlib.compress,
                3: bz2.compress}[algo](inner)
        return openpgp._packet(8, bytes([algo]) + data)

    def pkesk(self, name: str, key: bytes, *, cipher: int = 9, hidden: bool = False) -> bytes:
        packet = openpgp._session_key_packet(self.part(name, "encrypt"), cipher, key)
        if not hidden:
            return packet
        # The key id follows the version octet, after a 1-, 2- or 5-octet body length.
        at = 1 + (1 if packet[1] < 192 else 2 if packet[1] < 224 else 5) + 1
        return packet[:at] + bytes(8) + packet[at + 8:]

    @staticmethod
    def seipd(key: bytes, inner: bytes) -> bytes:
        return openpgp._seipd(key, inner)

    def encrypt(self, inner: bytes, to: Sequence[str] = ("partner-a",), *, cipher: int = 9,
                hidden: bool = False) -> bytes:
        key = os.urandom({7: 16, 8: 24, 9: 32}[cipher])
        return b"".join(self.pkesk(n, key, cipher=cipher, hidden=hidden) for n in to) + \
            self.seipd(key, inner)


def partial(tag: int, body: bytes, chunk_power: int = 9) -> bytes:
    """A new-format packet whose body is sent in partial chunks of 2**chunk_power bytes."""
    out, size, pos = bytearray([0xC0 | tag]), 1 << chunk_power, 0
    while len(body) - pos > size:
        out += bytes([224 + chunk_power]) + body[pos:pos + size]
        pos += size
    return bytes(out) + openpgp._new_length(len(body) - pos) + body[pos:]


@pytest.fixture(scope="module")
def craft(pgp_keys: PgpKeys) -> Craft:
    return Craft(pgp_keys)


def node(script: str, *args: str, stdin: bytes = b"") -> bytes:
    """Run an ES module `script` with OpenPGP.js importable; its stdout."""
    done = subprocess.run(["node", "--input-type=module", "-e", textwrap.dedent(script), *args],
                          input=stdin, capture_output=True, cwd=INTEROP, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


# Loading keys: the native loader reports what the gnupg loader reports.


def _facts(key: Key) -> tuple[object, ...]:
    return (key.id, key.state, key.fingerprint, key.private, key.can_sign, key.can_encrypt,
            key.algorithm, key.expires, key.place)


def test_every_session_key_loads_with_the_gnupg_loaders_facts(
    pgp_keys: PgpKeys, runtime_dir: Path
) -> None:
    entries = [(name, kind, "active") for name in PGP_KEY_NAMES for kind in ("sec", "pub")]
    config = pgp_keys.keyset_config("all", entries)
    native = load_native_keyset(config)
    reference = load_pgp_keyset(config, runtime_dir / "scan")
    assert [_facts(k) for k in native.keys] == [_facts(k) for k in reference.keys]
    assert all(len(k.fingerprint) == 40 and k.fingerprint.isupper() for k in native.keys)
    assert "material" not in repr(native.keys[0]) and "RSAPrivateKey" not in repr(native)


@pytest.fixture(scope="module")
def key_variants(pgp_keys: PgpKeys, session_tmp: Path) -> dict[str, Path]:
    """Exports of the session's keys in other shapes: binary, secret subkeys only (a GnuPG stub
    primary), a second, newer encryption subkey (then the first one revoked), and a key
    re-protected by OpenPGP.js (S2K SHA-256, AES-256)."""
    home = session_tmp / "variants"
    out = session_tmp / "variant-files"
    out.mkdir()
    peer = GpgPeer(pgp_keys, home, names=["partner-a", "partner-pw"])
    try:
        files = {"binary": out / "binary.gpg", "stub": out / "stub.asc",
                 "two-enc": out / "two-enc.asc", "openpgp-js": out / "openpgp-js.asc",
                 "revoked-sub": out / "revoked-sub.asc"}
        files["binary"].write_bytes(peer.gpg("--dearmor", stdin=pgp_keys.sec(
            "partner-pw").read_bytes()).stdout)
        files["stub"].write_bytes(peer.gpg(
            "--armor", "--export-secret-subkeys", pgp_keys.fingerprint("partner-a")).stdout)
        fpr = pgp_keys.fingerprint("partner-a")
        peer.gpg("--passphrase", "", "--quick-add-key", fpr, "rsa2048", "encr", "1y")
        files["two-enc"].write_bytes(peer.gpg("--armor", "--export", fpr).stdout)
        peer.gpg("--passphrase", "", "--command-fd", "0", "--edit-key", fpr,
                 stdin=b"key 1\nrevkey\ny\n0\n\ny\nsave\n")
        files["revoked-sub"].write_bytes(peer.gpg("--armor", "--export", fpr).stdout)
        files["openpgp-js"].write_bytes(node("""
            import { readFileSync } from 'node:fs';
            import * as openpgp from 'openpgp';
            const [file, pass] = process.argv.slice(1);
            const key = await openpgp.decryptKey({
              privateKey: await openpgp.readPrivateKey({ armoredKey: readFileSync(file, 'utf8') }),
              passphrase: readFileSync(pass, 'utf8').replace(/\\r?\\n$/, '') });
            const locked = await openpgp.encryptKey({ privateKey: key, passphrase: 'js pass' });
            process.stdout.write(locked.armor());
        """, str(pgp_keys.sec("partner-pw")), str(pgp_keys.passphrase_file("partner-pw"))))
        return files
    finally:
        peer.close()


@pytest.mark.parametrize("variant", ["binary", "stub", "two-enc", "revoked-sub", "openpgp-js"])
def test_other_export_shapes_load_with_the_same_facts(
    pgp_keys: PgpKeys, key_variants: dict[str, Path], runtime_dir: Path, variant: str
) -> None:
    base = {"binary": "partner-pw", "stub": "partner-a", "two-enc": "partner-a",
            "revoked-sub": "partner-a", "openpgp-js": "partner-pw"}[variant]
    config = pgp_keys.keyset_config("own", [(base, "sec", "active")])
    key_config = dataclasses.replace(config.keys[0], file=key_variants[variant])
    if variant == "openpgp-js":
        key_config = dataclasses.replace(key_config, passphrase="js pass")
    config = dataclasses.replace(config, keys=(key_config,))
    (native,) = load_native_keyset(config).keys
    (reference,) = load_pgp_keyset(config, runtime_dir / "scan").keys
    assert _facts(native) == _facts(reference)
    if variant == "stub":  # the primary's secret is not there: it cannot sign
        assert native.private and native.can_encrypt and not native.can_sign
    parts = native.material.parts
    if variant in ("two-enc", "revoked-sub"):  # the newer encryption subkey is encrypted to
        assert [p.revoked for p in parts] == [False, variant == "revoked-sub", False]
        assert native.material.pick("encrypt", int(time.time())) is parts[2]


def test_not_after_and_the_keys_own_expiry(pgp_keys: PgpKeys) -> None:
    config = pgp_keys.keyset_config("p", [("partner-a", "pub", "active")] * 2)
    soon = datetime.now(UTC) + timedelta(days=30)
    late = datetime.now(UTC) + timedelta(days=3000)
    keys = (dataclasses.replace(config.keys[0], id="soon", not_after=soon),
            dataclasses.replace(config.keys[1], id="late", not_after=late))
    first, second = load_native_keyset(dataclasses.replace(config, keys=keys)).keys
    assert first.expires == soon
    assert second.expires is not None and second.expires < soon + timedelta(days=340)


def test_an_expired_key_loads_but_never_verifies(pgp_keys: PgpKeys) -> None:
    keyset = load_native_keyset(pgp_keys.keyset_config("g", [("google-expired", "pub",
                                                                "active")]))
    (key,) = keyset.keys
    assert key.expires is not None and key.expires < datetime.now(UTC)
    assert keyset.verifiers() == () and keyset.recipients() == ()


@pytest.fixture(scope="module")
def odd_keys(session_tmp: Path) -> dict[str, Path]:
    """Keys to refuse: RSA-1024, Ed25519, a v4 key without self-signature, and a plain file."""
    home = session_tmp / "odd-native"
    home.mkdir(mode=0o700)
    files: dict[str, Path] = {}
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
           "--passphrase", ""]
    for name, algo in (("rsa1024", "rsa1024"), ("ed25519", "ed25519")):
        subprocess.run([*gpg, "--quick-gen-key", f"{name}@example.test", algo, "sign,cert", "1y"],
                       capture_output=True, check=True, timeout=60)
        files[name] = home / f"{name}.asc"
        files[name].write_bytes(subprocess.run(
            [*gpg, "--armor", "--export", f"{name}@example.test"], capture_output=True,
            check=True, timeout=60).stdout)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
    files["text"] = home / "notes.txt"
    files["text"].write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\nnot really\n")
    return files


@pytest.mark.parametrize(("case", "message"), [
    ("text", "holds no OpenPGP key"),
    ("rsa1024", "RSA-1024 part; only RSA keys of at least 2048 bits"),
    ("ed25519", "EdDSA-255 part; only RSA keys"),
    ("two", "holds 2 primary keys"),
    ("missing", "cannot read"),
    ("unsigned", "no valid self-signature"),
    ("bad-self-sig", "no valid self-signature"),
    ("v5", "version 5 keys are outside the profile"),
])
def test_unusable_key_files_are_refused(
    pgp_keys: PgpKeys, odd_keys: dict[str, Path], runtime_dir: Path, case: str, message: str
) -> None:
    two = runtime_dir / "two.asc"
    two.write_bytes(pgp_keys.pub("google-a").read_bytes() + pgp_keys.pub("google-b").read_bytes())
    packets = openpgp._key_packets(pgp_keys.pub("google-b").read_bytes())
    unsigned = runtime_dir / "unsigned.gpg"
    unsigned.write_bytes(b"".join(openpgp._packet(p.tag, p.body) for p in packets
                                  if p.tag in (6, 13)))
    bad = runtime_dir / "bad.gpg"
    damaged = [openpgp._packet(p.tag, p.body[:-3] + bytes([p.body[-3] ^ 1]) + p.body[-2:])
               if p.tag == 2 else openpgp._packet(p.tag, p.body) for p in packets]
    bad.write_bytes(b"".join(damaged))
    v5 = runtime_dir / "v5.gpg"
    v5.write_bytes(openpgp._packet(6, b"\x05" + packets[0].body[1:]))
    files = {**odd_keys, "two": two, "missing": runtime_dir / "nope.asc", "unsigned": unsigned,
             "bad-self-sig": bad, "v5": v5}
    config = pgp_keys.keyset_config("peer", [("google-a", "pub", "active"),
                                             ("google-b", "pub", "disabled")])
    wrong = dataclasses.replace(config.keys[1], file=files[case])
    with pytest.raises(ConfigError) as caught:
        load_native_keyset(dataclasses.replace(config, keys=(config.keys[0], wrong)))
    assert caught.value.place == "keysets.peer.keys[1].file"
    assert message in caught.value.message


@pytest.mark.parametrize(("name", "change", "place", "message"), [
    ("partner-pw", {"passphrase": None, "passphrase_file": None}, "keysets.own.keys[0]",
     "passphrase-protected: give passphrase_file or passphrase_env"),
    ("partner-pw", {"passphrase": "wrong"}, "keysets.own.keys[0].passphrase_file",
     "the passphrase does not open the secret key"),
    ("partner-pw2", {"passphrase": "correct horse battery", "passphrase_file": None,
                     "passphrase_env": "PW"},
     "keysets.own.keys[0].passphrase_env", "the passphrase does not open the secret key"),
    ("partner-pw2", {"passphrase": "passwort zwei"}, "keysets.own.keys[0].passphrase_file",
     "the passphrase does not open the secret key"),
])
def test_passphrases_must_open_their_keys(
    pgp_keys: PgpKeys, name: str, change: dict[str, object], place: str, message: str
) -> None:
    config = pgp_keys.keyset_config("own", [(name, "sec", "disabled")])
    key = dataclasses.replace(config.keys[0], **change)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        load_native_keyset(dataclasses.replace(config, keys=(key,)))
    assert caught.value.place == place and message in caught.value.message
    for secret in ("wrong", "horse", "zwei", "passwort"):
        assert secret not in str(caught.value)


def test_a_damaged_secret_key_is_refused(pgp_keys: PgpKeys, runtime_dir: Path) -> None:
    packets = openpgp._key_packets(pgp_keys.sec("partner-a").read_bytes())
    broken = [openpgp._packet(p.tag, p.body[:-1] + bytes([p.body[-1] ^ 1])) if p.tag == 5
              else openpgp._packet(p.tag, p.body) for p in packets]
    path = runtime_dir / "broken.gpg"
    path.write_bytes(b"".join(broken))
    config = pgp_keys.keyset_config("own", [("partner-a", "sec", "active")])
    config = dataclasses.replace(config, keys=(dataclasses.replace(config.keys[0], file=path),))
    with pytest.raises(ConfigError, match="this secret key cannot be used: the secret key's "
                                          "checksum does not match"):
        load_native_keyset(config)


def test_the_engine_takes_only_natively_loaded_keys(
    pgp_keyset: Callable[..., Keyset], native_keyset: Callable[..., Keyset]
) -> None:
    with pytest.raises(ConfigError, match="load_native_keyset"):
        NativePgpEnvelope(pgp_keyset("own", [("partner-a", "sec", "active")]),
                          native_keyset("peer", [("google-a", "pub", "active")]), PgpOptions(),
                          max_plaintext_bytes=1000)


# Sealing and opening.


def test_seal_then_open(native_envelope: MakeNative) -> None:
    partner = native_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    google = native_envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")])
    sealed = partner.seal(PLAINTEXT)
    assert (sealed.signed_by, sealed.encrypted_to) == (("partner-a",), ("google-a",))
    assert b"=" not in sealed.body and PLAINTEXT not in unb64url(sealed.body)
    opened = google.open(sealed.body)
    assert opened.plaintext == PLAINTEXT
    assert (opened.decrypted_by, opened.verified_by) == (("google-a",), ("partner-a",))
    assert partner.scheme == "pgp" and partner.content_type == CONTENT_TYPES["pgp"]
    assert google.open(partner.seal(b"").body).plaintext == b""
    partner.close()
    partner.close()
    assert google.open(partner.seal(PLAINTEXT).body).plaintext == PLAINTEXT


@pytest.mark.parametrize("options", [
    PgpOptions(armor=True, base64_padding=True, compression="zlib", digest="SHA512"),
    PgpOptions(compression="zip", digest="SHA256", cipher="AES128"),
    PgpOptions(cipher="AES192"),
])
def test_route_options_shape_the_message(
    native_envelope: MakeNative, gpg_peer: GpgPeer, options: PgpOptions
) -> None:
    partner = native_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")],
                              options)
    body = partner.seal(PLAINTEXT * 3).body
    raw = unb64url(body)
    assert raw.startswith(b"-----BEGIN PGP MESSAGE-----") == options.armor
    assert (len(body) % 4 == 0) if options.base64_padding else (b"=" not in body)
    packets = gpg_peer.gpg("--list-packets", stdin=raw).stdout.decode()
    algo = {"zip": "1", "zlib": "2", "none": None}[options.compression]
    assert (f"compressed packet: algo={algo}" in packets) if algo else ("compressed" not in packets)
    opened = gpg_peer.open_details(body)
    assert opened.plaintext == PLAINTEXT * 3
    hashes = {"SHA256": "8", "SHA384": "9", "SHA512": "10"}
    ciphers = {"AES128": "7", "AES192": "8", "AES256": "9"}
    assert opened.hashes == [hashes[options.digest]]
    assert (opened.cipher, opened.mdc) == (ciphers[options.cipher], "2")


def test_many_signers_many_recipients_and_two_passphrases(
    native_envelope: MakeNative, pgp_keys: PgpKeys, gpg_peer: GpgPeer
) -> None:
    signers = ["partner-a", "partner-pw", "partner-pw2"]
    partner = native_envelope(
        [(name, "sec", "active") for name in signers],
        [("google-a", "pub", "active"), ("google-b", "pub", "active")],
    )
    sealed = partner.seal(PLAINTEXT)
    assert sealed.signed_by == tuple(signers)
    assert sealed.encrypted_to == ("google-a", "google-b")
    plaintext, good = gpg_peer.open(sealed.body)
    assert plaintext == PLAINTEXT
    assert sorted(good) == sorted(pgp_keys.fingerprint(n) for n in signers)
    peers = [(name, "pub", "active") for name in signers]
    for google_key in ("google-a", "google-b"):
        opened = native_envelope([(google_key, "sec", "active")], peers).open(sealed.body)
        assert opened.decrypted_by == (google_key,)
        assert opened.verified_by == tuple(signers)
    for name in ("partner-pw", "partner-pw2"):
        back = gpg_peer.seal(PLAINTEXT, ["google-a"], [name])
        opened = native_envelope([(name, "sec", "active")],
                                 [("google-a", "pub", "active")]).open(back)
        assert (opened.plaintext, opened.decrypted_by) == (PLAINTEXT, (name,))


def test_signatures_by_a_signing_subkey_match_the_primary_fingerprint(
    native_envelope: MakeNative, pgp_keys: PgpKeys, gpg_peer: GpgPeer
) -> None:
    google = native_envelope([("google-sub", "sec", "active")], [("partner-a", "pub", "active")])
    partner = native_envelope([("partner-a", "sec", "active")], [("google-sub", "pub", "active")])
    (key,) = partner.peer.keys
    assert key.fingerprint == pgp_keys.fingerprint("google-sub") and key.can_sign
    ours = google.seal(PLAINTEXT).body
    validsig = next(s for s in gpg_peer.open_details(ours).status if s[0] == "VALIDSIG")
    assert validsig[10] == key.fingerprint != validsig[1]  # made by the subkey
    for body in (ours, gpg_peer.seal(PLAINTEXT, ["google-sub"], ["partner-a"])):
        assert partner.open(body).verified_by == ("google-sub",)


def test_a_signing_subkey_without_its_back_signature_signs_nothing(
    native_envelope: MakeNative, pgp_keys: PgpKeys, craft: Craft, runtime_dir: Path
) -> None:
    """Without the embedded 0x19 signature, anyone could claim our signing subkey."""
    packets = openpgp._key_packets(pgp_keys.pub("google-sub").read_bytes())
    stripped = []
    for packet in packets:
        sig = openpgp._parse_sig(packet.body) if packet.tag == 2 else None
        if sig is not None and sig.type == 0x18 and sig.first(32, hashed_only=False):
            unhashed = b"".join(openpgp._sub(s.type, s.data) for s in sig.unhashed
                                if s.type != 32)
            body = (sig.hashed_part + len(unhashed).to_bytes(2, "big") + unhashed + sig.left16
                    + openpgp._mpi(sig.value))
            stripped.append(openpgp._packet(2, body))
        else:
            stripped.append(openpgp._packet(packet.tag, packet.body))
    path = runtime_dir / "no-backsig.gpg"
    path.write_bytes(b"".join(stripped))
    config = pgp_keys.keyset_config("peer", [("google-sub", "pub", "active")])
    config = dataclasses.replace(config, keys=(dataclasses.replace(config.keys[0], file=path),))
    (key,) = load_native_keyset(config).keys
    assert not key.can_sign and key.can_encrypt
    partner = native_envelope([("partner-a", "sec", "active")],
                              Keyset("peer", "pgp", (key,)))
    body = b64url(craft.encrypt(craft.signed(PLAINTEXT, ["google-sub"])))
    with pytest.raises(SignatureError):
        partner.open(body)


def test_a_subkey_with_a_broken_binding_is_not_part_of_the_key(
    pgp_keys: PgpKeys, runtime_dir: Path
) -> None:
    packets = openpgp._key_packets(pgp_keys.pub("google-a").read_bytes())
    last_sig = max(i for i, p in enumerate(packets) if p.tag == 2)  # the subkey's binding
    out = [openpgp._packet(p.tag, p.body[:-3] + bytes([p.body[-3] ^ 1]) + p.body[-2:])
           if i == last_sig else openpgp._packet(p.tag, p.body) for i, p in enumerate(packets)]
    path = runtime_dir / "bad-binding.gpg"
    path.write_bytes(b"".join(out))
    config = pgp_keys.keyset_config("peer", [("google-a", "pub", "active")])
    config = dataclasses.replace(config, keys=(dataclasses.replace(config.keys[0], file=path),))
    (native,) = load_native_keyset(config).keys
    (reference,) = load_pgp_keyset(config, runtime_dir / "scan").keys
    assert _facts(native) == _facts(reference)
    assert native.can_sign and not native.can_encrypt
    assert len(native.material.parts) == 1


def test_an_expired_own_key_still_decrypts(
    native_envelope: MakeNative, pgp_keys: PgpKeys, gpg_peer: GpgPeer
) -> None:
    google = native_envelope(
        [("google-a", "sec", "active"), ("google-expired", "sec", "read-only")],
        [("partner-a", "pub", "active")],
    )
    late = gpg_peer.seal(PLAINTEXT, ["partner-a"], ["google-expired"],
                         at=pgp_keys.expired_key_valid_at)
    opened = google.open(late)
    assert (opened.decrypted_by, opened.verified_by) == (("google-expired",), ("partner-a",))
    assert google.seal(PLAINTEXT).signed_by == ("google-a",)


# The rotation matrix (Tink's), as tests/test_pgp.py runs it for the gnupg engine.
STAGES: dict[str, list[tuple[str, str]]] = {
    "old": [("old", "active")],
    "old+new": [("old", "active"), ("new", "read-only")],
    "new-primary": [("new", "active"), ("old", "read-only")],
    "old-disabled": [("new", "active"), ("old", "disabled")],
}
ACTIVE = {stage: {k for k, s in keys if s == "active"} for stage, keys in STAGES.items()}
ENABLED = {stage: {k for k, s in keys if s != "disabled"} for stage, keys in STAGES.items()}


def _stage(stage: str, prefix: str, kind: str) -> KeyEntries:
    return [(f"{prefix}-{'a' if key == 'old' else 'b'}", kind, state)
            for key, state in STAGES[stage]]


@pytest.mark.parametrize("opener", list(STAGES))
@pytest.mark.parametrize("sealer", list(STAGES))
def test_rotation_of_own_keys(native_envelope: MakeNative, sealer: str, opener: str) -> None:
    """Google encrypts to the partner keys active in `sealer`; the partner opens with `opener`."""
    google = native_envelope([("google-a", "sec", "active")], _stage(sealer, "partner", "pub"))
    partner = native_envelope(_stage(opener, "partner", "sec"), [("google-a", "pub", "active")])
    body = google.seal(PLAINTEXT).body
    if ACTIVE[sealer] & ENABLED[opener]:
        opened = partner.open(body)
        assert opened.plaintext == PLAINTEXT
        (used,) = ACTIVE[sealer] & ENABLED[opener]
        assert opened.decrypted_by == (f"partner-{'a' if used == 'old' else 'b'}",)
    else:
        with pytest.raises(UnknownKeyError):
            partner.open(body)


@pytest.mark.parametrize("verifier", list(STAGES))
@pytest.mark.parametrize("signer", list(STAGES))
def test_rotation_of_peer_keys(native_envelope: MakeNative, signer: str, verifier: str) -> None:
    """Google signs with its keys active in `signer`; the partner verifies with `verifier`."""
    google = native_envelope(_stage(signer, "google", "sec"), [("partner-a", "pub", "active")])
    partner = native_envelope([("partner-a", "sec", "active")], _stage(verifier, "google", "pub"))
    body = google.seal(PLAINTEXT).body
    if ACTIVE[signer] & ENABLED[verifier]:
        (used,) = ACTIVE[signer] & ENABLED[verifier]
        assert partner.open(body).verified_by == (f"google-{'a' if used == 'old' else 'b'}",)
    else:
        with pytest.raises(SignatureError):
            partner.open(body)


# Nothing to seal with, limits, threads.


def test_nothing_active_to_seal_with(
    native_envelope: MakeNative, native_keyset: Callable[..., Keyset]
) -> None:
    read_only = native_envelope([("partner-a", "sec", "read-only")],
                                [("google-a", "pub", "active")])
    with pytest.raises(NoKeyError):
        read_only.seal(PLAINTEXT)
    no_peer = native_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "read-only")])
    with pytest.raises(NoKeyError):
        no_peer.seal(PLAINTEXT)
    later = datetime.now(UTC) + timedelta(days=400)
    own = native_keyset("own", [("partner-a", "sec", "active")], now=lambda: later)
    with pytest.raises(NoKeyError) as caught:
        native_envelope(own, [("google-a", "pub", "active")]).seal(PLAINTEXT)
    assert caught.value.reason == "no_key"


def test_size_limits(native_envelope: MakeNative) -> None:
    partner = native_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")],
                              limit=1000)
    google = native_envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")],
                             limit=999)
    with pytest.raises(TooLargeError):
        partner.seal(b"x" * 1001)
    body = partner.seal(b"x" * 1000).body
    with pytest.raises(TooLargeError):
        google.open(body)
    with pytest.raises(TooLargeError):
        google.open(b"A" * (google.max_body_bytes + 1))


def test_seal_and_open_from_many_threads(native_envelope: MakeNative) -> None:
    partner = native_envelope([("partner-a", "sec", "active"), ("partner-pw", "sec", "active")],
                              [("google-a", "pub", "active")])
    google = native_envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")])
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                message = b'{"n": %d, "i": %d}' % (n, i)
                assert google.open(partner.seal(message).body).plaintext == message
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# The route option.


def test_the_route_chooses_its_engine(tmp_path: Path, pgp_keys: PgpKeys) -> None:
    base = textwrap.dedent(f"""\
        keysets:
          partner:
            type: pgp
            keys: [{{id: a, file: {pgp_keys.sec('partner-a')}}}]
          google:
            type: pgp
            keys: [{{id: g, file: {pgp_keys.pub('google-a')}}}]
        routes:
          - name: r
            direction: inbound
            listen: "127.0.0.1:0"
            upstream: {{url: "http://127.0.0.1:1"}}
            own_keys: partner
            peer_keys: google
        """)
    path = tmp_path / "config.yaml"
    for block, engine in (("", "gnupg"), ("    pgp: {engine: native}\n", "native"),
                          ("    pgp: {engine: gnupg, armor: true}\n", "gnupg")):
        path.write_text(base + block)
        assert load_config(path).routes[0].pgp.engine == engine
    path.write_text(base + "    pgp: {engine: sequoia}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == "routes[0].pgp.engine: 'sequoia' is not one of: gnupg, native"

