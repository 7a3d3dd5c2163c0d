"""Hostile and broken input for the native PGP engine, beyond what tests/test_pgp_adversarial.py
asks of both engines: each yields its specific error (the gnupg engine's), never plaintext, never
a crash; bombs and floods cost little."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway import openpgp
from gateway.config import PgpOptions
from gateway.errors import (
    ConfigError,
    DecryptError,
    EngineError,
    EnvelopeError,
    MalformedError,
    SignatureError,
    TooLargeError,
)
from gateway.keys import Key, Keyset
from gateway.openpgp import NativePgpEnvelope, load_native_keyset
from tests.pgp_fixtures import GpgPeer, PgpKeys, b64url, unb64url
from tests.test_openpgp import Craft, craft, partial  # noqa: F401
from tests.test_pgp_adversarial import OWN, PEER, SECRET, _bogus_session_keys, good, refused  # noqa: F401
from tests.work_count import count_calls, count_inflated

MakeNative = Callable[..., NativePgpEnvelope]
# Packets one level of the signed message may hold: one-pass, signature and literal packets.
LEVEL_CAP = 2 * openpgp.MAX_SIGNATURES + 1


@pytest.fixture(scope="module")
def partner(native_envelope: MakeNative) -> NativePgpEnvelope:
    """The native engine's envelope of tests/test_pgp_adversarial.py (OWN, PEER)."""
    return native_envelope(OWN, PEER)


def test_a_flood_of_session_keys_is_refused_at_once(
    partner: NativePgpEnvelope, good: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Reading stops at the first session-key packet past the cap: the rest of the thousand are
    never parsed, and none costs an RSA decryption."""
    body = _bogus_session_keys(good, 1000)
    packets = count_calls(monkeypatch, openpgp, "_next_packet")
    unwrapped = count_calls(monkeypatch, openpgp, "_unwrap")
    refused(partner, body, MalformedError)
    assert len(packets) <= openpgp.MAX_SESSION_KEY_PACKETS + 1
    assert unwrapped == []


def test_armor_with_a_wrong_checksum(partner: NativePgpEnvelope, gpg_peer: GpgPeer) -> None:
    text = unb64url(gpg_peer.seal(SECRET, ["google-a"], ["partner-a"], armor=True))
    lines = text.split(b"\n")
    checksum = next(i for i, line in enumerate(lines) if line.startswith(b"=") and
                    len(line) == 5)
    lines[checksum] = b"=AAAA" if lines[checksum] != b"=AAAA" else b"=AAAB"
    refused(partner, b64url(b"\n".join(lines)), MalformedError)


# Compression bombs: refused quickly, with the memory the cap allows and no more.


def _bomb_message(craft: Craft, algo: int, size: int, depth: int = 1) -> bytes:  # noqa: F811
    inner = craft.signed(bytes(size), ["google-a"])
    for _ in range(depth):
        inner = craft.compressed(algo, inner)
    return b64url(craft.encrypt(inner))


def assert_inflated_within_the_cap(inflated: list[int], partner: NativePgpEnvelope,
                                   levels: int = 1) -> None:
    """Each compressed level made at most one byte more than the decompression cap (the
    plaintext limit and room for the packets beside it): not what the bomb holds."""
    cap = partner.max_plaintext_bytes + openpgp._INNER_SLACK
    assert 0 < len(inflated) <= levels, inflated
    assert max(inflated) <= cap + 1, f"{max(inflated)} bytes inflated"


@pytest.mark.parametrize(("algo", "depth"), [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_compression_bombs(
    native_envelope: MakeNative, craft: Craft, algo: int, depth: int,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    partner = native_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")],
                              limit=100_000)
    body = _bomb_message(craft, algo, 30_000_000, depth)
    assert len(body) < 200_000
    inflated = count_inflated(monkeypatch, openpgp)
    tracemalloc.start()
    try:
        refused(partner, body, TooLargeError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_inflated_within_the_cap(inflated, partner, depth)
    assert peak < 4_000_000  # the body, the decrypted data, the capped output: not 30 MB


def test_a_bomb_from_gpg(
    native_envelope: MakeNative, gpg_peer: GpgPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    partner = native_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    body = gpg_peer.seal(bytes(20_000_000), ["google-a"], ["partner-a"], compress="zlib",
                         extra_args=["-z", "9"])
    inflated = count_inflated(monkeypatch, openpgp)
    refused(partner, body, TooLargeError)
    assert_inflated_within_the_cap(inflated, partner)


def test_compression_nested_too_deep(partner: NativePgpEnvelope, craft: Craft) -> None:  # noqa: F811
    inner = craft.signed(SECRET, ["google-a"])
    for _ in range(openpgp.MAX_NESTING):
        inner = craft.compressed(2, inner)
    assert partner.open(b64url(craft.encrypt(inner))).plaintext == SECRET
    refused(partner, b64url(craft.encrypt(craft.compressed(0, inner))), MalformedError)


@pytest.mark.parametrize(("name", "data", "error"), [
    ("not deflate", b"\x01\xff\xff\xff\xff", DecryptError),
    ("bad zlib header", b"\x02\x78\x9d" + zlib.compress(b"x")[2:], DecryptError),
    ("truncated deflate", b"\x01" + zlib.compress(bytes(range(256)) * 8)[2:40], DecryptError),
    ("not bzip2", b"\x03BZh9xxxx", DecryptError),
    ("unknown algorithm", b"\x07abc", MalformedError),
    ("empty", b"", MalformedError),
])
def test_broken_compressed_data(
    partner: NativePgpEnvelope, craft: Craft, name: str, data: bytes,  # noqa: F811
    error: type[EnvelopeError],
) -> None:
    refused(partner, b64url(craft.encrypt(openpgp._packet(8, data))), error)


# Packets: truncated, bad lengths, partial lengths, huge declared lengths, bad MPIs.


def test_every_truncation_is_refused(partner: NativePgpEnvelope, good: bytes) -> None:  # noqa: F811
    raw = unb64url(good)
    pkesk_end = 3 + int.from_bytes(raw[1:3], "big")
    for cut in range(1, len(raw), 7):
        expected = MalformedError if cut <= pkesk_end + 1 else DecryptError
        refused(partner, b64url(raw[:cut]), expected)


def _body(packet: bytes) -> bytes:
    return openpgp._next_packet(openpgp._Cursor(packet)).body


def test_partial_chunks_are_capped(
    native_envelope: MakeNative, craft: Craft, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """openpgp.MAX_PARTIAL_CHUNKS a packet: 1-octet chunks (two body octets for each one of
    data) would cost a list entry each, seconds and ~70 MB for a 2 MB body."""
    partner = native_envelope([("partner-a", "sec", "active")], [("google-a", "pub", "active")])
    key = os.urandom(32)
    data = bytes(range(256)) * 1500

    def message(chunk_power: int) -> bytes:
        literal = partial(11, _body(craft.literal(data)), chunk_power)
        inner = craft.ops("google-a") + literal + craft.sig("google-a", data)
        return b64url(craft.pkesk("partner-a", key) +
                      partial(18, _body(craft.seipd(key, inner)), chunk_power))

    assert partner.open(message(5)).plaintext == data  # 12,000 chunks of 32 octets
    body = message(0)
    assert len(body) < partner.max_body_bytes
    tracemalloc.start()
    try:
        refused(partner, body, MalformedError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000
    # Counted apart from the memory: the record of each call would weigh in the peak.
    lengths = count_calls(monkeypatch, openpgp, "_length")  # one a chunk (or a whole packet)
    refused(partner, body, MalformedError)
    # The session-key packet's length, then the encrypted packet's chunks up to the cap: not
    # the ~400,000 chunks it is sent in.
    assert len(lengths) <= 1 + openpgp.MAX_PARTIAL_CHUNKS


@pytest.mark.parametrize(("name", "mangle", "error"), [
    ("partial length on a session-key packet",
     lambda pk, data: partial(1, pk[3:], 4) + data, MalformedError),
    ("session-key length past the end",
     lambda pk, data: b"\xc1\xff\xff\xff\xff\xff" + pk[3:] + data, MalformedError),
    ("encrypted data declared 4 GiB long",
     lambda pk, data: pk + b"\xd2\xff\xff\xff\xff\xff" + data[6:], DecryptError),
    ("encrypted data with a partial chunk and nothing after",
     lambda pk, data: pk + b"\xd2\xef" + data[6:6 + 32768], DecryptError),
    ("a header octet without its high bit", lambda pk, data: pk + b"\x4b" + data,
     MalformedError),
    ("reserved packet tag 0", lambda pk, data: b"\xc0\x01\x00" + pk + data, MalformedError),
    ("marker packet first", lambda pk, data: b"\xca\x03PGP" + pk + data, MalformedError),
    ("session-key packet of version 6", lambda pk, data: pk[:3] + b"\x06" + pk[4:] + data,
     MalformedError),
    ("zero-length session-key packet", lambda pk, data: b"\xc1\x00" + pk + data, MalformedError),
])
def test_bad_packet_lengths(
    partner: NativePgpEnvelope, craft: Craft, name: str,  # noqa: F811
    mangle: Callable[[bytes, bytes], bytes], error: type[EnvelopeError],
) -> None:
    key = os.urandom(32)
    pk = craft.pkesk("partner-a", key)
    data = craft.seipd(key, craft.signed(SECRET * 2000, ["google-a"]))
    assert pk[:2] == b"\xc1\xc0" and data[:2] == b"\xd2\xff"  # 2048-bit: 267 or 268 bytes
    refused(partner, b64url(mangle(pk, data)), error)


def _pkesk(keyid: bytes, mpi: bytes, algo: int = 1) -> bytes:
    return openpgp._packet(1, b"\x03" + keyid + bytes([algo]) + mpi)


@pytest.mark.parametrize(("name", "mpi", "error"), [
    ("value over the modulus", b"\x08\x00" + b"\xff" * 256, DecryptError),
    ("longer than the modulus", b"\x09\x00" + b"\x01" * 288, DecryptError),
    ("zero", b"\x00\x00", DecryptError),
    ("bit count past the packet", b"\x08\x00" + b"\x01" * 10, MalformedError),
    ("bytes after the MPI", b"\x00\x08\x01junk", MalformedError),
    ("tiny", b"\x00\x08\x01", DecryptError),
])
def test_bad_mpis(
    partner: NativePgpEnvelope, craft: Craft, name: str, mpi: bytes,  # noqa: F811
    error: type[EnvelopeError],
) -> None:
    key = os.urandom(32)
    data = craft.seipd(key, craft.signed(SECRET, ["google-a"]))
    refused(partner, b64url(_pkesk(craft.part("partner-a", "encrypt").keyid, mpi) + data), error)


def test_a_non_rsa_session_key_naming_our_key(
    partner: NativePgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    key = os.urandom(32)
    data = craft.seipd(key, craft.signed(SECRET, ["google-a"]))
    keyid = craft.part("partner-a", "encrypt").keyid
    refused(partner, b64url(_pkesk(keyid, b"\x00\x08\x01\x00\x08\x01", 16) + data),
            MalformedError)


def test_leading_zeros_in_the_session_key_mpi_are_fine(
    partner: NativePgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    key = os.urandom(32)
    part = craft.part("partner-a", "encrypt")
    wrapped = part.public.encrypt(b"\x09" + key + (sum(key) & 0xFFFF).to_bytes(2, "big"),
                                  padding.PKCS1v15())
    mpi = (len(wrapped) * 8 + 8).to_bytes(2, "big") + b"\x00" + wrapped
    body = _pkesk(part.keyid, mpi) + craft.seipd(key, craft.signed(SECRET, ["google-a"]))
    assert partner.open(b64url(body)).plaintext == SECRET


# Decryption is no oracle.


def test_this_builds_rsa_uses_implicit_rejection() -> None:
    """PKCS#1 v1.5 decryption of a bad padding returns a pseudo-random message (the same for the
    same ciphertext) instead of raising: the engine relies on it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = bytearray(key.public_key().encrypt(b"x" * 35, padding.PKCS1v15()))
    bad[10] ^= 0x01
    first = key.decrypt(bytes(bad), padding.PKCS1v15())
    assert first == key.decrypt(bytes(bad), padding.PKCS1v15())
    assert first != b"x" * 35


def test_without_implicit_rejection_the_engine_does_not_start(
    monkeypatch: pytest.MonkeyPatch, native_keyset: Callable[..., Keyset]
) -> None:
    assert openpgp._implicit_rejection.__wrapped__()  # this build: the probe itself
    monkeypatch.setattr(openpgp, "_implicit_rejection", lambda: False)
    with pytest.raises(EngineError, match="implicit rejection"):
        NativePgpEnvelope(native_keyset("own", [("partner-a", "sec", "active")]),
                          native_keyset("peer", [("google-a", "pub", "active")]), PgpOptions(),
                          max_plaintext_bytes=1000)


def test_bad_session_keys_bad_mdcs_and_bad_structure_look_the_same(
    partner: NativePgpEnvelope, craft: Craft  # noqa: F811
) -> None:
    part = craft.part("partner-a", "encrypt")
    inner = craft.signed(SECRET, ["google-a"])
    key = os.urandom(32)
    good_pk = craft.pkesk("partner-a", key)
    seipd = craft.seipd(key, inner)

    def wrapped(message: bytes) -> bytes:
        return _pkesk(part.keyid, openpgp._mpi(part.public.encrypt(message, padding.PKCS1v15())))

    def structure(tail: bytes) -> bytes:  # a SEIPD whose MDC packet is not where it must be
        prefix = os.urandom(16)
        clear = prefix + prefix[-2:] + inner + tail
        clear += hashlib.sha1(clear).digest()
        encryptor = openpgp.Cipher(openpgp.algorithms.AES(key), openpgp.CFB(bytes(16))
                                   ).encryptor()
        return openpgp._packet(18, b"\x01" + encryptor.update(clear) + encryptor.finalize())

    damaged_pk = bytearray(good_pk)
    damaged_pk[40] ^= 0x01
    damaged_data = bytearray(seipd)
    damaged_data[100] ^= 0x01
    cases = {
        "RSA padding broken": bytes(damaged_pk) + seipd,
        "session key checksum wrong": wrapped(b"\x09" + key + b"\x00\x00") + seipd,
        "session key too short": wrapped(b"\x09" + key[:16] + (sum(key[:16]) & 0xFFFF)
                                         .to_bytes(2, "big")) + seipd,
        "another session key": wrapped(b"\x09" + bytes(32) + b"\x00\x00") + seipd,
        "ciphertext altered": good_pk + bytes(damaged_data),
        "MDC packet header wrong": good_pk + structure(b"\xd3\x15"),
        "MDC packet missing": good_pk + structure(b""),
        "encrypted data too short": good_pk + openpgp._packet(18, b"\x01" + os.urandom(30)),
        "encrypted data cut short": good_pk + seipd[:-50],
    }
    messages = {str(refused(partner, b64url(body), DecryptError)) for body in cases.values()}
    assert len(messages) == 1, messages


# Signatures.


def test_a_bad_signature_by_a_peer_key(partner: NativePgpEnvelope, craft: Craft) -> None:  # noqa: F811
    """Protocol.md: a bad signature is a signature failure (401), as in the gnupg engine."""
    inner = craft.ops("google-a") + craft.literal(SECRET) + craft.sig("google-a", SECRET,
                                                                      damage=True)
    error = refused(partner, b64url(craft.encrypt(inner)), SignatureError)
    assert error.layer == "signature"


@pytest.mark.parametrize(("name", "index"), [("google-sub", 0), ("google-a", 1)])
def test_a_signature_by_a_part_that_may_not_sign(
    native_envelope: MakeNative, craft: Craft, name: str, index: int  # noqa: F811
) -> None:
    """google-sub's primary only certifies; google-a's subkey only encrypts."""
    partner = native_envelope([("partner-a", "sec", "active")], [(name, "pub", "active")])
    part = craft.key(name).material.parts[index]
    assert not part.can_sign and part.private is not None
    inner = craft.ops(name, part=part) + craft.literal(SECRET) + craft.sig(name, SECRET,
                                                                           part=part)
    refused(partner, b64url(craft.encrypt(inner)), SignatureError)


def test_a_signature_over_other_data(partner: NativePgpEnvelope, craft: Craft) -> None:  # noqa: F811
    inner = craft.ops("google-a") + craft.literal(SECRET) + craft.sig("google-a", b"other")
    refused(partner, b64url(craft.encrypt(inner)), SignatureError)


@pytest.mark.parametrize(("name", "created"), [("before the key", 1000)])
def test_signature_times(partner: NativePgpEnvelope, craft: Craft, name: str,  # noqa: F811
                         created: int) -> None:
    inner = craft.ops("google-a") + craft.literal(SECRET) + craft.sig("google-a", SECRET,
                                                                      created=created)
    refused(partner, b64url(craft.encrypt(inner)), SignatureError)


@pytest.mark.parametrize("shape", [
    "one-pass without signature", "signature without one-pass", "two one-pass, one signature",
    "one-pass hash differs from the signature's",
])
def test_signature_packets_that_do_not_pair(
    partner: NativePgpEnvelope, craft: Craft, shape: str  # noqa: F811
) -> None:
    lit, sig, ops = craft.literal(SECRET), craft.sig("google-a", SECRET), craft.ops("google-a")
    inner = {
        "one-pass without signature": ops + lit,
        "signature without one-pass": lit + sig,
        "two one-pass, one signature": craft.ops("stranger", last=False) + ops + lit + sig,
        "one-pass hash differs from the signature's": craft.ops("google-a", hash_id=8) + lit +
        sig,
    }[shape]
    refused(partner, b64url(craft.encrypt(inner)), SignatureError)


def test_too_many_signatures(partner: NativePgpEnvelope, craft: Craft) -> None:  # noqa: F811
    sig = craft.sig("stranger", SECRET)
    inner = sig * (openpgp.MAX_SIGNATURES - 1) + craft.sig("google-a", SECRET) + \
        craft.literal(SECRET)
    assert partner.open(b64url(craft.encrypt(inner))).verified_by == ("google-a",)
    for count in (openpgp.MAX_SIGNATURES + 1, 2 * openpgp.MAX_SIGNATURES + 2):
        inner = sig * count + craft.literal(SECRET)
        refused(partner, b64url(craft.encrypt(inner)), MalformedError)


@pytest.mark.parametrize("flood", ["signatures", "one-pass packets"])
def test_floods_of_packets(
    partner: NativePgpEnvelope, craft: Craft, flood: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compressed, a million packets are refused at the decompression cap (the gnupg engine
    stops gpg at its CPU cap instead: 400); a hundred, uncompressed, by count. No RSA work."""
    sig = craft.sig("google-a", SECRET)

    def inner(n: int) -> bytes:
        if flood == "signatures":
            return sig * n + craft.literal(SECRET)
        return (craft.ops("google-a", last=False) * n + craft.ops("google-a")
                + craft.literal(SECRET) + sig)

    for n, compressed, error in ((1_000_000, True, TooLargeError), (100, False, MalformedError)):
        body = b64url(craft.encrypt(craft.compressed(2, inner(n)) if compressed else inner(n)))
        with monkeypatch.context() as spying:
            packets = count_calls(spying, openpgp, "_next_packet")
            inflated = count_inflated(spying, openpgp)
            unwrapped = count_calls(spying, openpgp, "_unwrap")
            verified = count_calls(spying, openpgp, "_rsa_verify")
            refused(partner, body, error)
        # The session-key and encrypted packets, then one level's packets up to its cap and the
        # two that _level reads past it before it refuses: not the n sent.
        assert len(packets) <= 2 + LEVEL_CAP + 2 < n
        if compressed:
            assert_inflated_within_the_cap(inflated, partner)
        assert (len(unwrapped), len(verified)) == (1, 0)  # the session key; no signature


@pytest.mark.parametrize(("name", "inner", "error"), [
    ("no literal", lambda c: c.sig("google-a", SECRET), MalformedError),
    ("two literals", lambda c: c.literal(SECRET) + c.literal(SECRET), DecryptError),
    ("nested encryption", lambda c: c.encrypt(c.signed(SECRET, ["google-a"])), MalformedError),
    ("a key packet inside", lambda c: openpgp._packet(6, b"\x04") + c.signed(SECRET,
                                                                            ["google-a"]),
     MalformedError),
    ("literal format 'x'", lambda c: c.signed(SECRET, ["google-a"], mode=b"x"), MalformedError),
    ("broken literal", lambda c: openpgp._packet(11, b"b\x09ab"), MalformedError),
    ("garbage", lambda c: b"garbage" * 10, MalformedError),
])
def test_odd_contents(partner: NativePgpEnvelope, craft: Craft, name: str,  # noqa: F811
                      inner: Callable[[Craft], bytes], error: type[EnvelopeError]) -> None:
    refused(partner, b64url(craft.encrypt(inner(craft))), error)


# Secret keys: S2K variants open with the right passphrase only.


def _reprotect(packet: openpgp._Packet, passphrase: bytes, usage: int, s2k: bytes,
               cipher: int) -> bytes:
    """`packet` (an unprotected secret key packet) protected again with the given S2K."""
    key = openpgp._parse_key_packet(packet)
    clear = key.secret[1:-2]  # the MPIs, without usage octet and checksum
    kind, hash_id = s2k[0], s2k[1]
    salt = s2k[2:10]
    count = (16 + (s2k[10] & 15)) << ((s2k[10] >> 4) + 6) if kind == 3 else 0
    size = openpgp.ACCEPTED_CIPHERS[cipher]
    derived = openpgp._s2k_key((kind, hash_id, salt, count), passphrase, size)
    check = hashlib.sha1(clear).digest() if usage == 254 else \
        (sum(clear) & 0xFFFF).to_bytes(2, "big")
    iv = os.urandom(16)
    encryptor = openpgp.Cipher(openpgp.algorithms.AES(derived), openpgp.CFB(iv)).encryptor()
    secret = encryptor.update(clear + check) + encryptor.finalize()
    return openpgp._packet(packet.tag, key.body + bytes([usage, cipher]) + s2k + iv + secret)


@pytest.mark.parametrize(("usage", "s2k", "cipher"), [
    (254, b"\x03\x02" + b"saltsalt" + b"\x60", 7),  # gpg's export: iterated SHA-1, AES-128
    (254, b"\x03\x08" + b"saltsalt" + b"\xff", 9),  # OpenPGP.js: iterated SHA-256, AES-256
    (254, b"\x03\x0a" + b"saltsalt" + b"\x10", 8),  # iterated SHA-512, AES-192
    (254, b"\x01\x08" + b"saltsalt", 9),  # salted
    (254, b"\x00\x08", 9),  # simple
    (255, b"\x03\x08" + b"saltsalt" + b"\x20", 9),  # a 16-bit checksum instead of SHA-1
])
def test_s2k_variants(
    pgp_keys: PgpKeys, runtime_dir: Path, usage: int, s2k: bytes, cipher: int
) -> None:
    packets = openpgp._key_packets(pgp_keys.sec("partner-a").read_bytes())
    out = [_reprotect(p, "pässword".encode(), usage, s2k, cipher) if p.tag in (5, 7)
           else openpgp._packet(p.tag, p.body) for p in packets]
    path = runtime_dir / "reprotected.gpg"
    path.write_bytes(b"".join(out))
    config = pgp_keys.keyset_config("own", [("partner-a", "sec", "active")])

    def load(passphrase: str | None) -> list[Key]:
        key = dataclasses.replace(config.keys[0], file=path, passphrase=passphrase)
        return list(load_native_keyset(dataclasses.replace(config, keys=(key,))).keys)

    (key,) = load("pässword")
    assert key.private and key.can_sign and key.can_encrypt
    if usage == 254:  # a 16-bit checksum lets one wrong passphrase in 65536 through
        with pytest.raises(ConfigError, match="the passphrase does not open"):
            load("password")
    with pytest.raises(ConfigError, match="passphrase-protected"):
        load(None)


def test_a_secret_key_protected_outside_the_profile(pgp_keys: PgpKeys, runtime_dir: Path) -> None:
    packets = openpgp._key_packets(pgp_keys.sec("partner-a").read_bytes())
    key = openpgp._parse_key_packet(next(p for p in packets if p.tag == 5))
    cast5 = openpgp._packet(5, key.body + b"\xfe\x03\x03\x02saltsalt\x60" + bytes(40))
    path = runtime_dir / "cast5.gpg"
    path.write_bytes(cast5 + b"".join(openpgp._packet(p.tag, p.body) for p in packets[1:]))
    config = pgp_keys.keyset_config("own", [("partner-a", "sec", "active")])
    replaced = dataclasses.replace(config.keys[0], file=path)
    with pytest.raises(ConfigError, match="cipher 3 is outside the profile"):
        load_native_keyset(dataclasses.replace(config, keys=(replaced,)))
