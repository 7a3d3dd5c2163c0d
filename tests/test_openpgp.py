"""Native PGP engine: loading keys (the same facts as the gnupg loader), what only it checks in
keys, the route option; and the helpers the other test_openpgp modules share. What both engines
must do alike (sealing, opening, rotation, limits) runs for both in tests/test_pgp.py."""

from __future__ import annotations

import bz2
import dataclasses
import os
import subprocess
import textwrap
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway import openpgp
from gateway.config import PgpOptions, load_config
from gateway.errors import ConfigError, SignatureError
from gateway.keys import Key, Keyset
from gateway.openpgp import NativePgpEnvelope, load_native_keyset
from gateway.pgp import load_pgp_keyset
from tests.pgp_fixtures import (  # noqa: F401 (native_* re-exported: test_openpgp_differential)
    PGP_KEY_NAMES,
    GpgPeer,
    PgpKeys,
    b64url,
    native_envelope,
    native_keyset,
)

PLAINTEXT = b'{"requestHeader": {"requestId": "r-1"}, "clientMessage": "h\xc3\xa9llo"}'
MakeNative = Callable[..., NativePgpEnvelope]
INTEROP = Path(__file__).parent / "interop"


# Shared fixtures (imported by the other test_openpgp modules).


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
    pgp_keyset: Callable[..., Keyset], native_keyset: Callable[..., Keyset]  # noqa: F811
) -> None:
    with pytest.raises(ConfigError, match="load_native_keyset"):
        NativePgpEnvelope(pgp_keyset("own", [("partner-a", "sec", "active")]),
                          native_keyset("peer", [("google-a", "pub", "active")]), PgpOptions(),
                          max_plaintext_bytes=1000)


def test_a_signing_subkey_without_its_back_signature_signs_nothing(
    native_envelope: MakeNative, pgp_keys: PgpKeys, craft: Craft, runtime_dir: Path  # noqa: F811
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

