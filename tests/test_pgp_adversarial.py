"""Hostile and broken PGP input: each yields its specific error, never plaintext, never a crash."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from tests.pgp_fixtures import GpgPeer, PgpKeys, b64url, unb64url

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
