"""Envelope benchmark: seal+open round trips per second, JOSE and PGP, beside the raw
`cryptography` floor doing the same crypto work, all measured in one run. Not a test.

    .venv/bin/python bench/envelopes.py [--quick] [--seconds S] [--bits 2048 3072] [--no-pgp]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import JoseOptions, KeyConfig, KeysetConfig, KeyState, PgpOptions
from gateway.envelope import Envelope
from gateway.jose import JoseEnvelope, load_jose_keyset

SIZES = {"1 KiB": 1024, "64 KiB": 64 * 1024}
MAX_PLAINTEXT = 1 << 20
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Result:
    bits: int
    size: str
    name: str
    floors: tuple[str, ...]  # the floor rows this one is compared with
    per_second: float
    median_ms: float
    runs: int


def measure(
    candidates: dict[str, Callable[[], object]], seconds: float, min_runs: int = 5
) -> dict[str, tuple[float, float, int]]:
    """Run every candidate once per round until `seconds` per candidate are spent: load from
    elsewhere on the machine then falls on all of them alike. The order is shuffled every round
    (seeded, so runs repeat it): a round trip right after another candidate's finds the caches
    full of that one's code and data, and a fixed order would charge that to the same rows
    every time. Returns, per name, round trips per second (runs over time spent in it), median
    milliseconds and runs."""
    for trip in candidates.values():
        trip()
        trip()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    budget = seconds * len(candidates)
    started = time.perf_counter()
    rounds = 0
    order = list(candidates.items())
    shuffle = random.Random(len(order)).shuffle
    while rounds < min_runs or time.perf_counter() - started < budget:
        shuffle(order)
        for name, trip in order:
            t0 = time.perf_counter()
            trip()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {
        name: (len(runs) / sum(runs), statistics.median(runs) * 1000, len(runs))
        for name, runs in times.items()
    }


# ---------------------------------------------------------------------------------------------
# The floor: what one JWS-in-JWE round trip must compute, done directly with `cryptography`.


def floor_round_trip(
    signer: PrivateKey, recipient: rsa.RSAPrivateKey, scheme: str, plaintext: bytes
) -> Callable[[], object]:
    """Sign (PKCS1v15, PSS or ECDSA, SHA-256), AES-256-GCM encrypt under a fresh key wrapped
    with RSA-OAEP-256; then unwrap, decrypt and verify."""
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    recipient_public = recipient.public_key()
    signer_public = signer.public_key()

    def sign(data: bytes) -> bytes:
        if isinstance(signer, ec.EllipticCurvePrivateKey):
            return signer.sign(data, ec.ECDSA(hashes.SHA256()))
        pad = padding.PKCS1v15() if scheme == "PKCS1v15" else _pss()
        return signer.sign(data, pad, hashes.SHA256())

    def verify(signature: bytes, data: bytes) -> None:
        if isinstance(signer_public, ec.EllipticCurvePublicKey):
            signer_public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(signer_public, rsa.RSAPublicKey)
            pad = padding.PKCS1v15() if scheme == "PKCS1v15" else _pss()
            signer_public.verify(signature, data, pad, hashes.SHA256())

    def round_trip() -> bytes:
        signature = sign(plaintext)
        cek, iv = AESGCM.generate_key(256), os.urandom(12)
        wrapped = recipient_public.encrypt(cek, oaep)
        ciphertext = AESGCM(cek).encrypt(iv, plaintext + signature, None)
        opened = AESGCM(recipient.decrypt(wrapped, oaep)).decrypt(iv, ciphertext, None)
        verify(opened[len(plaintext):], opened[: len(plaintext)])
        return opened

    return round_trip


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def floor_openpgp_round_trip(
    signer: rsa.RSAPrivateKey, recipient: rsa.RSAPrivateKey, plaintext: bytes
) -> Callable[[], object]:
    """The primitives OpenPGP's profile asks for, done directly with `cryptography`, no
    packets: SHA-384 and a PKCS1v15 signature, a fresh AES-256 key wrapped with RSA PKCS1v15,
    AES-256-CFB over a 18-byte prefix, the data, the signature and a SHA-1 MDC; then unwrap,
    decrypt, check the MDC, hash and verify. What the native engine cannot do without."""
    recipient_public = recipient.public_key()
    signer_public = signer.public_key()
    prehashed = Prehashed(hashes.SHA384())

    def digest(data: bytes) -> bytes:
        h = hashes.Hash(hashes.SHA384())
        h.update(data)
        return h.finalize()

    def round_trip() -> bytes:
        signature = signer.sign(digest(plaintext), padding.PKCS1v15(), prehashed)
        key = os.urandom(32)
        wrapped = recipient_public.encrypt(b"\x09" + key + b"\0\0", padding.PKCS1v15())
        prefix = os.urandom(16)
        prefix += prefix[-2:]
        mdc = hashlib.sha1(prefix)
        mdc.update(plaintext)
        mdc.update(signature)
        encryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
        sealed = b"".join((encryptor.update(prefix), encryptor.update(plaintext),
                           encryptor.update(signature), encryptor.update(mdc.digest()),
                           encryptor.finalize()))
        opened_key = recipient.decrypt(wrapped, padding.PKCS1v15())[1:33]
        decryptor = Cipher(algorithms.AES(opened_key), CFB(bytes(16))).decryptor()
        clear = decryptor.update(sealed) + decryptor.finalize()
        view = memoryview(clear)
        if not hmac.compare_digest(hashlib.sha1(view[:-20]).digest(),
                                   view[-20:]):
            raise AssertionError("MDC")
        opened = clear[18:18 + len(plaintext)]
        signer_public.verify(clear[18 + len(plaintext):-20], digest(opened),
                             padding.PKCS1v15(), prehashed)
        return opened

    return round_trip


# ---------------------------------------------------------------------------------------------
# JOSE


def write_pem(key: PrivateKey, directory: Path, name: str) -> tuple[Path, Path]:
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
    ))
    return private, public


def jose_keyset(name: str, keys: list[tuple[str, Path, str]]) -> KeysetConfig:
    return KeysetConfig(
        name=name,
        type="jose",
        place=f"keysets.{name}",
        keys=tuple(
            KeyConfig(id=key_id, file=file, state=KeyState.ACTIVE, use=use,  # type: ignore[arg-type]
                      place=f"keysets.{name}.keys[{i}]")
            for i, (key_id, file, use) in enumerate(keys)
        ),
    )


def jose_pair(
    directory: Path, partner_sig: PrivateKey, google_enc: rsa.RSAPrivateKey, sign_alg: str
) -> tuple[JoseEnvelope, JoseEnvelope]:
    """(partner, google): the partner seals, Google opens."""
    sig, sig_pub = write_pem(partner_sig, directory, f"partner-sig-{sign_alg}")
    enc, enc_pub = write_pem(google_enc, directory, "google-enc")
    # Each side needs both uses configured; the unused halves are never exercised.
    partner = JoseEnvelope(
        load_jose_keyset(jose_keyset("partner", [("partner-sig", sig, "sig"),
                                                 ("partner-enc", enc, "enc")])),
        load_jose_keyset(jose_keyset("google", [("google-enc", enc_pub, "enc")])),
        JoseOptions(sign_alg=sign_alg),
        max_plaintext_bytes=MAX_PLAINTEXT,
    )
    google = JoseEnvelope(
        load_jose_keyset(jose_keyset("google", [("google-enc", enc, "enc")])),
        load_jose_keyset(jose_keyset("partner", [("partner-sig", sig_pub, "sig")])),
        JoseOptions(sign_alg=sign_alg),
        max_plaintext_bytes=MAX_PLAINTEXT,
    )
    return partner, google


def envelope_round_trip(
    sealer: Envelope, opener: Envelope, plaintext: bytes
) -> Callable[[], object]:
    def round_trip() -> bytes:
        opened = opener.open(sealer.seal(plaintext).body)
        assert opened.plaintext == plaintext  # a benchmark of a broken envelope means nothing
        return opened.plaintext

    return round_trip


# ---------------------------------------------------------------------------------------------
# PGP: the gnupg engine (gateway.pgp) and the native engine (gateway.openpgp) on the same keys;
# their rows run when gpg is installed (it makes the keys) and the engines import.


def _gpg(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode", "loopback",
         *args],
        input=stdin, capture_output=True, timeout=300, check=True,
    )
    return done.stdout


def make_pgp_key(directory: Path, name: str, bits: int) -> tuple[Path, Path]:
    """An RSA primary (sign) with an RSA encryption subkey, exported armored."""
    home = Path(tempfile.mkdtemp(prefix="g", dir=directory))
    try:
        params = (
            f"Key-Type: RSA\nKey-Length: {bits}\nKey-Usage: sign\nSubkey-Type: RSA\n"
            f"Subkey-Length: {bits}\nSubkey-Usage: encrypt\nName-Real: {name}\n"
            f"Name-Email: {name}@example.test\nExpire-Date: 1y\n%no-protection\n%commit\n"
        )
        _gpg(home, "--gen-key", stdin=params.encode())
        secret, public = directory / f"{name}.sec.asc", directory / f"{name}.pub.asc"
        secret.write_bytes(_gpg(home, "--armor", "--export-secret-keys"))
        public.write_bytes(_gpg(home, "--armor", "--export"))
        return secret, public
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=30, check=False)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def pgp_pairs(directory: Path, bits: int) -> Iterator[dict[str, tuple[Envelope, Envelope]]]:
    """Row name -> (partner, google) PGP envelopes, one pair per engine, on the same fresh
    RSA-`bits` keys."""
    from gateway.openpgp import NativePgpEnvelope, load_native_keyset
    from gateway.pgp import PgpEnvelope, load_pgp_keyset

    with ThreadPoolExecutor(max_workers=2) as pool:
        partner_files, google_files = pool.map(
            lambda name: make_pgp_key(directory, f"{name}-{bits}", bits), ["partner", "google"]
        )

    def keyset(name: str, file: Path) -> KeysetConfig:
        key = KeyConfig(id=name, file=file, state=KeyState.ACTIVE, place=f"keysets.{name}.keys[0]")
        return KeysetConfig(name=name, type="pgp", keys=(key,), place=f"keysets.{name}")

    scratch = directory / f"s{bits}"
    partner = PgpEnvelope(
        load_pgp_keyset(keyset("partner", partner_files[0]), scratch),
        load_pgp_keyset(keyset("google", google_files[1]), scratch),
        PgpOptions(), directory / f"p{bits}", max_plaintext_bytes=MAX_PLAINTEXT,
    )
    try:
        google = PgpEnvelope(
            load_pgp_keyset(keyset("google", google_files[0]), scratch),
            load_pgp_keyset(keyset("partner", partner_files[1]), scratch),
            PgpOptions(), directory / f"g{bits}", max_plaintext_bytes=MAX_PLAINTEXT,
        )
        native = (
            NativePgpEnvelope(load_native_keyset(keyset("partner", partner_files[0])),
                              load_native_keyset(keyset("google", google_files[1])),
                              PgpOptions(), max_plaintext_bytes=MAX_PLAINTEXT),
            NativePgpEnvelope(load_native_keyset(keyset("google", google_files[0])),
                              load_native_keyset(keyset("partner", partner_files[1])),
                              PgpOptions(), max_plaintext_bytes=MAX_PLAINTEXT),
        )
        try:
            # gpg last: its exiting processes slow whatever runs next (see alternations).
            yield {"PGP (native)": native, "PGP (gpg)": (partner, google)}
        finally:
            google.close()
    finally:
        partner.close()


def pgp_unavailable() -> str | None:
    if shutil.which("gpg") is None:
        return "gpg is not installed"
    try:
        import gateway.openpgp
        import gateway.pgp  # noqa: F401
    except ImportError as exc:
        return f"gateway.pgp or gateway.openpgp does not import ({exc})"
    return None


# ---------------------------------------------------------------------------------------------


def run(bits_list: list[int], seconds: float, with_pgp: bool, directory: Path,
        report: Callable[[Result], None], mixed: bool = False) -> list[Result]:
    results: list[Result] = []

    def add(result: Result) -> None:
        results.append(result)
        report(result)

    ec_signer = ec.generate_private_key(ec.SECP256R1())
    for bits in bits_list:
        rsa_signer = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        rsa_recipient = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pairs = {
            alg: jose_pair(directory, ec_signer if alg == "ES256" else rsa_signer,
                           rsa_recipient, alg)
            for alg in ("RS256", "PS256", "ES256")
        }
        pgp = pgp_pairs(directory, bits) if with_pgp else None
        pgp_envelopes = pgp.__enter__() if pgp is not None else {}
        try:
            for size_name, size in SIZES.items():
                plaintext = os.urandom(size)
                floors: dict[str, Callable[[], object]] = {
                    "floor PKCS1v15": floor_round_trip(rsa_signer, rsa_recipient, "PKCS1v15",
                                                       plaintext),
                    "floor PSS": floor_round_trip(rsa_signer, rsa_recipient, "PSS", plaintext),
                    "floor ECDSA": floor_round_trip(ec_signer, rsa_recipient, "ECDSA", plaintext),
                    "floor OpenPGP": floor_openpgp_round_trip(rsa_signer, rsa_recipient,
                                                              plaintext),
                }
                envelopes: dict[str, Callable[[], object]] = {
                    f"JOSE {alg}": envelope_round_trip(*pairs[alg], plaintext)
                    for alg in ("RS256", "PS256", "ES256")
                }
                for name, (sealer, opener) in pgp_envelopes.items():
                    envelopes[name] = envelope_round_trip(sealer, opener, plaintext)
                groups, compared = alternations(floors, envelopes, mixed)
                for group in groups:
                    for name, figures in measure(group, seconds).items():
                        add(Result(bits, size_name, name, compared.get(name, ()), *figures))
        finally:
            if pgp is not None:
                pgp.__exit__(None, None, None)
    return results


# The floors each envelope row is compared with, the first being the one its target is set
# against. The native engine's is the floor of OpenPGP's own primitives (PKCS#1 v1.5, AES-CFB,
# SHA-384, the SHA-1 MDC: "the same RSA and AES work"); the PKCS1v15 floor beside it, with
# AES-GCM and SHA-256, shows what the OpenPGP profile itself costs.
OWN_FLOORS: dict[str, tuple[str, ...]] = {
    "JOSE RS256": ("floor PKCS1v15",),
    "JOSE PS256": ("floor PSS",),
    "JOSE ES256": ("floor ECDSA",),
    "PGP (native)": ("floor OpenPGP", "floor PKCS1v15"),
    "PGP (gpg)": ("floor PSS",),
}


def alternations(
    floors: dict[str, Callable[[], object]], envelopes: dict[str, Callable[[], object]],
    mixed: bool,
) -> tuple[list[dict[str, Callable[[], object]]], dict[str, tuple[str, ...]]]:
    """The groups of rows that alternate round by round, and each envelope row's floor rows.

    By default each envelope alternates with its own floors alone (a floor then runs once per
    envelope, its row named after the envelope): a round trip that follows another envelope's
    finds the caches and branch predictors full of that one's code, a cost that grows with an
    envelope's own Python code and that the small floors barely pay, so in one alternation of
    every row each envelope's ratio also measured its neighbours. `mixed` keeps that single
    alternation (bench/README.md's figures until the third 2026-11-29 session) for
    comparison. The gpg row always alternates apart, with its own floor: its exiting processes
    slow whatever follows them."""
    groups: list[dict[str, Callable[[], object]]] = []
    compared: dict[str, tuple[str, ...]] = {}
    if mixed:
        together: dict[str, Callable[[], object]] = dict(floors)
        groups.append(together)
    for name, trip in envelopes.items():
        if mixed and name != "PGP (gpg)":
            together[name] = trip
            compared[name] = OWN_FLOORS[name]
            continue
        tag = name.split()[-1].strip("()")  # RS256, PS256, ES256, native, gpg
        group = {f"{floor} ({tag})": floors[floor] for floor in OWN_FLOORS[name]}
        compared[name] = tuple(group)
        group[name] = trip
        groups.append(group)
    return groups, compared


def threaded_rate(trip: Callable[[], object], threads: int, seconds: float) -> float:
    """Round trips per second of `trip` run in `threads` threads at once for `seconds`."""
    deadline = time.perf_counter() + seconds

    def loop() -> int:
        runs = 0
        while time.perf_counter() < deadline:
            trip()
            runs += 1
        return runs

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        runs = sum(pool.map(lambda _: loop(), range(threads)))
    return runs / (time.perf_counter() - started)


def scaling(bits_list: list[int], seconds: float, slices: int, directory: Path) -> None:
    """Executor scaling: the same round trips in 1 thread and in one thread per core,
    alternating in `slices` so the machine's drift falls on both alike. The floor's own
    ratio is the ideal (RSA in `cryptography` runs outside the GIL)."""
    threads = os.cpu_count() or 1
    print(f"Executor scaling, 1 KiB: round trips per second in 1 thread and in {threads}, "
          f"{slices} alternating slices of {seconds / slices:g} s each")
    print(f"{'RSA':>5}  {'round trip':<15}{'1 thread':>10}{f'{threads} threads':>12}"
          f"{'ratio':>8}")
    for bits in bits_list:
        signer = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        recipient = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        plaintext = os.urandom(1024)
        candidates = {
            "floor PKCS1v15": floor_round_trip(signer, recipient, "PKCS1v15", plaintext),
            "JOSE RS256": envelope_round_trip(*jose_pair(directory, signer, recipient, "RS256"),
                                              plaintext),
        }
        totals = {name: [0.0, 0.0] for name in candidates}
        for _ in range(slices):
            for name, trip in candidates.items():
                for column, count in enumerate((1, threads)):
                    totals[name][column] += threaded_rate(trip, count, seconds / slices / 2)
        for name, (one, many) in totals.items():
            print(f"{bits:>5}  {name:<15}{one / slices:>10.1f}{many / slices:>12.1f}"
                  f"{many / one:>7.2f}x")


HEADER = f"{'RSA':>5}  {'plaintext':<9}  {'round trip':<24}{'rt/s':>9}{'median ms':>11}" \
         f"{'runs':>7}  x floor  rt/s of floor"


def line(result: Result, floors: dict[tuple[int, str, str], Result]) -> str:
    """A row; against each of its floors: the ratio of medians (x floor) and of rt/s."""
    ratios = []
    for name in result.floors:
        floor = floors[result.bits, result.size, name]
        ratios.append(f"{result.median_ms / floor.median_ms:5.2f}x "
                      f"{result.per_second / floor.per_second:5.2f}  (vs {name})")
    return (f"{result.bits:>5}  {result.size:<9}  {result.name:<24}{result.per_second:>9.1f}"
            f"{result.median_ms:>11.2f}{result.runs:>7}  {';  '.join(ratios)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="time spent on each row (default 1.5)")
    parser.add_argument("--quick", action="store_true", help="0.25 s per row, RSA-2048 only")
    parser.add_argument("--bits", type=int, nargs="+", default=[2048, 3072])
    parser.add_argument("--no-pgp", action="store_true", help="skip the PGP rows")
    parser.add_argument("--mixed", action="store_true",
                        help="every in-process row in one alternation (bench/README.md's "
                             "figures until the third 2026-11-29 session), not each envelope "
                             "with its own floors")
    parser.add_argument("--scaling", action="store_true",
                        help="only executor scaling: 1 thread against one thread per core")
    args = parser.parse_args(argv)
    seconds = 0.25 if args.quick else args.seconds
    bits = [2048] if args.quick else args.bits

    if args.scaling:
        directory = Path(tempfile.mkdtemp(prefix="gwb-", dir="/tmp"))
        try:
            scaling(bits, max(args.seconds, 1.0) * 4, 4, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return 0

    pgp_note = "skipped (--no-pgp)" if args.no_pgp else pgp_unavailable()
    print(f"Python {platform.python_version()}, cryptography {version('cryptography')}, "
          f"jwcrypto {version('jwcrypto')}, {os.cpu_count()} CPUs, {platform.machine()}; "
          f"{seconds:g} s per row")
    if pgp_note:
        print(f"PGP rows: {pgp_note}")
    print("A round trip is one seal by the partner side and one open by the Google side.")
    print("x floor compares medians with the raw `cryptography` work of the same round trip;")
    print("rt/s of floor compares rates (the targets' measure).")
    if args.mixed:
        print("Every in-process row alternates with every other; the gpg row with its own run of")
        print("the PSS floor, apart from the other rows that its processes would slow.")
    else:
        print("Each envelope alternates round by round with its own floors alone (a floor row is")
        print("named after its envelope); the first floor named is the one its target is set on.")
    print()
    print(HEADER)
    floors: dict[tuple[int, str, str], Result] = {}
    started = time.perf_counter()

    def report(result: Result) -> None:
        if not result.floors:
            floors[result.bits, result.size, result.name] = result
        print(line(result, floors), flush=True)

    directory = Path(tempfile.mkdtemp(prefix="gwb-", dir="/tmp"))
    directory.chmod(0o700)
    try:
        run(bits, seconds, pgp_note is None, directory, report, mixed=args.mixed)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
