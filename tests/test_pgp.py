"""PGP keys and envelope: loading, sealing, opening, rotation, many keys and threads, run for
both engines (gnupg and native) where they must behave alike; then the gnupg engine's own
lifecycle (its home, gpg and gpg-agent processes, pipes)."""

from __future__ import annotations

import dataclasses
import math
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import openpgp, pgp
from gateway.config import KeyState, PgpOptions
from gateway.envelope import CONTENT_TYPES
from gateway.errors import (
    ConfigError,
    EngineError,
    MalformedError,
    NoKeyError,
    SignatureError,
    TooLargeError,
    UnknownKeyError,
)
from gateway.keys import Keyset
from gateway.pgp import PgpEnvelope, load_pgp_keyset
from tests.pgp_fixtures import (
    GpgPeer,
    KeyEntries,
    PgpEngine,
    PgpKeys,
    gpg_processes_under,
    unb64url,
)
from tests.work_count import module_with

PLAINTEXT = b'{"requestHeader": {"requestId": "r-1"}, "clientMessage": "h\xc3\xa9llo"}'
MakeEnvelope = Callable[..., PgpEnvelope]


# Loading keys.


def test_load_reads_what_the_gateway_reports(pgp_keys: PgpKeys, runtime_dir: Path) -> None:
    keyset = load_pgp_keyset(pgp_keys.keyset_config("partner", [
        ("partner-a", "sec", "active"),
        ("google-a", "pub", "read-only"),
        ("partner-3k", "sec", "disabled"),
    ]), runtime_dir / "scan")
    own, peer, big = keyset.keys
    assert (keyset.name, keyset.type) == ("partner", "pgp")
    assert own.id == "partner-a" and own.state is KeyState.ACTIVE
    assert own.fingerprint == pgp_keys.fingerprint("partner-a")
    assert own.private and own.can_sign and own.can_encrypt
    assert own.algorithm == "RSA-2048" and own.place == "keysets.partner.keys[0]"
    assert own.expires is not None
    assert timedelta(days=350) < own.expires - datetime.now(UTC) < timedelta(days=360)
    assert peer.fingerprint == pgp_keys.fingerprint("google-a") and not peer.private
    assert peer.can_sign and peer.can_encrypt and peer.state is KeyState.READ_ONLY
    assert big.algorithm == "RSA-3072" and big.state is KeyState.DISABLED
    assert "material" not in repr(own) and "BEGIN PGP" not in repr(own)


def test_load_leaves_no_home_and_no_agent(pgp_keys: PgpKeys, runtime_dir: Path) -> None:
    scan = runtime_dir / "scan"
    load_pgp_keyset(pgp_keys.keyset_config("p", [("partner-pw", "sec", "active")]), scan)
    assert list(scan.iterdir()) == []
    assert gpg_processes_under(scan) == []


def test_not_after_and_the_keys_own_expiry(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, runtime_dir: Path
) -> None:
    config = pgp_keys.keyset_config("p", [("partner-a", "pub", "active")] * 2)
    soon = datetime.now(UTC) + timedelta(days=30)
    late = datetime.now(UTC) + timedelta(days=3000)
    keys = (dataclasses.replace(config.keys[0], id="soon", not_after=soon),
            dataclasses.replace(config.keys[1], id="late", not_after=late))
    first, second = pgp_engine.load(dataclasses.replace(config, keys=keys), runtime_dir).keys
    assert first.expires == soon
    assert second.expires is not None and second.expires < soon + timedelta(days=340)


def test_an_expired_key_loads_but_never_verifies(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, runtime_dir: Path
) -> None:
    keyset = pgp_engine.load(
        pgp_keys.keyset_config("g", [("google-expired", "pub", "active")]), runtime_dir
    )
    (key,) = keyset.keys
    assert key.expires is not None and key.expires < datetime.now(UTC)
    assert keyset.verifiers() == () and keyset.recipients() == ()


def test_binary_exports_load(pgp_keys: PgpKeys, runtime_dir: Path) -> None:
    config = pgp_keys.keyset_config("p", [("partner-pw", "sec", "active")])
    binary = runtime_dir / "partner-pw.sec.gpg"
    binary.write_bytes(subprocess.run(["gpg", "--dearmor"], input=pgp_keys.sec("partner-pw")
                                      .read_bytes(), capture_output=True, check=True).stdout)
    config = dataclasses.replace(config, keys=(dataclasses.replace(config.keys[0], file=binary),))
    (key,) = load_pgp_keyset(config, runtime_dir / "scan").keys
    assert key.private and key.fingerprint == pgp_keys.fingerprint("partner-pw")


@pytest.fixture(scope="module")
def odd_keys(session_tmp: Path) -> dict[str, Path]:
    """Keys the gateway must refuse: RSA-1024 and Ed25519 (made by gpg), and a plain file."""
    home = session_tmp / "odd"
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


# A key without a valid self-signature (none, a broken one, or of version 5) is no key to gpg;
# the native loader names what is wrong with it.
@pytest.mark.parametrize(("case", "gnupg", "native"), [
    ("text", "holds no OpenPGP key", "holds no OpenPGP key"),
    ("rsa1024", "RSA-1024 part; only RSA keys of at least 2048 bits",
     "RSA-1024 part; only RSA keys of at least 2048 bits"),
    ("ed25519", "EdDSA-255 part; only RSA keys", "EdDSA-255 part; only RSA keys"),
    ("two", "holds 2 primary keys", "holds 2 primary keys"),
    ("missing", "cannot read", "cannot read"),
    ("unsigned", "holds no OpenPGP key", "no valid self-signature"),
    ("bad-self-sig", "holds no OpenPGP key", "no valid self-signature"),
    ("v5", "holds no OpenPGP key", "version 5 keys are outside the profile"),
])
def test_unusable_key_files_are_refused(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, odd_keys: dict[str, Path], runtime_dir: Path,
    case: str, gnupg: str, native: str,
) -> None:
    two = runtime_dir / "two.asc"
    two.write_bytes(pgp_keys.pub("google-a").read_bytes() + pgp_keys.pub("google-b").read_bytes())
    packets = openpgp._key_packets(pgp_keys.pub("google-b").read_bytes())
    unsigned = runtime_dir / "unsigned.gpg"
    unsigned.write_bytes(b"".join(openpgp._packet(p.tag, p.body) for p in packets
                                  if p.tag in (6, 13)))
    bad_self_sig = runtime_dir / "bad.gpg"
    damaged = [openpgp._packet(p.tag, p.body[:-3] + bytes([p.body[-3] ^ 1]) + p.body[-2:])
               if p.tag == 2 else openpgp._packet(p.tag, p.body) for p in packets]
    bad_self_sig.write_bytes(b"".join(damaged))
    v5 = runtime_dir / "v5.gpg"
    v5.write_bytes(openpgp._packet(6, b"\x05" + packets[0].body[1:]))
    files = {**odd_keys, "two": two, "missing": runtime_dir / "nope.asc", "unsigned": unsigned,
             "bad-self-sig": bad_self_sig, "v5": v5}
    config = pgp_keys.keyset_config("peer", [("google-a", "pub", "active"),
                                             ("google-b", "pub", "disabled")])
    bad = dataclasses.replace(config.keys[1], file=files[case])
    with pytest.raises(ConfigError) as caught:
        pgp_engine.load(dataclasses.replace(config, keys=(config.keys[0], bad)), runtime_dir)
    assert caught.value.place == "keysets.peer.keys[1].file"
    assert pgp_engine.pick(gnupg=gnupg, native=native) in caught.value.message


@pytest.mark.parametrize(("name", "change", "place", "message"), [
    ("partner-pw", {"passphrase": None, "passphrase_file": None}, "keysets.own.keys[0]",
     "passphrase-protected: give passphrase_file or passphrase_env"),
    ("partner-pw", {"passphrase": "wrong"}, "keysets.own.keys[0].passphrase_file",
     "the passphrase does not open the secret key"),
    ("partner-pw", {"passphrase": "pässwört zwei", "passphrase_file": None,
                    "passphrase_env": "PW"},
     "keysets.own.keys[0].passphrase_env", "the passphrase does not open the secret key"),
    ("partner-pw2", {"passphrase": "correct horse battery", "passphrase_file": None,
                     "passphrase_env": "PW"},
     "keysets.own.keys[0].passphrase_env", "the passphrase does not open the secret key"),
    ("partner-pw2", {"passphrase": "passwort zwei"}, "keysets.own.keys[0].passphrase_file",
     "the passphrase does not open the secret key"),
])
def test_passphrases_must_open_their_keys(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, runtime_dir: Path, name: str,
    change: dict[str, object], place: str, message: str,
) -> None:
    config = pgp_keys.keyset_config("own", [(name, "sec", "disabled")])
    key = dataclasses.replace(config.keys[0], **change)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        pgp_engine.load(dataclasses.replace(config, keys=(key,)), runtime_dir)
    assert caught.value.place == place and message in caught.value.message
    for secret in ("wrong", "horse", "zwei", "passwort"):
        assert secret not in str(caught.value)


# Sealing and opening.


def test_seal_then_open(pgp_engine: PgpEngine) -> None:
    partner = pgp_engine.envelope([("partner-a", "sec", "active")],
                                  [("google-a", "pub", "active")])
    google = pgp_engine.envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")])
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
    # Closed, the native engine still seals: it holds nothing. The gnupg engine's home is gone
    # (test_close_stops_the_agent_and_removes_the_home).
    if pgp_engine.name == "native":
        assert google.open(partner.seal(PLAINTEXT).body).plaintext == PLAINTEXT


@pytest.mark.parametrize("options", [
    PgpOptions(armor=True, base64_padding=True, compression="zlib", digest="SHA512"),
    PgpOptions(compression="zip", digest="SHA256", cipher="AES128"),
    PgpOptions(cipher="AES192"),
])
def test_route_options_shape_the_message(
    pgp_engine: PgpEngine, gpg_peer: GpgPeer, options: PgpOptions
) -> None:
    partner = pgp_engine.envelope([("partner-a", "sec", "active")],
                                  [("google-a", "pub", "active")], options)
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
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, gpg_peer: GpgPeer
) -> None:
    signers = ["partner-a", "partner-pw", "partner-pw2"]
    partner = pgp_engine.envelope(
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
        google = pgp_engine.envelope([(google_key, "sec", "active")], peers)
        opened = google.open(sealed.body)
        assert opened.decrypted_by == (google_key,)
        assert opened.verified_by == tuple(signers)
    # Google answers to both protected keys: each decrypts with its own passphrase.
    for name in ("partner-pw", "partner-pw2"):
        back = gpg_peer.seal(PLAINTEXT, ["google-a"], [name])
        opened = pgp_engine.envelope([(name, "sec", "active")],
                                     [("google-a", "pub", "active")]).open(back)
        assert (opened.plaintext, opened.decrypted_by) == (PLAINTEXT, (name,))


def test_signatures_by_a_signing_subkey_match_the_primary_fingerprint(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, gpg_peer: GpgPeer
) -> None:
    google = pgp_engine.envelope([("google-sub", "sec", "active")],
                                 [("partner-a", "pub", "active")])
    partner = pgp_engine.envelope([("partner-a", "sec", "active")],
                                  [("google-sub", "pub", "active")])
    (key,) = partner.peer.keys
    assert key.fingerprint == pgp_keys.fingerprint("google-sub") and key.can_sign
    ours = google.seal(PLAINTEXT).body
    validsig = next(s for s in gpg_peer.open_details(ours).status if s[0] == "VALIDSIG")
    assert validsig[10] == key.fingerprint != validsig[1]  # made by the subkey
    for body in (ours, gpg_peer.seal(PLAINTEXT, ["google-sub"], ["partner-a"])):
        assert partner.open(body).verified_by == ("google-sub",)


def test_an_expired_own_key_still_decrypts(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, gpg_peer: GpgPeer
) -> None:
    google = pgp_engine.envelope(
        [("google-a", "sec", "active"), ("google-expired", "sec", "read-only")],
        [("partner-a", "pub", "active")],
    )
    late = gpg_peer.seal(PLAINTEXT, ["partner-a"], ["google-expired"],
                         at=pgp_keys.expired_key_valid_at)
    opened = google.open(late)
    assert (opened.decrypted_by, opened.verified_by) == (("google-expired",), ("partner-a",))
    assert google.seal(PLAINTEXT).signed_by == ("google-a",)


# The rotation matrix (Tink's): the partner's keyset in four stages of a rotation from
# "old" to "new"; messages made under each stage are opened under each.
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
def test_rotation_of_own_keys(pgp_engine: PgpEngine, sealer: str, opener: str) -> None:
    """Google encrypts to the partner keys active in `sealer`; the partner opens with `opener`."""
    google = pgp_engine.envelope([("google-a", "sec", "active")], _stage(sealer, "partner", "pub"))
    partner = pgp_engine.envelope(_stage(opener, "partner", "sec"), [("google-a", "pub", "active")])
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
def test_rotation_of_peer_keys(pgp_engine: PgpEngine, signer: str, verifier: str) -> None:
    """Google signs with its keys active in `signer`; the partner verifies with `verifier`."""
    google = pgp_engine.envelope(_stage(signer, "google", "sec"), [("partner-a", "pub", "active")])
    partner = pgp_engine.envelope([("partner-a", "sec", "active")],
                                  _stage(verifier, "google", "pub"))
    body = google.seal(PLAINTEXT).body
    if ACTIVE[signer] & ENABLED[verifier]:
        (used,) = ACTIVE[signer] & ENABLED[verifier]
        assert partner.open(body).verified_by == (f"google-{'a' if used == 'old' else 'b'}",)
    else:
        with pytest.raises(SignatureError):
            partner.open(body)


# Nothing to seal with, limits, threads.


def test_nothing_active_to_seal_with(pgp_engine: PgpEngine) -> None:
    read_only = pgp_engine.envelope([("partner-a", "sec", "read-only")],
                                    [("google-a", "pub", "active")])
    with pytest.raises(NoKeyError):
        read_only.seal(PLAINTEXT)
    no_peer = pgp_engine.envelope([("partner-a", "sec", "active")],
                                  [("google-a", "pub", "read-only")])
    with pytest.raises(NoKeyError):
        no_peer.seal(PLAINTEXT)
    # Keys that expire while the gateway runs stop sealing at once.
    later = datetime.now(UTC) + timedelta(days=400)
    own = pgp_engine.keyset("own", [("partner-a", "sec", "active")], now=lambda: later)
    expiring = pgp_engine.envelope(own, [("google-a", "pub", "active")])
    with pytest.raises(NoKeyError) as caught:
        expiring.seal(PLAINTEXT)
    assert caught.value.reason == "no_key"


def test_size_limits(pgp_engine: PgpEngine) -> None:
    partner = pgp_engine.envelope([("partner-a", "sec", "active")],
                                  [("google-a", "pub", "active")], limit=1000)
    google = pgp_engine.envelope([("google-a", "sec", "active")],
                                 [("partner-a", "pub", "active")], limit=999)
    with pytest.raises(TooLargeError):
        partner.seal(b"x" * 1001)
    body = partner.seal(b"x" * 1000).body
    with pytest.raises(TooLargeError):
        google.open(body)
    with pytest.raises(TooLargeError):
        google.open(b"A" * (google.max_body_bytes + 1))


def test_seal_and_open_from_many_threads(pgp_engine: PgpEngine) -> None:
    partner = pgp_engine.envelope([("partner-a", "sec", "active"), ("partner-pw", "sec", "active")],
                                  [("google-a", "pub", "active")])
    google = pgp_engine.envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")])
    # Fewer rounds for gnupg: each one is two gpg processes.
    threads_n, rounds = pgp_engine.pick(gnupg=(6, 3), native=(8, 5))
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(rounds):
                message = b'{"n": %d, "i": %d}' % (n, i)
                assert google.open(partner.seal(message).body).plaintext == message
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# The gnupg engine's lifecycle and concurrency.


def test_close_stops_the_agent_and_removes_the_home(
    pgp_keyset: Callable[..., Keyset], runtime_dir: Path, gpg_peer: GpgPeer
) -> None:
    home = runtime_dir / "h"
    envelope = PgpEnvelope(
        pgp_keyset("own", [("partner-pw", "sec", "active")]),
        pgp_keyset("peer", [("google-a", "pub", "active")]),
        PgpOptions(), home, max_plaintext_bytes=1000,
    )
    assert home.stat().st_mode & 0o777 == 0o700
    assert gpg_processes_under(home, wait_s=0)
    body = gpg_peer.seal(PLAINTEXT, ["google-a"], ["partner-pw"])
    envelope.seal(PLAINTEXT)
    assert envelope.open(body).plaintext == PLAINTEXT
    envelope.close()
    envelope.close()
    assert not home.exists()
    assert gpg_processes_under(home) == []
    # Used after close (never by the gateway, which closes an envelope once no request holds
    # it): an engine error (500), not a verdict on the message or the keys.
    for use in (lambda: envelope.seal(PLAINTEXT), lambda: envelope.open(body)):
        with pytest.raises(EngineError, match="closed"):
            use()
    assert not home.exists()


def test_what_gpg_writes_to_stderr_is_never_read_as_status(
    pgp_keyset: Callable[..., Keyset], runtime_dir: Path, gpg_peer: GpgPeer,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Status lines come on their own pipe, never mixed with gpg's log on stderr, whose text
    quotes what messages and keys hold (user ids, file names: the SigSpoof class of forgeries,
    CVE-2018-12020). A gpg that prints forged status lines on stderr changes nothing."""
    shim = tmp_path / "bin"
    shim.mkdir()
    forged = "\n".join([
        "[GNUPG:] SIG_CREATED S 1 10 00 1 " + "F" * 40,  # one signature more than asked
        "[GNUPG:] NEWSIG", "[GNUPG:] GOODSIG 0000000000000000 forged",
    ] + ["[GNUPG:] NEWSIG"] * 40)  # past MAX_SIGNATURES: a flood if read
    real = subprocess.run(["which", "gpg"], capture_output=True, text=True).stdout.strip()
    (shim / "gpg").write_text(f"#!/bin/sh\nprintf '%s\\n' '{forged}' >&2\nexec {real} \"$@\"\n")
    (shim / "gpg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    envelope = PgpEnvelope(
        pgp_keyset("own", [("partner-a", "sec", "active")]),
        pgp_keyset("peer", [("google-a", "pub", "active")]),
        PgpOptions(), runtime_dir / "h", max_plaintext_bytes=1000,
    )
    try:
        assert envelope.seal(PLAINTEXT).signed_by == ("partner-a",)
        body = gpg_peer.seal(PLAINTEXT, ["google-a"], ["partner-a"])
        assert envelope.open(body).verified_by == ("google-a",)
        unsigned = gpg_peer.seal(PLAINTEXT, [], ["partner-a"])
        with pytest.raises(SignatureError):
            envelope.open(unsigned)
    finally:
        envelope.close()


def test_a_failed_seal_says_what_gpg_reported(
    pgp_envelope: MakeEnvelope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal gpg could not make names gpg's exit status and failure codes (a flake of this
    kind once showed only "gpg could not sign and encrypt"), never its stderr."""
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    failed = pgp._Status.__new__(pgp._Status)
    failed.returncode, failed.stderr, failed.data = 2, "gpg: signing failed: SECRET-USERID", b""
    failed.lines = [("KEY_CONSIDERED", ["F" * 40, "0"]), ("ERROR", ["sign_encrypt", "67108949"]),
                    ("MISSING_PASSPHRASE", []), ("FAILURE", ["sign", "67108949", "x"]),
                    ("MISSING_PASSPHRASE", [])]
    monkeypatch.setattr(partner, "_run", lambda args, data, **limits: failed)
    with pytest.raises(EngineError) as caught:
        partner.seal(PLAINTEXT)
    assert str(caught.value) == (
        "gpg could not sign and encrypt (exit status 2: ERROR sign_encrypt 67108949, "
        "MISSING_PASSPHRASE, FAILURE sign 67108949)")


def test_protected_keys_survive_an_agent_restart(
    pgp_envelope: MakeEnvelope, gpg_peer: GpgPeer
) -> None:
    partner = pgp_envelope([("partner-pw", "sec", "active"), ("partner-pw2", "sec", "active")],
                           [("google-a", "pub", "active")])
    message = gpg_peer.seal(PLAINTEXT, ["google-a"], ["partner-pw2"])

    def kill_agent() -> None:
        subprocess.run(["gpgconf", "--homedir", str(partner.home), "--kill", "gpg-agent"],
                       check=True, capture_output=True)
        assert gpg_processes_under(partner.home) == []

    kill_agent()
    assert partner.seal(PLAINTEXT).signed_by == ("partner-pw", "partner-pw2")
    kill_agent()
    assert partner.open(message).decrypted_by == ("partner-pw2",)


def test_an_existing_home_is_left_alone(
    pgp_keyset: Callable[..., Keyset], runtime_dir: Path
) -> None:
    home = runtime_dir / "taken"
    home.mkdir()
    (home / "keep").write_text("someone else's")
    with pytest.raises(EngineError):
        PgpEnvelope(pgp_keyset("own", [("partner-a", "sec", "active")]),
                    pgp_keyset("peer", [("google-a", "pub", "active")]),
                    PgpOptions(), home, max_plaintext_bytes=1000)
    assert (home / "keep").read_text() == "someone else's"


def test_the_home_holds_only_enabled_keys(
    pgp_envelope: MakeEnvelope, pgp_keys: PgpKeys, gpg_peer: GpgPeer
) -> None:
    envelope = pgp_envelope(
        [("partner-a", "sec", "active"), ("partner-b", "sec", "disabled")],
        [("google-a", "pub", "active"), ("google-b", "pub", "disabled")],
    )
    listing = subprocess.run(
        ["gpg", "--homedir", str(envelope.home), "--with-colons", "--list-keys"],
        capture_output=True, check=True, text=True).stdout
    assert pgp_keys.fingerprint("partner-a") in listing
    assert pgp_keys.fingerprint("google-a") in listing
    assert pgp_keys.fingerprint("partner-b") not in listing
    assert pgp_keys.fingerprint("google-b") not in listing


def test_a_gpg_that_fails_before_reading_is_an_engine_error(
    pgp_envelope: MakeEnvelope, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gpg can fail at start-up with no status line at all (bench/soak.py once caught it exiting
    # with "can't disable core dumps"): that is the engine's failure (500), never a malformed
    # message (400 to Google for a valid request).
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    google = pgp_envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")])
    body = google.seal(PLAINTEXT).body
    real_run = partner._gpg.run

    def failing_at_start(args: list[str], data: bytes = b"", **options: Any) -> Any:
        return real_run(["--no-such-option", *args], data, **options)

    monkeypatch.setattr(partner._gpg, "run", failing_at_start)
    with pytest.raises(EngineError, match="before reading the message"):
        partner.open(body)
    monkeypatch.undo()
    assert partner.open(body).plaintext == PLAINTEXT


def test_a_gpg_past_its_deadline_is_killed(pgp_envelope: MakeEnvelope) -> None:
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    partner._gpg.timeout_s = 0.0005
    with pytest.raises(EngineError, match="did not finish"):
        partner.seal(b"x" * 100_000)
    assert [p for p in gpg_processes_under(partner.home, wait_s=0) if "gpg-agent" not in p] == []
    partner._gpg.timeout_s = 10.0
    assert partner.seal(PLAINTEXT).signed_by == ("partner-a",)


# gpg's pipes: one thread writes stdin and reads stdout, stderr and the status pipe
# (pgp._exchange).


def test_status_lines_split_across_reads_are_whole(pgp_envelope: MakeEnvelope) -> None:
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    status = pgp._Status(partner._gpg)
    text = (b"[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 0123456789ABCDEF A B\n"
            b"[GNUPG:] VALIDSIG AB CD")
    messages = b"gpg: some message\n[GNUPG:] NEWSIG\n"
    for i in range(0, len(text), 5):
        status.feed_status(text[i:i + 5])
        status.feed_stderr(messages[i:i + 5])
    # The VALIDSIG line has no end yet; the message stream's look-alike is only text.
    assert status.lines == [("NEWSIG", []), ("GOODSIG", ["0123456789ABCDEF", "A", "B"])]
    status.close_streams()
    assert status.lines == [("NEWSIG", []), ("GOODSIG", ["0123456789ABCDEF", "A", "B"]),
                            ("VALIDSIG", ["AB", "CD"])]
    assert status.stderr == messages.decode()


def test_bodies_larger_than_a_pipe_flow_both_ways(pgp_envelope: MakeEnvelope) -> None:
    # 3 MiB in and out: gpg writes its output while we still write its input (one thread must
    # not wait on one pipe while gpg waits on the other).
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")],
                           options=PgpOptions(compression="none"), limit=4 << 20)
    google = pgp_envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")],
                          limit=4 << 20)
    plaintext = bytes(range(256)) * (3 << 12)
    assert google.open(partner.seal(plaintext).body).plaintext == plaintext


def test_a_gpg_that_says_too_much_is_stopped(
    pgp_envelope: MakeEnvelope, monkeypatch: pytest.MonkeyPatch
) -> None:
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    google = pgp_envelope([("google-a", "sec", "active")], [("partner-a", "pub", "active")])
    body = partner.seal(PLAINTEXT).body
    monkeypatch.setattr(pgp, "MAX_STDERR_BYTES", 200)  # an honest open says ~1 kB
    with pytest.raises(MalformedError, match="more than 200 bytes of messages"):
        google.open(body)
    assert [p for p in gpg_processes_under(google.home, wait_s=0) if "gpg-agent" not in p] == []
    monkeypatch.undo()
    assert google.open(body).plaintext == PLAINTEXT


def waits_of(monkeypatch: pytest.MonkeyPatch, process: subprocess.Popen[bytes]) -> list[float]:
    """The timeout, in seconds, of every wait pgp blocks in from now on: poll() on gpg's pipes
    or its pidfd, `process`.wait() where the kernel has no pidfd (inf: a wait without end)."""
    waits: list[float] = []

    class Poll:
        def __init__(self) -> None:
            self._poll = select.poll()
            self.register, self.unregister = self._poll.register, self._poll.unregister

        def poll(self, timeout_ms: float | None = None) -> list[tuple[int, int]]:
            waits.append(math.inf if timeout_ms is None or timeout_ms < 0 else timeout_ms / 1000)
            return self._poll.poll(timeout_ms)

    monkeypatch.setattr(pgp, "select", module_with(select, poll=Poll))
    wait = process.wait

    def timed_wait(timeout: float | None = None) -> int:
        waits.append(math.inf if timeout is None else timeout)
        return wait(timeout)

    monkeypatch.setattr(process, "wait", timed_wait)
    return waits


@pytest.mark.parametrize("pidfd", [True, False])
def test_a_gpg_that_closes_its_pipes_but_lingers_is_killed_at_the_deadline(
    pgp_envelope: MakeEnvelope, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    if not pidfd:  # a kernel without pidfd_open: Popen's own wait with a timeout
        monkeypatch.delattr(pgp.os, "pidfd_open")
    status = pgp._Status(partner._gpg)
    status_r, status_w = os.pipe()
    stands_in = subprocess.Popen(
        ["bash", "-c", f"echo '[GNUPG:] NEWSIG' >&{status_w}; exec >&- 2>&- {status_w}>&-; "
         "sleep 30"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(status_w,))
    os.close(status_w)
    try:
        with monkeypatch.context() as spying:
            waits = waits_of(spying, stands_in)
            assert not pgp._exchange(stands_in, b"input", status, status_r,
                                     time.monotonic() + 0.5)
        # Every wait ended by the deadline, half a second away: none waited for the process
        # to end (the 30 s of its sleep), which was killed instead.
        assert waits and max(waits) <= 0.5, waits
        assert stands_in.wait() == -signal.SIGKILL
        assert status.lines == [("NEWSIG", [])]
    finally:
        pgp._reap(stands_in)
        os.close(status_r)
    assert partner.seal(PLAINTEXT).signed_by == ("partner-a",)  # and a real gpg exits in time


# -- the agent lost during a call -------------------------------------------------------------

# What gpg 2.2 said when its agent was killed during a call (a review helper's captures).
AGENT_LOST = {
    "open": [("ENC_TO", ["556C35ED0FB0F0D1", "1", "0"]),
             ("ERROR", ["pkdecrypt_failed", "33570815"]), ("BEGIN_DECRYPTION", []),
             ("DECRYPTION_FAILED", []), ("END_DECRYPTION", [])],
    "seal": [("INV_SGNR", ["0", "0123"]), ("FAILURE", ["sign-encrypt", "33587226"])],
}


class Said:
    """A gpg call's status lines, as _Status offers them to the envelope."""

    def __init__(self, lines: list[tuple[str, list[str]]]) -> None:
        self.lines = lines
        self.returncode = 2
        self.flooded = self.overflowed = False
        self.data = b""
        self.stderr = ""

    def has(self, *keywords: str) -> bool:
        return any(key in keywords for key, _ in self.lines)

    def values(self, keyword: str) -> list[list[str]]:
        return [value for key, value in self.lines if key == keyword]

    def diagnosis(self) -> str:
        return "exit 2"


@pytest.mark.parametrize("own", ["partner-a", "partner-pw"])  # partner-pw: a passphrase
@pytest.mark.parametrize("op", ["open", "seal"])
@pytest.mark.parametrize("times", [1, 2])
def test_an_agent_lost_during_a_call_is_retried_once_then_the_engines_failure(
    pgp_envelope: Callable[..., PgpEnvelope], gpg_peer: GpgPeer, op: str, times: int,
    own: str,
) -> None:
    """An agent that died mid-call made gpg fail the decryption or the signature: read as a
    verdict, a valid message got 400 (wrong key, decrypt) and a seal no_key. Once lost: one
    more call, which works; lost again: EngineError (500).

    A unit test of the envelope's reading of gpg's status lines and of its retry: the lost
    call's status lines are the ones gpg 2.2.40 printed when a review killed the agent during
    calls (a kill lands inside a call only by chance, so a real kill cannot be a reliable
    test); the agent is really killed each time, and the retried call is real gpg. A
    protected key's passphrase must then reach the new agent: presetting it used to fail,
    because nothing had started that agent yet."""
    envelope = pgp_envelope([(own, "sec", "active")], [("google-a", "pub", "active")])
    body = gpg_peer.seal(b'{"a": 1}', ["google-a"], [own])
    real = envelope._gpg.run
    calls = []

    def run(args: list[str], data: bytes, **limits: Any) -> Any:
        calls.append(args)
        if len(calls) <= times:
            subprocess.run(["gpgconf", "--homedir", str(envelope.home), "--kill", "gpg-agent"],
                           check=True, timeout=30)
            return Said(list(AGENT_LOST[op]))
        return real(args, data, **limits)

    envelope._gpg.run = run
    try:
        if times == 2:
            with pytest.raises(EngineError, match="gpg-agent failed"):
                envelope.open(body) if op == "open" else envelope.seal(b'{"a": 1}')
        elif op == "open":
            assert envelope.open(body).plaintext == b'{"a": 1}'
        else:
            assert envelope.seal(b'{"a": 1}').signed_by == (own,)
    finally:
        envelope._gpg.run = real
    assert len(calls) == 2
