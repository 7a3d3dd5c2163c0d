"""JOSE key files (generated once per session) and panva's jose as a stand-in peer.

Also `craft_jws` / `craft_jwe`: independent encoders over `cryptography` for hostile messages.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import JoseOptions, KeyConfig, KeysetConfig, KeyState
from gateway.jose import JoseEnvelope, load_jose_keyset
from gateway.keys import Keyset

__all__ = [
    "GOOGLE_OWN",
    "GOOGLE_PUBLIC",
    "JOSE_KEY_NAMES",
    "PARTNER_OWN",
    "PARTNER_PUBLIC",
    "JoseKeys",
    "NodeJose",
    "NodeJoseError",
    "b64u",
    "craft_jwe",
    "craft_jws",
    "jose_envelope",
    "jose_google",
    "jose_keys",
    "jose_keyset",
    "jose_keyset_config",
    "jose_partner",
    "node_jose",
]

INTEROP_DIR = Path(__file__).parent / "interop"

# name -> (key type, use). RSA keys are 2048 bits (fast to make); EC keys are P-256.
JOSE_KEY_NAMES: dict[str, tuple[Literal["RSA", "P-256"], Literal["sig", "enc"]]] = {
    "partner-sig-a": ("RSA", "sig"),
    "partner-enc-a": ("RSA", "enc"),
    "partner-sig-b": ("RSA", "sig"),
    "partner-enc-b": ("RSA", "enc"),
    "google-sig-a": ("RSA", "sig"),
    "google-enc-a": ("RSA", "enc"),
    "google-sig-b": ("RSA", "sig"),
    "google-enc-b": ("RSA", "enc"),
    "stranger-sig": ("RSA", "sig"),
    "stranger-enc": ("RSA", "enc"),
    "partner-sig-ec": ("P-256", "sig"),
    "google-sig-ec": ("P-256", "sig"),
    "partner-enc-ec": ("P-256", "enc"),
    "google-enc-ec": ("P-256", "enc"),
}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
# (key name, "private" or "public", state[, KeyConfig field overrides])
KeySpec = tuple[str, str, KeyState | str] | tuple[str, str, KeyState | str, Mapping[str, Any]]


def b64u(data: bytes | str) -> str:
    """Unpadded base64url, as JOSE writes it."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _uint(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return b64u(value.to_bytes(length, "big"))


def jwk_of(key: PrivateKey, kid: str, use: str) -> dict[str, Any]:
    """The private JWK of a `cryptography` key (RFC 7518 members)."""
    if isinstance(key, rsa.RSAPrivateKey):
        priv = key.private_numbers()
        pub = priv.public_numbers
        return {
            "kty": "RSA",
            "kid": kid,
            "use": use,
            "n": _uint(pub.n),
            "e": _uint(pub.e),
            "d": _uint(priv.d),
            "p": _uint(priv.p),
            "q": _uint(priv.q),
            "dp": _uint(priv.dmp1),
            "dq": _uint(priv.dmq1),
            "qi": _uint(priv.iqmp),
        }
    size = (key.curve.key_size + 7) // 8
    numbers = key.private_numbers()
    names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
    crv = names.get(key.curve.name, key.curve.name)
    return {
        "kty": "EC",
        "kid": kid,
        "use": use,
        "crv": crv,
        "x": _uint(numbers.public_numbers.x, size),
        "y": _uint(numbers.public_numbers.y, size),
        "d": _uint(numbers.private_value, size),
    }


def public_jwk(jwk: Mapping[str, Any]) -> dict[str, Any]:
    private_members = {"d", "p", "q", "dp", "dq", "qi"}
    return {k: v for k, v in jwk.items() if k not in private_members}


@dataclass
class JoseKeys:
    """The session's JOSE keys: private and public JWK files under `dir`."""

    dir: Path
    keys: dict[str, PrivateKey] = field(default_factory=dict)
    jwks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, name: str, key: PrivateKey, use: str) -> None:
        jwk = jwk_of(key, name, use)
        self.keys[name] = key
        self.jwks[name] = jwk
        self.private(name).write_text(json.dumps(jwk), encoding="utf-8")
        self.private(name).chmod(0o600)
        self.public(name).write_text(json.dumps(public_jwk(jwk)), encoding="utf-8")

    def private(self, name: str) -> Path:
        """The private JWK file of `name` (kid = name, `use` set)."""
        return self.dir / f"{name}.jwk"

    def public(self, name: str) -> Path:
        """The public JWK file of `name` (kid = name, `use` set)."""
        return self.dir / f"{name}.pub.jwk"

    def jwk(self, name: str) -> dict[str, Any]:
        """A copy of the private JWK of `name`."""
        return dict(self.jwks[name])

    def public_jwk(self, name: str) -> dict[str, Any]:
        return public_jwk(self.jwks[name])

    def key(self, name: str) -> PrivateKey:
        """The `cryptography` private key of `name` (for crafting messages by hand)."""
        return self.keys[name]

    def keyset_config(self, name: str, keys: Sequence[KeySpec]) -> KeysetConfig:
        """A KeysetConfig as config.py would build it. Each entry is (key name, "private" or
        "public", state) with an optional 4th mapping overriding KeyConfig fields (id, file,
        use, not_after, passphrase)."""
        configs = []
        for index, spec in enumerate(keys):
            key_name, half, state = spec[0], spec[1], spec[2]
            extra: Mapping[str, Any] = spec[3] if len(spec) > 3 else {}
            if half not in ("private", "public"):
                raise ValueError(f"{key_name}: 'private' or 'public', not {half!r}")
            fields: dict[str, Any] = {
                "id": key_name,
                "file": self.private(key_name) if half == "private" else self.public(key_name),
                "state": state if isinstance(state, KeyState) else KeyState(state),
                "place": f"keysets.{name}.keys[{index}]",
            }
            fields.update(extra)
            not_after = fields.get("not_after")
            if isinstance(not_after, str):
                fields["not_after"] = datetime.fromisoformat(not_after)
            configs.append(KeyConfig(**fields))
        return KeysetConfig(name=name, type="jose", keys=tuple(configs), place=f"keysets.{name}")


@pytest.fixture(scope="session")
def jose_keys(session_tmp: Path) -> JoseKeys:
    """Every key of JOSE_KEY_NAMES, made once per session, as JWK files."""
    directory = session_tmp / "jose"
    directory.mkdir(mode=0o700)
    keys = JoseKeys(directory)
    for name, (kind, use) in JOSE_KEY_NAMES.items():
        key: PrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if kind == "RSA"
            else ec.generate_private_key(ec.SECP256R1())
        )
        keys.add(name, key, use)
    return keys


@pytest.fixture(scope="session")
def jose_keyset_config(jose_keys: JoseKeys) -> Any:
    """`jose_keyset_config(name, [(key_name, "private"|"public", state), ...]) -> KeysetConfig`."""
    return jose_keys.keyset_config


# The usual layout: each side's own private keys; the other side's public keys, with its EC
# signing key read-only so that ES256 messages verify without a second active signing key.
PARTNER_OWN: list[KeySpec] = [
    ("partner-sig-a", "private", "active"),
    ("partner-enc-a", "private", "active"),
]
PARTNER_PUBLIC: list[KeySpec] = [
    ("partner-sig-a", "public", "active"),
    ("partner-enc-a", "public", "active"),
    ("partner-sig-ec", "public", "read-only"),
]
GOOGLE_OWN: list[KeySpec] = [
    ("google-sig-a", "private", "active"),
    ("google-enc-a", "private", "active"),
]
GOOGLE_PUBLIC: list[KeySpec] = [
    ("google-sig-a", "public", "active"),
    ("google-enc-a", "public", "active"),
    ("google-sig-ec", "public", "read-only"),
]


def jose_keyset(keys: JoseKeys, name: str, specs: Sequence[KeySpec]) -> Keyset:
    return load_jose_keyset(keys.keyset_config(name, specs))


def jose_envelope(
    keys: JoseKeys,
    own: Sequence[KeySpec],
    peer: Sequence[KeySpec],
    options: JoseOptions = JoseOptions(),  # noqa: B008 (frozen)
    *,
    max_plaintext_bytes: int = 64 * 1024,
) -> JoseEnvelope:
    """An envelope over keysets "own" and "peer" built from the session's keys."""
    return JoseEnvelope(
        jose_keyset(keys, "own", own),
        jose_keyset(keys, "peer", peer),
        options,
        max_plaintext_bytes=max_plaintext_bytes,
    )


@pytest.fixture(scope="session")
def jose_partner(jose_keys: JoseKeys) -> JoseEnvelope:
    """Our side with default options: PARTNER_OWN keys, GOOGLE_PUBLIC peer keys, 64 KiB cap."""
    return jose_envelope(jose_keys, PARTNER_OWN, GOOGLE_PUBLIC)


@pytest.fixture(scope="session")
def jose_google(jose_keys: JoseKeys) -> JoseEnvelope:
    """Our envelope playing Google: GOOGLE_OWN keys, PARTNER_PUBLIC peer keys, 64 KiB cap."""
    return jose_envelope(jose_keys, GOOGLE_OWN, PARTNER_PUBLIC)


# ---------------------------------------------------------------------------------------------
# Hand-made JWS and JWE, independent of jwcrypto, for messages no honest library would make.

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def craft_jws(
    header: Mapping[str, Any],
    payload: bytes,
    key: PrivateKey | bytes | None,
    *,
    sign_as: str | None = None,
) -> str:
    """A compact JWS with exactly `header`, signed per header["alg"] (or `sign_as`, to sign
    with another algorithm than the header claims): RS*/PS*/ES* with a private key, HS* with
    `key` as the raw HMAC secret, `none` (or key None) with an empty signature."""
    alg = sign_as or str(header.get("alg", ""))
    signing_input = f"{b64u(json.dumps(header))}.{b64u(payload)}".encode("ascii")
    signature = b""
    if key is not None and alg != "none":
        digest = _HASHES[alg[2:]]()
        if alg.startswith("HS"):
            assert isinstance(key, bytes)
            mac = hmac.HMAC(key, digest)
            mac.update(signing_input)
            signature = mac.finalize()
        elif alg.startswith("RS"):
            assert isinstance(key, rsa.RSAPrivateKey)
            signature = key.sign(signing_input, padding.PKCS1v15(), digest)
        elif alg.startswith("PS"):
            assert isinstance(key, rsa.RSAPrivateKey)
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            signature = key.sign(signing_input, pss, digest)
        elif alg.startswith("ES"):
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
            size = (key.curve.key_size + 7) // 8
            signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return f"{signing_input.decode('ascii')}.{b64u(signature)}"


def craft_jwe(
    header: Mapping[str, Any],
    plaintext: bytes,
    key: rsa.RSAPublicKey | None,
    *,
    cek: bytes | None = None,
    deflated: bytes | None = None,
    gcm_iv_bytes: int = 12,
) -> str:
    """A compact JWE with exactly `header`: key management RSA-OAEP-256, RSA-OAEP or RSA1_5
    (to `key`), or `dir` (with `cek`); content A128GCM/A256GCM/A128CBC-HS256/A256CBC-HS512.
    With `zip: DEF` the plaintext is raw-deflated, unless `deflated` gives the bytes to
    encrypt as they are (a bomb, say). `gcm_iv_bytes`: an IV of another size than RFC 7518's
    96 bits, which AES-GCM itself takes."""
    alg, enc = str(header["alg"]), str(header["enc"])
    sizes = {"A128GCM": 16, "A256GCM": 32, "A128CBC-HS256": 32, "A256CBC-HS512": 64}
    cek = cek if cek is not None else os.urandom(sizes[enc])
    if alg == "dir":
        encrypted_key = b""
    else:
        assert key is not None
        pad: padding.AsymmetricPadding
        if alg == "RSA1_5":
            pad = padding.PKCS1v15()
        else:
            oaep_hash: hashes.HashAlgorithm = (
                hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()
            )
            pad = padding.OAEP(mgf=padding.MGF1(oaep_hash), algorithm=oaep_hash, label=None)
        encrypted_key = key.encrypt(cek, pad)
    if deflated is not None:
        content = deflated
    elif header.get("zip") == "DEF":
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        content = packer.compress(plaintext) + packer.flush()
    else:
        content = plaintext
    protected = b64u(json.dumps(header))
    aad = protected.encode("ascii")
    if enc.endswith("GCM"):
        iv = os.urandom(gcm_iv_bytes)
        sealed = AESGCM(cek).encrypt(iv, content, aad)
        ciphertext, tag = sealed[:-16], sealed[-16:]
    else:
        half = len(cek) // 2
        mac_key, enc_key = cek[:half], cek[half:]
        iv = os.urandom(16)
        padded = content + bytes([16 - len(content) % 16]) * (16 - len(content) % 16)
        encryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
        ciphertext = encryptor.update(padded) + encryptor.finalize()
        mac_hash: hashes.HashAlgorithm = (
            hashes.SHA256() if enc == "A128CBC-HS256" else hashes.SHA512()
        )
        mac = hmac.HMAC(mac_key, mac_hash)
        mac.update(aad + iv + ciphertext + (len(aad) * 8).to_bytes(8, "big"))
        tag = mac.finalize()[:half]
    return ".".join([protected, *(b64u(p) for p in (encrypted_key, iv, ciphertext, tag))])


# ---------------------------------------------------------------------------------------------
# panva's jose (Node) as the peer


class NodeJoseError(Exception):
    """jose refused or failed; `code` is jose's error code (e.g. ERR_JWS_SIGNATURE_...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class NodeJose:
    """panva's jose in one long-lived node process (tests/interop/jose_tool.mjs), one JSON
    line per call. Safe to share between threads; started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._next_id = 0

    def seal(
        self,
        plaintext: bytes,
        sign_key: Path,
        sign_alg: str,
        enc_key: Path,
        key_alg: str = "RSA-OAEP-256",
        enc: str = "A256GCM",
        *,
        jws_header: Mapping[str, Any] | None = None,
        jwe_header: Mapping[str, Any] | None = None,
    ) -> bytes:
        """JWS (kid = the signing JWK's kid) inside a JWE (kid = the encryption JWK's kid),
        both compact. `jws_header` / `jwe_header` add members; a None value removes one."""
        answer = self._call(
            op="seal",
            plaintext=base64.b64encode(plaintext).decode("ascii"),
            sign_key=str(sign_key),
            sign_alg=sign_alg,
            enc_key=str(enc_key),
            key_alg=key_alg,
            enc=enc,
            jws_header=dict(jws_header or {}),
            jwe_header=dict(jwe_header or {}),
        )
        return str(answer["body"]).encode("ascii")

    def open(
        self,
        body: bytes,
        dec_key: Path,
        verify_keys: Sequence[Path],
        *,
        key_algs: Sequence[str] | None = None,
        encs: Sequence[str] | None = None,
        sign_algs: Sequence[str] | None = None,
    ) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """Decrypt with `dec_key`, verify with the key of `verify_keys` whose kid matches (or
        each in turn). Returns (plaintext, JWS protected header, JWE protected header).
        Raises NodeJoseError when jose refuses."""
        answer = self._call(
            op="open",
            body=body.decode("ascii"),
            dec_key=str(dec_key),
            verify_keys=[str(p) for p in verify_keys],
            key_algs=list(key_algs) if key_algs is not None else None,
            encs=list(encs) if encs is not None else None,
            sign_algs=list(sign_algs) if sign_algs is not None else None,
        )
        return (
            base64.b64decode(answer["plaintext"]),
            cast(dict[str, Any], answer["jws_header"]),
            cast(dict[str, Any], answer["jwe_header"]),
        )

    def close(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()

    def _start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["node", str(INTEROP_DIR / "jose_tool.mjs")],
            cwd=INTEROP_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )

    def _call(self, **request: Any) -> dict[str, Any]:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
            process = self._process
            assert process.stdin is not None and process.stdout is not None
            self._next_id += 1
            request["id"] = self._next_id
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        if not line:
            raise RuntimeError("jose_tool.mjs exited (is `npm ci` done in tests/interop?)")
        answer = cast(dict[str, Any], json.loads(line))
        if answer.get("id") != request["id"]:
            raise RuntimeError("jose_tool.mjs answered out of order")
        if not answer.get("ok"):
            raise NodeJoseError(str(answer.get("code")), str(answer.get("message")))
        return answer


@pytest.fixture(scope="session")
def node_jose() -> Iterator[NodeJose]:
    """panva's jose as the peer (stand-in Google): seal and open like our envelope does."""
    peer = NodeJose()
    yield peer
    peer.close()
