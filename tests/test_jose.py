"""jose.py: key loading, sealing and opening, the rotation matrix, concurrency."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import JoseOptions, KeysetConfig, KeyState
from gateway.envelope import CONTENT_TYPES
from gateway.errors import (
    ConfigError,
    EnvelopeError,
    NoKeyError,
    SignatureError,
    TooLargeError,
    UnknownKeyError,
)
from gateway.jose import JoseEnvelope, generate_jwk, load_jose_keyset
from gateway.keys import Keyset
from tests.jose_fixtures import (
    GOOGLE_OWN,
    GOOGLE_PUBLIC,
    PARTNER_OWN,
    PARTNER_PUBLIC,
    JoseKeys,
    KeySpec,
    b64u,
    jose_envelope,
    jose_keyset,
    jwk_of,
)

PLAINTEXT = b'{"requestHeader": {"requestId": "r-1"}, "clientMessage": "hello"}'


def b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def jwe_header(body: bytes) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(b64d(body.decode("ascii").split(".")[0]))
    return header


def one_key(keys: JoseKeys, file: Path, **extra: Any) -> KeysetConfig:
    config = keys.keyset_config("k", [("partner-sig-a", "private", "active", extra)])
    key = dataclasses.replace(config.keys[0], file=file)
    return dataclasses.replace(config, keys=(key,))


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638, computed here independently of jwcrypto."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64u(hashlib.sha256(canonical.encode("utf-8")).digest())


# ---------------------------------------------------------------------------------------------
# Loading keys


def test_loads_private_and_public_jwks(jose_keys: JoseKeys) -> None:
    keyset = jose_keyset(
        jose_keys,
        "partner",
        [
            ("partner-sig-a", "private", "active", {"not_after": "2030-01-01T00:00:00+00:00"}),
            ("partner-enc-a", "public", "read-only"),
            ("partner-sig-ec", "private", "disabled"),
        ],
    )
    sig, enc, ec_key = keyset.keys
    assert (keyset.name, keyset.type) == ("partner", "jose")
    assert (sig.id, sig.state, sig.private, sig.can_sign, sig.can_encrypt) == (
        "partner-sig-a", KeyState.ACTIVE, True, True, False,
    )
    assert sig.algorithm == "RSA-2048"
    assert sig.expires == datetime(2030, 1, 1, tzinfo=UTC)
    assert sig.place == "keysets.partner.keys[0]"
    assert sig.fingerprint == thumbprint(jose_keys.jwk("partner-sig-a"))
    assert (enc.private, enc.can_sign, enc.can_encrypt) == (False, False, True)
    assert enc.fingerprint == thumbprint(jose_keys.jwk("partner-enc-a"))
    assert (ec_key.algorithm, ec_key.state, ec_key.enabled) == ("EC-P256", KeyState.DISABLED, False)
    assert ec_key.fingerprint == thumbprint(jose_keys.jwk("partner-sig-ec"))


def test_use_comes_from_config_else_jwk_else_both(jose_keys: JoseKeys, tmp_path: Path) -> None:
    jwk = jose_keys.jwk("partner-sig-a")
    del jwk["use"]
    bare = write_json(tmp_path / "bare.jwk", jwk)
    both = load_jose_keyset(one_key(jose_keys, bare)).keys[0]
    assert (both.can_sign, both.can_encrypt) == (True, True)
    narrowed = load_jose_keyset(one_key(jose_keys, bare, use="enc")).keys[0]
    assert (narrowed.can_sign, narrowed.can_encrypt) == (False, True)
    same = load_jose_keyset(one_key(jose_keys, jose_keys.private("partner-sig-a"), use="sig"))
    assert same.keys[0].can_sign


def test_config_use_contradicting_the_jwk_is_an_error(jose_keys: JoseKeys) -> None:
    config = one_key(jose_keys, jose_keys.private("partner-sig-a"), use="enc")
    with pytest.raises(ConfigError) as caught:
        load_jose_keyset(config)
    assert caught.value.place == "keysets.k.keys[0].use"
    assert "contradicts" in caught.value.message


def test_webcrypto_key_ops_restrict_use(jose_keys: JoseKeys, tmp_path: Path) -> None:
    # WebCrypto exports RSA-OAEP public keys with key_ops ["encrypt"] and no `use`.
    jwk = jose_keys.public_jwk("google-enc-a")
    del jwk["use"]
    jwk.update(key_ops=["encrypt"], alg="RSA-OAEP-256")
    path = write_json(tmp_path / "webcrypto.jwk", jwk)
    key = load_jose_keyset(
        jose_keys.keyset_config("google", [("google-enc-a", "public", "active", {"file": path})])
    ).keys[0]
    assert (key.can_sign, key.can_encrypt) == (False, True)
    peer = Keyset("google", "jose", (key, *jose_keyset(jose_keys, "g", GOOGLE_PUBLIC).keys[:1]))
    partner = JoseEnvelope(
        jose_keyset(jose_keys, "partner", PARTNER_OWN), peer, JoseOptions(),
        max_plaintext_bytes=1024,
    )
    google = jose_envelope(jose_keys, GOOGLE_OWN, PARTNER_PUBLIC)
    assert google.open(partner.seal(PLAINTEXT).body).plaintext == PLAINTEXT


def test_kid_differing_from_configured_id_is_an_error(jose_keys: JoseKeys) -> None:
    config = one_key(jose_keys, jose_keys.private("partner-enc-a"))
    with pytest.raises(ConfigError) as caught:
        load_jose_keyset(config)
    assert caught.value.place == "keysets.k.keys[0].id"
    assert "'partner-enc-a'" in caught.value.message and "'partner-sig-a'" in caught.value.message


def test_jwk_without_kid_takes_the_configured_id(jose_keys: JoseKeys, tmp_path: Path) -> None:
    jwk = jose_keys.jwk("partner-sig-a")
    del jwk["kid"]
    key = load_jose_keyset(one_key(jose_keys, write_json(tmp_path / "k.jwk", jwk))).keys[0]
    assert key.id == "partner-sig-a"
    assert key.fingerprint == thumbprint(jwk)


def test_jwk_set_with_exactly_one_key(jose_keys: JoseKeys, tmp_path: Path) -> None:
    one = write_json(tmp_path / "one.jwks", {"keys": [jose_keys.jwk("partner-sig-a")]})
    assert load_jose_keyset(one_key(jose_keys, one)).keys[0].can_sign
    two = write_json(
        tmp_path / "two.jwks",
        {"keys": [jose_keys.jwk("partner-sig-a"), jose_keys.jwk("partner-sig-b")]},
    )
    with pytest.raises(ConfigError) as caught:
        load_jose_keyset(one_key(jose_keys, two))
    assert caught.value.place == "keysets.k.keys[0].file"
    assert "2 keys" in caught.value.message


@pytest.mark.parametrize("encrypted", [False, True])
def test_pem_private_and_public(jose_keys: JoseKeys, tmp_path: Path, encrypted: bool) -> None:
    key = jose_keys.key("partner-sig-a")
    protection: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(b"pass phrase")
        if encrypted
        else serialization.NoEncryption()
    )
    private_pem = tmp_path / "private.pem"
    private_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, protection
        )
    )
    public_pem = tmp_path / "public.pem"
    public_pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    extra = {"passphrase": "pass phrase"} if encrypted else {}
    private = load_jose_keyset(one_key(jose_keys, private_pem, **extra)).keys[0]
    public = load_jose_keyset(one_key(jose_keys, public_pem)).keys[0]
    expected = thumbprint(jose_keys.jwk("partner-sig-a"))
    assert (private.id, private.private, private.fingerprint) == ("partner-sig-a", True, expected)
    assert (public.id, public.private, public.fingerprint) == ("partner-sig-a", False, expected)
    assert private.can_sign and private.can_encrypt  # PEM has no `use`
    if encrypted:
        with pytest.raises(ConfigError, match="PEM key cannot be read"):
            load_jose_keyset(one_key(jose_keys, private_pem, passphrase="wrong"))


def test_pem_key_signs_and_is_seen_under_its_configured_id(
    jose_keys: JoseKeys, tmp_path: Path
) -> None:
    pem = tmp_path / "partner-sig.pem"
    pem.write_bytes(
        jose_keys.key("partner-sig-a").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    own = load_jose_keyset(
        jose_keys.keyset_config(
            "partner",
            [
                ("partner-sig-a", "private", "active", {"file": pem, "use": "sig"}),
                ("partner-enc-a", "private", "active"),
            ],
        )
    )
    partner = JoseEnvelope(
        own, jose_keyset(jose_keys, "google", GOOGLE_PUBLIC), JoseOptions(),
        max_plaintext_bytes=1024,
    )
    google = jose_envelope(jose_keys, GOOGLE_OWN, PARTNER_PUBLIC)
    assert google.open(partner.seal(PLAINTEXT).body).verified_by == ("partner-sig-a",)


def bad_file(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "bad.jwk"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_json(path, content)
    return path


def rsa_1024_jwk() -> dict[str, Any]:
    return jwk_of(rsa.generate_private_key(public_exponent=65537, key_size=1024), "x", "sig")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key at all", "not a JWK, JWK Set or PEM key"),
        (b'["kty"]', "not a JWK, JWK Set or PEM key"),
        (b'{"kty": "RSA", "kty": "EC"}', "not a JWK, JWK Set or PEM key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PEM key cannot"),
        ({"kty": "oct", "k": b64u(b"k" * 32)}, "symmetric 'oct' keys are refused"),
        ({"keys": [{"kty": "oct", "k": b64u(b"k" * 32)}]}, "symmetric 'oct' keys are refused"),
        ({"kty": "OKP", "crv": "Ed25519", "x": b64u(b"x" * 32)}, "not supported"),
        ({"kty": "RSA", "n": "!!", "e": "AQAB"}, "not a valid JWK"),
        ({"kty": "RSA", "n": b64u(b"\x81" * 256), "e": "AQAB", "d": b64u(b"\x02" * 256)},
         "not a valid key"),
        ({"keys": []}, "0 keys"),
        ({"kty": "RSA", "n": b64u(b"\xff" * 256), "e": "AQAB", "use": "both"}, "neither"),
        ({"kty": "RSA", "n": b64u(b"\xff" * 256), "e": "AQAB", "key_ops": "sign"},
         "not a list"),
        ({"kty": "RSA", "n": b64u(b"\xff" * 256), "e": "AQAB", "key_ops": []},
         "neither signing nor encryption"),
    ],
)
def test_key_file_errors_name_the_place(
    jose_keys: JoseKeys, tmp_path: Path, content: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_jose_keyset(one_key(jose_keys, bad_file(tmp_path, content)))
    assert caught.value.place == "keysets.k.keys[0].file"
    assert message in caught.value.message


def test_rsa_below_2048_bits_is_refused(jose_keys: JoseKeys, tmp_path: Path) -> None:
    path = bad_file(tmp_path, {**rsa_1024_jwk(), "kid": "partner-sig-a"})
    with pytest.raises(ConfigError, match="1024 bits; 2048 to 8192 accepted") as caught:
        load_jose_keyset(one_key(jose_keys, path))
    assert caught.value.place == "keysets.k.keys[0].file"


def test_rsa_above_8192_bits_is_refused_at_load_not_at_every_message(
    jose_keys: JoseKeys, tmp_path: Path,
) -> None:
    """A bigger key's signatures and encrypted keys exceed the segment bounds checked before
    decoding: it would load, then fail every message."""
    def public(size: int) -> Path:  # an odd modulus of `size` bytes: a valid public JWK
        return bad_file(tmp_path, {"kty": "RSA", "n": b64u(b"\xff" * size), "e": "AQAB",
                                   "use": "sig"})

    config = one_key(jose_keys, public(1024))
    assert load_jose_keyset(config).keys[0].algorithm == "RSA-8192"
    with pytest.raises(ConfigError, match="8200 bits; 2048 to 8192 accepted"):
        load_jose_keyset(one_key(jose_keys, public(1025)))


def test_other_curves_are_refused(jose_keys: JoseKeys, tmp_path: Path) -> None:
    jwk = jwk_of(ec.generate_private_key(ec.SECP256K1()), "partner-sig-a", "sig")
    with pytest.raises(ConfigError, match="not supported"):
        load_jose_keyset(one_key(jose_keys, bad_file(tmp_path, jwk)))


def test_missing_file_and_wrong_keyset_type(jose_keys: JoseKeys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_jose_keyset(one_key(jose_keys, tmp_path / "absent.jwk"))
    assert caught.value.place == "keysets.k.keys[0].file"
    config = dataclasses.replace(one_key(jose_keys, jose_keys.private("partner-sig-a")),
                                 type="pgp")
    with pytest.raises(ConfigError) as caught:
        load_jose_keyset(config)
    assert caught.value.place == "keysets.k.type"


def test_generated_jwks_load_and_work(jose_keys: JoseKeys, tmp_path: Path) -> None:
    files: dict[str, Path] = {}
    for name, use in (("demo-sig", "sig"), ("demo-enc", "enc")):
        private, public = generate_jwk(name, use)
        assert "\"d\"" in private and "\"d\"" not in public
        files[name] = write_json(tmp_path / f"{name}.jwk", json.loads(private))
        files[name + ".pub"] = write_json(tmp_path / f"{name}.pub.jwk", json.loads(public))

    def spec(name: str, file: str) -> KeySpec:
        return ("partner-sig-a", "private", "active", {"id": name, "file": files[file]})

    own = load_jose_keyset(jose_keys.keyset_config(
        "own", [spec("demo-sig", "demo-sig"), spec("demo-enc", "demo-enc")]))
    peer = load_jose_keyset(jose_keys.keyset_config(
        "peer", [spec("demo-sig", "demo-sig.pub"), spec("demo-enc", "demo-enc.pub")]))
    assert [(k.algorithm, k.private, k.capabilities) for k in own.keys] == [
        ("RSA-2048", True, ("sign",)), ("RSA-2048", True, ("encrypt",)),
    ]
    assert [k.private for k in peer.keys] == [False, False]
    envelope = JoseEnvelope(own, peer, JoseOptions(), max_plaintext_bytes=100)
    assert envelope.open(envelope.seal(b"demo").body).plaintext == b"demo"
    with pytest.raises(ConfigError):
        generate_jwk("x", "both")
    with pytest.raises(ConfigError):
        generate_jwk("x", "sig", bits=1024)


# ---------------------------------------------------------------------------------------------
# Options against keys


@pytest.mark.parametrize(
    ("own", "peer", "options", "place"),
    [
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(sign_alg="ES256"), "keysets.own.keys[0]"),
        (
            [("partner-sig-ec", "private", "active"), ("partner-enc-a", "private", "active")],
            GOOGLE_PUBLIC,
            JoseOptions(sign_alg="PS256"),
            "keysets.own.keys[0]",
        ),
        (
            [("partner-sig-ec", "private", "active"), ("partner-enc-a", "private", "active")],
            GOOGLE_PUBLIC,
            JoseOptions(sign_alg="ES384"),
            "keysets.own.keys[0]",
        ),
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(key_alg="ECDH-ES"), "keysets.peer.keys[1]"),
        (
            PARTNER_OWN,
            [("google-sig-a", "public", "active"), ("google-enc-ec", "public", "active")],
            JoseOptions(key_alg="RSA-OAEP-256"),
            "keysets.peer.keys[1]",
        ),
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(sign_alg="HS256"), "jose.sign_alg"),
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(key_alg="RSA1_5"), "jose.key_alg"),
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(accept_sign_algs=("none",)),
         "jose.accept_sign_algs"),
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(accept_sign_algs=("RS256", "HS256")),
         "jose.accept_sign_algs"),
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(accept_key_algs=("dir",)),
         "jose.accept_key_algs"),
        (PARTNER_OWN, GOOGLE_PUBLIC, JoseOptions(accept_encs=("A256KW",)), "jose.accept_encs"),
    ],
)
def test_options_must_fit_the_keys(
    jose_keys: JoseKeys,
    own: Sequence[KeySpec],
    peer: Sequence[KeySpec],
    options: JoseOptions,
    place: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        jose_envelope(jose_keys, own, peer, options)
    assert caught.value.place == place


def test_read_only_keys_need_not_fit_the_sealing_algorithms(jose_keys: JoseKeys) -> None:
    # An RSA signing key kept read-only while ES256 is active is a normal migration step.
    own = [
        ("partner-sig-ec", "private", "active"),
        ("partner-sig-a", "private", "read-only"),
        ("partner-enc-a", "private", "active"),
    ]
    partner = jose_envelope(jose_keys, own, GOOGLE_PUBLIC, JoseOptions(sign_alg="ES256"))
    google = jose_envelope(jose_keys, GOOGLE_OWN, PARTNER_PUBLIC)
    assert google.open(partner.seal(PLAINTEXT).body).verified_by == ("partner-sig-ec",)


# ---------------------------------------------------------------------------------------------
# Round trips

EC_OWN: list[KeySpec] = [
    ("partner-sig-ec", "private", "active"),
    ("partner-enc-ec", "private", "active"),
]
EC_PUBLIC: list[KeySpec] = [
    ("partner-sig-ec", "public", "active"),
    ("partner-enc-ec", "public", "active"),
]


@pytest.mark.parametrize("sign_alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
@pytest.mark.parametrize("key_alg", ["RSA-OAEP-256", "RSA-OAEP"])
def test_round_trip_rsa(
    jose_keys: JoseKeys, jose_google: JoseEnvelope, sign_alg: str, key_alg: str
) -> None:
    options = JoseOptions(sign_alg=sign_alg, key_alg=key_alg)
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, options)
    sealed = partner.seal(PLAINTEXT)
    assert (sealed.signed_by, sealed.encrypted_to) == (("partner-sig-a",), ("google-enc-a",))
    assert jwe_header(sealed.body) == {"alg": key_alg, "enc": "A256GCM", "kid": "google-enc-a"}
    opened = jose_google.open(sealed.body)
    assert opened.plaintext == PLAINTEXT
    assert (opened.decrypted_by, opened.verified_by) == (("google-enc-a",), ("partner-sig-a",))


@pytest.mark.parametrize(
    "key_alg", ["ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW"]
)
@pytest.mark.parametrize(
    "enc", ["A256GCM", "A128GCM", "A192GCM", "A256CBC-HS512", "A128CBC-HS256", "A192CBC-HS384"]
)
def test_round_trip_ec(jose_keys: JoseKeys, key_alg: str, enc: str) -> None:
    options = JoseOptions(
        sign_alg="ES256", key_alg=key_alg, enc=enc, accept_encs=(enc,)
    )
    google = jose_envelope(jose_keys, EC_OWN, EC_PUBLIC, options)
    sealed = google.seal(PLAINTEXT)
    assert jwe_header(sealed.body)["epk"]["crv"] == "P-256"
    # A fresh ephemeral key for every message (the RSA headers are encoded once and reused).
    assert jwe_header(google.seal(PLAINTEXT).body)["epk"] != jwe_header(sealed.body)["epk"]
    opened = google.open(sealed.body)  # an envelope talking to itself: own and peer are alike
    assert opened.plaintext == PLAINTEXT
    assert (opened.decrypted_by, opened.verified_by) == (("partner-enc-ec",), ("partner-sig-ec",))


def test_round_trip_sizes_and_whitespace(
    jose_partner: JoseEnvelope, jose_google: JoseEnvelope
) -> None:
    for plaintext in (b"", b"x", bytes(range(256)) * 256):  # 64 KiB: exactly the cap
        body = jose_partner.seal(plaintext).body
        assert body.isascii() and body.count(b".") == 4
        assert jose_google.open(b"\r\n  " + body + b"\n").plaintext == plaintext


def test_content_type_and_close(jose_partner: JoseEnvelope) -> None:
    assert jose_partner.scheme == "jose"
    assert jose_partner.content_type == CONTENT_TYPES["jose"] == "application/jose; charset=utf-8"
    jose_partner.close()
    jose_partner.close()
    assert jose_partner.seal(b"still works").body


def test_seal_over_the_cap_is_too_large(jose_keys: JoseKeys) -> None:
    partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, max_plaintext_bytes=100)
    partner.seal(b"x" * 100)
    with pytest.raises(TooLargeError):
        partner.seal(b"x" * 101)


def test_open_over_the_cap_is_too_large(jose_keys: JoseKeys) -> None:
    big = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC, max_plaintext_bytes=10_000)
    small = jose_envelope(jose_keys, GOOGLE_OWN, PARTNER_PUBLIC, max_plaintext_bytes=1_000)
    small.open(big.seal(b"x" * 1_000).body)
    with pytest.raises(TooLargeError):
        small.open(big.seal(b"x" * 1_001).body)
    tiny = jose_envelope(jose_keys, GOOGLE_OWN, PARTNER_PUBLIC, max_plaintext_bytes=1)
    with pytest.raises(TooLargeError):  # refused on the ciphertext's length, before decrypting
        tiny.open(big.seal(b"x" * 10_000).body)


def shifted(keyset: Keyset, days: int) -> Keyset:
    """The same keyset seen `days` from now."""
    return dataclasses.replace(
        keyset, now=lambda: datetime.now(UTC) + timedelta(days=days)
    )


def test_seal_without_usable_keys_is_no_key(jose_keys: JoseKeys) -> None:
    soon = {"not_after": datetime.now(UTC) + timedelta(days=10)}
    own = jose_keyset(
        jose_keys,
        "partner",
        [("partner-sig-a", "private", "active", soon), ("partner-enc-a", "private", "active")],
    )
    peer = jose_keyset(
        jose_keys,
        "google",
        [("google-sig-a", "public", "active"), ("google-enc-a", "public", "active", soon)],
    )
    JoseEnvelope(own, peer, JoseOptions(), max_plaintext_bytes=100).seal(b"ok today")
    # Keys expire while the gateway runs: sealing stops, opening with own keys goes on.
    later_own = JoseEnvelope(shifted(own, 11), peer, JoseOptions(), max_plaintext_bytes=100)
    with pytest.raises(NoKeyError, match="signing key"):
        later_own.seal(b"x")
    later_peer = JoseEnvelope(own, shifted(peer, 11), JoseOptions(), max_plaintext_bytes=100)
    with pytest.raises(NoKeyError, match="encrypt to"):
        later_peer.seal(b"x")
    no_active = jose_keyset(
        jose_keys, "partner",
        [("partner-sig-a", "private", "read-only"), ("partner-enc-a", "private", "active")],
    )
    with pytest.raises(NoKeyError):
        JoseEnvelope(no_active, peer, JoseOptions(), max_plaintext_bytes=100).seal(b"x")


def test_expired_own_key_still_decrypts_expired_peer_key_never_verifies(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope
) -> None:
    soon = {"not_after": datetime.now(UTC) + timedelta(days=10)}
    body = jose_partner.seal(PLAINTEXT).body
    google_own = jose_keyset(
        jose_keys, "google",
        [("google-sig-a", "private", "active"), ("google-enc-a", "private", "active", soon)],
    )
    partner_public = jose_keyset(
        jose_keys, "partner",
        [("partner-sig-a", "public", "active", soon), ("partner-enc-a", "public", "active")],
    )
    later = JoseEnvelope(
        shifted(google_own, 11), partner_public, JoseOptions(), max_plaintext_bytes=1024
    )
    assert later.open(body).decrypted_by == ("google-enc-a",)
    expired_peer = JoseEnvelope(
        google_own, shifted(partner_public, 11), JoseOptions(), max_plaintext_bytes=1024
    )
    with pytest.raises(SignatureError):
        expired_peer.open(body)


def test_a_naive_not_after_is_utc(jose_keys: JoseKeys) -> None:
    """As for PGP keys (keys.key_expiry): a KeyConfig made in code with a naive not_after made
    Keyset.verifiers() raise TypeError comparing it with the aware current time."""
    keyset = jose_keyset(jose_keys, "peer", [
        ("partner-sig-a", "public", "active", {"not_after": datetime(2030, 1, 1)})])
    assert keyset.keys[0].expires == datetime(2030, 1, 1, tzinfo=UTC)
    assert [key.id for key in keyset.verifiers()] == ["partner-sig-a"]


def test_not_after_in_the_past_never_verifies(
    jose_keys: JoseKeys, jose_partner: JoseEnvelope
) -> None:
    past = {"not_after": "2020-01-01T00:00:00+00:00"}
    google = jose_envelope(
        jose_keys, GOOGLE_OWN,
        [("partner-sig-a", "public", "active", past), ("partner-enc-a", "public", "active")],
    )
    with pytest.raises(SignatureError, match="no enabled, unexpired peer key"):
        google.open(jose_partner.seal(PLAINTEXT).body)


# ---------------------------------------------------------------------------------------------
# The rotation matrix (Tink): messages sealed under each keyset state, opened under each.
#   old           a active
#   old+new       a active, b read-only
#   new-primary   b active, a read-only
#   old-disabled  b active, a disabled

STATES: dict[str, dict[str, str]] = {
    "old": {"a": "active"},
    "old+new": {"a": "active", "b": "read-only"},
    "new-primary": {"a": "read-only", "b": "active"},
    "old-disabled": {"a": "disabled", "b": "active"},
}


def rotated(party: str, half: str, state: str) -> list[KeySpec]:
    specs: list[KeySpec] = []
    for generation, key_state in STATES[state].items():
        for use in ("sig", "enc"):
            specs.append((f"{party}-{use}-{generation}", half, key_state))
    return specs


def active_generation(state: str) -> str:
    return next(g for g, s in STATES[state].items() if s == "active")


def opens(sealed_under: str, opened_under: str) -> bool:
    """Tink's rule: a message opens iff the key that sealed it is enabled where it is opened."""
    return STATES[opened_under].get(active_generation(sealed_under), "disabled") != "disabled"


@pytest.fixture(scope="module")
def rotation_envelopes(
    jose_keys: JoseKeys,
) -> Callable[[str, str, str], JoseEnvelope]:
    """(rotating party, its state, side) -> envelope; the other party keeps generation a."""
    cache: dict[tuple[str, str, str], JoseEnvelope] = {}
    fixed = {"partner": (PARTNER_OWN, PARTNER_PUBLIC), "google": (GOOGLE_OWN, GOOGLE_PUBLIC)}

    def build(rotating: str, state: str, side: str) -> JoseEnvelope:
        if (rotating, state, side) not in cache:
            other = "google" if rotating == "partner" else "partner"
            if side == rotating:
                own, peer = rotated(rotating, "private", state), fixed[other][1]
            else:
                own, peer = fixed[other][0], rotated(rotating, "public", state)
            cache[rotating, state, side] = jose_envelope(jose_keys, own, peer)
        return cache[rotating, state, side]

    return build


@pytest.mark.parametrize("opened_under", list(STATES))
@pytest.mark.parametrize("sealed_under", list(STATES))
@pytest.mark.parametrize("rotating", ["partner", "google"])
def test_rotation_matrix(
    rotation_envelopes: Callable[[str, str, str], JoseEnvelope],
    rotating: str,
    sealed_under: str,
    opened_under: str,
) -> None:
    other = "google" if rotating == "partner" else "partner"
    generation = active_generation(sealed_under)
    expected = opens(sealed_under, opened_under)

    # The rotating party's encryption keys: the other side seals to what it knows of them.
    to_rotating = rotation_envelopes(rotating, sealed_under, other).seal(PLAINTEXT)
    assert to_rotating.encrypted_to == (f"{rotating}-enc-{generation}",)
    receiver = rotation_envelopes(rotating, opened_under, rotating)
    if expected:
        opened = receiver.open(to_rotating.body)
        assert opened.decrypted_by == (f"{rotating}-enc-{generation}",)
        assert opened.plaintext == PLAINTEXT
    else:
        with pytest.raises(UnknownKeyError):
            receiver.open(to_rotating.body)

    # The rotating party's signing keys: the other side verifies with what it knows of them.
    from_rotating = rotation_envelopes(rotating, sealed_under, rotating).seal(PLAINTEXT)
    assert from_rotating.signed_by == (f"{rotating}-sig-{generation}",)
    verifier = rotation_envelopes(rotating, opened_under, other)
    if expected:
        assert verifier.open(from_rotating.body).verified_by == (f"{rotating}-sig-{generation}",)
    else:
        with pytest.raises(SignatureError):
            verifier.open(from_rotating.body)


# ---------------------------------------------------------------------------------------------
# Concurrency


@pytest.mark.parametrize("ec", [False, True], ids=["rsa", "ec"])
def test_seal_and_open_from_many_threads(jose_keys: JoseKeys, ec: bool) -> None:
    # Fresh keysets, so that the first uses of each key race too; jwcrypto's algorithm objects
    # are shared by every thread (jose._algorithm).
    if ec:
        options = JoseOptions(sign_alg="ES256", key_alg="ECDH-ES+A128KW", enc="A128CBC-HS256",
                              accept_encs=("A128CBC-HS256",))
        partner = google = jose_envelope(jose_keys, EC_OWN, EC_PUBLIC, options)
    else:
        partner = jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC)
        google = jose_envelope(jose_keys, GOOGLE_OWN, PARTNER_PUBLIC)
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(index: int) -> None:
        try:
            barrier.wait()
            for round_ in range(15):
                plaintext = f"thread {index} round {round_}".encode()
                assert google.open(partner.seal(plaintext).body).plaintext == plaintext
                assert partner.open(google.seal(plaintext).body).plaintext == plaintext
        except BaseException as exc:  # reported below, with the thread's failure
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_every_failure_is_an_envelope_error(jose_partner: JoseEnvelope) -> None:
    for body in (b"", b"...", b"\xff\xfe", b"a.b.c.d.e", "é".encode()):
        with pytest.raises(EnvelopeError):
            jose_partner.open(body)
