"""PGP key files made once per session with the gpg command line, and gpg as the other party."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.config import KeyConfig, KeysetConfig, KeyState, PgpOptions
from gateway.keys import Key, Keyset
from gateway.openpgp import NativePgpEnvelope, load_native_keyset
from gateway.pgp import PgpEnvelope, load_pgp_keyset

__all__ = [
    "PGP_KEY_NAMES",
    "AnyPgpEnvelope",
    "GpgOpened",
    "GpgPeer",
    "GpgPeerError",
    "KeyEntries",
    "PgpEngine",
    "PgpKeys",
    "b64url",
    "gpg_peer",
    "gpg_processes_under",
    "native_envelope",
    "native_keyset",
    "pgp_engine",
    "pgp_envelope",
    "pgp_keys",
    "pgp_keyset",
    "pgp_keyset_config",
    "unb64url",
]

KeyEntries = Sequence[tuple[str, str, "str | KeyState"]]  # (key name, "sec"|"pub", state)
AnyPgpEnvelope = PgpEnvelope | NativePgpEnvelope
T = TypeVar("T")

DAY = 86400
# name -> (RSA bits, passphrase or None). Every key: RSA primary (sign, certify) + RSA encryption
# subkey, created ten days ago (so that messages can be dated in the past), valid for one year.
_KEYS: dict[str, tuple[int, str | None]] = {
    "partner-a": (2048, None),
    "partner-b": (2048, None),
    "google-a": (2048, None),
    "google-b": (2048, None),
    "stranger": (2048, None),
    "partner-pw": (2048, "correct horse battery"),
    "partner-pw2": (2048, "pässwört zwei"),
    "partner-3k": (3072, None),
    "google-sub": (2048, None),
}
# Keys whose primary only certifies: they sign with a separate signing subkey.
SIGNING_SUBKEY = {"google-sub"}
# Created three days ago, expired two days ago; valid at PgpKeys.expired_key_valid_at.
EXPIRED = "google-expired"
PGP_KEY_NAMES = (*_KEYS, EXPIRED)


def b64url(data: bytes, padded: bool = False) -> bytes:
    encoded = base64.urlsafe_b64encode(data)
    return encoded if padded else encoded.rstrip(b"=")


def unb64url(body: bytes) -> bytes:
    text = body.strip().rstrip(b"=")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def gpg_processes_under(path: Path, wait_s: float = 3.0) -> list[str]:
    """Command lines of live gpg/gpg-agent processes naming a path below `path`, after giving
    stopping agents up to `wait_s` to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "gpg" in text and str(path) in text:
                found.append(text.strip())
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _status_lines(stderr: bytes) -> list[list[str]]:
    return [
        line[len("[GNUPG:] "):].split()
        for line in stderr.decode("utf-8", "replace").splitlines()
        if line.startswith("[GNUPG:] ")
    ]


def _gpg(home: Path, *args: str, stdin: bytes = b"", check: bool = True,
         ) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--status-fd", "2",
         "--pinentry-mode", "loopback", "--trust-model", "always", *args],
        input=stdin, capture_output=True, timeout=120, check=False,
    )
    if check and done.returncode != 0:
        raise GpgPeerError(f"gpg failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return done


def _agent(home: Path, command: str) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), command, "gpg-agent"],
                   capture_output=True, timeout=30, check=False)


def _preset_program() -> str:
    libexec = subprocess.run(["gpgconf", "--list-dirs", "libexecdir"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
    return f"{libexec}/gpg-preset-passphrase"


def _new_home(home: Path, s2k_count: int | None = None) -> None:
    home.mkdir(mode=0o700, parents=True)
    (home / "gpg-agent.conf").write_text(
        "allow-preset-passphrase\ndefault-cache-ttl 315360000\nmax-cache-ttl 315360000\n"
        + (f"s2k-count {s2k_count}\n" if s2k_count else "")
    )
    _agent(home, "--launch")


class GpgPeerError(AssertionError):
    """The gpg command line refused something a test expected it to do."""


@dataclass
class PgpKeys:
    """The session's key files: `<name>.sec.asc`, `<name>.pub.asc`, `<name>.pass` in `dir`."""

    dir: Path
    fingerprints: dict[str, str] = field(default_factory=dict)
    passphrases: dict[str, str | None] = field(default_factory=dict)
    expired_key_valid_at: int = 0  # a Unix time at which EXPIRED was valid

    def sec(self, name: str) -> Path:
        return self.dir / f"{name}.sec.asc"

    def pub(self, name: str) -> Path:
        return self.dir / f"{name}.pub.asc"

    def fingerprint(self, name: str) -> str:
        return self.fingerprints[name]

    def passphrase(self, name: str) -> str | None:
        return self.passphrases[name]

    def passphrase_file(self, name: str) -> Path | None:
        """A file holding the passphrase and a trailing newline, or None for an open key."""
        return None if self.passphrases[name] is None else self.dir / f"{name}.pass"

    def name_of(self, fingerprint: str) -> str:
        return next(n for n, f in self.fingerprints.items() if f == fingerprint)

    def key_config(
        self, name: str, kind: str, state: str | KeyState, place: str, key_id: str | None = None
    ) -> KeyConfig:
        """One configured key: `kind` "sec" (with its passphrase) or "pub"."""
        secret = kind == "sec"
        return KeyConfig(
            id=key_id or name,
            file=self.sec(name) if secret else self.pub(name),
            state=KeyState(state),
            place=place,
            passphrase_file=self.passphrase_file(name) if secret else None,
            passphrase=self.passphrases[name] if secret else None,
        )

    def keyset_config(self, keyset: str, entries: KeyEntries) -> KeysetConfig:
        """A pgp KeysetConfig from (key name, "sec"|"pub", state); key ids are the names."""
        return KeysetConfig(
            name=keyset,
            type="pgp",
            place=f"keysets.{keyset}",
            keys=tuple(
                self.key_config(name, kind, state, f"keysets.{keyset}.keys[{i}]")
                for i, (name, kind, state) in enumerate(entries)
            ),
        )


def _generate(home: Path, name: str, bits: int, passphrase: str | None, created: int,
              expire: str) -> str:
    protection = f"Passphrase: {passphrase}" if passphrase is not None else "%no-protection"
    usage = "cert" if name in SIGNING_SUBKEY else "sign"
    params = (
        f"Key-Type: RSA\nKey-Length: {bits}\nKey-Usage: {usage}\n"
        f"Subkey-Type: RSA\nSubkey-Length: {bits}\nSubkey-Usage: encrypt\n"
        f"Name-Real: {name}\nName-Email: {name}@example.test\nExpire-Date: {expire}\n"
        f"{protection}\n%commit\n"
    )
    done = _gpg(home, "--faked-system-time", str(created), "--gen-key", stdin=params.encode())
    fingerprint = next(s[2] for s in _status_lines(done.stderr) if s[:2] == ["KEY_CREATED", "B"])
    if name in SIGNING_SUBKEY:
        _gpg(home, "--faked-system-time", str(created + 60), "--passphrase", passphrase or "",
             "--quick-add-key", fingerprint, f"rsa{bits}", "sign", expire)
    return fingerprint


def _make_key(keys: PgpKeys, name: str, bits: int, passphrase: str | None, created: int,
              expire: str) -> None:
    home = keys.dir / "gen" / name
    _new_home(home, s2k_count=65536)  # the least protection work: fast tests
    try:
        fingerprint = _generate(home, name, bits, passphrase, created, expire)
        keys.pub(name).write_bytes(_gpg(home, "--armor", "--export", fingerprint).stdout)
        keys.sec(name).write_bytes(_gpg(
            home, "--passphrase", passphrase or "", "--armor", "--export-secret-keys", fingerprint,
        ).stdout)
    finally:
        _agent(home, "--kill")
    keys.fingerprints[name] = fingerprint
    keys.passphrases[name] = passphrase
    if passphrase is not None:
        (keys.dir / f"{name}.pass").write_text(passphrase + "\n", encoding="utf-8")


def make_pgp_keys(directory: Path) -> PgpKeys:
    """Generate every key of PGP_KEY_NAMES with gpg and export it armored into `directory`."""
    directory.mkdir(mode=0o700, parents=True)
    keys = PgpKeys(dir=directory)
    now = int(time.time())
    plan = [(name, bits, pw, now - 10 * DAY, "1y") for name, (bits, pw) in _KEYS.items()]
    plan.append((EXPIRED, 2048, None, now - 3 * DAY, "1d"))
    keys.expired_key_valid_at = now - 3 * DAY + 3600
    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(_make_key, keys, *item) for item in plan]:
            future.result()
    shutil.rmtree(directory / "gen", ignore_errors=True)
    return keys


@dataclass(frozen=True)
class GpgOpened:
    """What gpg made of a message: plaintext and facts from its status lines."""

    plaintext: bytes
    signers: list[str]  # primary fingerprints of good signatures
    hashes: list[str]  # hash algorithm ids of the good signatures (RFC 4880 9.4)
    cipher: str  # symmetric algorithm id (9 = AES256)
    mdc: str  # "0" = no integrity protection
    recipients: list[str]  # ENC_TO key ids
    status: list[list[str]]


class GpgPeer:
    """The other party played by the real gpg command line in its own GNUPGHOME, holding the
    secret keys of `names` (default: every session key), passphrases preset in its agent.
    Thread-safe (every call is one gpg process)."""

    def __init__(self, keys: PgpKeys, home: Path, names: Iterable[str] | None = None) -> None:
        self.keys = keys
        self.home = home
        _new_home(home)
        try:
            for name in PGP_KEY_NAMES if names is None else names:
                self._add_key(name)
        except BaseException:
            self.close()
            raise

    def _add_key(self, name: str) -> None:
        _gpg(self.home, "--import", str(self.keys.sec(name)))
        passphrase = self.keys.passphrase(name)
        if passphrase is None:
            return
        listing = _gpg(self.home, "--with-colons", "--with-keygrip", "--list-secret-keys",
                       self.keys.fingerprint(name)).stdout.decode()
        for line in listing.splitlines():
            if line.startswith("grp:"):
                subprocess.run(
                    [_preset_program(), "--preset", line.split(":")[9]],
                    input=passphrase.encode() + b"\n", env={"GNUPGHOME": str(self.home)},
                    capture_output=True, timeout=30, check=True,
                )

    def gpg(self, *args: str, stdin: bytes = b"", check: bool = True,
            ) -> subprocess.CompletedProcess[bytes]:
        """Run gpg in this peer's home (batch, loopback pinentry, status lines on stderr)."""
        return _gpg(self.home, *args, stdin=stdin, check=check)

    def seal(
        self,
        plaintext: bytes,
        sign_with: Sequence[str] = (),
        encrypt_to: Sequence[str] = (),
        *,
        armor: bool = False,
        compress: str | None = None,
        digest: str = "SHA384",
        cipher: str = "AES256",
        padded: bool = False,
        symmetric: str | None = None,
        at: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> bytes:
        """What gpg makes of `plaintext`, base64url-encoded: signed by the keys named in
        `sign_with`, encrypted to those in `encrypt_to` (or with the passphrase `symmetric`).
        `compress` None keeps gpg's default (ZLIB); "none", "zip", "zlib", "bzip2" force one.
        `at` (Unix time) dates the message with --faked-system-time."""
        args: list[str] = []
        if at is not None:
            args += ["--faked-system-time", str(at)]
        if sign_with:
            args += ["--sign", "--digest-algo", digest]
            args += [a for name in sign_with for a in ("--local-user", self.keys.fingerprint(name))]
        if encrypt_to:
            args += ["--encrypt", "--cipher-algo", cipher]
            args += [a for name in encrypt_to for a in ("--recipient", self.keys.fingerprint(name))]
        if symmetric is not None:
            args += ["--symmetric", "--cipher-algo", cipher, "--passphrase", symmetric]
        if not (sign_with or encrypt_to or symmetric is not None):
            args.append("--store")
        if compress is not None:
            args += ["--compress-algo", compress]
        if armor:
            args.append("--armor")
        return b64url(self.gpg(*args, *extra_args, stdin=plaintext).stdout, padded)

    def open_details(self, body: bytes) -> GpgOpened:
        """Decrypt and verify with gpg; raises GpgPeerError unless gpg decrypted it cleanly."""
        done = self.gpg("--decrypt", stdin=unb64url(body), check=False)
        status = _status_lines(done.stderr)
        words = {s[0] for s in status}
        if not {"DECRYPTION_OKAY", "GOODMDC"} <= words or "DECRYPTION_FAILED" in words:
            raise GpgPeerError(f"gpg could not decrypt: {[s[0] for s in status]}")
        signers: list[str] = []
        hashes: list[str] = []
        good = False
        for s in status:
            if s[0] == "NEWSIG":
                good = False
            elif s[0] == "GOODSIG":
                good = True
            elif s[0] == "VALIDSIG" and good:
                signers.append(s[10] if len(s) > 10 else s[1])
                hashes.append(s[8])
        info = next(s for s in status if s[0] == "DECRYPTION_INFO")
        return GpgOpened(
            plaintext=done.stdout,
            signers=signers,
            hashes=hashes,
            cipher=info[2],
            mdc=info[1],
            recipients=[s[1] for s in status if s[0] == "ENC_TO"],
            status=status,
        )

    def open(self, body: bytes) -> tuple[bytes, list[str]]:
        """Plaintext and the primary fingerprints of its good signatures, as gpg sees them."""
        opened = self.open_details(body)
        return opened.plaintext, opened.signers

    def close(self) -> None:
        _agent(self.home, "--kill")


@pytest.fixture(scope="session")
def pgp_keys(session_tmp: Path) -> PgpKeys:
    """Every key of PGP_KEY_NAMES, generated once per session."""
    return make_pgp_keys(session_tmp / "pk")


@pytest.fixture(scope="session")
def gpg_peer(pgp_keys: PgpKeys, session_tmp: Path) -> Iterator[GpgPeer]:
    """gpg holding every session key (secret parts too): plays Google or the partner."""
    peer = GpgPeer(pgp_keys, session_tmp / "gp")
    yield peer
    peer.close()


@pytest.fixture(scope="session")
def pgp_keyset_config(pgp_keys: PgpKeys) -> Callable[[str, KeyEntries], KeysetConfig]:
    """pgp_keyset_config(name, [(key name, "sec"|"pub", state), ...]) -> KeysetConfig."""
    return pgp_keys.keyset_config


def _keyset_builder(pgp_keys: PgpKeys, load: Callable[[KeysetConfig], Keyset]
                    ) -> Callable[..., Keyset]:
    """build(name, entries, now=None) -> Keyset, from keys each loaded once by `load` (states,
    places and the clock set per call)."""
    loaded: dict[tuple[str, str], Key] = {}

    def build(name: str, entries: KeyEntries, now: Callable[[], Any] | None = None) -> Keyset:
        keys = []
        for i, (key_name, kind, state) in enumerate(entries):
            if (key_name, kind) not in loaded:
                single = pgp_keys.keyset_config("one", [(key_name, kind, "active")])
                loaded[key_name, kind] = load(single).keys[0]
            keys.append(replace(
                loaded[key_name, kind], state=KeyState(state), place=f"keysets.{name}.keys[{i}]"
            ))
        if now is None:
            return Keyset(name=name, type="pgp", keys=tuple(keys))
        return Keyset(name=name, type="pgp", keys=tuple(keys), now=now)

    return build


@pytest.fixture(scope="session")
def pgp_keyset(pgp_keys: PgpKeys, session_tmp: Path) -> Callable[..., Keyset]:
    """pgp_keyset(name, entries, now=None) -> Keyset, from keys each loaded once per session by
    load_pgp_keyset (states, places and the clock set per call)."""
    return _keyset_builder(pgp_keys, lambda config: load_pgp_keyset(config, session_tmp / "pl"))


@pytest.fixture(scope="session")
def native_keyset(pgp_keys: PgpKeys) -> Callable[..., Keyset]:
    """native_keyset(name, entries, now=None) -> Keyset, as pgp_keyset but each key parsed by
    load_native_keyset."""
    return _keyset_builder(pgp_keys, load_native_keyset)


@pytest.fixture(scope="module")
def pgp_envelope(
    pgp_keyset: Callable[..., Keyset], session_tmp: Path
) -> Iterator[Callable[..., PgpEnvelope]]:
    """pgp_envelope(own, peer, options=PgpOptions(), limit=1 MiB, timeout_s=10) -> PgpEnvelope;
    own and peer are Keysets or entry lists. Every envelope is closed after the module."""
    root = Path(tempfile.mkdtemp(prefix="e", dir=session_tmp))
    made: list[PgpEnvelope] = []

    def make(
        own: Keyset | KeyEntries,
        peer: Keyset | KeyEntries,
        options: PgpOptions = PgpOptions(),  # noqa: B008
        *,
        limit: int = 1 << 20,
        timeout_s: float = 10.0,
    ) -> PgpEnvelope:
        own_set = own if isinstance(own, Keyset) else pgp_keyset("own", own)
        peer_set = peer if isinstance(peer, Keyset) else pgp_keyset("peer", peer)
        envelope = PgpEnvelope(own_set, peer_set, options, root / str(len(made)),
                               max_plaintext_bytes=limit, timeout_s=timeout_s)
        made.append(envelope)
        return envelope

    yield make
    for envelope in made:
        envelope.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def native_envelope(native_keyset: Callable[..., Keyset]) -> Callable[..., NativePgpEnvelope]:
    """native_envelope(own, peer, options=PgpOptions(), limit=1 MiB) -> NativePgpEnvelope;
    own and peer are Keysets or entry lists."""

    def make(
        own: Keyset | KeyEntries,
        peer: Keyset | KeyEntries,
        options: PgpOptions = PgpOptions(),  # noqa: B008
        *,
        limit: int = 1 << 20,
    ) -> NativePgpEnvelope:
        own_set = own if isinstance(own, Keyset) else native_keyset("own", own)
        peer_set = peer if isinstance(peer, Keyset) else native_keyset("peer", peer)
        return NativePgpEnvelope(own_set, peer_set, options, max_plaintext_bytes=limit)

    return make


@dataclass(frozen=True)
class PgpEngine:
    """One of the two PGP engines, for the tests both must pass alike: `envelope` and `keyset`
    are its pgp_envelope/pgp_keyset or native_envelope/native_keyset."""

    name: str  # "gnupg" or "native", as PgpOptions.engine
    envelope: Callable[..., AnyPgpEnvelope]
    keyset: Callable[..., Keyset]

    def load(self, config: KeysetConfig, scan: Path) -> Keyset:
        """The engine's key loader (gnupg's scans in a home below `scan`)."""
        return load_pgp_keyset(config, scan) if self.name == "gnupg" else load_native_keyset(
            config)

    def pick(self, *, gnupg: T, native: T) -> T:
        """The expectation for this engine, where the two legitimately differ."""
        return gnupg if self.name == "gnupg" else native


@pytest.fixture(scope="module", params=["gnupg", "native"])
def pgp_engine(request: pytest.FixtureRequest) -> PgpEngine:
    """Each engine in turn (a module's tests run for one, then the other), its envelopes
    made from the session's keys."""
    prefix = "pgp" if request.param == "gnupg" else "native"
    return PgpEngine(request.param, request.getfixturevalue(f"{prefix}_envelope"),
                     request.getfixturevalue(f"{prefix}_keyset"))
