"""JOSE envelope: a compact JWS signed by our key, inside a compact JWE to the peer.

Only jwcrypto's keys (JWK) and algorithms (JWA) are used: compact form, sizes, accept-lists and
kids are handled here, before any crypto. The only module that imports jwcrypto; its exceptions
become gateway errors in `_jwcrypto` alone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from jwcrypto.jwa import JWA
from jwcrypto.jwk import JWK

from gateway import b64url
from gateway.config import (
    JWE_ENCS,
    JWE_KEY_ALGS,
    JWE_LEGACY_KEY_ALGS,
    JWS_ALGS,
    JoseOptions,
    KeyConfig,
    KeysetConfig,
)
from gateway.envelope import CONTENT_TYPES, Opened, Sealed
from gateway.errors import (
    AlgorithmError,
    ConfigError,
    DecryptError,
    EngineError,
    GatewayError,
    MalformedError,
    NoKeyError,
    SignatureError,
    TooLargeError,
    UnknownKeyError,
)
from gateway.keys import Key, Keyset, key_expiry

__all__ = ["GENERATE_ALGS", "JoseEnvelope", "generate_jwk", "jwe_header", "load_jose_keyset"]

# What each algorithm needs from a key: (kty, crv or None for any allowed curve).
_SIGN_KEYS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
_WRAP_KEYS: dict[str, str] = {
    "RSA-OAEP-256": "RSA",
    "RSA-OAEP": "RSA",
    "RSA1_5": "RSA",
    "ECDH-ES": "EC",
    "ECDH-ES+A128KW": "EC",
    "ECDH-ES+A192KW": "EC",
    "ECDH-ES+A256KW": "EC",
}
_CURVES = ("P-256", "P-384", "P-521")
_MIN_RSA_BITS = 2048
_MAX_RSA_BITS = 8192  # what the encrypted-key and signature bounds below leave room for
_MAX_KEY_FILE_BYTES = 1 << 20

# Bounds on compact segments (base64url characters), checked before anything is decoded.
_MAX_HEADER = 8192
_MAX_ENCRYPTED_KEY = 1400  # RSA-8192 is 1366
_MAX_IV = 64
_MAX_TAG = 128
_MAX_SIGNATURE = 1400
_MAX_ECDH_PARAM = 512

# ECDSA signatures are r || s at the curve's size (RFC 7518 3.4).
_EC_SIGNATURE_BYTES = {"ES256": 64, "ES384": 96, "ES512": 132}


def _b64len(n: int) -> int:
    """Characters of unpadded base64url for n bytes."""
    return (4 * n + 2) // 3


def _decoded(parts: list[bytes]) -> list[bytes] | None:
    """Each part decoded (unpadded base64url, checked as it is decoded: one pass over the
    text), or None when one is not."""
    try:
        return [b64url.decode(part) for part in parts]
    except MalformedError:
        return None


def _header(members: dict[str, Any]) -> bytes:
    return b64url.encode(json.dumps(members, separators=(",", ":")).encode("utf-8"))


@functools.lru_cache(maxsize=256)
def _fixed_header(*members: tuple[str, str]) -> bytes:
    """_header of string members that repeat from message to message (algorithms and kids from
    the configuration), encoded once."""
    return _header(dict(members))


_MAKERS: dict[str, Callable[[str], Any]] = {
    "sign": JWA.signing_alg, "wrap": JWA.keymgmt_alg, "content": JWA.encryption_alg,
}


@functools.lru_cache(maxsize=64)
def _algorithm(kind: str, name: str) -> Any:
    """jwcrypto's object for an algorithm, made once and shared by every thread: jwcrypto's
    algorithm classes set their attributes in __init__ only, so an operation changes nothing in
    them. Names reach here only past the accept-lists."""
    return _MAKERS[kind](name)


def _show(value: object) -> str:
    """A peer-supplied value, made safe and short for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@contextmanager
def _jwcrypto(failure: Callable[[], GatewayError]) -> Iterator[None]:
    """The one place where jwcrypto's (and cryptography's) exceptions become gateway errors.

    Their text never reaches our messages: it may quote headers, logs or key parameters."""
    try:
        yield
    except GatewayError:
        raise
    except Exception:
        raise failure() from None


# ---------------------------------------------------------------------------------------------
# Keys


def load_jose_keyset(config: KeysetConfig) -> Keyset:
    """Parse every key of a jose keyset, disabled ones included (so a roll-back cannot fail).

    A key file is a JWK, a JWK Set holding exactly one key, or PEM (private, public or a
    certificate; PEM has no kid, so the configured id is used). Only RSA (>= 2048 bits) and EC
    P-256/P-384/P-521 keys are accepted. Raises ConfigError naming the key's place."""
    if config.type != "jose":
        raise ConfigError(f"{config.place}.type", f"keyset '{config.name}' is not a jose keyset")
    return Keyset(name=config.name, type="jose", keys=tuple(_load_key(k) for k in config.keys))


# What `generate_jwk` makes: alg -> (use, kty, curve).
GENERATE_ALGS: dict[str, tuple[str, str, str | None]] = {
    "RS256": ("sig", "RSA", None),
    "PS256": ("sig", "RSA", None),
    "ES256": ("sig", "EC", "P-256"),
    "RSA-OAEP-256": ("enc", "RSA", None),
}
DEFAULT_GENERATE_ALG = {"sig": "RS256", "enc": "RSA-OAEP-256"}
_MAX_GENERATE_RSA_BITS = 4096


def generate_jwk(kid: str, use: str, *, bits: int = 2048, alg: str | None = None,
                 ) -> tuple[str, str]:
    """A fresh key as (private JWK, public JWK) JSON texts with `kid`, `use` and `alg` set:
    RSA of `bits` bits for RS256, PS256 and RSA-OAEP-256, EC P-256 for ES256 (`bits` is then
    not used). Without `alg`: RS256 for sig, RSA-OAEP-256 for enc.
    Raises ConfigError (place "use", "alg" or "bits") for a value outside these."""
    if use not in ("sig", "enc"):
        raise ConfigError("use", f"'{use}' is not one of: sig, enc")
    alg = alg or DEFAULT_GENERATE_ALG[use]
    if alg not in GENERATE_ALGS:
        raise ConfigError("alg", f"'{alg}' is not one of: {', '.join(GENERATE_ALGS)}")
    alg_use, kty, curve = GENERATE_ALGS[alg]
    if alg_use != use:
        raise ConfigError("alg", f"{alg} is a {alg_use} algorithm; keys for use '{use}' take: "
                                 + ", ".join(a for a, spec in GENERATE_ALGS.items()
                                             if spec[0] == use))
    if kty == "RSA":
        if bits < _MIN_RSA_BITS:
            raise ConfigError("bits", f"{bits} bits; at least {_MIN_RSA_BITS} needed")
        if bits > _MAX_GENERATE_RSA_BITS:
            raise ConfigError("bits", f"{bits} bits; at most {_MAX_GENERATE_RSA_BITS}")
        jwk = JWK.generate(kty="RSA", size=bits, kid=kid, use=use, alg=alg)
    else:
        jwk = JWK.generate(kty="EC", crv=curve, kid=kid, use=use, alg=alg)
    return str(jwk.export_private()), str(jwk.export_public())


def _load_key(config: KeyConfig) -> Key:
    place = f"{config.place}.file"
    jwk = _read_jwk(config, place)
    kty = jwk.get("kty")
    if kty == "oct":
        raise ConfigError(place, "symmetric 'oct' keys are refused; give an RSA or EC key")
    if kty == "RSA":
        try:
            modulus = b64url.decode(str(jwk["n"]).encode("ascii"))
        except (MalformedError, UnicodeEncodeError):
            raise ConfigError(place, "the RSA modulus 'n' is not base64url") from None
        bits = int.from_bytes(modulus, "big").bit_length()
        if not _MIN_RSA_BITS <= bits <= _MAX_RSA_BITS:
            raise ConfigError(place, f"RSA key of {bits} bits; {_MIN_RSA_BITS} to "
                                     f"{_MAX_RSA_BITS} accepted")
        algorithm = f"RSA-{bits}"
    elif kty == "EC" and jwk.get("crv") in _CURVES:
        algorithm = f"EC-{str(jwk['crv']).replace('-', '')}"
    else:
        raise ConfigError(
            place, f"key type {_show(kty)} is not supported (RSA, or EC P-256, P-384, P-521)"
        )

    kid = jwk.get("kid")
    if kid is None:
        jwk["kid"] = config.id
    elif kid != config.id:
        raise ConfigError(
            f"{config.place}.id",
            f"the JWK's kid {_show(kid)} differs from the configured id '{config.id}'",
        )

    uses = _jwk_uses(jwk, place)
    if config.use is not None:
        if config.use not in uses:
            raise ConfigError(
                f"{config.place}.use",
                f"use '{config.use}' contradicts the JWK, which allows only "
                f"{', '.join(sorted(uses)) or 'nothing'}",
            )
        uses = {config.use}
    if not uses:
        raise ConfigError(place, "the JWK's key_ops allow neither signing nor encryption")
    private = bool(jwk.has_private)
    _prepare(jwk, private, uses, place)
    return Key(
        id=config.id,
        state=config.state,
        fingerprint=jwk.thumbprint(),
        private=private,
        can_sign="sig" in uses,
        can_encrypt="enc" in uses,
        algorithm=algorithm,
        expires=key_expiry((), config.not_after),  # a naive not_after is UTC, as for PGP
        place=config.place,
        material=jwk,
    )


def _read_jwk(config: KeyConfig, place: str) -> Any:
    try:
        with config.file.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(place, f"cannot read '{config.file}': {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(place, "too large for a key file")
    if data.lstrip().startswith(b"-----BEGIN"):
        password = None if config.passphrase is None else config.passphrase.encode("utf-8")
        with _jwcrypto(lambda: ConfigError(place, "PEM key cannot be read (or wrong passphrase)")):
            jwk = JWK.from_pem(data, password=password)
        jwk.pop("kid", None)  # jwcrypto names PEM keys by thumbprint; ours is the configured id
        return jwk
    not_a_key = ConfigError(place, "not a JWK, JWK Set or PEM key")
    try:
        value = json.loads(data, object_pairs_hook=_unique_members)
    except (ValueError, RecursionError):
        raise not_a_key from None
    if isinstance(value, dict) and isinstance(value.get("keys"), list):
        if len(value["keys"]) != 1:
            raise ConfigError(
                place, f"a JWK Set with {len(value['keys'])} keys; give exactly one key per file"
            )
        value = value["keys"][0]
    if not isinstance(value, dict) or "kty" not in value:
        raise not_a_key
    if value.get("kty") == "oct":
        raise ConfigError(place, "symmetric 'oct' keys are refused; give an RSA or EC key")
    jwk = JWK()
    with _jwcrypto(lambda: ConfigError(place, "not a valid JWK")):
        jwk.import_key(**value)
    return jwk


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # the rare case: find the name to report
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"duplicate member {_show(name)}")
            seen.add(name)
    return result


_OPS_USE = {
    "sign": "sig",
    "verify": "sig",
    "encrypt": "enc",
    "decrypt": "enc",
    "wrapKey": "enc",
    "unwrapKey": "enc",
    "deriveKey": "enc",
    "deriveBits": "enc",
}


def _jwk_uses(jwk: Any, place: str) -> set[str]:
    """The uses the JWK itself allows, from `use` and `key_ops` (absent: both)."""
    uses = {"sig", "enc"}
    use = jwk.get("use")
    if use is not None:
        if use not in uses:
            raise ConfigError(place, f"the JWK's use {_show(use)} is neither 'sig' nor 'enc'")
        uses = {use}
    ops = jwk.get("key_ops")
    if ops is not None:
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
            raise ConfigError(place, "the JWK's key_ops is not a list of operation names")
        uses &= {_OPS_USE[op] for op in ops if op in _OPS_USE}
        # jwcrypto names operations its own way (wrapKey, not encrypt): once `use` carries the
        # restriction, key_ops would only make it refuse operations the JWK meant to allow.
        del jwk["key_ops"]
        if "use" not in jwk and len(uses) == 1:
            jwk["use"] = next(iter(uses))
    return uses


def _prepare(jwk: Any, private: bool, uses: set[str], place: str) -> None:
    """Build jwcrypto's cached key objects now: a bad key fails at load, and the JWK is never
    written to again, so seal and open may share it across threads."""
    ops: list[str] = []
    if "sig" in uses:
        ops += ["sign", "verify"] if private else ["verify"]
    if "enc" in uses:
        ops += ["unwrapKey", "wrapKey"] if private else ["wrapKey"]
    for op in ops:
        with _jwcrypto(lambda: ConfigError(place, "the key's parameters are not a valid key")):
            jwk.get_op_key(op)


def _fits(key: Key, kty: str, crv: str | None) -> bool:
    material = key.material
    return bool(material.get("kty") == kty and (crv is None or material.get("crv") == crv))


def _can_sign_with(key: Key, alg: str) -> bool:
    kty, crv = _SIGN_KEYS[alg]
    return _fits(key, kty, crv)


def _can_wrap_with(key: Key, alg: str) -> bool:
    return _fits(key, _WRAP_KEYS[alg], None)


# ---------------------------------------------------------------------------------------------
# Envelope


@dataclass(frozen=True)
class _Jwe:
    """A compact JWE: its header parsed, `protected` as received (it is the AAD), the rest
    decoded."""

    header: dict[str, Any]
    protected: bytes
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes
    tag: bytes


class JoseEnvelope:
    """Seal: JWS (own active signing key) inside JWE (peer active encryption key), compact.
    Open: the reverse, with the route's accept-lists. Thread-safe; holds no mutable state."""

    scheme = "jose"
    waits_on_processes = False

    def __init__(
        self, own: Keyset, peer: Keyset, options: JoseOptions, *, max_plaintext_bytes: int
    ) -> None:
        """Raises ConfigError when the options name unknown algorithms or do not fit the keys."""
        _check_options(options)
        if max_plaintext_bytes < 1:
            raise ConfigError("limits.max_body_bytes", "must be at least 1")
        for key in own.keys:
            if key.active and key.can_sign and not _can_sign_with(key, options.sign_alg):
                raise ConfigError(
                    key.place,
                    f"sign_alg {options.sign_alg} cannot sign with key '{key.id}' "
                    f"({key.algorithm})",
                )
        for key in peer.keys:
            if key.active and key.can_encrypt and not _can_wrap_with(key, options.key_alg):
                raise ConfigError(
                    key.place,
                    f"key_alg {options.key_alg} cannot encrypt to key '{key.id}' "
                    f"({key.algorithm})",
                )
        self.own = own
        self.peer = peer
        self.options = options
        self.max_plaintext_bytes = max_plaintext_bytes
        # The inner JWS is at most header + payload + signature; the JWE carries it.
        self._jws_limit = _MAX_HEADER + _b64len(max_plaintext_bytes) + _MAX_SIGNATURE + 2
        self._ciphertext_limit = _b64len(self._jws_limit + 16)  # + a CBC padding block

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES["jose"]

    def close(self) -> None:
        """Nothing to release."""

    # -- seal ----------------------------------------------------------------------------------

    def seal(self, plaintext: bytes) -> Sealed:
        """Sign `plaintext` as a compact JWS (kid = our active signing key), encrypt that to the
        peer's active encryption key as a compact JWE. Raises TooLargeError over the size cap,
        NoKeyError when no unexpired active key is left for either step."""
        if len(plaintext) > self.max_plaintext_bytes:
            raise TooLargeError(
                f"plaintext of {len(plaintext)} bytes is over the cap of "
                f"{self.max_plaintext_bytes}"
            )
        signers = self.own.signers()
        if not signers:
            raise NoKeyError(f"keyset '{self.own.name}' has no active, unexpired signing key")
        recipients = self.peer.recipients()
        if not recipients:
            raise NoKeyError(
                f"keyset '{self.peer.name}' has no active, unexpired key to encrypt to"
            )
        signer, recipient = signers[0], recipients[0]
        opts = self.options
        with _jwcrypto(
            lambda: EngineError(f"jwcrypto failed to seal with '{signer.id}' to '{recipient.id}'")
        ):
            jws_header = _fixed_header(("alg", opts.sign_alg), ("kid", signer.id))
            signing_input = jws_header + b"." + b64url.encode(plaintext)
            signature = _algorithm("sign", opts.sign_alg).sign(signer.material, signing_input)
            jws = signing_input + b"." + b64url.encode(signature)
            wrap = _algorithm("wrap", opts.key_alg)
            content = _algorithm("content", opts.enc)
            header: dict[str, Any] = {"alg": opts.key_alg, "enc": opts.enc, "kid": recipient.id}
            wrapped = wrap.wrap(recipient.material, content.wrap_key_size, None, header)
            if "header" in wrapped:  # ECDH-ES: the ephemeral key, `epk`, new each time
                protected = _header({**header, **wrapped["header"]})
            else:
                protected = _fixed_header(*header.items())
            iv, ciphertext, tag = content.encrypt(wrapped["cek"], protected, jws)
        body = b".".join(
            [protected, *(b64url.encode(p) for p in (wrapped.get("ek", b""), iv, ciphertext, tag))]
        )
        return Sealed(body=body, signed_by=(signer.id,), encrypted_to=(recipient.id,))

    # -- open ----------------------------------------------------------------------------------

    def open(self, body: bytes) -> Opened:
        """Decrypt a compact JWE with an enabled own key, then verify the compact JWS inside
        with an enabled, unexpired peer key; return the JWS payload.

        Raises MalformedError (not a compact JWE, a bare JWS, bad header), AlgorithmError
        (alg/enc/zip outside the accept-lists; layer "signature" for the JWS alg),
        UnknownKeyError (JWE kid names no enabled own key), DecryptError, SignatureError
        (payload not a JWS, no good signature by an enabled peer key) and TooLargeError
        (plaintext over the cap, compressed or not). Nothing else."""
        jwe = self._parse(body)
        self._check_jwe_header(jwe.header)
        _check_iv_and_tag(jwe)
        key, data = self._decrypt(jwe)
        if "zip" in jwe.header:
            data = _inflate(data, self._jws_limit)
        payload, verifier = self._verify(data)
        return Opened(plaintext=payload, decrypted_by=(key.id,), verified_by=(verifier.id,))

    def _parse(self, body: bytes) -> _Jwe:
        text = bytes(body).strip()
        if not text:
            raise MalformedError("empty body")
        parts = text.split(b".", 5)
        if len(parts) == 3 and all(b64url.is_unpadded(p) for p in parts):
            raise MalformedError("a compact JWS that was never encrypted, not a JWE")
        if len(parts) != 5:
            raise MalformedError("not a compact JWE (five base64url parts)")
        protected, encrypted_key, iv, ciphertext, tag = parts
        for name, segment, limit in (
            ("protected header", protected, _MAX_HEADER),
            ("encrypted key", encrypted_key, _MAX_ENCRYPTED_KEY),
            ("iv", iv, _MAX_IV),
            ("tag", tag, _MAX_TAG),
        ):
            if len(segment) > limit:
                raise MalformedError(f"JWE {name} of {len(segment)} characters (at most {limit})")
        if len(ciphertext) > self._ciphertext_limit:
            raise TooLargeError("JWE ciphertext is larger than the plaintext cap allows")
        decoded = _decoded(parts)
        if decoded is None:
            raise MalformedError("not a compact JWE (a part is not base64url)")
        if not (protected and iv and tag):
            raise MalformedError("not a compact JWE (empty header, iv or tag)")
        raw_header, raw_key, raw_iv, raw_ciphertext, raw_tag = decoded
        header = _json_object(raw_header)
        if header is None:
            raise MalformedError("JWE protected header is not a JSON object")
        return _Jwe(header=header, protected=protected, encrypted_key=raw_key, iv=raw_iv,
                    ciphertext=raw_ciphertext, tag=raw_tag)

    def _check_jwe_header(self, header: dict[str, Any]) -> None:
        opts = self.options
        alg, enc = header.get("alg"), header.get("enc")
        if not isinstance(alg, str) or not isinstance(enc, str):
            raise MalformedError("JWE header lacks 'alg' or 'enc'")
        if alg == "dir" or alg not in _WRAP_KEYS or alg not in opts.accept_key_algs:
            raise AlgorithmError(f"JWE alg {_show(alg)} is not accepted")
        if enc not in JWE_ENCS or enc not in opts.accept_encs:
            raise AlgorithmError(f"JWE enc {_show(enc)} is not accepted")
        if "zip" in header:
            if not opts.allow_zip:
                raise AlgorithmError("JWE zip (compression) is not accepted on this route")
            if header["zip"] != "DEF":
                raise AlgorithmError(f"JWE zip {_show(header['zip'])} is not accepted")
        if "crit" in header:
            raise MalformedError("JWE header has 'crit': no extensions are supported")
        if not isinstance(header.get("kid", ""), str):
            raise MalformedError("JWE kid is not a string")
        if _WRAP_KEYS[alg] == "EC":
            epk = header.get("epk")
            if not (
                isinstance(epk, dict)
                and set(epk) <= {"kty", "crv", "x", "y"}
                and epk.get("kty") == "EC"
                and epk.get("crv") in _CURVES
                and all(isinstance(epk.get(c), str) and len(epk[c]) <= 100 for c in "xy")
            ):
                raise MalformedError("JWE epk is not an EC P-256/P-384/P-521 public key")
            for name in ("apu", "apv"):
                value = header.get(name, "")
                if not isinstance(value, str) or len(value) > _MAX_ECDH_PARAM:
                    raise MalformedError(f"JWE {name} is not a short base64url string")

    def _decrypt(self, jwe: _Jwe) -> tuple[Key, bytes]:
        """Only the key named by kid is tried; without kid, every enabled own key in turn."""
        kid = jwe.header.get("kid")
        if kid is not None:
            candidates = tuple(k for k in self.own.decryptors() if k.id == kid)
            if not candidates:
                raise UnknownKeyError(f"JWE kid {_show(kid)} names no enabled own key")
        else:
            candidates = self.own.decryptors()
        alg = jwe.header["alg"]
        epk_curve = jwe.header["epk"]["crv"] if _WRAP_KEYS[alg] == "EC" else None
        failure: DecryptError | None = None
        for key in candidates:
            if _fits(key, _WRAP_KEYS[alg], epk_curve):
                try:
                    return key, _decrypt_with(key, jwe)
                except DecryptError as exc:
                    failure = exc
        if kid is not None:
            raise failure or DecryptError(f"own key '{kid}' does not fit JWE alg {alg}")
        raise DecryptError("no enabled own key decrypts this JWE (it names no kid)")

    def _verify(self, data: bytes) -> tuple[bytes, Key]:
        """Only the key named by kid is tried; without kid, every enabled peer key in turn."""
        parts = data.split(b".", 3)
        if len(parts) != 3:
            raise SignatureError("a JWE whose payload is not a compact JWS")
        protected, payload, signature = parts
        if len(protected) > _MAX_HEADER or len(signature) > _MAX_SIGNATURE:
            raise SignatureError("JWS header or signature is oversized")
        if len(payload) > _b64len(self.max_plaintext_bytes):
            raise TooLargeError(f"JWS payload is over the cap of {self.max_plaintext_bytes} bytes")
        decoded = _decoded(parts)
        if decoded is None or not protected:
            raise SignatureError("a JWE whose payload is not a compact JWS")
        raw_header, raw_payload, raw_signature = decoded
        header = _json_object(raw_header)
        if header is None:
            raise SignatureError("JWS protected header is not a JSON object")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise SignatureError("JWS header lacks 'alg'")
        # The algorithm first: an unsigned `none` JWS is refused for its algorithm.
        if alg not in _SIGN_KEYS or alg not in self.options.accept_sign_algs:
            raise AlgorithmError(f"JWS alg {_show(alg)} is not accepted", layer="signature")
        if not signature:
            raise SignatureError("the JWS has no signature")
        if "crit" in header or "b64" in header:
            raise SignatureError("JWS header has 'crit' or 'b64': no extensions are supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise SignatureError("JWS kid is not a string")
        if len(raw_signature) != _EC_SIGNATURE_BYTES.get(alg, len(raw_signature)):
            raise SignatureError(f"{alg} signature of {len(raw_signature)} bytes")
        candidates = self.peer.verifiers()
        if kid is not None:
            candidates = tuple(k for k in candidates if k.id == kid)
            if not candidates:
                raise SignatureError(f"JWS kid {_show(kid)} names no enabled, unexpired peer key")
        signing_input = data[: len(protected) + 1 + len(payload)]
        for key in candidates:
            if _can_sign_with(key, alg):
                try:
                    _verify_with(key, alg, signing_input, raw_signature)
                except SignatureError:
                    continue
                return raw_payload, key
        if kid is not None:
            raise SignatureError(f"bad signature by peer key '{kid}'")
        raise SignatureError("no enabled, unexpired peer key verifies the JWS")


def jwe_header(body: bytes) -> dict[str, Any] | None:
    """The protected header of a compact JWE (its `kid`, `alg`, `enc`), read without any key;
    None when the body does not start as one."""
    parts = bytes(body).strip().split(b".", 5)
    if len(parts) != 5 or len(parts[0]) > _MAX_HEADER or not b64url.is_unpadded(parts[0]):
        return None
    return _json_object(b64url.decode(parts[0]))


# (iv, tag) lengths in bytes per `enc` (RFC 7518 5.2.3-5.2.5 and 5.3: a 96-bit IV is REQUIRED
# for GCM). cryptography's GCM takes any IV of 8 bytes and up, and other implementations
# (panva's jose) refuse what the RFC does not allow: so do we.
_IV_AND_TAG = {
    "A128GCM": (12, 16), "A192GCM": (12, 16), "A256GCM": (12, 16),
    "A128CBC-HS256": (16, 16), "A192CBC-HS384": (16, 24), "A256CBC-HS512": (16, 32),
}


def _check_iv_and_tag(jwe: _Jwe) -> None:
    iv_bytes, tag_bytes = _IV_AND_TAG[jwe.header["enc"]]
    if len(jwe.iv) != iv_bytes or len(jwe.tag) != tag_bytes:
        raise MalformedError(f"JWE iv of {len(jwe.iv)} or tag of {len(jwe.tag)} bytes; "
                             f"{jwe.header['enc']} takes {iv_bytes} and {tag_bytes}")


def _decrypt_with(key: Key, jwe: _Jwe) -> bytes:
    """Unwrap the CEK with `key` and decrypt. The header was checked against the route's
    accept-lists and the key's type first, so only accepted algorithms reach jwcrypto."""
    header = jwe.header
    params = {name: header[name] for name in ("alg", "enc", "epk", "apu", "apv") if name in header}
    with _jwcrypto(lambda: DecryptError(
            f"own key '{key.id}' does not unwrap this JWE's content key ({header['alg']})")):
        wrap = _algorithm("wrap", header["alg"])
        content = _algorithm("content", header["enc"])
    try:
        with _jwcrypto(lambda: DecryptError(
                f"own key '{key.id}' does not unwrap this JWE's content key ({header['alg']})")):
            cek = wrap.unwrap(key.material, content.wrap_key_size, jwe.encrypted_key, params)
    except DecryptError:
        # Security (RFC 7516 11.5): decrypt with a random content key all the same, so that a
        # key that does not unwrap costs the time of a message that fails its tag: the time
        # does not tell which layer failed (the inbound answer is the same 400 for both).
        with contextlib.suppress(Exception):
            content.decrypt(os.urandom(content.wrap_key_size // 8), jwe.protected, jwe.iv,
                            jwe.ciphertext, jwe.tag)
        raise
    with _jwcrypto(lambda: DecryptError(
            f"the content key unwrapped by own key '{key.id}' does not decrypt the JWE "
            f"({header['enc']} authentication failed): the message was altered or damaged")):
        plaintext: bytes = content.decrypt(cek, jwe.protected, jwe.iv, jwe.ciphertext, jwe.tag)
    return plaintext


def _verify_with(key: Key, alg: str, signing_input: bytes, signature: bytes) -> None:
    """Raises SignatureError unless `signature` is `key`'s over `signing_input`. `alg` was
    checked against the route's accept-list and the key's type first."""
    with _jwcrypto(lambda: SignatureError(f"bad signature by peer key '{key.id}'")):
        _algorithm("sign", alg).verify(key.material, signing_input, signature)


def _inflate(data: bytes, limit: int) -> bytes:
    """Raw DEFLATE (`zip: DEF`), stopping at `limit` output bytes: a bomb costs at most that."""
    inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise MalformedError("JWE plaintext is not valid DEFLATE data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLargeError(f"compressed JWE plaintext inflates beyond {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise MalformedError("JWE plaintext is not one complete DEFLATE stream")
    return out


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object with unique member names, or None."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_members)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _check_options(options: JoseOptions) -> None:
    """The same choices config.py allows, for options built in code."""
    choices: tuple[tuple[str, str, tuple[str, ...]], ...] = (
        ("sign_alg", options.sign_alg, JWS_ALGS),
        ("key_alg", options.key_alg, JWE_KEY_ALGS),
        ("enc", options.enc, JWE_ENCS),
    )
    for name, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"jose.{name}", f"'{value}' is not one of: {', '.join(allowed)}")
    lists: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
        ("accept_sign_algs", options.accept_sign_algs, JWS_ALGS),
        ("accept_key_algs", options.accept_key_algs, JWE_KEY_ALGS + JWE_LEGACY_KEY_ALGS),
        ("accept_encs", options.accept_encs, JWE_ENCS),
    )
    for name, values, allowed in lists:
        for value in values:
            if value not in allowed:
                raise ConfigError(
                    f"jose.{name}", f"'{value}' is not one of: {', '.join(allowed)}"
                )
