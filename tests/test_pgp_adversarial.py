"""Hostile and broken PGP input: each yields its specific error, never plaintext, never a crash.
What both engines must refuse alike runs for both (gnupg and native); then what only the gnupg
engine does: gpg runs, kills and limits. tests/test_openpgp_adversarial.py holds the native
engine's own (packet parsing, memory, timing)."""

from __future__ import annotations

import base64
import os
import resource
import signal
import subprocess
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import openpgp, pgp
from gateway.envelope import Opened
from gateway.errors import (
    AlgorithmError,
    DecryptError,
    EnvelopeError,
    MalformedError,
    SignatureError,
    TooLargeError,
    UnknownKeyError,
)
from gateway.pgp import PgpEnvelope
from tests.pgp_fixtures import (
    AnyPgpEnvelope,
    GpgPeer,
    PgpEngine,
    PgpKeys,
    b64url,
    gpg_processes_under,
    unb64url,
)
from tests.test_openpgp import Craft, craft, partial  # noqa: F401
from tests.work_count import Call, count_calls, module_with

SECRET = b'{"cardNumber": "4111111111111111"}'
MakeEnvelope = Callable[..., PgpEnvelope]
# The partner's keys: partner-a (active) and partner-b (disabled) are its own; google-a
# (active), google-b (disabled) and google-expired (active, expired) the peer's.
OWN = [("partner-a", "sec", "active"), ("partner-b", "sec", "disabled")]
PEER = [("google-a", "pub", "active"), ("google-b", "pub", "disabled"),
        ("google-expired", "pub", "active")]
# The gnupg engine's own tests below take `partner` for that engine alone.
gnupg_only = pytest.mark.parametrize("pgp_engine", ["gnupg"], indirect=True)


@pytest.fixture(scope="module")
def partner(pgp_engine: PgpEngine) -> AnyPgpEnvelope:
    """The partner's envelope (OWN, PEER), for each engine in turn."""
    return pgp_engine.envelope(OWN, PEER)


@pytest.fixture(scope="module")
def good(gpg_peer: GpgPeer) -> bytes:
    return gpg_peer.seal(SECRET, ["google-a"], ["partner-a"])


def refused(partner: AnyPgpEnvelope, body: bytes, error: type[EnvelopeError]) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as caught:
        partner.open(body)
    assert type(caught.value) is error, repr(caught.value)
    assert b"4111" not in str(caught.value).encode()
    return caught.value


# The work of gpg itself cannot be counted from here: what a test can count is the gpg runs the
# engine starts (each with its arguments, limits and status), the kills it sends, and the limits
# it sets on each process.


def gpg_runs(monkeypatch: pytest.MonkeyPatch, envelope: PgpEnvelope) -> list[Call]:
    """Every gpg run `envelope` starts from now on; each Call's result is its pgp._Status."""
    return count_calls(monkeypatch, envelope._gpg, "run")


def gpg_kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pid of each gpg process the engine kills from now on (once a kill() call)."""
    kills: list[int] = []

    class Popen(subprocess.Popen[bytes]):
        def kill(self) -> None:
            kills.append(self.pid)
            super().kill()

    monkeypatch.setattr(pgp, "subprocess", module_with(subprocess, Popen=Popen))
    return kills


def exited_by_itself(status: pgp._Status) -> bool:
    """gpg ended on its own: not by a signal (the CPU limit, a kill at the deadline or cap)."""
    return status.returncode is not None and status.returncode >= 0


def test_the_good_message_opens(partner: AnyPgpEnvelope, good: bytes) -> None:
    assert partner.open(good) == Opened(SECRET, ("partner-a",), ("google-a",))


def flip(body: bytes, position: int) -> bytes:
    raw = bytearray(unb64url(body))
    raw[position] ^= 0x01
    return b64url(bytes(raw))


@pytest.mark.parametrize("where", [-1, -10, -40, -100])
def test_tampered_ciphertext(partner: AnyPgpEnvelope, good: bytes, where: int) -> None:
    refused(partner, flip(good, where), DecryptError)


def test_tampered_recipient_key_id(partner: AnyPgpEnvelope, good: bytes) -> None:
    refused(partner, flip(good, 5), UnknownKeyError)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated(partner: AnyPgpEnvelope, good: bytes, keep: float) -> None:
    raw = unb64url(good)
    refused(partner, b64url(raw[: int(len(raw) * keep)]), DecryptError)


def test_truncated_base64(partner: AnyPgpEnvelope, good: bytes) -> None:
    cut = len(good) - 1
    while cut % 4 != 1:
        cut -= 1
    refused(partner, good[:cut], MalformedError)


@pytest.mark.parametrize("body", [
    b"", b"   \n", b"not base64!", b"QUJD=D", b"A", b"AAAA=", b"QQ=", SECRET,
    b64url(b"plain bytes, no OpenPGP"), b64url(b"-----BEGIN PGP MESSAGE-----\n\nxx\n"),
    b64url(b"-----BEGIN PGP MESSAGE-----\n\nxx\n-----END PGP MESSAGE-----\n"),
    b64url(b"-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"),
])
def test_not_base64url_or_not_openpgp(partner: AnyPgpEnvelope, body: bytes) -> None:
    refused(partner, body, MalformedError)


def test_padding_and_whitespace_are_tolerated(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], padded=True)
    assert partner.open(b"\r\n  " + body + b"\n\n").plaintext == SECRET
    assert partner.open(body.rstrip(b"=")).plaintext == SECRET


def test_encrypted_to_someone_else(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    error = refused(partner, gpg_peer.seal(SECRET, ["google-a"], ["stranger"]), UnknownKeyError)
    assert "recipient key ids" in str(error)


def test_a_disabled_own_key_cannot_decrypt(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    refused(partner, gpg_peer.seal(SECRET, ["google-a"], ["partner-b"]), UnknownKeyError)


def test_hidden_recipient_that_is_not_us(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["stranger"], extra_args=["--throw-keyids"])
    refused(partner, body, UnknownKeyError)


def test_unsigned(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    error = refused(partner, gpg_peer.seal(SECRET, [], ["partner-a"]), SignatureError)
    assert error.layer == "signature"


@pytest.mark.parametrize("signer", ["stranger", "google-b", "partner-a"])
def test_signed_only_by_a_key_not_enabled_in_the_peer_keyset(
    partner: AnyPgpEnvelope, gpg_peer: GpgPeer, signer: str
) -> None:
    refused(partner, gpg_peer.seal(SECRET, [signer], ["partner-a"]), SignatureError)


def test_signed_by_an_expired_peer_key(
    partner: AnyPgpEnvelope, gpg_peer: GpgPeer, pgp_keys: PgpKeys
) -> None:
    body = gpg_peer.seal(SECRET, ["google-expired"], ["partner-a"],
                         at=pgp_keys.expired_key_valid_at)
    refused(partner, body, SignatureError)


@pytest.mark.parametrize(("digest", "extra"), [
    ("SHA1", ()), ("MD5", ("--allow-weak-digest-algos",)), ("SHA224", ()),
])
def test_refused_signature_hashes(
    partner: AnyPgpEnvelope, gpg_peer: GpgPeer, digest: str, extra: tuple[str, ...]
) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], digest=digest, extra_args=extra)
    error = refused(partner, body, AlgorithmError)
    assert error.layer == "signature" and digest in str(error)


def test_a_strangers_signature_beside_a_good_one_is_fine(
    partner: AnyPgpEnvelope, gpg_peer: GpgPeer
) -> None:
    body = gpg_peer.seal(SECRET, ["google-a", "stranger"], ["partner-a"])
    assert partner.open(body).verified_by == ("google-a",)


# Where the engines still differ, each engine's answer is pinned, so that a change in either
# shows. protocol.md says both "accept when any one signature is a good one by a trusted key"
# and "refuse every other hash"; it does not say which wins for a SHA-1 signature beside a
# good one. A passphrase (SKESK) beside our key is outside the native engine's profile.


def test_a_sha1_signature_beside_a_good_one(
    pgp_engine: PgpEngine, partner: AnyPgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    inner = (craft.sig("google-a", SECRET, hash_id=2) + craft.sig("google-a", SECRET)
             + craft.literal(SECRET))
    body = b64url(craft.encrypt(inner))
    if pgp_engine.name == "native":  # the SHA-1 one is ignored, the good one counts
        assert partner.open(body).verified_by == ("google-a",)
    else:  # gpg reports the SHA-1 signature, and the engine refuses its hash
        assert "SHA1" in str(refused(partner, body, AlgorithmError))


def test_a_passphrase_beside_our_key(
    pgp_engine: PgpEngine, partner: AnyPgpEnvelope, gpg_peer: GpgPeer
) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], symmetric="guessable")
    if pgp_engine.name == "native":
        refused(partner, body, MalformedError)
    else:  # gpg opens it with our key and ignores the passphrase packet
        assert partner.open(body).plaintext == SECRET


@pytest.mark.parametrize("cipher", ["CAST5", "3DES", "TWOFISH"])
def test_refused_ciphers(partner: AnyPgpEnvelope, gpg_peer: GpgPeer, cipher: str) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], cipher=cipher)
    assert refused(partner, body, AlgorithmError).layer == "encryption"


def test_no_integrity_protection(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], extra_args=["--rfc2440"])
    status = gpg_peer.gpg("--list-packets", stdin=unb64url(body), check=False).stdout
    assert b"encrypted data packet:" in status and b"mdc_method" not in status
    refused(partner, body, DecryptError)


@pytest.mark.parametrize("armor", [False, True])
def test_signed_but_not_encrypted(partner: AnyPgpEnvelope, gpg_peer: GpgPeer, armor: bool) -> None:
    refused(partner, gpg_peer.seal(SECRET, ["google-a"], [], armor=armor), MalformedError)


def test_clearsigned(partner: AnyPgpEnvelope, gpg_peer: GpgPeer, pgp_keys: PgpKeys) -> None:
    signed = gpg_peer.gpg("--clearsign", "--local-user", pgp_keys.fingerprint("google-a"),
                          stdin=SECRET).stdout
    refused(partner, b64url(signed), MalformedError)


def test_literal_only(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    refused(partner, gpg_peer.seal(SECRET), MalformedError)


@pytest.mark.parametrize("signers", [[], ["google-a"]])
def test_symmetrically_encrypted(
    partner: AnyPgpEnvelope, gpg_peer: GpgPeer, signers: list[str]
) -> None:
    refused(partner, gpg_peer.seal(SECRET, signers, symmetric="guessable"), MalformedError)


def test_two_messages_in_one_body(
    partner: AnyPgpEnvelope, gpg_peer: GpgPeer, good: bytes
) -> None:
    other = gpg_peer.seal(b'{"other": 1}', ["google-a"], ["partner-a"])
    refused(partner, b64url(unb64url(good) + unb64url(other)), DecryptError)


def _bogus_session_keys(good: bytes, count: int) -> bytes:
    """`count` copies of the message's first session-key packet, damaged, then the message."""
    raw = unb64url(good)
    assert raw[0] == 0x85  # old-format header, tag 1, two length octets
    packet = bytearray(raw[: 3 + int.from_bytes(raw[1:3], "big")])
    packet[-5] ^= 0xFF
    return b64url(bytes(packet) * count + raw)


def test_a_few_session_keys_that_fail_are_tried(partner: AnyPgpEnvelope, good: bytes) -> None:
    assert partner.open(_bogus_session_keys(good, 3)).plaintext == SECRET


def test_session_key_packets_are_capped(
    pgp_engine: PgpEngine, partner: AnyPgpEnvelope, good: bytes
) -> None:
    """MAX_SESSION_KEY_PACKETS recipients are fine, one more is refused (the same cap in both
    engines; the gnupg engine's before gpg starts)."""
    limit = pgp_engine.pick(gnupg=pgp, native=openpgp).MAX_SESSION_KEY_PACKETS
    assert limit == 32
    assert partner.open(_bogus_session_keys(good, limit - 1)).plaintext == SECRET
    refused(partner, _bogus_session_keys(good, limit), MalformedError)


def test_hidden_recipients_and_armor_headers(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], armor=True,
                         extra_args=["--throw-keyids", "--comment", "made: by gpg"])
    assert b"Comment: made: by gpg" in unb64url(body)
    assert partner.open(body).decrypted_by == ("partner-a",)


def test_just_over_the_limit_uncompressed(pgp_engine: PgpEngine, gpg_peer: GpgPeer) -> None:
    partner = pgp_engine.envelope([("partner-a", "sec", "active")],
                                  [("google-a", "pub", "active")], limit=5000)
    assert partner.open(gpg_peer.seal(b"y" * 5000, ["google-a"], ["partner-a"])).plaintext
    refused(partner, gpg_peer.seal(b"y" * 5001, ["google-a"], ["partner-a"], compress="none"),
            TooLargeError)


def _packet_body(packet: bytes) -> bytes:
    return packet[2 if packet[1] < 192 else 3 if packet[1] < 224 else 6:]


def test_partial_and_indeterminate_lengths_are_read(
    partner: AnyPgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    """As gpg writes a stream: partial chunks, and an old-format compressed packet of
    indeterminate length."""
    key = os.urandom(32)
    literal = _packet_body(craft.literal(SECRET * 40))
    signed = craft.ops("google-a") + partial(11, literal, 5) + craft.sig("google-a", SECRET * 40)
    compressed = b"\xa3\x02" + zlib.compress(signed)  # old format, tag 8, to the end
    for inner in (signed, compressed):
        body = craft.pkesk("partner-a", key) + partial(18, _packet_body(craft.seipd(key, inner)),
                                                       6)
        assert partner.open(b64url(body)).plaintext == SECRET * 40


@gnupg_only
def test_a_flood_of_session_keys_is_refused_before_gpg(
    partner: PgpEnvelope, good: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _bogus_session_keys(good, 1000)  # gpg would spend ~2 ms of RSA on each
    runs = gpg_runs(monkeypatch, partner)
    error = refused(partner, body, MalformedError)
    assert "session-key packets" in str(error)
    assert runs == []  # no gpg, so no RSA decryption asked of it


def assert_stopped_at_max_output(partner: PgpEnvelope, runs: list[Call]) -> None:
    """One gpg run, told --max-output of the plaintext cap + 1, which gpg itself stopped at
    (its own error, its own exit: not the CPU limit, not a kill), having handed over no more:
    the bomb cost the cap's worth of inflating, not what it holds."""
    cap = partner.max_plaintext_bytes + 1
    [run] = runs
    assert run.args[0][:2] == ["--max-output", str(cap)]
    status: pgp._Status = run.result
    assert pgp._MAX_OUTPUT_HIT.search(status.stderr), status.stderr[-500:]
    assert exited_by_itself(status), status.returncode
    assert len(status.data) <= cap


@pytest.mark.parametrize("algo", ["zlib", "bzip2"])
def test_compression_bomb(
    pgp_envelope: MakeEnvelope, gpg_peer: GpgPeer, algo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    body = gpg_peer.seal(bytes(50_000_000), ["google-a"], ["partner-a"], compress=algo,
                         extra_args=["-z", "9"])
    assert len(body) < 100_000
    runs = gpg_runs(monkeypatch, partner)
    refused(partner, body, TooLargeError)
    assert_stopped_at_max_output(partner, runs)


@gnupg_only
def test_a_session_key_that_does_not_decrypt_costs_the_data_work(
    partner: PgpEnvelope, craft: Craft, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """gpg stops at a bad session key but decrypts and hashes all the data before a bad MDC;
    the engine does that work in vain in the first case, so time tells neither apart."""
    calls = count_calls(monkeypatch, pgp, "_decrypt_in_vain")
    key = os.urandom(32)
    pk = bytearray(craft.pkesk("partner-a", key))
    pk[-20] ^= 0x55
    seipd = craft.seipd(key, craft.signed(SECRET * 100, ["google-a"]))
    refused(partner, b64url(bytes(pk) + seipd), DecryptError)
    assert [len(call.args[0]) for call in calls] == [len(pk) + len(seipd)]
    altered = bytearray(craft.encrypt(craft.signed(SECRET * 100, ["google-a"])))
    altered[-5] ^= 0x01
    refused(partner, b64url(bytes(altered)), DecryptError)
    assert len(calls) == 1


# Bad signatures beside good ones (gpg --batch stops at the first bad one, before the MDC).


@pytest.fixture(scope="module")
def two_peers(pgp_envelope: MakeEnvelope) -> PgpEnvelope:
    return pgp_envelope([("partner-a", "sec", "active")],
                        [("google-a", "pub", "active"), ("google-sub", "pub", "active")])


def _signed(craft: Craft, signers: list[tuple[str, bool]], data: bytes = SECRET  # noqa: F811
            ) -> bytes:
    """One-pass signed `data`, one signature per (key name, spoilt) in order."""
    ops = [craft.ops(name, last=i == 0) for i, (name, _) in enumerate(signers)]
    return (b"".join(reversed(ops)) + craft.literal(data)
            + b"".join(craft.sig(name, data, damage=bad) for name, bad in signers))


@pytest.mark.parametrize("signers", [
    [("google-a", False), ("google-sub", True)],
    [("google-sub", True), ("google-a", False)],
    [("google-a", False), ("google-a", True)],
    [("google-a", True), ("google-sub", True), ("stranger", False), ("google-a", False)],
], ids=["good-then-bad", "bad-then-good", "same-key", "two-bad-unknown-then-good"])
def test_a_good_signature_beside_a_bad_one_is_accepted(
    two_peers: PgpEnvelope, craft: Craft, signers: list[tuple[str, bool]]  # noqa: F811
) -> None:
    """protocol.md 3: any one good signature by an enabled peer key is enough. gpg --batch
    exits at a BADSIG ("[GNUPG:] FAILURE gpg-exit 33554433", no DECRYPTION_OKAY, GOODMDC
    nor END_DECRYPTION); the engine then asks gpg again without --batch."""
    opened = two_peers.open(b64url(craft.encrypt(_signed(craft, signers))))
    assert opened == Opened(SECRET, ("partner-a",), ("google-a",))


def test_only_bad_signatures_are_a_signature_failure(
    two_peers: PgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    body = b64url(craft.encrypt(_signed(craft, [("google-a", True), ("google-sub", True)])))
    error = refused(two_peers, body, SignatureError)
    assert error.layer == "signature" and "bad" in str(error)


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_bad_signature_never_excuses_altered_data(
    two_peers: PgpEnvelope, craft: Craft, damage: str  # noqa: F811
) -> None:
    """The second gpg run must still prove the data whole (GOODMDC, DECRYPTION_OKAY)."""
    raw = bytearray(craft.encrypt(_signed(craft, [("google-sub", True), ("google-a", False)])))
    if damage == "flip":
        raw[-3] ^= 0x01
    else:
        del raw[-10:]
    refused(two_peers, b64url(bytes(raw)), DecryptError)


# Bounds on the work one message may ask of gpg.


@gnupg_only
def test_signatures_are_capped(
    partner: PgpEnvelope, craft: Craft, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """At most pgp.MAX_SIGNATURES signatures, one-pass or not: gpg is stopped at the status
    line announcing one more, before it checks it."""
    limit, stranger = pgp.MAX_SIGNATURES, craft.sig("stranger", SECRET)
    ok = stranger * (limit - 1) + craft.sig("google-a", SECRET) + craft.literal(SECRET)
    assert partner.open(b64url(craft.encrypt(ok))).verified_by == ("google-a",)
    one_pass = [("stranger", False)] * (limit - 1) + [("google-a", False)]
    assert partner.open(b64url(craft.encrypt(_signed(craft, one_pass)))).plaintext == SECRET
    for inner in (stranger * limit + craft.sig("google-a", SECRET) + craft.literal(SECRET),
                  _signed(craft, [*one_pass, ("google-a", False)]),
                  craft.sig("google-a", SECRET) * 5000 + craft.literal(SECRET)):
        body = b64url(craft.encrypt(inner))
        with monkeypatch.context() as spying:
            runs, kills = gpg_runs(spying, partner), gpg_kills(spying)
            error = refused(partner, body, MalformedError)
        assert "more than 32 signatures" in str(error)
        # One run (no second one without --batch), stopped at the NEWSIG line past the cap:
        # killed then, whatever signatures are left to check (5000 in the last message).
        [run] = runs
        status: pgp._Status = run.result
        assert status.flooded and status.signatures == limit + 1
        assert status.process is not None and status.process.pid in kills


@gnupg_only
@pytest.mark.parametrize("flood", ["signatures", "one-pass packets"])
def test_a_compressed_flood_of_packets_costs_at_most_the_cpu_cap(
    partner: PgpEnvelope, craft: Craft, flood: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A million packets compressed into a small message: gpg parses them all before the
    first NEWSIG (unbounded: it ran to its 10 s deadline), so RLIMIT_CPU stops it."""
    sig = craft.sig("google-a", SECRET)
    inner = (sig * 1_000_000 + craft.literal(SECRET) if flood == "signatures" else
             craft.ops("google-a", last=False) * 1_000_000 + craft.ops("google-a")
             + craft.literal(SECRET) + sig)
    body = b64url(craft.encrypt(craft.compressed(2, inner)))
    assert len(body) < 2_500_000
    runs = gpg_runs(monkeypatch, partner)
    limits = count_calls(monkeypatch, pgp.resource, "prlimit")
    error = refused(partner, body, MalformedError)
    assert "of CPU" in str(error)
    # One gpg run, limited to the envelope's CPU seconds before it read anything, and ended by
    # that limit's signal: at most that much CPU, whatever the message holds.
    [run] = runs
    status: pgp._Status = run.result
    assert status.process is not None
    cpu = partner.cpu_seconds
    assert (run.kwargs["cpu_seconds"], cpu) == (cpu, pgp.GPG_CPU_SECONDS)
    assert [c.args for c in limits] == [(status.process.pid, resource.RLIMIT_CPU, (cpu, cpu + 1))]
    assert status.returncode == -signal.SIGXCPU
    assert [p for p in gpg_processes_under(partner.home) if "gpg-agent" not in p] == []


@gnupg_only
def test_nested_compression(
    partner: PgpEnvelope, craft: Craft, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """gpg reads a few levels (the native engine: openpgp.MAX_NESTING) and refuses deep
    nesting itself, quickly."""
    inner = craft.signed(SECRET, ["google-a"])
    for depth in range(1, 41):
        inner = craft.compressed(2, inner)
        if depth in (2, 9):
            assert partner.open(b64url(craft.encrypt(inner))).plaintext == SECRET
    body = b64url(craft.encrypt(inner))
    runs = gpg_runs(monkeypatch, partner)
    refused(partner, body, MalformedError)
    # Itself: one run that gpg ended on its own, not one stopped by the CPU limit.
    [run] = runs
    assert exited_by_itself(run.result), run.result.returncode


@gnupg_only
def test_a_compression_bomb_inside_nested_compression(
    partner: PgpEnvelope, craft: Craft, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    inner = craft.signed(bytes(30_000_000), ["google-a"])
    for _ in range(3):
        inner = craft.compressed(2, inner)
    body = b64url(craft.encrypt(inner))
    assert len(body) < 100_000
    runs = gpg_runs(monkeypatch, partner)
    refused(partner, body, TooLargeError)
    assert_stopped_at_max_output(partner, runs)


@gnupg_only
@pytest.mark.parametrize(("name", "error", "gpg_started"), [
    ("partial length on a session-key packet", MalformedError, 0),
    ("session-key length past the end", MalformedError, 0),
    ("encrypted data declared 4 GiB long", DecryptError, 1),
    ("encrypted data with a partial chunk and nothing after", DecryptError, 1),
])
def test_bad_and_huge_packet_lengths(
    partner: PgpEnvelope, craft: Craft, name: str, error: type[EnvelopeError],  # noqa: F811
    gpg_started: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Broken session-key packets are refused before gpg; a huge or unfinished encrypted
    packet is gpg's to refuse, which it does on its own (no limit of ours has to stop it)."""
    key = os.urandom(32)
    pk = craft.pkesk("partner-a", key)
    data = craft.seipd(key, craft.signed(SECRET * 2000, ["google-a"]))
    assert pk[:2] == b"\xc1\xc0" and data[:2] == b"\xd2\xff"  # 2048-bit: 267 or 268 bytes
    message = {
        "partial length on a session-key packet": partial(1, pk[3:], 4) + data,
        "session-key length past the end": b"\xc1\xff\xff\xff\xff\xff" + pk[3:] + data,
        "encrypted data declared 4 GiB long": pk + b"\xd2\xff\xff\xff\xff\xff" + data[6:],
        "encrypted data with a partial chunk and nothing after":
            pk + b"\xd2\xef" + data[6:6 + 32768],
    }[name]
    runs = gpg_runs(monkeypatch, partner)
    refused(partner, b64url(message), error)
    assert len(runs) == gpg_started
    assert all(exited_by_itself(run.result) for run in runs), [r.result.returncode for r in runs]


def test_hidden_recipients_times_own_keys_are_capped(
    pgp_engine: PgpEngine, craft: Craft  # noqa: F811
) -> None:
    """Each hidden recipient is tried with every own key: at most MAX_RSA_DECRYPTIONS RSA
    decryptions a message (the same cap in both engines), refused by the pre-check (its own
    message) before gpg or any RSA work."""
    cap = pgp_engine.pick(gnupg=pgp, native=openpgp).MAX_RSA_DECRYPTIONS
    partner = pgp_engine.envelope(
        [("partner-a", "sec", "active"), ("partner-pw", "sec", "active")],
        [("google-a", "pub", "active")])
    key = os.urandom(32)
    seipd = craft.seipd(key, craft.signed(SECRET, ["google-a"]))
    decoy = craft.pkesk("stranger", key, hidden=True)
    ours = craft.pkesk("partner-a", key, hidden=True)
    per_message = cap // 2  # two own keys
    body = b64url(decoy * (per_message - 1) + ours + seipd)
    assert partner.open(body).decrypted_by == ("partner-a",)
    error = refused(partner, b64url(decoy * per_message + ours + seipd), MalformedError)
    expected = pgp_engine.pick(gnupg="RSA decryptions", native="session keys to try")
    assert f"more than {cap}" in str(error) and expected in str(error)


# Arbitrary input: only the envelope's own errors come out.
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes(partner: AnyPgpEnvelope, body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        partner.open(body)


@SETTINGS
@given(st.binary(min_size=1, max_size=400))
def test_arbitrary_base64url(partner: AnyPgpEnvelope, raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        partner.open(base64.urlsafe_b64encode(raw))


@SETTINGS
@given(st.data())
def test_mutated_messages(partner: AnyPgpEnvelope, good: bytes, data: st.DataObject) -> None:
    raw = bytearray(unb64url(good))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    try:
        opened = partner.open(b64url(bytes(raw)))
    except EnvelopeError:
        return
    assert opened.plaintext == SECRET  # a change an engine ignores may pass, never other content
