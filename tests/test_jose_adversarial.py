"""jose.py against hostile messages: each refusal has its own error class, and nothing else
escapes open(). Messages are made by hand (tests.jose_fixtures.craft_*), not by jwcrypto."""

from __future__ import annotations

import base64
import json
import os
import tracemalloc
import zlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import b64url, jose
from gateway.config import JoseOptions
from gateway.errors import (
    AlgorithmError,
    ConfigError,
    DecryptError,
    EnvelopeError,
    MalformedError,
    SignatureError,
    TooLargeError,
    UnknownKeyError,
)
from gateway.jose import JoseEnvelope
from tests.jose_fixtures import (
    GOOGLE_PUBLIC,
    PARTNER_OWN,
    JoseKeys,
    b64u,
    craft_jwe,
    craft_jws,
    jose_envelope,
)
from tests.work_count import Call, count_calls, count_inflated

SECRET = b'{"cardNumber": "4111111111111111", "cryptogram": "SECRET-CRYPTOGRAM"}'
JWE_HEADER = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "partner-enc-a"}
JWS_HEADER = {"alg": "RS256", "kid": "google-sig-a"}


def rsa_key(keys: JoseKeys, name: str) -> rsa.RSAPrivateKey:
    key = keys.key(name)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def to_partner(
    keys: JoseKeys,
    inner: str | bytes,
    header: dict[str, Any] | None = None,
    *,
    recipient: str = "partner-enc-a",
    **kwargs: Any,
) -> bytes:
    """A JWE of `inner` to `recipient`'s public key (kid partner-enc-a unless `header` says)."""
    plaintext = inner.encode("ascii") if isinstance(inner, str) else inner
    public = rsa_key(keys, recipient).public_key()
    return craft_jwe(header or JWE_HEADER, plaintext, public, **kwargs).encode("ascii")


def signed(keys: JoseKeys, header: dict[str, Any] | None = None, signer: str = "google-sig-a",
           payload: bytes = SECRET) -> str:
    """Signed by `signer`: with the header's alg when it is a signing algorithm, else RS256 or
    ES256 by key type (so that only the header can be the reason for a refusal)."""
    header = header or JWS_HEADER
    key = keys.key(signer)
    sign_as = None
    if str(header.get("alg", ""))[:2] not in ("RS", "PS", "ES"):
        sign_as = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    return craft_jws(header, payload, key, sign_as=sign_as)


def valid(keys: JoseKeys) -> bytes:
    return to_partner(keys, signed(keys))


def refused(
    envelope: JoseEnvelope, body: bytes, error: type[EnvelopeError], layer: str | None = None
) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as caught:
        envelope.open(body)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    if layer is not None:
        assert caught.value.layer == layer
    assert b"4111" not in str(caught.value).encode() and "SECRET" not in str(caught.value)
    return caught.value


def replace_part(body: bytes, index: int, part: str) -> bytes:
    parts = body.decode("ascii").split(".")
    parts[index] = part
    return ".".join(parts).encode("ascii")


def flip_first(segment: str) -> str:
    return ("B" if segment[0] == "A" else "A") + segment[1:]


# ---------------------------------------------------------------------------------------------
# The hand-made messages are right: each of these opens.


@pytest.mark.parametrize("enc", ["A256GCM", "A128GCM", "A256CBC-HS512", "A128CBC-HS256"])
@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA-OAEP"])
@pytest.mark.parametrize("sign_alg", ["RS256", "PS384", "ES256"])
def test_hand_made_messages_open(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, enc: str, alg: str, sign_alg: str
) -> None:
    signer = "google-sig-ec" if sign_alg == "ES256" else "google-sig-a"
    inner = signed(jose_keys, {"alg": sign_alg, "kid": signer}, signer)
    opened = jose_partner.open(to_partner(jose_keys, inner, {**JWE_HEADER, "alg": alg, "enc": enc}))
    assert opened.plaintext == SECRET
    assert (opened.decrypted_by, opened.verified_by) == (("partner-enc-a",), (signer,))


def test_without_kids_every_enabled_key_is_tried(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope
) -> None:
    inner = signed(jose_keys, {"alg": "ES256"}, "google-sig-ec")
    opened = jose_partner.open(to_partner(jose_keys, inner, {"alg": "RSA-OAEP", "enc": "A256GCM"}))
    assert (opened.decrypted_by, opened.verified_by) == (("partner-enc-a",), ("google-sig-ec",))


# ---------------------------------------------------------------------------------------------
# Tampering and truncation


@pytest.mark.parametrize("index", [1, 2, 3, 4], ids=["encrypted_key", "iv", "ciphertext", "tag"])
def test_tampered_parts_do_not_decrypt(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, index: int
) -> None:
    body = valid(jose_keys)
    part = body.decode("ascii").split(".")[index]
    refused(jose_partner, replace_part(body, index, flip_first(part)), DecryptError)


@pytest.mark.parametrize("iv_bytes", [8, 11, 13, 16, 32])
def test_a_gcm_iv_other_than_96_bits_is_malformed(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, iv_bytes: int,
) -> None:
    """RFC 7518 5.3 requires a 96-bit IV; AES-GCM takes others, panva's jose refuses them."""
    body = to_partner(jose_keys, signed(jose_keys), gcm_iv_bytes=iv_bytes)
    assert f"iv of {iv_bytes}" in str(refused(jose_partner, body, MalformedError))


@pytest.mark.parametrize("enc", ["A256GCM", "A128CBC-HS256", "A256CBC-HS512"])
def test_a_truncated_or_padded_tag_is_malformed(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, enc: str,
) -> None:
    body = to_partner(jose_keys, signed(jose_keys), {**JWE_HEADER, "enc": enc})
    tag = b64url.decode(body.split(b".")[4])
    for other in (tag[:-1], tag + b"\0"):
        refused(jose_partner, replace_part(body, 4, b64u(other)), MalformedError)


def test_tampered_header_does_not_decrypt(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    body = valid(jose_keys)
    header = b64u(json.dumps({**JWE_HEADER, "typ": "JOSE"}))  # same alg, enc, kid: only the AAD
    refused(jose_partner, replace_part(body, 0, header), DecryptError)


def test_truncated(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    body = valid(jose_keys)
    refused(jose_partner, body[: len(body) // 2], MalformedError)
    parts = body.decode("ascii").split(".")
    refused(jose_partner, replace_part(body, 3, parts[3][:-8]), DecryptError)
    refused(jose_partner, replace_part(body, 4, parts[4][:8]), MalformedError)  # 6-byte tag
    refused(jose_partner, replace_part(body, 4, parts[4][:-1]), MalformedError)  # 21 chars


def test_wrong_key(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    inner = signed(jose_keys)
    # Encrypted to a stranger but claiming our kid: that key is tried, and fails.
    refused(jose_partner, to_partner(jose_keys, inner, recipient="stranger-enc"), DecryptError)
    # No kid: every enabled key is tried, none works.
    no_kid = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
    refused(jose_partner, to_partner(jose_keys, inner, no_kid, recipient="stranger-enc"),
            DecryptError)
    # The stranger's own kid: not one of ours.
    theirs = {**JWE_HEADER, "kid": "stranger-enc"}
    refused(jose_partner, to_partner(jose_keys, inner, theirs, recipient="stranger-enc"),
            UnknownKeyError)


@pytest.mark.parametrize("kid", ["partner-sig-a", "partner-enc-b", "google-enc-a", "", "x" * 200])
def test_unknown_kid(jose_keys: JoseKeys, jose_partner: JoseEnvelope, kid: str) -> None:
    # partner-sig-a is ours but cannot decrypt; partner-enc-b is not in this keyset.
    body = to_partner(jose_keys, signed(jose_keys), {**JWE_HEADER, "kid": kid})
    error = refused(jose_partner, body, UnknownKeyError, "encryption")
    assert len(str(error)) < 200  # the peer's value is shortened in the message


def test_disabled_own_key_never_decrypts(jose_keys: JoseKeys) -> None:
    own = [
        ("partner-sig-a", "private", "active"),
        ("partner-enc-a", "private", "active"),
        ("partner-enc-b", "private", "disabled"),
    ]
    partner = jose_envelope(jose_keys, own, GOOGLE_PUBLIC)
    inner = signed(jose_keys)
    to_b = {**JWE_HEADER, "kid": "partner-enc-b"}
    refused(partner, to_partner(jose_keys, inner, to_b, recipient="partner-enc-b"),
            UnknownKeyError)
    no_kid = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
    refused(partner, to_partner(jose_keys, inner, no_kid, recipient="partner-enc-b"),
            DecryptError)
    enabled = jose_envelope(jose_keys, [*own[:2], ("partner-enc-b", "private", "read-only")],
                            GOOGLE_PUBLIC)
    assert enabled.open(to_partner(jose_keys, inner, no_kid, recipient="partner-enc-b"))


# ---------------------------------------------------------------------------------------------
# Not a JWE, or not a JWS inside


def test_bare_jws_is_malformed(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    error = refused(jose_partner, signed(jose_keys).encode("ascii"), MalformedError, "encryption")
    assert "never encrypted" in str(error)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   \n",
        b"hello",
        b"a.b.c.d",
        b"a.b.c.d.e.f",
        b"....",
        b"eyJ=.a.b.c.d",
        b'{"protected": "e30", "iv": "", "ciphertext": "", "tag": ""}',
        b"\xff\xfe.\x00.a.b.c",
        b"a b.c.d.e.f",
    ],
)
def test_not_a_compact_jwe_is_malformed(jose_partner: JoseEnvelope, body: bytes) -> None:
    refused(jose_partner, body, MalformedError)


def test_padded_segments_are_malformed(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    parts = valid(jose_keys).decode("ascii").split(".")
    padded = ".".join(p + "=" * (-len(p) % 4) for p in parts).encode("ascii")
    assert padded != valid(jose_keys)
    refused(jose_partner, padded, MalformedError)


@pytest.mark.parametrize(
    "header",
    [
        b"[]",
        b"not json",
        b'{"alg": "RSA-OAEP-256"}',
        b'{"alg": ["RSA-OAEP-256"], "enc": "A256GCM"}',
        b'{"alg": "RSA-OAEP-256", "enc": "A256GCM", "alg": "RSA-OAEP"}',
        b'{"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": 7}',
        b'{"alg": "RSA-OAEP-256", "enc": "A256GCM", "crit": ["exp"], "exp": 1}',
        b"\xff",
    ],
)
def test_bad_jwe_headers_are_malformed(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, header: bytes
) -> None:
    refused(jose_partner, replace_part(valid(jose_keys), 0, b64u(header)), MalformedError)


@pytest.mark.parametrize(
    "inner",
    [
        SECRET,
        b"",
        b"a.b",
        b"a.b.c.d.e",
        b"\x00\xff" * 10,
        b"e30.e30.",  # unsigned: no signature at all
        b".e30.c2ln",
        "é.e30.c2ln".encode(),
    ],
)
def test_payload_not_a_jws_is_a_signature_failure(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, inner: bytes
) -> None:
    refused(jose_partner, to_partner(jose_keys, inner), SignatureError, "signature")


def test_bad_jws_headers(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    for header in ({"kid": "google-sig-a"}, {"alg": "RS256", "kid": 5},
                   {"alg": "RS256", "crit": ["b64"], "b64": False},
                   {"alg": "RS256", "b64": True}):
        refused(jose_partner, to_partner(jose_keys, signed(jose_keys, header)), SignatureError)
    duplicate = b'{"alg": "RS256", "alg": "PS256"}'
    inner = signed(jose_keys).split(".")
    inner[0] = b64u(duplicate)
    refused(jose_partner, to_partner(jose_keys, ".".join(inner)), SignatureError)


# ---------------------------------------------------------------------------------------------
# Signatures


def test_alg_none_is_refused(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    for header in ({"alg": "none"}, {"alg": "none", "kid": "google-sig-a"}, {"alg": "NONE"}):
        inner = craft_jws(header, SECRET, None)
        refused(jose_partner, to_partner(jose_keys, inner), AlgorithmError, "signature")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_keyed_with_the_public_key_is_refused(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, alg: str
) -> None:
    public = rsa_key(jose_keys, "google-sig-a").public_key()
    secrets = [
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1),
        json.dumps(jose_keys.public_jwk("google-sig-a")).encode(),
    ]
    for secret in secrets:
        inner = craft_jws({"alg": alg, "kid": "google-sig-a"}, SECRET, secret)
        refused(jose_partner, to_partner(jose_keys, inner), AlgorithmError, "signature")


def test_hmac_cannot_be_accepted(jose_keys: JoseKeys) -> None:
    with pytest.raises(ConfigError):
        jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC,
                      JoseOptions(accept_sign_algs=("RS256", "HS256")))


def test_signature_algorithms_outside_the_accept_list(jose_keys: JoseKeys) -> None:
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC,
                            JoseOptions(accept_sign_algs=("PS256",)))
    refused(partner, valid(jose_keys), AlgorithmError, "signature")
    for alg in ("ES256K", "EdDSA", "Ed25519", "RS1"):
        inner = craft_jws({"alg": alg, "kid": "google-sig-a"}, SECRET, None)
        refused(partner, to_partner(jose_keys, inner), AlgorithmError, "signature")


def test_bad_signatures(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    cases = {
        "stranger, own kid": signed(jose_keys, {"alg": "RS256", "kid": "stranger-sig"},
                                    "stranger-sig"),
        "stranger posing as google": signed(jose_keys, JWS_HEADER, "stranger-sig"),
        "stranger, no kid": signed(jose_keys, {"alg": "RS256"}, "stranger-sig"),
        "kid of an encryption key": signed(jose_keys, {"alg": "RS256", "kid": "google-enc-a"},
                                           "google-enc-a"),
        "ES256 claimed for an RSA key": signed(jose_keys, {"alg": "ES256", "kid": "google-sig-a"},
                                               "google-sig-ec"),
        "PS256 header, RS256 signature": craft_jws(
            {"alg": "PS256", "kid": "google-sig-a"}, SECRET, jose_keys.key("google-sig-a"),
            sign_as="RS256",
        ),
        "signature of other payload": signed(jose_keys).rsplit(".", 1)[0] + "."
        + signed(jose_keys, payload=b"other").rsplit(".", 1)[1],
        "ES256 signature in DER, not r || s": _der_es256(jose_keys),
    }
    for name, inner in cases.items():
        with pytest.raises(SignatureError):
            jose_partner.open(to_partner(jose_keys, inner))
        assert name


def test_unsigned(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    for header in (JWS_HEADER, {"alg": "RS256"}):
        unsigned = craft_jws(header, SECRET, None)
        assert unsigned.endswith(".")
        refused(jose_partner, to_partner(jose_keys, unsigned), SignatureError, "signature")
    refused(jose_partner, to_partner(jose_keys, SECRET), SignatureError, "signature")


def _der_es256(keys: JoseKeys) -> str:
    key = keys.key("google-sig-ec")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    header = {"alg": "ES256", "kid": "google-sig-ec"}
    signing_input = f"{b64u(json.dumps(header))}.{b64u(SECRET)}"
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{b64u(der)}"


def test_tampered_jws_inside_a_good_jwe(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    header, payload, signature = signed(jose_keys).split(".")
    for inner in (
        f"{header}.{b64u(b'{}')}.{signature}",
        f"{header}.{payload}.{flip_first(signature)}",
        f"{header}.{payload}.{signature[:-10]}",
    ):
        refused(jose_partner, to_partner(jose_keys, inner), SignatureError)


def test_expired_peer_key_does_not_verify(jose_keys: JoseKeys) -> None:
    expired = {"not_after": "2021-06-30T00:00:00+00:00"}
    partner = jose_envelope(
        jose_keys, PARTNER_OWN,
        [("google-sig-a", "public", "active", expired), ("google-enc-a", "public", "active")],
    )
    refused(partner, valid(jose_keys), SignatureError, "signature")
    inner = signed(jose_keys, {"alg": "RS256"})
    refused(partner, to_partner(jose_keys, inner), SignatureError)


# ---------------------------------------------------------------------------------------------
# Key management: RSA1_5, dir, outside the lists


def test_rsa1_5_only_when_listed(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    body = to_partner(jose_keys, signed(jose_keys), {**JWE_HEADER, "alg": "RSA1_5"})
    refused(jose_partner, body, AlgorithmError, "encryption")
    legacy = jose_envelope(
        jose_keys, PARTNER_OWN, GOOGLE_PUBLIC,
        JoseOptions(accept_key_algs=("RSA-OAEP-256", "RSA1_5"),
                    accept_encs=("A256GCM", "A128CBC-HS256")),
    )
    assert legacy.open(body).plaintext == SECRET
    cbc = to_partner(jose_keys, signed(jose_keys),
                     {**JWE_HEADER, "alg": "RSA1_5", "enc": "A128CBC-HS256"})
    assert legacy.open(cbc).plaintext == SECRET
    stranger = to_partner(jose_keys, signed(jose_keys), {**JWE_HEADER, "alg": "RSA1_5"},
                          recipient="stranger-enc")
    refused(legacy, stranger, DecryptError)
    refused(legacy, replace_part(body, 3, flip_first(body.decode().split(".")[3])), DecryptError)


def test_dir_is_refused(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    body = craft_jwe({"alg": "dir", "enc": "A256GCM", "kid": "partner-enc-a"},
                     signed(jose_keys).encode(), None, cek=os.urandom(32)).encode()
    refused(jose_partner, body, AlgorithmError, "encryption")
    with pytest.raises(ConfigError):
        jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC,
                      JoseOptions(accept_key_algs=("RSA-OAEP-256", "dir")))


@pytest.mark.parametrize(
    ("alg", "enc"),
    [
        ("PBES2-HS256+A128KW", "A256GCM"),
        ("A256KW", "A256GCM"),
        ("A256GCMKW", "A256GCM"),
        ("none", "A256GCM"),
        ("RSA-OAEP-256", "A192GCM"),  # a real enc, but not in the default list
        ("RSA-OAEP-256", "A512GCM"),
        ("RSA-OAEP-384", "A256GCM"),
    ],
)
def test_key_management_outside_the_lists(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, alg: str, enc: str
) -> None:
    body = replace_part(valid(jose_keys), 0, b64u(json.dumps({"alg": alg, "enc": enc})))
    refused(jose_partner, body, AlgorithmError, "encryption")


def test_narrowed_accept_lists(jose_keys: JoseKeys) -> None:
    partner = jose_envelope(
        jose_keys, PARTNER_OWN, GOOGLE_PUBLIC,
        JoseOptions(accept_key_algs=("RSA-OAEP-256",), accept_encs=("A256GCM",)),
    )
    assert partner.open(valid(jose_keys)).plaintext == SECRET
    for header in ({**JWE_HEADER, "alg": "RSA-OAEP"}, {**JWE_HEADER, "enc": "A128GCM"}):
        refused(partner, to_partner(jose_keys, signed(jose_keys), header), AlgorithmError)


def test_ecdh_header_is_checked_before_jwcrypto_sees_it(jose_keys: JoseKeys) -> None:
    ec_own = [("partner-sig-a", "private", "active"), ("partner-enc-ec", "private", "active")]
    partner = jose_envelope(jose_keys, ec_own, GOOGLE_PUBLIC)
    ecdh = {"alg": "ECDH-ES", "enc": "A256GCM", "kid": "partner-enc-ec"}
    point = jose_keys.public_jwk("google-sig-ec")
    epks: list[Any] = [
        None,
        "epk",
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "crv": "secp256k1", "x": point["x"], "y": point["y"]},
        # jwcrypto would build a JWK from this with JWK(**epk): `generate` makes it make a key.
        {"generate": "RSA", "size": 8192, "kty": "EC", "crv": "P-256"},
        {"kty": "EC", "crv": "P-256", "x": point["x"], "y": point["y"], "d": "AAAA"},
    ]
    for epk in epks:
        header = {**ecdh, "epk": epk} if epk is not None else ecdh
        body = f"{b64u(json.dumps(header))}..{b64u(b'i' * 12)}.{b64u(b'c')}.{b64u(b't' * 16)}"
        refused(partner, body.encode(), MalformedError)
    off_curve = {"kty": "EC", "crv": "P-256", "x": point["x"], "y": b64u(b"\x01" * 32)}
    body = (f"{b64u(json.dumps({**ecdh, 'epk': off_curve}))}..{b64u(b'i' * 12)}."
            f"{b64u(b'c')}.{b64u(b't' * 16)}")
    refused(partner, body.encode(), DecryptError)
    other_curve = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    p384 = {"kty": "EC", "crv": "P-384", "x": b64u(other_curve.x.to_bytes(48, "big")),
            "y": b64u(other_curve.y.to_bytes(48, "big"))}
    body = (f"{b64u(json.dumps({**ecdh, 'epk': p384}))}..{b64u(b'i' * 12)}."
            f"{b64u(b'c')}.{b64u(b't' * 16)}")
    refused(partner, body.encode(), DecryptError)


# ---------------------------------------------------------------------------------------------
# Compression


def zip_options(**kwargs: Any) -> JoseOptions:
    return JoseOptions(allow_zip=True, **kwargs)


def test_zip_refused_by_default_accepted_when_allowed(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope
) -> None:
    body = to_partner(jose_keys, signed(jose_keys), {**JWE_HEADER, "zip": "DEF"})
    refused(jose_partner, body, AlgorithmError, "encryption")
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, zip_options())
    assert partner.open(body).plaintext == SECRET


def test_zip_other_than_def_and_broken_deflate(jose_keys: JoseKeys) -> None:
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, zip_options())
    inner = signed(jose_keys)
    refused(partner, to_partner(jose_keys, inner, {**JWE_HEADER, "zip": "GZIP"},
                                deflated=zlib.compress(inner.encode())), AlgorithmError)
    zipped = {**JWE_HEADER, "zip": "DEF"}
    refused(partner, to_partner(jose_keys, inner, zipped, deflated=b"\xff" * 40), MalformedError)
    whole = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    stream = whole.compress(inner.encode()) + whole.flush()
    refused(partner, to_partner(jose_keys, inner, zipped, deflated=stream[:-4]), MalformedError)
    refused(partner, to_partner(jose_keys, inner, zipped, deflated=stream + b"junk"),
            MalformedError)


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """64 MiB of zeros as one raw DEFLATE stream (about 64 KiB)."""
    packer = zlib.compressobj(9, wbits=-zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join(packer.compress(chunk) for _ in range(64)) + packer.flush()


def test_zip_bomb_fails_fast_in_bounded_memory(
    jose_keys: JoseKeys, zip_bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inflating stops one byte past the largest JWS the plaintext cap allows: a 64 MiB bomb
    costs that much inflating, not 64 MiB."""
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, zip_options(),
                            max_plaintext_bytes=64 * 1024)
    body = to_partner(jose_keys, "unused", {**JWE_HEADER, "zip": "DEF"}, deflated=zip_bomb)
    inflated = count_inflated(monkeypatch, jose)
    tracemalloc.start()
    try:
        refused(partner, body, TooLargeError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < sum(inflated) <= partner._jws_limit + 1, f"{sum(inflated)} bytes inflated"
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while opening a 64 MiB bomb"


def test_zip_just_over_the_cap(jose_keys: JoseKeys) -> None:
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, zip_options(),
                            max_plaintext_bytes=1000)
    zipped = {**JWE_HEADER, "zip": "DEF"}
    assert partner.open(to_partner(jose_keys, signed(jose_keys, payload=b"a" * 1000), zipped))
    refused(partner, to_partner(jose_keys, signed(jose_keys, payload=b"a" * 1001), zipped),
            TooLargeError)


# ---------------------------------------------------------------------------------------------
# Sizes


def test_oversized_parts(jose_keys: JoseKeys, jose_partner: JoseEnvelope) -> None:
    body = valid(jose_keys)
    big_header = b64u(json.dumps({**JWE_HEADER, "pad": "x" * 7000}))
    refused(jose_partner, replace_part(body, 0, big_header), MalformedError)
    refused(jose_partner, replace_part(body, 1, "A" * 2000), MalformedError)
    refused(jose_partner, replace_part(body, 2, "A" * 100), MalformedError)
    refused(jose_partner, replace_part(body, 4, "A" * 200), MalformedError)
    refused(jose_partner, replace_part(body, 3, "A" * 200_000), TooLargeError)
    inner_header = b64u(json.dumps({**JWS_HEADER, "pad": "x" * 7000}))
    inner = inner_header + "." + signed(jose_keys).split(".", 1)[1]
    refused(jose_partner, to_partner(jose_keys, inner), SignatureError)
    header, payload, _ = signed(jose_keys).split(".")
    refused(jose_partner, to_partner(jose_keys, f"{header}.{payload}.{'A' * 2000}"),
            SignatureError)


# The work on a JWE's parts that the size and count checks must spare an oversized one: the
# base64url scan, the decoding, the JSON parsing and the content-key unwrapping.
SEGMENT_WORK = ((b64url, "is_unpadded"), (b64url, "decode"), (jose, "_json_object"),
                (jose, "_decrypt_with"))


def segment_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Call]]:
    """The calls of each function of SEGMENT_WORK from now on."""
    return {name: count_calls(monkeypatch, owner, name) for owner, name in SEGMENT_WORK}


def assert_no_segment_work(work: dict[str, list[Call]]) -> None:
    assert {name: len(calls) for name, calls in work.items()} == {
        name: 0 for _, name in SEGMENT_WORK}


def _header_of(length: int) -> str:
    """A base64url JWE header of exactly `length` characters (a multiple of 4)."""
    members = json.dumps({**JWE_HEADER, "pad": ""})
    pad = length * 3 // 4 - len(members)
    header = b64u(json.dumps({**JWE_HEADER, "pad": "x" * pad}))
    assert len(header) == length
    return header


def test_the_protected_header_is_measured_before_json_parsing(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jose._MAX_HEADER (8192 characters) is checked before the header is decoded and parsed:
    a huge or deeply nested header costs no parsing."""
    body = valid(jose_keys)
    work = segment_work(monkeypatch)
    # At the limit the header is read (and, being another header than the one encrypted
    # under, fails decryption).
    refused(jose_partner, replace_part(body, 0, _header_of(jose._MAX_HEADER)), DecryptError)
    assert len(work["_json_object"]) == 1
    nested = b64u("[" * 100_000 + "]" * 100_000)
    for header in (_header_of(jose._MAX_HEADER + 4), "A" * 10_000_000, nested):
        work = segment_work(monkeypatch)
        error = refused(jose_partner, replace_part(body, 0, header), MalformedError)
        assert "protected header of" in str(error)
        assert_no_segment_work(work)


@pytest.mark.parametrize(("index", "limit", "error"), [
    (1, "_MAX_ENCRYPTED_KEY", MalformedError),
    (2, "_MAX_IV", MalformedError),
    (3, None, TooLargeError),
    (4, "_MAX_TAG", MalformedError),
], ids=["encrypted_key", "iv", "ciphertext", "tag"])
def test_each_segment_is_measured_before_decoding(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, index: int, limit: str | None,
    error: type[EnvelopeError], monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = valid(jose_keys)
    if limit is not None:
        size = getattr(jose, limit)
        just_over = "A" * (size + 1 + (-(size + 1) % 4 == 3))  # never a 4n+1 length
        refused(jose_partner, replace_part(body, index, just_over), error)
    work = segment_work(monkeypatch)
    refused(jose_partner, replace_part(body, index, "A" * 10_000_000), error)
    assert_no_segment_work(work)


@pytest.mark.parametrize("dots", [5, 6, 100_000])
def test_too_many_segments(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, dots: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused by the count of parts alone: none of them is scanned, decoded or parsed."""
    body = valid(jose_keys) + b"." + b".".join([b"AAAA"] * (dots - 4))
    work = segment_work(monkeypatch)
    error = refused(jose_partner, body, MalformedError)
    assert_no_segment_work(work)
    assert "five base64url parts" in str(error)


@pytest.mark.parametrize("inner", [
    "a.b", "a.b.c.d", "a.b.c.d.e", ".".join(["QUFB"] * 1000),
])
def test_a_jwe_holding_no_compact_jws(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, inner: str
) -> None:
    refused(jose_partner, to_partner(jose_keys, inner), SignatureError, "signature")


def test_the_largest_jws_inside(jose_keys: JoseKeys) -> None:
    """The JWS payload may be the plaintext cap, not one byte more; the inner header and
    signature have their own caps (test_oversized_parts)."""
    envelope = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, max_plaintext_bytes=50_000)
    at_cap = signed(jose_keys, payload=b"x" * 50_000)
    assert envelope.open(to_partner(jose_keys, at_cap)).plaintext == b"x" * 50_000
    refused(envelope, to_partner(jose_keys, signed(jose_keys, payload=b"x" * 50_001)),
            TooLargeError)


# ---------------------------------------------------------------------------------------------
# Property: open() raises only envelope errors, whatever it is given.

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
segments = st.text(alphabet=B64 + "=.+/ ", max_size=60)
PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(jose_partner: JoseEnvelope, body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        jose_partner.open(body)


@PROPERTY
@given(st.lists(segments, min_size=5, max_size=5))
def test_arbitrary_five_part_strings(jose_partner: JoseEnvelope, parts: list[str]) -> None:
    with pytest.raises(EnvelopeError):
        jose_partner.open(".".join(parts).encode())


header_values = st.one_of(
    st.sampled_from(["RSA-OAEP-256", "RSA-OAEP", "RSA1_5", "ECDH-ES", "dir", "A256GCM", "DEF",
                     "partner-enc-a", "none", "HS256"]),
    st.text(max_size=10), st.integers(), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2),
)
headers = st.dictionaries(
    st.sampled_from(["alg", "enc", "kid", "zip", "epk", "apu", "apv", "crit", "typ", "cty"]),
    header_values,
)


@PROPERTY
@given(headers, st.lists(st.binary(max_size=300), min_size=4, max_size=4))
def test_arbitrary_headers_and_parts(
    jose_keys: JoseKeys, header: dict[str, Any], parts: list[bytes]
) -> None:
    envelope = _zip_partner(jose_keys)
    body = ".".join([b64u(json.dumps(header)), *(b64u(p) for p in parts)]).encode()
    with pytest.raises(EnvelopeError):
        envelope.open(body)


@PROPERTY
@given(st.data())
def test_mutated_valid_messages(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, data: st.DataObject
) -> None:
    body = bytearray(_valid_cached(jose_keys))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.sampled_from(B64 + ".=").map(ord))
    if bytes(body) == _valid_cached(jose_keys):
        return
    try:
        opened = jose_partner.open(bytes(body))
    except EnvelopeError:
        return
    # A change that survives must be one base64url cannot see (the unused low bits of a
    # segment's last character): the message is the same.
    assert opened.plaintext == SECRET


_cache: dict[str, Any] = {}


def _valid_cached(keys: JoseKeys) -> bytes:
    if "valid" not in _cache:
        _cache["valid"] = valid(keys)
    body: bytes = _cache["valid"]
    return body


def _zip_partner(keys: JoseKeys) -> JoseEnvelope:
    if "zip" not in _cache:
        _cache["zip"] = jose_envelope(
            keys, [*PARTNER_OWN, ("partner-enc-ec", "private", "read-only")], GOOGLE_PUBLIC,
            zip_options(accept_key_algs=("RSA-OAEP-256", "RSA-OAEP", "RSA1_5", "ECDH-ES")),
        )
    envelope: JoseEnvelope = _cache["zip"]
    return envelope


def test_messages_never_carry_the_plaintext(jose_keys: JoseKeys) -> None:
    plain = base64.urlsafe_b64encode(SECRET).rstrip(b"=")
    assert plain not in valid(jose_keys) and SECRET not in valid(jose_keys)


def test_a_key_that_does_not_unwrap_costs_a_content_decryption(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 7516 11.5: a wrong key and an altered message do the same work (no timing oracle
    between the key layer and the content layer); both are DecryptError."""
    from jwcrypto.jwa import JWA

    calls = count_calls(monkeypatch, type(JWA.encryption_alg("A256GCM")), "decrypt")
    inner = signed(jose_keys)
    refused(jose_partner, to_partner(jose_keys, inner, recipient="stranger-enc"), DecryptError)
    assert [len(call.args[1]) for call in calls] == [32]  # (self, cek, ...): a 256-bit key
    body = to_partner(jose_keys, inner)
    refused(jose_partner, replace_part(body, 4, flip_first(body.decode().split(".")[4])),
            DecryptError)
    assert [len(call.args[1]) for call in calls] == [32, 32]
