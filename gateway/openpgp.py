"""Native PGP envelope: protocol.md section 3's OpenPGP profile in process, on `cryptography`.

A strict RFC 4880 subset (v4 RSA keys, PKESK v3, SEIPD v1 with MDC, one-pass signatures v4);
what lies outside it is refused with the GnuPG engine's errors, never guessed at.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import dataclasses
import functools
import hashlib
import hmac
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from gateway import armor, b64url
from gateway.config import KeyConfig, KeysetConfig, PgpOptions
from gateway.envelope import CONTENT_TYPES, Opened, Sealed
from gateway.errors import (
    AlgorithmError,
    ConfigError,
    DecryptError,
    EngineError,
    MalformedError,
    NoKeyError,
    SignatureError,
    TooLargeError,
    UnknownKeyError,
)
from gateway.keys import Key, Keyset, key_expiry, utcnow

__all__ = ["NativePgpEnvelope", "load_native_keyset"]

# RFC 4880 section 9: algorithm ids.
ACCEPTED_HASHES = {8: "SHA256", 9: "SHA384", 10: "SHA512"}
ACCEPTED_CIPHERS = {7: 16, 8: 24, 9: 32}  # AES-128/192/256 -> key bytes
_HASH_NAMES = {1: "MD5", 2: "SHA1", 3: "RIPEMD160", 11: "SHA224", **ACCEPTED_HASHES}
_CIPHER_NAMES = {1: "IDEA", 2: "3DES", 3: "CAST5", 4: "BLOWFISH", 7: "AES128", 8: "AES192",
                 9: "AES256", 10: "TWOFISH", 11: "CAMELLIA128", 12: "CAMELLIA192",
                 13: "CAMELLIA256"}
# Ciphers outside the profile, with their key sizes: a well-formed session key for one of these
# is refused as an algorithm (as gpg reports it), anything else is a failed decryption.
_REFUSED_CIPHERS = {1: 16, 2: 24, 3: 16, 4: 16, 10: 32, 11: 16, 12: 24, 13: 32}
_DIGEST_IDS = {"SHA256": 8, "SHA384": 9, "SHA512": 10}
_CIPHER_IDS = {"AES128": 7, "AES192": 8, "AES256": 9}
_COMPRESSION_IDS = {"zip": 1, "zlib": 2}
# Hashes for key self-signatures: gpg accepts SHA-1 there (older keys are bound with it); message
# signatures take ACCEPTED_HASHES only.
_HASHES: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    2: hashes.SHA1, 8: hashes.SHA256, 9: hashes.SHA384, 10: hashes.SHA512, 11: hashes.SHA224,
}
_S2K_HASHES = {2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
_RSA = {1, 2, 3}  # RSA, RSA encrypt-only, RSA sign-only
_ALGO_NAMES = {16: "ELG", 17: "DSA", 18: "ECDH", 19: "ECDSA", 22: "EdDSA"}
_CURVE_BITS = {
    bytes.fromhex("2a8648ce3d030107"): 256, bytes.fromhex("2b81040022"): 384,
    bytes.fromhex("2b81040023"): 521, bytes.fromhex("2b06010401da470f01"): 255,
    bytes.fromhex("2b060104019755010501"): 255, bytes.fromhex("2b2403030208010107"): 256,
    bytes.fromhex("2b240303020801010b"): 384, bytes.fromhex("2b240303020801010d"): 512,
}
MIN_RSA_BITS = 2048

# Bounds on the work one message may ask for.
MAX_SESSION_KEY_PACKETS = 32  # as the GnuPG engine: each one may cost an RSA decryption
MAX_RSA_DECRYPTIONS = 32
MAX_SIGNATURES = 32  # signature packets, as the GnuPG engine (and 2 * 32 + 1 packets a level)
MAX_NESTING = 8  # compressed packets inside compressed packets
# Marker packets ("PGP", RFC 4880 5.8) are skipped, but each costs a packet parse: more than
# this many in one level is a flood (gpg reads them; ~0.5 M of them once cost 9 s here).
MAX_MARKERS = 8
# Partial-length chunks of one packet. Writers send chunks of at least 512 octets (RFC 4880
# 4.2.2.4 asks it of the first; gpg writes 8 KiB), so this is 8 MiB a packet at the least; a
# 2 MB body of 1-octet chunks cost 70 MB and seconds of joining before this cap.
MAX_PARTIAL_CHUNKS = 16384
_INNER_SLACK = 64 * 1024  # room for packet headers and signatures beside the literal data

# Packet tags (RFC 4880 4.3).
_PKESK, _SIG, _SKESK, _OPS, _SECKEY, _PUBKEY, _SECSUB, _COMPRESSED, _SED = 1, 2, 3, 4, 5, 6, 7, 8, 9
_MARKER, _LITERAL, _TRUST, _UID, _PUBSUB, _UATTR, _SEIPD, _AEAD = 10, 11, 12, 13, 14, 17, 18, 20
_STREAMABLE = {_COMPRESSED, _SED, _LITERAL, _SEIPD, _AEAD}  # may have partial lengths
# Signature subpackets (RFC 4880 5.2.3.1) a critical bit may be set on; others make it invalid.
_SUB_CREATED, _SUB_SIG_EXPIRES, _SUB_KEY_EXPIRES, _SUB_ISSUER = 2, 3, 9, 16
_SUB_PRIMARY_UID, _SUB_KEY_FLAGS, _SUB_EMBEDDED, _SUB_ISSUER_FPR = 25, 27, 32, 33
_CRITICAL_OK = {2, 3, 4, 5, 6, 7, 9, 11, 12, 16, 21, 22, 23, 25, 26, 27, 30, 32, 33, 34}
# One answer for a session key that does not decrypt and for data that fails its MDC: no oracle.
_DECRYPT_FAILED = ("decryption failed: the message was not made for the own key it names, or "
                   "was altered or damaged")


class _Invalid(Exception):
    """Broken or out-of-profile bytes; translated into the caller's error at each boundary."""


# ---------------------------------------------------------------------------------------------
# Reading packets.


class _Cursor:
    """Reads a byte string front to back; raises _Invalid instead of reading past its end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > len(self.data):
            raise _Invalid("truncated packet")
        self.pos = pos + n
        return self.data[pos:pos + n]

    def byte(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise _Invalid("truncated packet")
        self.pos = pos + 1
        return self.data[pos]

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def mpi(self) -> bytes:
        """An MPI's magnitude bytes (RFC 4880 3.2), without leading zero octets."""
        bits = self.number(2)
        return self.take((bits + 7) // 8).lstrip(b"\0")

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


@dataclass(frozen=True)
class _Packet:
    tag: int
    body: bytes
    cut: bool = False  # encrypted data that ended before its declared length
    trailing: bool = False  # encrypted data followed by more data
    chunked: bool = False  # sent in partial-length chunks


def _length(cur: _Cursor) -> tuple[int, bool]:
    """A new-format body length (RFC 4880 4.2.2): (length, True if it is a partial chunk)."""
    first = cur.byte()
    if first < 192:
        return first, False
    if first < 224:
        return ((first - 192) << 8) + cur.byte() + 192, False
    if first == 255:
        return cur.number(4), False
    return 1 << (first & 0x1F), True


def _next_packet(cur: _Cursor, *, clip: bool = False) -> _Packet:
    """The packet at the cursor, partial chunks joined. Raises _Invalid (lengths are checked
    against the bytes present before anything is copied, so a huge declared length costs
    nothing). With `clip`, encrypted data cut short keeps the bytes present instead: it then
    fails its integrity check like any other damage (gpg's verdict too)."""
    first = cur.byte()
    if not first & 0x80:
        raise _Invalid("not an OpenPGP packet")
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    clip = clip and tag in (_SED, _SEIPD, _AEAD)
    cut = False

    def take(n: int) -> bytes:
        nonlocal cut
        if clip and cur.pos + n > len(cur.data):
            cut = True
            return cur.rest()
        return cur.take(n)

    if first & 0x40:
        length, partial = _length(cur)
        chunked = partial
        chunks = [take(length)]
        if partial and tag not in _STREAMABLE:
            raise _Invalid(f"packet type {tag} may not have partial lengths")
        while partial:
            if clip and cur.done:
                cut = True
                break
            if len(chunks) >= MAX_PARTIAL_CHUNKS:
                raise _Invalid(f"more than {MAX_PARTIAL_CHUNKS} partial-length chunks")
            length, partial = _length(cur)
            chunks.append(take(length))
        return _Packet(tag, b"".join(chunks), cut, chunked=chunked)
    kind = first & 0x03
    if kind == 3:  # indeterminate: to the end of the data
        if tag not in _STREAMABLE:
            raise _Invalid(f"packet type {tag} may not have an indeterminate length")
        return _Packet(tag, cur.rest())
    body = take(cur.number(1 << kind))
    return _Packet(tag, body, cut)


def _packets(data: bytes, limit: int) -> list[_Packet]:
    """Every packet of `data`, at most `limit` of them. Raises _Invalid."""
    cur = _Cursor(data)
    found: list[_Packet] = []
    while not cur.done:
        if len(found) >= limit:
            raise _Invalid(f"more than {limit} packets")
        found.append(_next_packet(cur))
    if not found:
        raise _Invalid("no OpenPGP packet")
    return found


def _dearmor(text: bytes, labels: Sequence[bytes]) -> list[bytes]:
    """The blocks of ASCII armor (RFC 4880 6.2) in `text` whose label is one of `labels`, in
    order. Headers are skipped, a checksum line must match. Raises _Invalid."""
    lines = [line.strip() for line in text.splitlines()]
    blocks: list[bytes] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not (line.startswith(b"-----BEGIN ") and line.endswith(b"-----")):
            continue
        label = line[len(b"-----BEGIN "):-5]
        if label not in labels:
            raise _Invalid("unexpected armor")
        end = b"-----END " + label + b"-----"
        while i < len(lines) and b":" in lines[i]:  # armor headers ("Comment: ...")
            i += 1
        body: list[bytes] = []
        checksum: bytes | None = None
        while i < len(lines) and lines[i] != end:
            if checksum is not None:
                raise _Invalid("data after the armor checksum")
            if lines[i].startswith(b"=") and len(lines[i]) == 5:
                checksum = lines[i][1:]
            elif lines[i]:
                body.append(lines[i])
            i += 1
        if i >= len(lines):
            raise _Invalid("armor without its END line")
        i += 1
        try:
            data = base64.b64decode(b"".join(body), validate=True)
        except (binascii.Error, ValueError):
            raise _Invalid("armor that is not base64") from None
        if checksum is not None and checksum != armor.checksum(data):
            raise _Invalid("armor checksum mismatch")
        blocks.append(data)
    return blocks


def _armor(data: bytes) -> bytes:
    text = base64.b64encode(data)
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return (b"-----BEGIN PGP MESSAGE-----\n\n" + b"\n".join(lines) + b"\n="
            + armor.checksum(data)
            + b"\n-----END PGP MESSAGE-----\n")


# ---------------------------------------------------------------------------------------------
# Signatures.


@dataclass(frozen=True)
class _Sub:
    type: int
    critical: bool
    data: bytes


def _subpackets(data: bytes) -> tuple[_Sub, ...]:
    subs: list[_Sub] = []
    pos, end = 0, len(data)
    while pos < end:
        first = data[pos]
        if first < 192:
            length, pos = first, pos + 1
        elif first < 255 and pos + 1 < end:
            length, pos = ((first - 192) << 8) + data[pos + 1] + 192, pos + 2
        elif first == 255 and pos + 4 < end:
            length, pos = int.from_bytes(data[pos + 1:pos + 5], "big"), pos + 5
        else:
            raise _Invalid("truncated signature subpacket")
        if not 0 < length <= end - pos:
            raise _Invalid("a signature subpacket of a wrong length")
        subs.append(_Sub(data[pos] & 0x7F, bool(data[pos] & 0x80), data[pos + 1:pos + length]))
        pos += length
    return tuple(subs)


@dataclass(frozen=True)
class _Sig:
    """One v4 signature packet (RFC 4880 5.2.3)."""

    type: int
    pk_algo: int
    hash_algo: int
    hashed_part: bytes  # version through the hashed subpackets: what the trailer covers
    hashed: tuple[_Sub, ...]
    unhashed: tuple[_Sub, ...]
    left16: bytes
    value: bytes

    def first(self, kind: int, *, hashed_only: bool = True) -> bytes | None:
        area = self.hashed if hashed_only else self.hashed + self.unhashed
        return next((s.data for s in area if s.type == kind), None)

    @property
    def created(self) -> int | None:
        value = self.first(_SUB_CREATED)
        return int.from_bytes(value, "big") if value is not None and len(value) == 4 else None

    def seconds(self, kind: int) -> int | None:
        """A time-span subpacket (expiry) in seconds; None if absent or zero (never)."""
        value = self.first(kind)
        span = int.from_bytes(value, "big") if value is not None and len(value) == 4 else 0
        return span or None

    @property
    def issuers(self) -> tuple[bytes, ...]:
        """Key ids (8 bytes) and v4 fingerprints (20 bytes) this signature names as its maker.
        A hint only, from either area: the RSA check is what binds the key."""
        found: list[bytes] = []
        for sub in self.hashed + self.unhashed:
            if sub.type == _SUB_ISSUER and len(sub.data) == 8:
                found.append(sub.data)
            elif sub.type == _SUB_ISSUER_FPR and len(sub.data) == 21 and sub.data[0] == 4:
                found.append(sub.data[1:])
        return tuple(found)

    @property
    def sound(self) -> bool:
        """A creation time, and no critical subpacket we do not understand (RFC 4880 5.2.3.1)."""
        return self.created is not None and all(
            s.type in _CRITICAL_OK for s in self.hashed if s.critical)

    def digest(self, data: hashes.Hash) -> bytes:
        """The signed hash: `data` (a running hash of the signed bytes) plus the v4 trailer."""
        h = data.copy()
        h.update(self.hashed_part)
        h.update(b"\x04\xff" + len(self.hashed_part).to_bytes(4, "big"))
        return h.finalize()


def _parse_sig(body: bytes) -> _Sig | None:
    """A v4 signature, or None for another version (outside the profile). Raises _Invalid."""
    cur = _Cursor(body)
    if cur.byte() != 4:
        return None
    sig_type, pk_algo, hash_algo = cur.byte(), cur.byte(), cur.byte()
    hashed_area = cur.take(cur.number(2))
    hashed_part = body[:cur.pos]
    unhashed = _subpackets(cur.take(cur.number(2)))
    left16 = cur.take(2)
    value = cur.mpi() if pk_algo in _RSA else b""
    if pk_algo in _RSA and not cur.done:
        raise _Invalid("bytes after the signature value")
    return _Sig(sig_type, pk_algo, hash_algo, hashed_part, _subpackets(hashed_area), unhashed,
                left16, value)


def _rsa_verify(key: rsa.RSAPublicKey, sig: _Sig, data: hashes.Hash) -> bool:
    """True when `sig` is a good RSA PKCS#1 v1.5 signature by `key` over `data`."""
    algorithm = _HASHES.get(sig.hash_algo)
    if algorithm is None or sig.pk_algo not in (1, 3):
        return False
    digest = sig.digest(data)
    size = (key.key_size + 7) // 8
    if digest[:2] != sig.left16 or len(sig.value) > size:
        return False
    try:
        key.verify(sig.value.rjust(size, b"\0"), digest, padding.PKCS1v15(),
                   Prehashed(algorithm()))
    except InvalidSignature:
        return False
    return True


def _hash_of(hash_algo: int, *chunks: bytes) -> hashes.Hash:
    h = hashes.Hash(_HASHES[hash_algo]())
    for chunk in chunks:
        h.update(chunk)
    return h


def _sub(kind: int, data: bytes) -> bytes:
    body = bytes([kind]) + data
    return _new_length(len(body)) + body


def _make_sig(
    part: _Part, sig_type: int, hash_algo: int, data: hashes.Hash, created: int,
) -> bytes:
    """The body of a v4 RSA signature by `part` (which holds its secret) over `data`."""
    assert part.private is not None
    hashed = (_sub(_SUB_CREATED, created.to_bytes(4, "big"))
              + _sub(_SUB_ISSUER_FPR, b"\x04" + part.fingerprint))
    hashed_part = bytes([4, sig_type, 1, hash_algo]) + len(hashed).to_bytes(2, "big") + hashed
    h = data.copy()
    h.update(hashed_part)
    h.update(b"\x04\xff" + len(hashed_part).to_bytes(4, "big"))
    digest = h.finalize()
    value = part.private.sign(digest, padding.PKCS1v15(), Prehashed(_HASHES[hash_algo]()))
    unhashed = _sub(_SUB_ISSUER, part.keyid)
    return (hashed_part + len(unhashed).to_bytes(2, "big") + unhashed + digest[:2]
            + _mpi(value))


# ---------------------------------------------------------------------------------------------
# Keys.


@dataclass(frozen=True, eq=False)
class _Part:
    """A primary key or subkey: its facts once its binding signatures were checked."""

    fingerprint: bytes  # 20 bytes
    created: int
    bits: int
    public: rsa.RSAPublicKey = field(repr=False)
    private: rsa.RSAPrivateKey | None = field(default=None, repr=False)
    expires: int | None = None
    can_sign: bool = False
    can_encrypt: bool = False
    revoked: bool = False

    @property
    def keyid(self) -> bytes:
        return self.fingerprint[-8:]

    def live(self, now: int) -> bool:
        return not self.revoked and (self.expires is None or self.expires > now)


@dataclass(frozen=True)
class _Material:
    """A key's parts, primary first. Never shown."""

    parts: tuple[_Part, ...] = field(repr=False)

    def pick(self, use: str, now: int) -> _Part | None:
        """The part used to sign (`use` "sign", secret held) or be encrypted to ("encrypt"):
        the newest live one able to, as gpg picks it."""
        able = [p for p in self.parts if p.live(now) and getattr(p, f"can_{use}")
                and (use == "encrypt" or p.private is not None)]
        return max(able, key=lambda p: p.created) if able else None


@dataclass
class _KeyPacket:
    """A v4 public or secret key packet, its secret part not yet opened."""

    tag: int
    body: bytes  # the public part: what fingerprints and binding signatures cover
    created: int
    algo: int
    bits: int
    public: rsa.RSAPublicKey | None
    secret: bytes  # what follows the public part in a secret key packet

    @property
    def fingerprint(self) -> bytes:
        return hashlib.sha1(self._framed).digest()  # noqa: S324 - the v4 fingerprint is SHA-1

    @property
    def _framed(self) -> bytes:
        return b"\x99" + len(self.body).to_bytes(2, "big") + self.body

    @property
    def hex(self) -> str:
        return self.fingerprint.hex().upper()


def _parse_key_packet(packet: _Packet) -> _KeyPacket:
    cur = _Cursor(packet.body)
    version = cur.byte()
    if version != 4:
        raise _Invalid(f"version {version} keys are outside the profile (v4 only)")
    created, algo = cur.number(4), cur.byte()
    public: rsa.RSAPublicKey | None = None
    if algo in _RSA:
        n, e = int.from_bytes(cur.mpi(), "big"), int.from_bytes(cur.mpi(), "big")
        bits = n.bit_length()
        try:
            public = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise _Invalid("an RSA public key that is not valid") from None
    elif algo in (16, 17):  # Elgamal (p, g, y), DSA (p, q, g, y)
        bits = int.from_bytes(cur.mpi(), "big").bit_length()
        for _ in range(2 if algo == 16 else 3):
            cur.mpi()
    elif algo in (18, 19, 22):  # ECDH, ECDSA, EdDSA: curve OID, point [, KDF parameters]
        bits = _CURVE_BITS.get(cur.take(cur.byte()), 0)
        cur.mpi()
        if algo == 18:
            cur.take(cur.byte())
    else:
        raise _Invalid(f"public-key algorithm {algo} is outside the profile")
    return _KeyPacket(packet.tag, packet.body[:cur.pos], created, algo, bits, public,
                      packet.body[cur.pos:])


def _s2k(cur: _Cursor) -> tuple[int, int, bytes, int] | None:
    """(type, hash, salt, byte count) of a string-to-key specifier; None for GnuPG's "no secret
    here" (gnu-dummy, divert-to-card). Raises _Invalid outside the profile."""
    kind, hash_algo = cur.byte(), cur.byte()
    if kind == 101 and cur.take(3) == b"GNU":
        return None
    if hash_algo not in _S2K_HASHES:
        raise _Invalid(f"S2K hash {hash_algo} is outside the profile")
    if kind == 0:
        return kind, hash_algo, b"", 0
    if kind == 1:
        return kind, hash_algo, cur.take(8), 0
    if kind == 3:
        salt, c = cur.take(8), cur.byte()
        return kind, hash_algo, salt, (16 + (c & 15)) << ((c >> 4) + 6)
    raise _Invalid(f"S2K type {kind} is outside the profile")


def _s2k_key(spec: tuple[int, int, bytes, int], passphrase: bytes, size: int) -> bytes:
    """Derive `size` key bytes from the passphrase (RFC 4880 3.7.1)."""
    kind, hash_algo, salt, count = spec
    data = salt + passphrase
    out = b""
    preload = 0
    while len(out) < size:
        h = hashlib.new(_S2K_HASHES[hash_algo])
        h.update(b"\0" * preload)
        if kind == 3 and count > len(data) and data:
            chunk = data * max(1, 65536 // len(data))
            full, remainder = divmod(count, len(chunk))
            for _ in range(full):
                h.update(chunk)
            h.update(chunk[:remainder])
        else:
            h.update(data)
        out += h.digest()
        preload += 1
    return out[:size]


class _Passphrase(Exception):
    """The secret part needs a passphrase that is missing (`missing`) or does not open it."""

    def __init__(self, missing: bool) -> None:
        super().__init__()
        self.missing = missing


def _open_secret(key: _KeyPacket, passphrase: str | None) -> rsa.RSAPrivateKey | None:
    """The RSA private key of a secret key packet, None when the packet holds no secret (GnuPG
    stubs). Raises _Passphrase, or _Invalid outside the profile or when damaged."""
    cur = _Cursor(key.secret)
    usage = cur.byte()
    if usage == 0:
        clear = cur.rest()
        check: Callable[[bytes], bool] = _sum16_ok
    elif usage in (254, 255):
        cipher = cur.byte()
        spec = _s2k(cur)
        if spec is None:
            return None
        if cipher not in ACCEPTED_CIPHERS:
            raise _Invalid(f"secret key protection cipher {cipher} is outside the profile")
        if passphrase is None:
            raise _Passphrase(missing=True)
        iv = cur.take(16)
        secret_key = _s2k_key(spec, passphrase.encode("utf-8"), ACCEPTED_CIPHERS[cipher])
        decryptor = Cipher(algorithms.AES(secret_key), CFB(iv)).decryptor()
        clear = decryptor.update(cur.rest()) + decryptor.finalize()
        check = _sha1_ok if usage == 254 else _sum16_ok
        if not check(clear):
            raise _Passphrase(missing=False)
    else:
        raise _Invalid(f"secret key protection (usage {usage}) is outside the profile")
    if not check(clear):
        raise _Invalid("the secret key's checksum does not match")
    if key.algo not in _RSA or key.public is None:
        return None
    mpis = _Cursor(clear)
    d, p, q = (int.from_bytes(mpis.mpi(), "big") for _ in range(3))
    pub = key.public.public_numbers()
    try:
        # The arithmetic that makes it a working key pair, instead of OpenSSL's full check
        # (primality tests: ~100 ms per part): the file is the operator's, not the network's.
        if p < 3 or q < 3 or p * q != pub.n or pub.e * d % math.lcm(p - 1, q - 1) != 1:
            raise ValueError("inconsistent")
        return rsa.RSAPrivateNumbers(
            p=p, q=q, d=d, dmp1=rsa.rsa_crt_dmp1(d, p), dmq1=rsa.rsa_crt_dmq1(d, q),
            iqmp=rsa.rsa_crt_iqmp(p, q), public_numbers=pub,
        ).private_key(unsafe_skip_rsa_key_validation=True)
    except (ValueError, ZeroDivisionError):
        if usage == 255:  # a 16-bit checksum lets a wrong passphrase through now and then
            raise _Passphrase(missing=False) from None
        raise _Invalid("the secret key does not match its public key") from None


def _sum16_ok(clear: bytes) -> bool:
    return len(clear) >= 2 and sum(clear[:-2]) & 0xFFFF == int.from_bytes(clear[-2:], "big")


def _sha1_ok(clear: bytes) -> bool:
    return len(clear) >= 20 and hmac.compare_digest(
        hashlib.sha1(clear[:-20]).digest(), clear[-20:])  # noqa: S324 - RFC 4880 5.5.3


@dataclass
class _Transferable:
    """One primary key with what follows it in a key file (RFC 4880 11.1/11.2)."""

    primary: _KeyPacket
    direct: list[_Sig] = field(default_factory=list)
    ids: list[tuple[bytes, list[_Sig]]] = field(default_factory=list)  # framed uid, its sigs
    subkeys: list[tuple[_KeyPacket, list[_Sig]]] = field(default_factory=list)


def _transferables(packets: Sequence[_Packet]) -> list[_Transferable]:
    keys: list[_Transferable] = []
    sigs: list[_Sig] | None = None
    for packet in packets:
        if packet.tag in (_SECKEY, _PUBKEY):
            keys.append(_Transferable(_parse_key_packet(packet)))
            sigs = keys[-1].direct
        elif not keys:
            raise _Invalid("a key file must begin with a primary key")
        elif packet.tag in (_UID, _UATTR):
            prefix = b"\xb4" if packet.tag == _UID else b"\xd1"
            keys[-1].ids.append((prefix + len(packet.body).to_bytes(4, "big") + packet.body, []))
            sigs = keys[-1].ids[-1][1]
        elif packet.tag in (_SECSUB, _PUBSUB):
            keys[-1].subkeys.append((_parse_key_packet(packet), []))
            sigs = keys[-1].subkeys[-1][1]
        elif packet.tag == _SIG:
            sig = _parse_sig(packet.body)
            if sig is not None and sigs is not None:
                sigs.append(sig)
        elif packet.tag not in (_TRUST, _MARKER):
            raise _Invalid(f"packet type {packet.tag} does not belong in a key file")
    return keys


def _self_sig_ok(sig: _Sig, signer: _KeyPacket, now: int, *chunks: bytes) -> bool:
    """A self-signature by `signer` over `chunks` that holds: sound, not expired, made after
    the key, good."""
    created = sig.created
    if signer.public is None or created is None or not sig.sound or created < signer.created:
        return False
    expires = sig.seconds(_SUB_SIG_EXPIRES)
    if expires is not None and created + expires <= now:
        return False
    if sig.hash_algo not in _HASHES:
        return False
    issuers = sig.issuers
    fingerprint = signer.fingerprint
    if issuers and not any(i in (fingerprint, fingerprint[-8:]) for i in issuers):
        return False
    return _rsa_verify(signer.public, sig, _hash_of(sig.hash_algo, *chunks))


def _usage(sig: _Sig | None, algo: int) -> tuple[bool, bool]:
    """(can sign, can encrypt) from a self-signature's key flags, else from the algorithm."""
    flags = None if sig is None else sig.first(_SUB_KEY_FLAGS)
    if flags:
        return bool(flags[0] & 0x02) and algo != 2, bool(flags[0] & 0x0C) and algo != 3
    return algo != 2, algo != 3


def _bind(
    key: _Transferable, now: int
) -> tuple[_Part | None, list[tuple[_KeyPacket, _Part | None]]]:
    """Check every binding signature: the primary's part (None if no valid self-signature)
    and each subkey bound to it, with usage, expiry and revocation (None for a subkey that is
    bound, not revoked and not RSA: the caller refuses the key). Never raises."""
    primary = key.primary
    framed = primary._framed
    revoked = any(
        s.type == 0x20 and _self_sig_ok(s, primary, now, framed) for s in key.direct)
    certs = [
        s for uid, sigs in key.ids for s in sigs
        if 0x10 <= s.type <= 0x13 and _self_sig_ok(s, primary, now, framed, uid)
    ]
    if not certs:
        return None, []
    chosen = max(certs, key=lambda s: (bool(s.first(_SUB_PRIMARY_UID)), s.created or 0))
    direct = [s for s in key.direct if s.type == 0x1F and _self_sig_ok(s, primary, now, framed)]
    flagged = chosen if chosen.first(_SUB_KEY_FLAGS) else next(iter(direct), None)
    can_sign, can_encrypt = _usage(flagged, primary.algo)
    lifetime = chosen.seconds(_SUB_KEY_EXPIRES)
    assert primary.public is not None
    main = _Part(primary.fingerprint, primary.created, primary.bits, primary.public,
                 expires=None if lifetime is None else primary.created + lifetime,
                 can_sign=can_sign, can_encrypt=can_encrypt, revoked=revoked)
    subkeys: list[tuple[_KeyPacket, _Part | None]] = []
    for sub, sigs in key.subkeys:
        chunks = (framed, sub._framed)
        bindings = [s for s in sigs if s.type == 0x18 and _self_sig_ok(s, primary, now, *chunks)]
        if not bindings:
            continue
        binding = max(bindings, key=lambda s: s.created or 0)
        revoked = any(s.type == 0x28 and _self_sig_ok(s, primary, now, *chunks) for s in sigs)
        if sub.public is None:
            if not revoked:
                subkeys.append((sub, None))
            continue
        can_sign, can_encrypt = _usage(binding, sub.algo)
        if can_sign:
            # A signing subkey must sign the primary back (RFC 4880 5.2.1 0x19), as gpg requires:
            # otherwise anyone could bind our signing subkey to their primary.
            can_sign = any(
                e is not None and e.type == 0x19 and _self_sig_ok(e, sub, now, *chunks)
                for e in _embedded(binding))
        lifetime = binding.seconds(_SUB_KEY_EXPIRES)
        subkeys.append((sub, _Part(
            sub.fingerprint, sub.created, sub.bits, sub.public,
            expires=None if lifetime is None else sub.created + lifetime,
            can_sign=can_sign, can_encrypt=can_encrypt, revoked=revoked,
        )))
    return main, subkeys


def _embedded(sig: _Sig) -> list[_Sig | None]:
    """The signatures embedded in `sig` (RFC 4880 5.2.3.26); None for one that does not parse."""
    found: list[_Sig | None] = []
    for sub in sig.hashed + sig.unhashed:
        if sub.type == _SUB_EMBEDDED:
            try:
                found.append(_parse_sig(sub.data))
            except _Invalid:
                found.append(None)
    return found


def _key_packets(data: bytes) -> list[_Packet]:
    if data.lstrip().startswith(b"-----BEGIN "):
        blocks = _dearmor(data, (b"PGP PUBLIC KEY BLOCK", b"PGP PRIVATE KEY BLOCK"))
        return [p for block in blocks for p in _packets(block, 100_000)]
    return _packets(data, 100_000)


def load_native_keyset(config: KeysetConfig) -> Keyset:
    """Parse every key of a pgp keyset, disabled ones too, into Key objects, in process.

    Each key file (armored or binary export) must hold exactly one v4 RSA key (>= 2048 bits in
    every usable part) with valid self-signatures; a protected secret key's passphrase must open
    it. The Key facts are those of the GnuPG engine's loader. Raises ConfigError naming the
    key's place; the message never holds key material or the passphrase.
    """
    if config.type != "pgp":
        raise ConfigError(f"{config.place}.type", "expected a pgp keyset")
    return Keyset(name=config.name, type="pgp", keys=tuple(_load_key(k) for k in config.keys))


def _load_key(config: KeyConfig) -> Key:
    place = f"{config.place}.file"
    name = config.file.name
    try:
        data = config.file.read_bytes()
    except OSError as exc:
        raise ConfigError(place, f"cannot read '{config.file}': {exc.strerror}") from None
    try:
        keys = _transferables(_key_packets(data))
    except _Invalid as exc:
        raise ConfigError(place, f"'{name}' holds no OpenPGP key ({exc})") from None
    if not keys:
        raise ConfigError(place, f"'{name}' holds no OpenPGP key")
    if len(keys) > 1:
        raise ConfigError(place, f"'{name}' holds {len(keys)} primary keys; give one per file")
    key = keys[0]
    fingerprint = key.primary.hex
    now = int(utcnow().timestamp())
    if key.primary.public is None or key.primary.bits < MIN_RSA_BITS:
        raise ConfigError(place, _too_weak(fingerprint, key.primary))
    main, subkeys = _bind(key, now)
    if main is None:
        raise ConfigError(place, f"'{name}' holds no usable OpenPGP key (no valid self-signature)")
    if main.revoked:
        raise ConfigError(place, f"key {fingerprint} is revoked or invalid")
    packets = [(key.primary, main)]
    for sub, bound in subkeys:
        if bound is None or (not bound.revoked and sub.bits < MIN_RSA_BITS):
            raise ConfigError(place, _too_weak(fingerprint, sub))
        packets.append((sub, bound))
    parts = tuple(_with_secret(config, packet, part) for packet, part in packets)
    private = any(p.private is not None for p in parts)
    material = _Material(parts)
    signing = _gpg_pick(parts, "sign", now, private)
    encryption = _gpg_pick(parts, "encrypt", now, private)
    ends = [p.expires for p in (parts[0], signing, encryption) if p is not None]
    expires = key_expiry([datetime.fromtimestamp(e, UTC) for e in ends if e is not None],
                         config.not_after)
    return Key(
        id=config.id,
        state=config.state,
        fingerprint=fingerprint,
        private=private,
        can_sign=signing is not None,
        can_encrypt=encryption is not None,
        algorithm=f"RSA-{main.bits}",
        expires=expires,
        place=config.place,
        material=material,
    )


def _too_weak(fingerprint: str, packet: _KeyPacket) -> str:
    algo = "RSA" if packet.algo in _RSA else _ALGO_NAMES.get(packet.algo, "unknown")
    return (f"key {fingerprint} has a {algo}-{packet.bits} part; only RSA keys of at least "
            f"{MIN_RSA_BITS} bits are accepted")


def _gpg_pick(parts: Sequence[_Part], use: str, now: int, need_secret: bool) -> _Part | None:
    """The part gpg lists for `use`: the newest unrevoked able one, unexpired if any."""
    able = [p for p in parts if not p.revoked and getattr(p, f"can_{use}")
            and (p.private is not None or not need_secret)]
    live = [p for p in able if p.expires is None or p.expires > now]
    pool = live or able
    return max(pool, key=lambda p: p.created) if pool else None


def _with_secret(config: KeyConfig, packet: _KeyPacket, part: _Part) -> _Part:
    if packet.tag not in (_SECKEY, _SECSUB):
        return part
    place = f"{config.place}.file"
    try:
        private = _open_secret(packet, config.passphrase)
    except _Invalid as exc:
        raise ConfigError(place, f"this secret key cannot be used: {exc}") from None
    except _Passphrase as exc:
        if exc.missing:
            raise ConfigError(config.place, "the secret key is passphrase-protected: give "
                              "passphrase_file or passphrase_env") from None
        where = (f"{config.place}.passphrase_env" if config.passphrase_env
                 else f"{config.place}.passphrase_file" if config.passphrase_file
                 else config.place)
        raise ConfigError(where, "the passphrase does not open the secret key") from None
    return part if private is None else dataclasses.replace(part, private=private)


# ---------------------------------------------------------------------------------------------
# Writing packets.


def _new_length(n: int) -> bytes:
    if n < 192:
        return bytes([n])
    if n < 8384:
        n -= 192
        return bytes([(n >> 8) + 192, n & 0xFF])
    return b"\xff" + n.to_bytes(4, "big")


def _packet(tag: int, body: bytes) -> bytes:
    return bytes([0xC0 | tag]) + _new_length(len(body)) + body


def _mpi(value: bytes) -> bytes:
    value = value.lstrip(b"\0")
    bits = (len(value) - 1) * 8 + value[0].bit_length() if value else 0
    return bits.to_bytes(2, "big") + value


def _session_key_packet(part: _Part, cipher: int, key: bytes) -> bytes:
    checksum = (sum(key) & 0xFFFF).to_bytes(2, "big")
    wrapped = part.public.encrypt(bytes([cipher]) + key + checksum, padding.PKCS1v15())
    return _packet(_PKESK, b"\x03" + part.keyid + b"\x01" + _mpi(wrapped))


def _seipd(key: bytes, inner: bytes) -> bytes:
    """Symmetrically encrypted, integrity protected data (RFC 4880 5.13): AES-CFB with a zero
    IV over a random prefix (its last two octets repeated), the data and the MDC packet."""
    prefix = os.urandom(16)
    prefix += prefix[-2:]
    mdc = hashlib.sha1(prefix)  # noqa: S324 - the MDC is SHA-1 by definition
    mdc.update(inner)
    mdc.update(b"\xd3\x14")
    encryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
    body = b"".join((b"\x01", encryptor.update(prefix), encryptor.update(inner),
                     encryptor.update(b"\xd3\x14" + mdc.digest()), encryptor.finalize()))
    return bytes([0xC0 | _SEIPD]) + _new_length(len(body)) + body


def _compress(algo: int, data: bytes) -> bytes:
    if algo == 1:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return _packet(_COMPRESSED, b"\x01" + c.compress(data) + c.flush())
    return _packet(_COMPRESSED, b"\x02" + zlib.compress(data, 6))


# ---------------------------------------------------------------------------------------------
# Opening: the encryption layer.


@dataclass(frozen=True)
class _SessionKeyPacket:
    keyid: bytes
    algo: int
    value: bytes


def _outer(message: bytes) -> tuple[list[_SessionKeyPacket], _Packet]:
    """The session-key packets (v3, public-key) and the encrypted data packet that must follow
    them and end the message. Raises MalformedError."""
    cur = _Cursor(message)
    found: list[_SessionKeyPacket] = []
    count = 0
    try:
        while True:
            packet = _next_packet(cur, clip=True)
            if packet.tag not in (_PKESK, _SKESK):
                break
            count += 1
            if count > MAX_SESSION_KEY_PACKETS:
                raise MalformedError(f"more than {MAX_SESSION_KEY_PACKETS} session-key packets")
            if packet.tag == _SKESK:
                # Not in the profile; gpg then asks for a passphrase before trying any key.
                raise MalformedError("the message is encrypted with a passphrase, not to a key")
            body = _Cursor(packet.body)
            version = body.byte()
            if version != 3:
                raise MalformedError(f"a version {version} session-key packet (v3 only)")
            keyid, algo = body.take(8), body.byte()
            value = body.mpi() if algo in _RSA else body.rest()
            if algo in _RSA and not body.done:
                raise _Invalid("bytes after the session key")
            found.append(_SessionKeyPacket(keyid, algo, value))
        if not count or packet.tag not in (_SED, _SEIPD, _AEAD):
            raise MalformedError("not an encrypted OpenPGP message")
        if not cur.done:
            # Refused once the recipients are known (an integrity failure, as gpg answers when
            # the encrypted packet's length was shortened): nothing outside the MDC is read.
            packet = _Packet(packet.tag, packet.body, trailing=True)
    except _Invalid as exc:
        raise MalformedError(f"not a well-formed OpenPGP message: {exc}") from None
    return found, packet


def _cfb_open(key: bytes, body: bytes) -> bytes | None:
    """The data inside a SEIPD v1 body when its MDC holds, else None. Nothing decrypted is
    looked at before the MDC is checked; the quick-check octets never are (an oracle)."""
    decryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor()
    clear = decryptor.update(memoryview(body)[1:]) + decryptor.finalize()
    if len(clear) < 18 + 22:
        return None
    view = memoryview(clear)
    mdc = hashlib.sha1(view[:-20]).digest()  # noqa: S324 - the MDC is SHA-1 by definition
    if not hmac.compare_digest(mdc, view[-20:]) or clear[-22:-20] != b"\xd3\x14":
        return None
    return clear[18:-22]


# ---------------------------------------------------------------------------------------------
# Opening: what the encrypted data holds.


def _decompress(body: bytes, cap: int) -> bytes:
    """The packets inside a compressed data packet, at most `cap` bytes of them. Raises
    TooLargeError over the cap (a bomb costs at most `cap` bytes and the time to make them),
    DecryptError if the data is broken (as gpg reports it), MalformedError for an unknown
    algorithm. As gpg, ZLIB's Adler-32 is checked when all four of its bytes are there, and
    a stream that ends without them is taken as it is (the MDC covers those bytes anyway)."""
    algo, data = body[0] if body else -1, body[1:]
    if algo == 0:
        return data
    if algo == 2:
        cmf, flg = (data[0], data[1]) if len(data) >= 2 else (0, 0)
        if cmf & 0x0F != 8 or (cmf << 8 | flg) % 31 or flg & 0x20:
            raise DecryptError("broken ZLIB header in the compressed data")
        algo, data, adler = 1, data[2:], True
    else:
        adler = False
    finished: bool
    if algo == 1:
        inflater = zlib.decompressobj(-15)
        try:
            out = inflater.decompress(data, cap + 1)
        except zlib.error:
            raise DecryptError("broken compressed data") from None
        finished = inflater.eof
    elif algo == 3:
        unbzip = bz2.BZ2Decompressor()
        try:
            out = unbzip.decompress(data, cap + 1)
        except (OSError, EOFError, ValueError):
            raise DecryptError("broken compressed data") from None
        finished = unbzip.eof
    else:
        raise MalformedError(f"compression algorithm {algo} is outside the profile")
    if len(out) > cap:
        raise TooLargeError(f"decompressed data is over the {cap} byte limit")
    if not finished:
        raise DecryptError("truncated compressed data")
    if adler:
        trailer = inflater.unused_data[:4]
        if len(trailer) == 4 and int.from_bytes(trailer, "big") != zlib.adler32(out):
            raise DecryptError("the ZLIB checksum of the compressed data does not match")
    return out


@dataclass(frozen=True)
class _Content:
    literal: bytes  # as the literal data packet holds it: what signatures cover
    plaintext: bytes  # what open() returns (gpg's output for the literal's format)
    # (signature, hash ids announced for it): None for a signature packet outside the profile;
    # the announced ids are those of the one-pass packets (gpg hashes the data with those only),
    # or None for a signature packet before the literal.
    sigs: tuple[tuple[_Sig | None, frozenset[int] | None], ...]


def _level(data: bytes, cap: int) -> list[_Packet]:
    """The packets of the signed message: descend through compressed packets that are alone
    at their level (as gpg, OpenPGP.js and BouncyCastle write them). Raises MalformedError,
    DecryptError or TooLargeError."""
    for _ in range(MAX_NESTING + 1):
        cur = _Cursor(data)
        packets: list[_Packet] = []
        markers = 0
        try:
            while not cur.done:
                packet = _next_packet(cur)
                if packet.tag == _MARKER:  # ignored, as RFC 4880 5.8 asks, if it is one
                    if packet.body != b"PGP":
                        raise MalformedError("a marker packet that does not hold 'PGP'")
                    markers += 1
                    if markers > MAX_MARKERS:
                        raise MalformedError(f"more than {MAX_MARKERS} marker packets")
                    continue
                if len(packets) > 2 * MAX_SIGNATURES + 1:
                    raise MalformedError(f"more than {MAX_SIGNATURES} signatures")
                packets.append(packet)
        except _Invalid as exc:
            raise MalformedError(f"the encrypted data is not a signed message: {exc}") from None
        if len(packets) != 1 or packets[0].tag != _COMPRESSED:
            return packets
        data = _decompress(packets[0].body, cap)
    raise MalformedError(f"compressed data nested more than {MAX_NESTING} deep")


def _content(data: bytes, limit: int) -> _Content:
    """One literal data packet, signed by signature packets before it or by one-pass signatures
    around it (RFC 4880 11.3). Raises MalformedError, DecryptError, SignatureError (signature
    packets that do not pair up: gpg then sees no signature) or TooLargeError."""
    packets = _level(data, limit + _INNER_SLACK)
    tags = [p.tag for p in packets]
    odd = [t for t in tags if t not in (_SIG, _OPS, _LITERAL)]
    if odd:
        raise MalformedError(f"packet type {odd[0]} inside the encrypted data")
    if _LITERAL not in tags:
        raise MalformedError("the message does not hold exactly one encrypted literal")
    if tags.count(_LITERAL) > 1:
        raise DecryptError("the encrypted data holds more than one literal")
    if tags.count(_SIG) > MAX_SIGNATURES:
        raise MalformedError(f"more than {MAX_SIGNATURES} signatures")
    at = tags.index(_LITERAL)
    prefix = next((i for i, t in enumerate(tags) if t != _SIG), at)
    ops, after = tags[prefix:at], tags[at + 1:]
    if any(t != _OPS for t in ops) or any(t != _SIG for t in after) or len(after) != len(ops):
        raise SignatureError("the signature packets do not pair with one-pass signature packets")
    if prefix and ops:
        # Both forms of signed message at once: gpg sees no valid signature in it.
        raise SignatureError("signature packets before one-pass signed data")
    literal = _Cursor(packets[at].body)
    try:
        mode = literal.byte()
        literal.take(literal.byte())  # file name
        literal.take(4)  # date
    except _Invalid:
        raise MalformedError("a broken literal data packet") from None
    if mode not in b"btum":
        raise MalformedError(f"literal data format {mode:#04x} is outside the profile")
    content = literal.rest()
    # gpg writes text-mode literals ('t', 'u') without any CR: so do we, for the same output.
    plaintext = content.replace(b"\r", b"") if mode in b"tu" else content
    if len(plaintext) > limit:
        raise TooLargeError(f"plaintext is over the {limit} byte limit")
    announced = frozenset(packets[i].body[2] for i in range(prefix, at)
                          if len(packets[i].body) == 13 and packets[i].body[0] == 3)
    sigs: list[tuple[_Sig | None, frozenset[int] | None]] = []
    for i in (*range(prefix), *range(at + 1, len(packets))):  # gpg's order of report
        try:
            sig = _parse_sig(packets[i].body)
        except _Invalid:
            sig = None
        sigs.append((sig, None if i < prefix else announced))
    return _Content(content, plaintext, tuple(sigs))


# ---------------------------------------------------------------------------------------------
# The envelope.


class NativePgpEnvelope:
    """Seal and open OpenPGP messages for one route (protocol.md section 3), in process.

    Only enabled own keys decrypt and only enabled, unexpired peer keys verify. Holds no
    resources; thread-safe (nothing changes after construction)."""

    scheme = "pgp"
    waits_on_processes = False

    def __init__(
        self, own: Keyset, peer: Keyset, options: PgpOptions, *, max_plaintext_bytes: int
    ) -> None:
        """Raises ConfigError when a key was not loaded by load_native_keyset, EngineError when
        this build's RSA lacks implicit rejection."""
        if not _implicit_rejection():
            raise EngineError("the native PGP engine needs RSA PKCS#1 v1.5 decryption with "
                              "implicit rejection (OpenSSL 3.2 or later); use engine: gnupg")
        for keyset in (own, peer):
            for key in keyset.keys:
                if not isinstance(key.material, _Material):
                    raise ConfigError(key.place, "the native engine needs keys loaded by "
                                      "load_native_keyset")
        self.own = own
        self.peer = peer
        self.options = options
        self.max_plaintext_bytes = max_plaintext_bytes
        # base64url of armored, uncompressed OpenPGP is ~1.8x the plaintext, plus the packets.
        self.max_body_bytes = 2 * max_plaintext_bytes + 64 * 1024

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES["pgp"]

    def close(self) -> None:
        """Nothing to release. Idempotent."""

    # Sealing.

    def seal(self, plaintext: bytes) -> Sealed:
        """Sign with every own signer, encrypt to every peer recipient; base64url out.
        Raises TooLargeError, NoKeyError (nothing usable to seal with)."""
        if len(plaintext) > self.max_plaintext_bytes:
            raise TooLargeError(
                f"plaintext of {len(plaintext)} bytes is over the {self.max_plaintext_bytes} limit"
            )
        now = int(self.own.now().timestamp())
        signers = [(k, k.material.pick("sign", now)) for k in self.own.signers()]
        recipients = [(k, k.material.pick("encrypt", now)) for k in self.peer.recipients()]
        if not signers:
            raise NoKeyError(f"keyset '{self.own.name}' has no active, unexpired signing key")
        if not recipients:
            raise NoKeyError(f"keyset '{self.peer.name}' has no active, unexpired encryption key")
        if any(p is None for _, p in signers + recipients):
            raise NoKeyError("a key has no usable part left (expired or revoked)")
        o = self.options
        digest = _DIGEST_IDS[o.digest]
        data = _hash_of(digest, plaintext)
        # As gpg writes them: one-pass packets in reverse, so that the signature packets, which
        # close in the reverse order of their one-pass packets (RFC 4880 5.4), come in order.
        one_pass = b"".join(
            _packet(_OPS, bytes([3, 0x00, digest, 1]) + part.keyid + bytes([i == 0]))
            for i, (_, part) in reversed(list(enumerate(signers)))
        )
        signatures = b"".join(
            _packet(_SIG, _make_sig(part, 0x00, digest, data, now)) for _, part in signers
        )
        literal = _packet(_LITERAL, b"b\x00" + now.to_bytes(4, "big") + plaintext)
        inner = one_pass + literal + signatures
        if o.compression in _COMPRESSION_IDS:
            inner = _compress(_COMPRESSION_IDS[o.compression], inner)
        cipher = _CIPHER_IDS[o.cipher]
        session_key = os.urandom(ACCEPTED_CIPHERS[cipher])
        message = b"".join(_session_key_packet(part, cipher, session_key)
                           for _, part in recipients) + _seipd(session_key, inner)
        if o.armor:
            message = _armor(message)
        body = b64url.encode(message, padding=o.base64_padding)
        return Sealed(
            body=body,
            signed_by=tuple(k.id for k, _ in signers),
            encrypted_to=tuple(k.id for k, _ in recipients),
        )

    # Opening.

    def open(self, body: bytes) -> Opened:
        """Decode, decrypt with an enabled own key, verify a signature by an enabled peer key.
        Raises an EnvelopeError subclass (the GnuPG engine's, for the same message) on any
        failure; the plaintext is returned only when everything holds."""
        if len(body) > self.max_body_bytes:
            raise TooLargeError(
                f"body of {len(body)} bytes is over the {self.max_body_bytes} byte limit"
            )
        message = b64url.decode_body(body)
        if message.lstrip().startswith(b"-----BEGIN "):
            try:
                blocks = _dearmor(message, (b"PGP MESSAGE",))
            except _Invalid as exc:
                raise MalformedError(f"not an ASCII-armored OpenPGP message: {exc}") from None
            if len(blocks) != 1:
                raise MalformedError("not one ASCII-armored OpenPGP message")
            message = blocks[0]
        session_keys, encrypted = _outer(message)
        decrypted_by, data = self._decrypt(session_keys, encrypted)
        content = _content(data, self.max_plaintext_bytes)
        verified_by = self._verify(content)
        return Opened(plaintext=content.plaintext, decrypted_by=decrypted_by,
                      verified_by=verified_by)

    def _decrypt(
        self, session_keys: list[_SessionKeyPacket], encrypted: _Packet
    ) -> tuple[tuple[str, ...], bytes]:
        if encrypted.cut and encrypted.chunked:
            # gpg reads a chunked packet to its end before it looks at the recipients: cut
            # short, it is a decryption failure whoever it was for. Same verdict here.
            raise DecryptError("the encrypted data ends before its last chunk")
        parts = [(k, p) for k in self.own.decryptors() for p in k.material.parts
                 if p.can_encrypt and p.private is not None]
        # A key id of zeros hides the recipient (gpg --throw-keyids): try every own key on it.
        tries = [
            (sk, key, part) for sk in session_keys for key, part in parts
            if sk.keyid in (part.keyid, bytes(8))
        ]
        if any(sk.algo not in (1, 2) and sk.keyid != bytes(8) for sk, _, _ in tries):
            raise MalformedError("a session-key packet names an own RSA key with another "
                                 "algorithm")
        tries = [t for t in tries if t[0].algo in (1, 2)]
        if not tries:
            ids = ", ".join(sorted({sk.keyid.hex().upper() for sk in session_keys}))
            raise UnknownKeyError(
                f"the message is encrypted to no enabled own key (recipient key ids: {ids})")
        if len(tries) > MAX_RSA_DECRYPTIONS:
            raise MalformedError(f"more than {MAX_RSA_DECRYPTIONS} session keys to try")
        if encrypted.trailing:
            raise DecryptError("data after the encrypted message")
        if encrypted.tag == _SED:
            raise DecryptError("the message has no integrity protection")
        if encrypted.tag == _AEAD or encrypted.body[:1] != b"\x01":
            raise DecryptError("encrypted data outside the profile (SEIPD v1 only)")
        # The first session key whose data passes its MDC wins, as in gpg. Every failure runs
        # every try to its end, so only success ends the work early.
        unwrapped = False
        for sk, key, part in tries:
            found = _unwrap(sk, part)
            if found is None:
                continue
            cipher, session_key = found
            if cipher not in ACCEPTED_CIPHERS:
                raise AlgorithmError(
                    f"cipher algorithm {_CIPHER_NAMES[cipher]} ({cipher}) is refused "
                    "(accepted: AES128, AES192, AES256)", layer="encryption")
            unwrapped = True
            data = _cfb_open(session_key, encrypted.body)
            if data is not None and not encrypted.cut:
                return (key.id,), data
        if not unwrapped:
            if all(sk.keyid == bytes(8) for sk, _, _ in tries):
                # Hidden recipients: no own key recovered a session key, so as far as anyone
                # can tell the message is for someone else (gpg's verdict too).
                raise UnknownKeyError("the message is encrypted to a hidden recipient that is "
                                      "no enabled own key")
            # Security: the same work and the same answer as a bad MDC, so that no one learns
            # whether the RSA layer or the symmetric layer failed.
            _cfb_open(os.urandom(32), encrypted.body)
        raise DecryptError(_DECRYPT_FAILED)

    def _verify(self, content: _Content) -> tuple[str, ...]:
        """Ids of the enabled, unexpired peer keys with a good signature. Raises AlgorithmError
        (a peer key signed with a refused hash, and no good signature) or SignatureError."""
        now = int(self.peer.now().timestamp())
        makers: dict[bytes, list[tuple[Key, _Part]]] = {}
        for key in self.peer.verifiers():
            for part in key.material.parts:
                if part.can_sign:
                    makers.setdefault(part.keyid, []).append((key, part))
                    makers.setdefault(part.fingerprint, []).append((key, part))
        hashed: dict[int, hashes.Hash] = {}
        good: list[str] = []
        refused: list[int] = []
        seen: list[str] = []
        for sig, announced in content.sigs:
            if sig is None:
                seen.append("unknown key id: outside the profile")
                continue
            candidates = list(dict.fromkeys(m for i in sig.issuers for m in makers.get(i, [])))
            keyid = next((i[-8:].hex().upper() for i in sig.issuers), "unknown")
            if not candidates:
                seen.append(f"key id {keyid}: no such key among the enabled peer keys")
                continue
            if sig.hash_algo not in ACCEPTED_HASHES:
                refused.append(sig.hash_algo)
                continue
            if sig.hash_algo not in hashed:
                # Text signatures (0x01) too are checked over the literal's bytes as they are:
                # gpg does so (they are canonical when made by gpg or OpenPGP.js).
                hashed[sig.hash_algo] = _hash_of(sig.hash_algo, content.literal)
            checkable = sig.type in (0x00, 0x01) and sig.sound and (
                announced is None or sig.hash_algo in announced)
            signer = next((key for key, part in candidates if checkable and _message_sig_ok(
                sig, part, now, hashed[sig.hash_algo])), None)
            if signer is not None:
                good.append(signer.id)
            else:
                seen.append(f"key id {keyid}: bad, expired or outside the profile")
        if good:
            return tuple(dict.fromkeys(good))
        if refused:
            names = sorted({_HASH_NAMES.get(h, str(h)) for h in refused})
            raise AlgorithmError(
                f"the peer's signature uses the refused hash algorithm {', '.join(names)} "
                f"(accepted: {', '.join(ACCEPTED_HASHES.values())})", layer="signature")
        if not content.sigs:
            raise SignatureError("the message is not signed")
        raise SignatureError(
            f"no good signature by an enabled peer key (signatures: {'; '.join(seen)})")


def _message_sig_ok(sig: _Sig, part: _Part, now: int, data: hashes.Hash) -> bool:
    """A good signature over the literal data by a live part, made after the part (gpg's time
    checks)."""
    created = sig.created
    if created is None or created < part.created or part.created > now or not part.live(now):
        return False
    expires = sig.seconds(_SUB_SIG_EXPIRES)
    if expires is not None and created + expires <= now:
        return False
    return _rsa_verify(part.public, sig, data)


@functools.cache
def _implicit_rejection() -> bool:
    """Whether this build's RSA answers a bad PKCS#1 v1.5 padding with a pseudo-random message
    (OpenSSL >= 3.2) rather than an error whose timing would be an oracle. Checked once."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - a probe
    try:
        key.decrypt(bytes(127) + b"\x01", padding.PKCS1v15())  # 1^d = 1: no valid padding
    except ValueError:
        return False
    return True


def _unwrap(sk: _SessionKeyPacket, part: _Part) -> tuple[int, bytes] | None:
    """(cipher id, session key) from a v3 PKESK, or None when it does not decrypt to one.

    Security: PKCS#1 v1.5 decryption relies on OpenSSL's implicit rejection (OpenSSL >= 3.2): a
    bad padding yields a pseudo-random message instead of an error, which then fails the
    checksum like any wrong key, so nothing here tells a padding error from a wrong key."""
    assert part.private is not None
    size = (part.private.key_size + 7) // 8
    if sk.algo not in (1, 2) or len(sk.value) > size:
        return None
    try:
        clear = part.private.decrypt(sk.value.rjust(size, b"\0"), padding.PKCS1v15())
    except ValueError:  # a value over the modulus: public knowledge, no oracle
        return None
    if len(clear) < 4:
        return None
    cipher, key, checksum = clear[0], clear[1:-2], clear[-2:]
    expected = ACCEPTED_CIPHERS.get(cipher) or _REFUSED_CIPHERS.get(cipher)
    if expected != len(key) or (sum(key) & 0xFFFF).to_bytes(2, "big") != checksum:
        return None
    return cipher, key

