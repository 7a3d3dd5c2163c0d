"""Hostile and broken PGP input: each yields its specific error, never plaintext, never a crash."""

from __future__ import annotations

import base64
import os
import time
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
from tests.pgp_fixtures import GpgPeer, PgpKeys, b64url, gpg_processes_under, unb64url
from tests.test_openpgp import (  # noqa: F401
    Craft,
    craft,
    native_envelope,
    native_keyset,
    partial,
)

SECRET = b'{"cardNumber": "4111111111111111"}'
MakeEnvelope = Callable[..., PgpEnvelope]


@pytest.fixture(scope="module")
def partner(pgp_envelope: MakeEnvelope) -> PgpEnvelope:
    """The partner's envelope: partner-a (active) and partner-b (disabled) are its own keys;
    google-a (active), google-b (disabled) and google-expired (active, expired) the peer's."""
    return pgp_envelope(
        [("partner-a", "sec", "active"), ("partner-b", "sec", "disabled")],
        [("google-a", "pub", "active"), ("google-b", "pub", "disabled"),
         ("google-expired", "pub", "active")],
    )


@pytest.fixture(scope="module")
def good(gpg_peer: GpgPeer) -> bytes:
    return gpg_peer.seal(SECRET, ["google-a"], ["partner-a"])


def refused(partner: PgpEnvelope, body: bytes, error: type[EnvelopeError]) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as caught:
        partner.open(body)
    assert type(caught.value) is error, repr(caught.value)
    assert b"4111" not in str(caught.value).encode()
    return caught.value


def test_the_good_message_opens(partner: PgpEnvelope, good: bytes) -> None:
    assert partner.open(good) == Opened(SECRET, ("partner-a",), ("google-a",))


def flip(body: bytes, position: int) -> bytes:
    raw = bytearray(unb64url(body))
    raw[position] ^= 0x01
    return b64url(bytes(raw))


@pytest.mark.parametrize("where", [-1, -10, -40, -100])
def test_tampered_ciphertext(partner: PgpEnvelope, good: bytes, where: int) -> None:
    refused(partner, flip(good, where), DecryptError)


def test_tampered_recipient_key_id(partner: PgpEnvelope, good: bytes) -> None:
    refused(partner, flip(good, 5), UnknownKeyError)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated(partner: PgpEnvelope, good: bytes, keep: float) -> None:
    raw = unb64url(good)
    refused(partner, b64url(raw[: int(len(raw) * keep)]), DecryptError)


def test_truncated_base64(partner: PgpEnvelope, good: bytes) -> None:
    cut = len(good) - 1
    while cut % 4 != 1:
        cut -= 1
    refused(partner, good[:cut], MalformedError)


@pytest.mark.parametrize("body", [
    b"", b"   \n", b"not base64!", b"QUJD=D", b"A", b"AAAA=", b"QQ=", SECRET,
    b64url(b"plain bytes, no OpenPGP"), b64url(b"-----BEGIN PGP MESSAGE-----\n\nxx\n"),
])
def test_not_base64url_or_not_openpgp(partner: PgpEnvelope, body: bytes) -> None:
    refused(partner, body, MalformedError)


def test_padding_and_whitespace_are_tolerated(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], padded=True)
    assert partner.open(b"\r\n  " + body + b"\n\n").plaintext == SECRET
    assert partner.open(body.rstrip(b"=")).plaintext == SECRET


def test_encrypted_to_someone_else(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    refused(partner, gpg_peer.seal(SECRET, ["google-a"], ["stranger"]), UnknownKeyError)


def test_a_disabled_own_key_cannot_decrypt(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    refused(partner, gpg_peer.seal(SECRET, ["google-a"], ["partner-b"]), UnknownKeyError)


def test_unsigned(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    refused(partner, gpg_peer.seal(SECRET, [], ["partner-a"]), SignatureError)


@pytest.mark.parametrize("signer", ["stranger", "google-b", "partner-a"])
def test_signed_only_by_a_key_not_enabled_in_the_peer_keyset(
    partner: PgpEnvelope, gpg_peer: GpgPeer, signer: str
) -> None:
    refused(partner, gpg_peer.seal(SECRET, [signer], ["partner-a"]), SignatureError)


def test_signed_by_an_expired_peer_key(
    partner: PgpEnvelope, gpg_peer: GpgPeer, pgp_keys: PgpKeys
) -> None:
    body = gpg_peer.seal(SECRET, ["google-expired"], ["partner-a"],
                         at=pgp_keys.expired_key_valid_at)
    refused(partner, body, SignatureError)


@pytest.mark.parametrize(("digest", "extra"), [
    ("SHA1", ()), ("MD5", ("--allow-weak-digest-algos",)), ("SHA224", ()),
])
def test_refused_signature_hashes(
    partner: PgpEnvelope, gpg_peer: GpgPeer, digest: str, extra: tuple[str, ...]
) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], digest=digest, extra_args=extra)
    assert refused(partner, body, AlgorithmError).layer == "signature"


def test_a_weak_hash_beside_a_good_signature_is_fine(
    partner: PgpEnvelope, gpg_peer: GpgPeer
) -> None:
    body = gpg_peer.seal(SECRET, ["google-a", "stranger"], ["partner-a"])
    assert partner.open(body).verified_by == ("google-a",)


@pytest.mark.parametrize("cipher", ["CAST5", "3DES", "TWOFISH"])
def test_refused_ciphers(partner: PgpEnvelope, gpg_peer: GpgPeer, cipher: str) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], cipher=cipher)
    assert refused(partner, body, AlgorithmError).layer == "encryption"


def test_no_integrity_protection(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], extra_args=["--rfc2440"])
    status = gpg_peer.gpg("--list-packets", stdin=unb64url(body), check=False).stdout
    assert b"encrypted data packet:" in status and b"mdc_method" not in status
    refused(partner, body, DecryptError)


@pytest.mark.parametrize("armor", [False, True])
def test_signed_but_not_encrypted(partner: PgpEnvelope, gpg_peer: GpgPeer, armor: bool) -> None:
    refused(partner, gpg_peer.seal(SECRET, ["google-a"], [], armor=armor), MalformedError)


def test_clearsigned(partner: PgpEnvelope, gpg_peer: GpgPeer, pgp_keys: PgpKeys) -> None:
    signed = gpg_peer.gpg("--clearsign", "--local-user", pgp_keys.fingerprint("google-a"),
                          stdin=SECRET).stdout
    refused(partner, b64url(signed), MalformedError)


def test_literal_only(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    refused(partner, gpg_peer.seal(SECRET), MalformedError)


def test_symmetrically_encrypted_only(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    refused(partner, gpg_peer.seal(SECRET, symmetric="guessable"), MalformedError)


def test_signed_and_symmetrically_encrypted(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], symmetric="guessable")
    refused(partner, body, MalformedError)


def test_two_messages_in_one_body(partner: PgpEnvelope, gpg_peer: GpgPeer, good: bytes) -> None:
    other = gpg_peer.seal(b'{"other": 1}', ["google-a"], ["partner-a"])
    with pytest.raises(EnvelopeError):
        partner.open(b64url(unb64url(good) + unb64url(other)))


def _bogus_session_keys(good: bytes, count: int) -> bytes:
    """`count` copies of the message's first session-key packet, damaged, then the message."""
    raw = unb64url(good)
    assert raw[0] == 0x85  # old-format header, tag 1, two length octets
    packet = bytearray(raw[: 3 + int.from_bytes(raw[1:3], "big")])
    packet[-5] ^= 0xFF
    return b64url(bytes(packet) * count + raw)


def test_a_few_session_keys_that_fail_are_tried(partner: PgpEnvelope, good: bytes) -> None:
    assert partner.open(_bogus_session_keys(good, 3)).plaintext == SECRET


def test_a_flood_of_session_keys_is_refused_before_gpg(partner: PgpEnvelope, good: bytes) -> None:
    body = _bogus_session_keys(good, 1000)  # gpg would spend ~2 ms of RSA on each
    started = time.monotonic()
    refused(partner, body, MalformedError)
    assert time.monotonic() - started < 0.5


def test_hidden_recipients_and_armor_headers(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], armor=True,
                         extra_args=["--throw-keyids", "--comment", "made: by gpg"])
    assert b"Comment: made: by gpg" in unb64url(body)
    assert partner.open(body).decrypted_by == ("partner-a",)


@pytest.mark.parametrize("algo", ["zlib", "bzip2"])
def test_compression_bomb(
    pgp_envelope: MakeEnvelope, gpg_peer: GpgPeer, algo: str
) -> None:
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    body = gpg_peer.seal(bytes(50_000_000), ["google-a"], ["partner-a"], compress=algo,
                         extra_args=["-z", "9"])
    assert len(body) < 100_000
    started = time.monotonic()
    refused(partner, body, TooLargeError)
    assert time.monotonic() - started < 5


def test_just_over_the_limit_uncompressed(pgp_envelope: MakeEnvelope, gpg_peer: GpgPeer) -> None:
    partner = pgp_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")],
                           limit=5000)
    assert partner.open(gpg_peer.seal(b"y" * 5000, ["google-a"], ["partner-a"])).plaintext
    refused(partner, gpg_peer.seal(b"y" * 5001, ["google-a"], ["partner-a"], compress="none"),
            TooLargeError)


def test_a_session_key_that_does_not_decrypt_costs_the_data_work(
    partner: PgpEnvelope, craft: Craft, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """gpg stops at a bad session key but decrypts and hashes all the data before a bad MDC;
    the engine does that work in vain in the first case, so time tells neither apart."""
    calls: list[int] = []
    real = pgp._decrypt_in_vain

    def spy(message: bytes) -> None:
        calls.append(len(message))
        real(message)

    monkeypatch.setattr(pgp, "_decrypt_in_vain", spy)
    key = os.urandom(32)
    pk = bytearray(craft.pkesk("partner-a", key))
    pk[-20] ^= 0x55
    seipd = craft.seipd(key, craft.signed(SECRET * 100, ["google-a"]))
    refused(partner, b64url(bytes(pk) + seipd), DecryptError)
    assert calls == [len(pk) + len(seipd)]
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


def test_signatures_are_capped(partner: PgpEnvelope, craft: Craft) -> None:  # noqa: F811
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
        started = time.monotonic()
        error = refused(partner, b64url(craft.encrypt(inner)), MalformedError)
        assert "more than 32 signatures" in str(error)
        assert time.monotonic() - started < 2


@pytest.mark.parametrize("flood", ["signatures", "one-pass packets"])
def test_a_compressed_flood_of_packets_costs_at_most_the_cpu_cap(
    partner: PgpEnvelope, craft: Craft, flood: str  # noqa: F811
) -> None:
    """A million packets compressed into a small message: gpg parses them all before the
    first NEWSIG (unbounded: it ran to its 10 s deadline), so RLIMIT_CPU stops it."""
    sig = craft.sig("google-a", SECRET)
    inner = (sig * 1_000_000 + craft.literal(SECRET) if flood == "signatures" else
             craft.ops("google-a", last=False) * 1_000_000 + craft.ops("google-a")
             + craft.literal(SECRET) + sig)
    body = b64url(craft.encrypt(craft.compressed(2, inner)))
    assert len(body) < 2_500_000
    started = time.monotonic()
    error = refused(partner, body, MalformedError)
    assert "of CPU" in str(error)
    assert time.monotonic() - started < 5  # ~1 s of CPU; generous for a loaded machine
    assert [p for p in gpg_processes_under(partner.home) if "gpg-agent" not in p] == []


def test_nested_compression(partner: PgpEnvelope, craft: Craft) -> None:  # noqa: F811
    """gpg reads a few levels (the native engine: openpgp.MAX_NESTING) and refuses deep
    nesting itself, quickly."""
    inner = craft.signed(SECRET, ["google-a"])
    for depth in range(1, 41):
        inner = craft.compressed(2, inner)
        if depth in (2, 9):
            assert partner.open(b64url(craft.encrypt(inner))).plaintext == SECRET
    started = time.monotonic()
    refused(partner, b64url(craft.encrypt(inner)), MalformedError)
    assert time.monotonic() - started < 2


def test_a_compression_bomb_inside_nested_compression(
    partner: PgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    inner = craft.signed(bytes(30_000_000), ["google-a"])
    for _ in range(3):
        inner = craft.compressed(2, inner)
    body = b64url(craft.encrypt(inner))
    assert len(body) < 100_000
    started = time.monotonic()
    refused(partner, body, TooLargeError)
    assert time.monotonic() - started < 5


def _packet_body(packet: bytes) -> bytes:
    return packet[2 if packet[1] < 192 else 3 if packet[1] < 224 else 6:]


def test_partial_lengths_are_read_where_gpg_writes_them(
    partner: PgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    key = os.urandom(32)
    literal = partial(11, _packet_body(craft.literal(SECRET * 40)), 5)
    inner = craft.ops("google-a") + literal + craft.sig("google-a", SECRET * 40)
    body = craft.pkesk("partner-a", key) + partial(18, _packet_body(craft.seipd(key, inner)), 6)
    assert partner.open(b64url(body)).plaintext == SECRET * 40


@pytest.mark.parametrize(("name", "error"), [
    ("partial length on a session-key packet", MalformedError),
    ("session-key length past the end", MalformedError),
    ("encrypted data declared 4 GiB long", DecryptError),
    ("encrypted data with a partial chunk and nothing after", DecryptError),
])
def test_bad_and_huge_packet_lengths(
    partner: PgpEnvelope, craft: Craft, name: str, error: type[EnvelopeError]  # noqa: F811
) -> None:
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
    started = time.monotonic()
    refused(partner, b64url(message), error)
    assert time.monotonic() - started < 2


def test_session_key_packets_are_capped(partner: PgpEnvelope, good: bytes) -> None:
    """pgp.MAX_SESSION_KEY_PACKETS recipients are fine, one more is refused before gpg."""
    limit = pgp.MAX_SESSION_KEY_PACKETS
    assert partner.open(_bogus_session_keys(good, limit - 1)).plaintext == SECRET
    refused(partner, _bogus_session_keys(good, limit), MalformedError)


@pytest.mark.parametrize("engine", ["gnupg", "native"])
def test_hidden_recipients_times_own_keys_are_capped(
    request: pytest.FixtureRequest, craft: Craft, engine: str  # noqa: F811
) -> None:
    """Each hidden recipient is tried with every own key: at most MAX_RSA_DECRYPTIONS RSA
    decryptions a message (the same cap in both engines), refused by the pre-check (its own
    message) before gpg or any RSA work."""
    make = request.getfixturevalue("pgp_envelope" if engine == "gnupg" else "native_envelope")
    cap = (pgp if engine == "gnupg" else openpgp).MAX_RSA_DECRYPTIONS
    partner = make([("partner-a", "sec", "active"), ("partner-pw", "sec", "active")],
                   [("google-a", "pub", "active")])
    key = os.urandom(32)
    seipd = craft.seipd(key, craft.signed(SECRET, ["google-a"]))
    decoy = craft.pkesk("stranger", key, hidden=True)
    ours = craft.pkesk("partner-a", key, hidden=True)
    per_message = cap // 2  # two own keys
    body = b64url(decoy * (per_message - 1) + ours + seipd)
    assert partner.open(body).decrypted_by == ("partner-a",)
    error = refused(partner, b64url(decoy * per_message + ours + seipd), MalformedError)
    expected = "RSA decryptions" if engine == "gnupg" else "session keys to try"
    assert f"more than {cap}" in str(error) and expected in str(error)


# Arbitrary input: only the envelope's own errors come out.
SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(partner: PgpEnvelope, body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        partner.open(body)


@SETTINGS
@given(st.binary(min_size=1, max_size=300))
def test_arbitrary_base64url(partner: PgpEnvelope, raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        partner.open(base64.urlsafe_b64encode(raw))


@SETTINGS
@given(st.data())
def test_mutated_messages(partner: PgpEnvelope, good: bytes, data: st.DataObject) -> None:
    raw = bytearray(unb64url(good))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    try:
        opened = partner.open(b64url(bytes(raw)))
    except EnvelopeError:
        return
    assert opened.plaintext == SECRET  # a change gpg ignores may pass, but never other content
