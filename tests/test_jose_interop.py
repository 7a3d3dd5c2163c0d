"""jose.py against panva's jose (Node), in both directions: jose seals, we open; we seal, jose
opens and verifies, with the kid headers we expect."""

from __future__ import annotations

import pytest

from gateway.config import JoseOptions
from gateway.errors import AlgorithmError, DecryptError, SignatureError, UnknownKeyError
from gateway.jose import JoseEnvelope
from tests.jose_fixtures import (
    GOOGLE_PUBLIC,
    PARTNER_OWN,
    JoseKeys,
    KeySpec,
    NodeJose,
    NodeJoseError,
    jose_envelope,
)

pytestmark = pytest.mark.interop

REQUEST = (
    b'{"requestHeader": {"requestId": "3f1e2d", "requestTimestamp": {"epochMillis": "1"}, '
    b'"protocolVersion": {"major": 1}, "paymentIntegratorAccountId": "ACME"}, '
    b'"clientMessage": "caf\xc3\xa9"}'
)
BIG = bytes(range(256)) * 256  # 64 KiB, every byte value
EC_SIGNING: list[KeySpec] = [
    ("partner-sig-ec", "private", "active"),
    ("partner-enc-a", "private", "active"),
]


# ---------------------------------------------------------------------------------------------
# jose seals, we open


@pytest.mark.parametrize(
    ("sign_alg", "signer"),
    [("RS256", "google-sig-a"), ("PS256", "google-sig-a"), ("ES256", "google-sig-ec")],
)
@pytest.mark.parametrize("plaintext", [REQUEST, BIG], ids=["request", "64KiB"])
def test_jose_seals_we_open(
    jose_keys: JoseKeys,
    jose_partner: JoseEnvelope,
    node_jose: NodeJose,
    sign_alg: str,
    signer: str,
    plaintext: bytes,
) -> None:
    body = node_jose.seal(
        plaintext, jose_keys.private(signer), sign_alg, jose_keys.public("partner-enc-a")
    )
    opened = jose_partner.open(body)
    assert opened.plaintext == plaintext
    assert (opened.decrypted_by, opened.verified_by) == (("partner-enc-a",), (signer,))


@pytest.mark.parametrize(
    ("key_alg", "enc"),
    [
        ("RSA-OAEP", "A128GCM"),
        ("RSA-OAEP-256", "A256CBC-HS512"),
        ("RSA-OAEP-256", "A128CBC-HS256"),
    ],
)
def test_jose_key_management_and_content_encryption(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, node_jose: NodeJose, key_alg: str, enc: str
) -> None:
    body = node_jose.seal(
        REQUEST, jose_keys.private("google-sig-a"), "RS256", jose_keys.public("partner-enc-a"),
        key_alg, enc,
    )
    assert jose_partner.open(body).plaintext == REQUEST


@pytest.mark.parametrize("key_alg", ["ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A256KW"])
def test_jose_ecdh_es(jose_keys: JoseKeys, node_jose: NodeJose, key_alg: str) -> None:
    own: list[KeySpec] = [
        ("partner-sig-a", "private", "active"),
        ("partner-enc-ec", "private", "active"),
    ]
    partner = jose_envelope(jose_keys, own, GOOGLE_PUBLIC)
    body = node_jose.seal(
        REQUEST, jose_keys.private("google-sig-ec"), "ES256",
        jose_keys.public("partner-enc-ec"), key_alg,
    )
    opened = partner.open(body)
    assert (opened.plaintext, opened.decrypted_by) == (REQUEST, ("partner-enc-ec",))


def test_jose_without_kids(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, node_jose: NodeJose
) -> None:
    body = node_jose.seal(
        REQUEST, jose_keys.private("google-sig-a"), "PS256", jose_keys.public("partner-enc-a"),
        jws_header={"kid": None}, jwe_header={"kid": None},
    )
    opened = jose_partner.open(body)
    assert (opened.decrypted_by, opened.verified_by) == (("partner-enc-a",), ("google-sig-a",))


def test_jose_with_extra_headers(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, node_jose: NodeJose
) -> None:
    body = node_jose.seal(
        REQUEST, jose_keys.private("google-sig-a"), "RS256", jose_keys.public("partner-enc-a"),
        jws_header={"typ": "JOSE"}, jwe_header={"cty": "JWT", "typ": "JOSE"},
    )
    assert jose_partner.open(body).plaintext == REQUEST


def test_jose_zip_refused_unless_allowed(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, node_jose: NodeJose
) -> None:
    body = node_jose.seal(
        REQUEST * 50, jose_keys.private("google-sig-a"), "RS256",
        jose_keys.public("partner-enc-a"), jwe_header={"zip": "DEF"},
    )
    with pytest.raises(AlgorithmError):
        jose_partner.open(body)
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(allow_zip=True))
    assert partner.open(body).plaintext == REQUEST * 50


def test_jose_messages_we_must_refuse(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope, node_jose: NodeJose
) -> None:
    def seal(
        signer: str,
        recipient: str,
        sign_alg: str = "RS256",
        *,
        jws_header: dict[str, object] | None = None,
        jwe_header: dict[str, object] | None = None,
    ) -> bytes:
        return node_jose.seal(
            REQUEST, jose_keys.private(signer), sign_alg, jose_keys.public(recipient),
            jws_header=jws_header, jwe_header=jwe_header,
        )

    with pytest.raises(SignatureError):
        jose_partner.open(seal("stranger-sig", "partner-enc-a"))
    with pytest.raises(SignatureError):
        jose_partner.open(seal("stranger-sig", "partner-enc-a", jws_header={"kid": "google-sig-a"}))
    with pytest.raises(UnknownKeyError):
        jose_partner.open(seal("google-sig-a", "stranger-enc"))
    with pytest.raises(DecryptError):
        jose_partner.open(seal("google-sig-a", "stranger-enc", jwe_header={"kid": None}))
    with pytest.raises(UnknownKeyError):
        jose_partner.open(seal("google-sig-a", "partner-enc-b"))  # not (yet) in our keyset
    restricted = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC,
                               JoseOptions(accept_sign_algs=("RS256",)))
    with pytest.raises(AlgorithmError) as caught:
        restricted.open(seal("google-sig-a", "partner-enc-a", "PS256"))
    assert caught.value.layer == "signature"


def test_jose_rotation_new_key_read_only(jose_keys: JoseKeys, node_jose: NodeJose) -> None:
    """Google starts encrypting to our new key while it is still read-only here."""
    own: list[KeySpec] = [
        ("partner-sig-a", "private", "active"),
        ("partner-enc-a", "private", "active"),
        ("partner-enc-b", "private", "read-only"),
    ]
    partner = jose_envelope(jose_keys, own, GOOGLE_PUBLIC)
    for recipient in ("partner-enc-a", "partner-enc-b"):
        body = node_jose.seal(
            REQUEST, jose_keys.private("google-sig-a"), "RS256", jose_keys.public(recipient)
        )
        assert partner.open(body).decrypted_by == (recipient,)


# ---------------------------------------------------------------------------------------------
# We seal, jose opens and verifies


@pytest.mark.parametrize(
    ("sign_alg", "own"),
    [
        ("RS256", PARTNER_OWN),
        ("PS256", PARTNER_OWN),
        ("ES256", EC_SIGNING),
    ],
)
@pytest.mark.parametrize("plaintext", [REQUEST, BIG], ids=["request", "64KiB"])
def test_we_seal_jose_opens(
    jose_keys: JoseKeys,
    node_jose: NodeJose,
    sign_alg: str,
    own: list[KeySpec],
    plaintext: bytes,
) -> None:
    partner = jose_envelope(jose_keys, own, GOOGLE_PUBLIC, JoseOptions(sign_alg=sign_alg))
    sealed = partner.seal(plaintext)
    signer = sealed.signed_by[0]
    opened, jws_header, jwe_header = node_jose.open(
        sealed.body,
        jose_keys.private("google-enc-a"),
        [jose_keys.public("partner-sig-a"), jose_keys.public("partner-sig-ec")],
        key_algs=["RSA-OAEP-256"],
        encs=["A256GCM"],
        sign_algs=[sign_alg],
    )
    assert opened == plaintext
    assert jwe_header == {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "google-enc-a"}
    assert jws_header == {"alg": sign_alg, "kid": signer}
    assert signer == ("partner-sig-ec" if sign_alg == "ES256" else "partner-sig-a")


@pytest.mark.parametrize(
    ("key_alg", "enc", "recipient"),
    [
        ("RSA-OAEP", "A128GCM", "google-enc-a"),
        ("RSA-OAEP-256", "A256CBC-HS512", "google-enc-a"),
        ("ECDH-ES", "A256GCM", "google-enc-ec"),
        ("ECDH-ES+A256KW", "A128CBC-HS256", "google-enc-ec"),
    ],
)
def test_we_seal_with_other_algorithms(
    jose_keys: JoseKeys, node_jose: NodeJose, key_alg: str, enc: str, recipient: str
) -> None:
    peer: list[KeySpec] = [("google-sig-a", "public", "active"), (recipient, "public", "active")]
    partner = jose_envelope(jose_keys, PARTNER_OWN, peer, JoseOptions(key_alg=key_alg, enc=enc))
    opened, _, jwe_header = node_jose.open(
        partner.seal(REQUEST).body, jose_keys.private(recipient),
        [jose_keys.public("partner-sig-a")],
    )
    assert opened == REQUEST
    assert (jwe_header["alg"], jwe_header["enc"], jwe_header["kid"]) == (key_alg, enc, recipient)


def test_jose_verification_is_real(jose_keys: JoseKeys, node_jose: NodeJose) -> None:
    """The checks above mean something: jose refuses our message with the wrong keys."""
    body = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC).seal(REQUEST).body
    with pytest.raises(NodeJoseError):
        node_jose.open(body, jose_keys.private("google-enc-a"), [jose_keys.public("stranger-sig")])
    with pytest.raises(NodeJoseError):
        node_jose.open(body, jose_keys.private("stranger-enc"), [jose_keys.public("partner-sig-a")])
    with pytest.raises(NodeJoseError):
        node_jose.open(body, jose_keys.private("google-enc-a"),
                       [jose_keys.public("partner-sig-a")], sign_algs=["PS256"])


def test_both_of_our_envelopes_and_jose_agree(
    jose_keys: JoseKeys, jose_google: JoseEnvelope, node_jose: NodeJose
) -> None:
    """Our envelope playing Google seals; jose and our partner side both open it alike."""
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC)
    body = jose_google.seal(REQUEST).body
    by_jose = node_jose.open(body, jose_keys.private("partner-enc-a"),
                             [jose_keys.public("google-sig-a")])
    assert by_jose[0] == partner.open(body).plaintext == REQUEST
    assert by_jose[1] == {"alg": "RS256", "kid": "google-sig-a"}
