"""PGP envelope over python-gnupg: sign with every active own key, encrypt to every active peer key.

The only module that imports gnupg. Each envelope owns a private GNUPGHOME holding exactly the
enabled keys; what a message is and who signed it is decided from gpg's status lines.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import gnupg
from cryptography.hazmat.decrepit.ciphers.modes import CFB
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
from gateway.keys import MAX_PGP_VALIDITY, Key, Keyset, key_expiry, utcnow

__all__ = [
    "GeneratedPgpKey",
    "PgpEnvelope",
    "generate_pgp_key",
    "load_pgp_keyset",
    "message_recipients",
    "pgp_key_ids",
]

# Security: python-gnupg's own log repeats gpg's stderr (user ids, key ids) and every routine
# failure; we report through the gateway's errors instead.
logging.getLogger("gnupg").setLevel(logging.CRITICAL)

ACCEPTED_HASHES = {"8": "SHA256", "9": "SHA384", "10": "SHA512"}  # RFC 4880 9.4
ACCEPTED_CIPHERS = {"7": "AES128", "8": "AES192", "9": "AES256"}  # RFC 4880 9.2
_HASH_NAMES = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160", "11": "SHA224", **ACCEPTED_HASHES}
_CIPHER_NAMES = {"1": "IDEA", "2": "3DES", "3": "CAST5", "4": "BLOWFISH", "10": "TWOFISH",
                 "11": "CAMELLIA128", "12": "CAMELLIA192", "13": "CAMELLIA256",
                 **ACCEPTED_CIPHERS}
_RSA_ALGOS = {"1", "2", "3"}  # RFC 4880 9.1
_ALGO_NAMES = {"16": "ELG", "17": "DSA", "18": "ECDH", "19": "ECDSA", "22": "EdDSA"}
MIN_RSA_BITS = 2048

# Every gpg call runs in a private home with these: trust is decided by fingerprint here, gpg
# never asks a human, never fetches keys, never keeps a symmetric passphrase.
_OPTIONS = [
    "--no-options",
    "--pinentry-mode", "loopback",
    "--trust-model", "always",
    "--no-auto-check-trustdb",
    "--no-auto-key-retrieve",
    "--no-auto-key-import",
    "--no-auto-key-locate",
    "--no-symkey-cache",
    "--no-random-seed-file",
    "--no-greeting",
]
# s2k-count: the agent re-protects imported secret keys with this work factor and pays it again
# on every use; the calibrated default (~100 ms+) per protected key per message is too slow for a
# gateway, and the copy lives only in this private home whose passphrase is in the agent anyway.
_AGENT_CONF = (
    "allow-preset-passphrase\n"
    "s2k-count 1048576\n"
    "allow-loopback-pinentry\n"
    "default-cache-ttl 315360000\n"
    "max-cache-ttl 315360000\n"
)
_MAX_OUTPUT_HIT = re.compile(r"^gpg: error writing to .*: exceeded --max-output limit$", re.M)
MAX_SESSION_KEY_PACKETS = 32
# RSA decryptions one message may ask of the agent (outside gpg's CPU limit): gpg tries every
# own secret key on each hidden recipient (key id 0000000000000000). As the native engine.
MAX_RSA_DECRYPTIONS = 32
_HIDDEN = "0" * 16
# Signatures gpg may check in one message (each a key lookup and an RSA verification, ~0.3 ms):
# they lie inside the encryption, out of our sight before gpg runs, so gpg is killed at the
# status line that announces one more (a compressed flood of copies would otherwise keep it
# busy until its deadline). As the native engine's MAX_SIGNATURES.
MAX_SIGNATURES = 32
# CPU seconds one gpg call may spend opening a message (RLIMIT_CPU, then SIGXCPU): gpg parses the
# packets inside the encryption unbounded (a 30 kB compressed message of a million one-pass
# signature packets kept it busy until its 10 s deadline), and no check of ours can see them
# first. A legitimate 1 MiB message costs gpg ~15 ms; one more second per 16 MiB of limit.
GPG_CPU_SECONDS = 1
_SESSION_KEY_TAGS = {1, 3}  # public-key and symmetric-key encrypted session key
_ENCRYPTED_DATA_TAGS = {9, 18, 20}  # SED, SEIPD, AEAD; gpg then refuses all but SEIPD+MDC
_PASSPHRASE_STATUSES = {"BAD_PASSPHRASE", "MISSING_PASSPHRASE", "INQUIRE_MAXLEN"}
# What one call may make gpg say, on its status pipe and on stderr (messages), each: a legitimate
# open says a few kB (a line per recipient and signature, within the caps above); past this gpg
# is stopped.
MAX_STDERR_BYTES = 1 << 20
_PIPE_CHUNK = 64 * 1024


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """The one place where gnupg and subprocess failures become the gateway's EngineError."""
    try:
        yield
    except subprocess.TimeoutExpired:
        raise EngineError("a GnuPG tool timed out") from None
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise EngineError(f"GnuPG could not be run ({type(exc).__name__})") from exc


def _env(home: Path) -> dict[str, str]:
    # LC_ALL=C: the one gpg message we read from stderr (--max-output) must not be translated.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GNUPGHOME": str(home),
        "LC_ALL": "C",
        "LANGUAGE": "C",
    }


# Status keywords that say why a call failed (doc/DETAILS of GnuPG); their arguments are error
# locations and codes, key ids at most.
_DIAGNOSTIC_STATUSES = frozenset({
    "ERROR", "FAILURE", "NEED_PASSPHRASE", "MISSING_PASSPHRASE", "BAD_PASSPHRASE",
    "PINENTRY_LAUNCHED", "INV_SGNR", "INV_RECP", "NO_SGNR", "KEYEXPIRED", "KEYREVOKED",
})


# libgpg-error codes (gpg-error.h) in gpg's ERROR/FAILURE status lines: the low 16 bits.
_GPG_ERR_EOF = 16383  # the agent's socket closed mid-call
_GPG_ERR_SYSTEM_ERROR = 1 << 15  # an errno: ECONNRESET, EPIPE, ECONNREFUSED...


def _agent_failed(status: _Status) -> bool:
    """Whether gpg lost its agent during the call rather than judged the message: an agent
    operation (a public-key decryption, a signature) that failed on end of file or a system
    error. (An agent lost while gpg looks a secret key up reads as NO_SECKEY, which a message
    to a key id of ours that is not for encryption gives too: left as the message's 400.)"""
    for key, values in status.lines:
        if key in ("ERROR", "FAILURE") and len(values) >= 2 and values[-1].isdigit() \
                and values[0] in _AGENT_OPERATIONS:
            code = int(values[-1]) & 0xFFFF
            if code == _GPG_ERR_EOF or code & _GPG_ERR_SYSTEM_ERROR:
                return True
    return False


# The status lines' names of what gpg asks its agent to do (decrypt a session key, sign).
_AGENT_OPERATIONS = frozenset({"pkdecrypt_failed", "sign-encrypt", "sign", "keysign"})


class _Status(gnupg.StatusHandler):  # type: ignore[misc]
    """Every status line of one gpg call, in order, plus its stdout and stderr. Status lines
    come on a pipe of their own (`--status-fd`), never from stderr, whose messages quote what
    messages and keys hold (user ids, file names): a line there that looks like a status line
    is only text. With `max_signatures`, the gpg process is killed at the NEWSIG line past it
    (`flooded`); past MAX_STDERR_BYTES on either stream it is killed too (`flooded` and
    `overflowed`: only a hostile message makes gpg say that much)."""

    def __init__(self, gpg: Any, max_signatures: int | None = None) -> None:
        super().__init__(gpg)
        self.lines: list[tuple[str, list[str]]] = []
        self.data = b""
        self.stderr = ""
        self.returncode: int | None = None
        self.max_signatures = max_signatures
        self.process: subprocess.Popen[bytes] | None = None
        self.signatures = 0
        self.flooded = False
        self.overflowed = False
        self._encoding: str = gpg.encoding
        self._status = bytearray()
        self._parsed = 0  # bytes of _status already split into lines
        self._stderr = bytearray()

    def handle_status(self, key: str, value: str) -> None:
        if self.flooded:
            return
        self.lines.append((key, value.split()))
        if key == "NEWSIG" and self.max_signatures is not None:
            self.signatures += 1
            if self.signatures > self.max_signatures:
                self._flood()

    def _flood(self) -> None:
        self.flooded = True
        if self.process is not None:
            with contextlib.suppress(OSError):
                self.process.kill()

    def feed_status(self, chunk: bytes) -> None:
        """Take the next bytes of gpg's status pipe; act on each line as it completes (the
        signature cap must stop gpg while it runs)."""
        self._status += chunk
        if self._over(self._status):
            return
        end = self._status.rfind(b"\n") + 1
        if end > self._parsed:
            for line in bytes(self._status[self._parsed:end]).splitlines():
                self._line(line)
            self._parsed = end

    def feed_stderr(self, chunk: bytes) -> None:
        """Take the next bytes of gpg's messages (text only: never parsed for status)."""
        self._stderr += chunk
        self._over(self._stderr)

    def _over(self, stream: bytearray) -> bool:
        if len(stream) > MAX_STDERR_BYTES:
            self.overflowed = True
            self._flood()
        return self.overflowed

    def close_streams(self) -> None:
        """gpg closed both: the last, unterminated status line too, then the messages' text."""
        if self._parsed < len(self._status) and not self.flooded:
            self._line(bytes(self._status[self._parsed:]))
        self.stderr = self._stderr.decode(self._encoding, "replace")

    def _line(self, raw: bytes) -> None:
        # As python-gnupg's _read_response: "[GNUPG:] KEYWORD value" lines are status lines.
        line = raw.decode(self._encoding, "replace").rstrip()
        if line.startswith("[GNUPG:] "):
            keyword, _, value = line[9:].partition(" ")
            if keyword:
                self.handle_status(keyword, value.strip())

    def has(self, *keywords: str) -> bool:
        return any(key in keywords for key, _ in self.lines)

    def values(self, keyword: str) -> list[list[str]]:
        return [value for key, value in self.lines if key == keyword]

    def index(self, keyword: str, default: int) -> int:
        return next((i for i, (key, _) in enumerate(self.lines) if key == keyword), default)

    def diagnosis(self) -> str:
        """Why a gpg call failed, safe for a log line: its exit status and the status lines
        that name a failure (ERROR and FAILURE with their location and code, passphrase and key
        trouble by keyword alone); never stderr, which quotes user ids."""
        said = dict.fromkeys(
            " ".join([key, *value[:2]]) if key in ("ERROR", "FAILURE") else key
            for key, value in self.lines if key in _DIAGNOSTIC_STATUSES)
        return f"exit status {self.returncode}" + (f": {', '.join(said)}" if said else "")


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Make sure `process` is gone and its pipes closed."""
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _exchange(process: subprocess.Popen[bytes], data: bytes, status: _Status, status_fd: int,
              deadline: float) -> bool:
    """Write `data` to gpg's stdin and read its stdout and stderr, all in the calling thread,
    until gpg closes both (python-gnupg starts a writer and two reader threads per call, reads
    stdout 1 KiB and stderr one decoded line at a time: under load those threads and their GIL
    hand-offs cost more than the gpg process itself). A gpg that stops reading its input is not
    an error here: its status lines say why. Returns False if the deadline passed first (gpg is
    then killed). `status_fd`: the reading end of gpg's status pipe."""
    assert process.stdin and process.stdout and process.stderr
    stdin, stdout, stderr = (process.stdin.fileno(), process.stdout.fileno(),
                             process.stderr.fileno())
    poller = select.poll()
    for fd in (stdout, stderr, status_fd):
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    view, written = memoryview(data), 0
    if view:
        os.set_blocking(stdin, False)
        poller.register(stdin, select.POLLOUT)
    else:
        process.stdin.close()
    out: list[bytes] = []
    reading = 3
    while reading or written < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            process.kill()
            return False
        for fd, _ in poller.poll(remaining * 1000):
            if fd == stdin:
                try:
                    written += os.write(stdin, view[written:written + _PIPE_CHUNK])
                except BrokenPipeError:
                    written = len(view)
                except BlockingIOError:
                    continue
                if written >= len(view):
                    poller.unregister(stdin)
                    process.stdin.close()
                continue
            try:
                chunk = os.read(fd, _PIPE_CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                poller.unregister(fd)
                reading -= 1
            elif fd == stdout:
                out.append(chunk)
            elif fd == status_fd:
                status.feed_status(chunk)
            else:
                status.feed_stderr(chunk)
    status.close_streams()
    status.data = b"".join(out)
    if not _wait_exit(process, deadline):
        process.kill()
        return False
    status.returncode = process.returncode
    return True


def _wait_exit(process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Reap `process` once it exits, at the latest at `deadline` (then False). Through a pidfd
    where the kernel has them: Popen.wait with a timeout polls with growing sleeps, which cost
    ~1-2 ms per gpg call (gpg closes its pipes just before it exits)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: Popen's own polling
        try:
            process.wait(max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(deadline - time.monotonic(), 0.001) * 1000):
            return process.poll() is not None
        process.wait()  # it has exited: returns at once
        return True
    finally:
        os.close(pidfd)


class _Watchdog:
    """Kills one gpg process at its deadline; finish() reaps it whatever happened. Only for the
    calls python-gnupg makes itself (its version probe): ours go through _exchange."""

    def __init__(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        self.process = process
        self.fired = False
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.fired = True
        self.process.kill()

    def finish(self) -> bool:
        """Stop the timer and reap the process; True if it had to be killed at the deadline."""
        self._timer.cancel()
        _reap(self.process)
        return self.fired


class _Gpg(gnupg.GPG):  # type: ignore[misc]
    """python-gnupg bound to one home, with a deadline on every gpg process it starts.

    Thread-safe: each call has its own status object and process; the watchdog of python-gnupg's
    own calls is kept in thread-local storage."""

    def __init__(self, home: Path, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._local = threading.local()
        with _engine_errors(), self._deadline():
            super().__init__(gnupghome=str(home), options=_OPTIONS, env=_env(home))

    def _open_subprocess(self, args: Any, passphrase: Any = False) -> Any:
        process = super()._open_subprocess(args, passphrase)
        self._local.watchdog = _Watchdog(process, self.timeout_s)
        return process

    @contextlib.contextmanager
    def _deadline(self) -> Iterator[None]:
        self._local.watchdog = None
        try:
            yield
        finally:
            watchdog: _Watchdog | None = self._local.watchdog
            self._local.watchdog = None
            if watchdog is not None and watchdog.finish():
                raise EngineError(f"gpg did not finish within {self.timeout_s:g} s")

    def run(
        self, args: Sequence[str], data: bytes = b"", *, max_signatures: int | None = None,
        cpu_seconds: int | None = None,
    ) -> _Status:
        """Run gpg with `args` on `data` (stdin); gpg's refusals are in the returned status
        (`flooded` when it was killed for checking more than `max_signatures` signatures;
        return code -SIGXCPU past `cpu_seconds` of CPU). Raises EngineError when gpg cannot
        run or misses its deadline."""
        status = _Status(self, max_signatures)
        deadline = time.monotonic() + self.timeout_s
        command = self.make_args(list(args), False)
        with _engine_errors():
            status_r, status_w = os.pipe()
            try:
                # python-gnupg asks for status lines on stderr (--status-fd 2), mixed with
                # gpg's messages: they get a pipe of their own instead (see _Status).
                if "--status-fd" in command:
                    command[command.index("--status-fd") + 1] = str(status_w)
                else:
                    command[1:1] = ["--status-fd", str(status_w)]
                # As python-gnupg's _open_subprocess, without its debug rendering of the
                # command line (built whether or not anything logs it).
                process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=self.env, pass_fds=(status_w,),
                )
            except BaseException:
                os.close(status_r)
                raise
            finally:
                os.close(status_w)
            try:
                status.process = process
                if cpu_seconds is not None:
                    # gpg has not read its input yet: the limit is in place before any work.
                    # Only RLIMIT_CPU: gpg sets RLIMIT_CORE to 0 itself as it starts (so no core
                    # file at SIGXCPU), and it exits ("can't disable core dumps") when another
                    # process changes that limit between its read and its write (1 in ~3000
                    # opens, found by bench/soak.py when this also set RLIMIT_CORE).
                    with contextlib.suppress(ProcessLookupError):
                        resource.prlimit(process.pid, resource.RLIMIT_CPU,
                                         (cpu_seconds, cpu_seconds + 1))
                finished = _exchange(process, data, status, status_r, deadline)
            finally:
                _reap(process)
                os.close(status_r)
        if not finished:
            raise EngineError(f"gpg did not finish within {self.timeout_s:g} s")
        return status


def _tool(args: Sequence[str], home: Path, timeout_s: float, stdin: bytes = b"") -> None:
    """Run a GnuPG helper (gpgconf, gpg-preset-passphrase). Raises EngineError if it fails."""
    with _engine_errors():
        done = subprocess.run(
            list(args), input=stdin, capture_output=True, env=_env(home), timeout=timeout_s,
            check=False,
        )
    if done.returncode != 0:
        raise EngineError(f"{Path(args[0]).name} failed with exit status {done.returncode}")


def _sockets_elsewhere() -> bool:
    """GnuPG puts a home's sockets under /run/user/<uid>/gnupg when that directory exists."""
    return Path(f"/run/user/{os.getuid()}").is_dir()


@cache
def _preset_program() -> str:
    with _engine_errors():
        done = subprocess.run(
            ["gpgconf", "--list-dirs", "libexecdir"], capture_output=True, text=True,
            timeout=10, check=True,
        )
    return str(Path(done.stdout.strip()) / "gpg-preset-passphrase")


# A Unix socket path holds 107 bytes; gpg-agent's longest socket name in a home is this one.
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET = "S.gpg-agent.browser"


def _create_home(home: Path) -> None:
    """Create `home` (0700; it must not exist yet) with an agent that takes preset passphrases.
    Raises ConfigError (runtime_dir) when the agent's sockets would not fit below it."""
    socket = home / _LONGEST_SOCKET
    if len(os.fsencode(socket)) > _MAX_SOCKET_PATH and not _sockets_elsewhere():
        raise ConfigError("runtime_dir", f"too long for gpg-agent, whose sockets go in the "
                          f"GnuPG homes below it: '{socket}' is {len(os.fsencode(socket))} "
                          f"bytes, over the {_MAX_SOCKET_PATH} of a socket path; shorten it")
    with _engine_errors():
        home.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.mkdir(mode=0o700)
        home.chmod(0o700)
        (home / "gpg-agent.conf").write_text(_AGENT_CONF)


def _start(home: Path, timeout_s: float) -> _Gpg:
    """Start the home's agent (presetting passphrases needs it running) and bind python-gnupg
    to the home."""
    _launch_agent(home, timeout_s)
    return _Gpg(home, timeout_s)


def _launch_agent(home: Path, timeout_s: float) -> None:
    """Start the home's gpg-agent unless it runs."""
    _tool(["gpgconf", "--homedir", str(home), "--launch", "gpg-agent"], home, timeout_s)


def _remove_home(home: Path) -> None:
    """Stop the home's agent and delete the home; never raises."""
    if home.exists():
        with contextlib.suppress(EngineError):
            _tool(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], home, 10.0)
        shutil.rmtree(home, ignore_errors=True)


def _preset(
    home: Path, keygrips: Sequence[str], passphrase: str | None, timeout_s: float
) -> None:
    """Give the home's agent the passphrase of each keygrip (nothing to do without one)."""
    if passphrase is None:
        return
    for keygrip in keygrips:
        _tool(
            [_preset_program(), "--preset", keygrip], home, timeout_s,
            stdin=passphrase.encode("utf-8") + b"\n",
        )


def _import(gpg: _Gpg, data: bytes) -> list[str]:
    """Import key data; return the primary fingerprints gpg reports, in order, once each."""
    status = gpg.run(["--import", "--import-options", "import-minimal"], data)
    return list(dict.fromkeys(v[1] for v in status.values("IMPORT_OK") if len(v) > 1))


# Loading keys.


@dataclass(frozen=True)
class _Material:
    """What the envelope needs of a key later. Never shown."""

    public: bytes
    secret: bytes | None
    keygrips: tuple[str, ...]  # of the parts whose secret we hold
    keyids: frozenset[str]  # long key ids and fingerprints of every part
    passphrase: str | None = field(default=None, repr=False)


@dataclass
class _Part:
    """One primary key or subkey from gpg's colon listing."""

    validity: str
    bits: int
    algo: str
    keyid: str
    created: datetime
    expires: datetime | None
    caps: str
    fingerprint: str = ""
    keygrip: str = ""
    secret: bool = False

    @property
    def usable(self) -> bool:
        return self.validity not in ("r", "i")


def _timestamp(text: str) -> datetime | None:
    return datetime.fromtimestamp(int(text), UTC) if text.isdigit() and int(text) else None


def _parse_listing(text: str) -> list[_Part]:
    parts: list[_Part] = []
    for line in text.splitlines():
        f = line.split(":")
        if f[0] in ("pub", "sub", "sec", "ssb") and len(f) > 11:
            parts.append(_Part(
                validity=f[1], bits=int(f[2] or 0), algo=f[3], keyid=f[4].upper(),
                created=_timestamp(f[5]) or datetime.fromtimestamp(0, UTC),
                expires=_timestamp(f[6]), caps=f[11],
                secret=f[0] in ("sec", "ssb") and len(f) > 14 and f[14] == "+",
            ))
        elif f[0] == "fpr" and parts and not parts[-1].fingerprint and len(f) > 9:
            parts[-1].fingerprint = f[9].upper()
        elif f[0] == "grp" and parts and not parts[-1].keygrip and len(f) > 9:
            parts[-1].keygrip = f[9].upper()
    return parts


def _pick(parts: list[_Part], cap: str, now: datetime, need_secret: bool) -> _Part | None:
    """The part gpg uses for `cap` ('s' or 'e'): the newest usable one, unexpired if any."""
    able = [p for p in parts if cap in p.caps and p.usable and (p.secret or not need_secret)]
    live = [p for p in able if p.expires is None or p.expires > now]
    pool = live or able
    return max(pool, key=lambda p: p.created) if pool else None


def load_pgp_keyset(config: KeysetConfig, workdir: Path, *, timeout_s: float = 10.0) -> Keyset:
    """Parse every key of a pgp keyset, disabled ones too, into Key objects.

    Each key file must hold exactly one RSA key (>= 2048 bits in every part); a secret key's
    passphrase must open it. `workdir` is a short scratch directory: temporary GnuPG homes are
    made below it and removed, their agents stopped, before returning. Raises ConfigError naming
    the key's place, or EngineError when gpg itself fails.
    """
    if config.type != "pgp":
        raise ConfigError(f"{config.place}.type", "expected a pgp keyset")
    with _engine_errors():
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="k", dir=workdir))
    try:
        keys = tuple(
            _load_key(key, scratch / str(i), timeout_s) for i, key in enumerate(config.keys)
        )
    finally:
        for home in scratch.iterdir():
            _remove_home(home)
        shutil.rmtree(scratch, ignore_errors=True)
    return Keyset(name=config.name, type="pgp", keys=keys)


def _load_key(config: KeyConfig, home: Path, timeout_s: float) -> Key:
    place = f"{config.place}.file"
    try:
        data = config.file.read_bytes()
    except OSError as exc:
        raise ConfigError(place, f"cannot read '{config.file}': {exc.strerror}") from None
    _create_home(home)
    gpg = _start(home, timeout_s)
    primaries = _import(gpg, data)
    if not primaries:
        raise ConfigError(place, f"'{config.file.name}' holds no OpenPGP key")
    if len(primaries) > 1:
        raise ConfigError(
            place, f"'{config.file.name}' holds {len(primaries)} primary keys; give one per file"
        )
    fingerprint = primaries[0]
    parts = _parse_listing(gpg.run(["--list-keys", "--with-keygrip", fingerprint]).data.decode())
    if not parts or parts[0].fingerprint != fingerprint:
        raise ConfigError(place, f"'{config.file.name}' holds no usable OpenPGP key")
    secret_listing = gpg.run(["--list-secret-keys", "--with-keygrip", fingerprint]).data.decode()
    secret = {p.fingerprint for p in _parse_listing(secret_listing) if p.secret}
    for part in parts:
        part.secret = part.fingerprint in secret
    primary = parts[0]
    if not primary.usable:
        raise ConfigError(place, f"key {fingerprint} is revoked or invalid")
    for part in (p for p in parts if p.usable):
        if part.algo not in _RSA_ALGOS or part.bits < MIN_RSA_BITS:
            name = "RSA" if part.algo in _RSA_ALGOS else _ALGO_NAMES.get(part.algo, "unknown")
            found = f"{name}-{part.bits}"
            raise ConfigError(
                place,
                f"key {fingerprint} has a {found} part; only RSA keys of at least "
                f"{MIN_RSA_BITS} bits are accepted",
            )
    private = bool(secret)
    now = utcnow()
    signing = _pick(parts, "s", now, need_secret=private)
    encryption = _pick(parts, "e", now, need_secret=private)
    expires = key_expiry([p.expires for p in (primary, signing, encryption) if p is not None],
                         config.not_after)
    public = gpg.run(["--export", fingerprint]).data
    if private:
        _check_secret(gpg, config, home, parts, signing, encryption, timeout_s)
    return Key(
        id=config.id,
        state=config.state,
        fingerprint=fingerprint,
        private=private,
        can_sign=signing is not None,
        can_encrypt=encryption is not None,
        algorithm=f"RSA-{primary.bits}",
        expires=expires,
        place=config.place,
        material=_Material(
            public=public,
            secret=data if private else None,
            keygrips=tuple(p.keygrip for p in parts if p.secret and p.keygrip),
            keyids=frozenset(p.keyid for p in parts) | {p.fingerprint for p in parts},
            passphrase=config.passphrase,
        ),
    )


def _check_secret(
    gpg: _Gpg,
    config: KeyConfig,
    home: Path,
    parts: list[_Part],
    signing: _Part | None,
    encryption: _Part | None,
    timeout_s: float,
) -> None:
    """Sign and decrypt once through the agent, with the passphrase preset exactly as the
    envelope will do it. Raises ConfigError if the passphrase is missing or wrong."""
    _preset(home, [p.keygrip for p in parts if p.secret and p.keygrip], config.passphrase,
            timeout_s)
    fingerprint = parts[0].fingerprint
    # An expired key may still decrypt: make the probe message at a time when it was valid.
    used = [p for p in (signing, encryption) if p is not None]
    newest = max(p.created for p in used) if used else parts[0].created
    at = ["--faked-system-time", str(int(newest.timestamp()) + 1)]
    failed: _Status | None = None
    if signing is not None:
        status = gpg.run([*at, "--sign", "--local-user", fingerprint], b"probe")
        if not status.has("SIG_CREATED"):
            failed = status
    if failed is None and encryption is not None:
        sealed = gpg.run([*at, "--encrypt", "--recipient", fingerprint], b"probe")
        status = gpg.run(["--decrypt"], sealed.data)
        if not status.has("DECRYPTION_OKAY"):
            failed = status
    if failed is None:
        return
    if config.passphrase_env:
        where = f"{config.place}.passphrase_env"
    elif config.passphrase_file:
        where = f"{config.place}.passphrase_file"
    else:
        where = config.place
    if not failed.has(*_PASSPHRASE_STATUSES):
        raise ConfigError(f"{config.place}.file", "gpg cannot use this secret key")
    if config.passphrase is None:
        raise ConfigError(
            where, "the secret key is passphrase-protected: give passphrase_file or passphrase_env"
        )
    raise ConfigError(where, "the passphrase does not open the secret key")


# Making keys.

MAX_RSA_BITS = 4096  # gpg's own limit without --enable-large-rsa
MAX_VALID_DAYS = MAX_PGP_VALIDITY.days  # keys.py: Google's one year, two at most
# Google's profile first: SHA384 and AES256 are what peers pick when they follow our preferences.
KEY_PREFERENCES = "SHA384 SHA256 SHA512 AES256 AES192 AES128 ZLIB ZIP Uncompressed"
_EMAIL = re.compile(r"^[^\s<>@()]+@[^\s<>@()]+\.[^\s<>@()]+$")


@dataclass(frozen=True)
class GeneratedPgpKey:
    """A new key pair as gpg made it. `secret` is the armored secret key (protected by the
    passphrase when one was given): write it only to a private file."""

    user_id: str
    fingerprint: str  # primary key (sign, certify)
    subkey_fingerprint: str  # encryption subkey
    bits: int
    created: datetime
    expires: datetime
    public: bytes = field(repr=False)
    secret: bytes = field(repr=False)


def generate_pgp_key(
    name: str,
    email: str,
    *,
    bits: int,
    valid_days: int,
    passphrase: str | None = None,
    workdir: Path,
    timeout_s: float = 300.0,
) -> GeneratedPgpKey:
    """Make a key to Google's rules with gpg: an RSA primary key that signs and certifies, an
    RSA encryption subkey, both of `bits` bits and expiring after `valid_days` days, with the
    preferences SHA384 and AES256 first. gpg runs in a private GNUPGHOME made below `workdir`
    (keep it short: GnuPG socket paths hold about 100 bytes), removed and its agent stopped
    before returning.

    Raises ConfigError (place "name", "email", "bits", "expires" or "passphrase") for a value
    outside Google's rules, EngineError when gpg fails."""
    if not name.strip() or any(c in name for c in "<>()") or not name.isprintable():
        raise ConfigError("name", f"{name!r} is not a printable name without <, >, ( or )")
    if not _EMAIL.match(email):
        raise ConfigError("email", f"{email!r} is not an email address")
    if bits < MIN_RSA_BITS:
        raise ConfigError("bits", f"{bits} bits: Google requires RSA keys of at least "
                                  f"{MIN_RSA_BITS} bits")
    if bits > MAX_RSA_BITS:
        raise ConfigError("bits", f"{bits} bits: gpg makes RSA keys of at most {MAX_RSA_BITS}")
    if valid_days < 1:
        raise ConfigError("expires", "a key must be valid for at least one day")
    if valid_days > MAX_VALID_DAYS:
        raise ConfigError("expires", f"{valid_days} days is more than two years: Google allows "
                                     "one year, two at most")
    if passphrase is not None and (
        not passphrase or not passphrase.isprintable() or passphrase != passphrase.strip()
    ):
        raise ConfigError("passphrase", "the passphrase is empty, has control characters (a "
                                        "line break inside it, say) or spaces at either end")
    protection = "%no-protection" if passphrase is None else f"Passphrase: {passphrase}"
    params = (
        f"Key-Type: RSA\nKey-Length: {bits}\nKey-Usage: sign\n"
        f"Subkey-Type: RSA\nSubkey-Length: {bits}\nSubkey-Usage: encrypt\n"
        f"Name-Real: {name}\nName-Email: {email}\nExpire-Date: {valid_days}d\n"
        f"Preferences: {KEY_PREFERENCES}\n{protection}\n%commit\n"
    )
    with _engine_errors():
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="g", dir=workdir))
    home = scratch / "h"
    try:
        _create_home(home)
        gpg = _start(home, timeout_s)
        created = gpg.run(["--gen-key"], params.encode("utf-8"))
        made = [v[1].upper() for v in created.values("KEY_CREATED") if len(v) > 1]
        if not made:
            raise EngineError("gpg could not make the key")
        fingerprint = made[0]
        parts = _parse_listing(
            gpg.run(["--list-keys", "--with-keygrip", fingerprint]).data.decode())
        primary, subkeys = parts[0], [p for p in parts[1:] if "e" in p.caps]
        if (primary.fingerprint != fingerprint or not {"s", "c"} <= set(primary.caps)
                or len(subkeys) != 1 or primary.expires is None):
            raise EngineError("gpg made a key of another shape than asked")
        public = gpg.run(["--armor", "--export", fingerprint])
        # The agent asks for the passphrase to export: give it on stdin, as UTF-8 (the key
        # was protected with the UTF-8 text above).
        secret = gpg.run(["--passphrase-fd", "0", "--armor", "--export-secret-keys",
                          fingerprint], (passphrase or "").encode("utf-8") + b"\n")
        if not public.data or not secret.data.startswith(b"-----BEGIN PGP PRIVATE KEY"):
            raise EngineError("gpg could not export the new key")
        return GeneratedPgpKey(
            user_id=f"{name} <{email}>", fingerprint=fingerprint,
            subkey_fingerprint=subkeys[0].fingerprint, bits=primary.bits,
            created=primary.created, expires=primary.expires, public=public.data,
            secret=secret.data,
        )
    finally:
        _remove_home(home)
        shutil.rmtree(scratch, ignore_errors=True)


def pgp_key_ids(key: Key) -> frozenset[str]:
    """Every long key id and fingerprint of a loaded pgp key's parts (upper-case hex)."""
    material: _Material = key.material
    return material.keyids


def message_recipients(body: bytes) -> tuple[str, ...]:
    """The key ids a base64url OpenPGP message is encrypted to, read from its public-key
    session-key packets without decrypting (16 upper-case hex digits each; all zeros for a
    hidden recipient). Raises MalformedError when the body is not such a message."""
    return _check_structure(b64url.decode_body(body))


# The envelope.


def _dearmor(text: bytes) -> bytes:
    lines = [line.strip() for line in text.splitlines()]
    begin = next((i for i, x in enumerate(lines) if x.startswith(b"-----BEGIN PGP MESSAGE")), None)
    end = next((i for i, x in enumerate(lines) if x.startswith(b"-----END PGP MESSAGE")), None)
    if begin is None or end is None or end < begin:
        raise MalformedError("not an ASCII-armored OpenPGP message")
    # Skip armor headers ("Key: value"; ':' is not base64) and the "=XXXX" checksum line.
    data = [x for x in lines[begin + 1:end]
            if x and b":" not in x and not (x.startswith(b"=") and len(x) == 5)]
    try:
        return base64.b64decode(b"".join(data))
    except (binascii.Error, ValueError):
        raise MalformedError("not an ASCII-armored OpenPGP message") from None


def _armor_checksum_fails(message: bytes) -> bool:
    """Whether `message` is armored with a checksum line ("=XXXX") that its data does not
    match."""
    if not message.lstrip().startswith(b"-----BEGIN "):
        return False
    sums = [x for x in (line.strip() for line in message.splitlines())
            if x.startswith(b"=") and len(x) == 5]
    if not sums:
        return False
    try:
        return sums[0][1:] != armor.checksum(_dearmor(message))
    except MalformedError:
        return True


def _packet(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, body offset, body length or -1 when partial/indeterminate) of the packet at `pos`
    (RFC 4880 4.2). Raises MalformedError if there is none."""
    if pos >= len(data) or not data[pos] & 0x80:
        raise MalformedError("not an OpenPGP message")
    first, rest = data[pos], data[pos + 1:pos + 6]
    if first & 0x40:
        tag = first & 0x3F
        if not rest:
            raise MalformedError("truncated OpenPGP packet header")
        if rest[0] < 192:
            return tag, pos + 2, rest[0]
        if rest[0] < 224 and len(rest) >= 2:
            return tag, pos + 3, ((rest[0] - 192) << 8) + rest[1] + 192
        if rest[0] == 255 and len(rest) >= 5:
            return tag, pos + 6, int.from_bytes(rest[1:5], "big")
        return tag, pos + 2, -1
    tag, size = (first >> 2) & 0x0F, {0: 1, 1: 2, 2: 4}.get(first & 0x03, 0)
    if len(rest) < size:
        raise MalformedError("truncated OpenPGP packet header")
    return tag, pos + 1 + size, int.from_bytes(rest[:size], "big") if size else -1


def _check_structure(message: bytes) -> tuple[str, ...]:
    """Refuse, before gpg runs, what does not start as an encrypted message does (session-key
    packets, then encrypted data), and more session-key packets than any sender needs: gpg
    spends an RSA decryption on each one addressed to us. Returns the key ids of the v3
    public-key session-key packets (all zeros for a hidden recipient)."""
    data = _dearmor(message) if message.lstrip().startswith(b"-----BEGIN ") else message
    pos = count = 0
    recipients: list[str] = []
    while True:
        tag, start, length = _packet(data, pos)
        if tag not in _SESSION_KEY_TAGS:
            break
        count += 1
        if count > MAX_SESSION_KEY_PACKETS or length < 0:
            raise MalformedError(
                f"more than {MAX_SESSION_KEY_PACKETS} session-key packets, or a broken one"
            )
        if tag == 1 and length >= 10 and data[start] == 3:
            recipients.append(data[start + 1:start + 9].hex().upper())
        pos = start + length
    if not count or tag not in _ENCRYPTED_DATA_TAGS:
        raise MalformedError("not an encrypted OpenPGP message")
    return tuple(recipients)


def _decrypt_in_vain(message: bytes) -> None:
    """AES-256-CFB with a random key, SHA-1 and SHA-384 over `message`: the work of opening
    SEIPD data, checking its MDC and hashing the literal for a signature, for nothing."""
    decryptor = Cipher(algorithms.AES(os.urandom(32)), CFB(bytes(16))).decryptor()
    clear = decryptor.update(message) + decryptor.finalize()
    hashlib.sha1(clear).digest()  # noqa: S324 - the MDC's hash, computed in vain
    hashlib.sha384(clear).digest()


@dataclass
class _Signature:
    """One signature as gpg's status lines describe it."""

    kind: str = ""
    primary: str = ""
    hash_algo: str = ""
    keyid: str = ""
    errsig_rc: str = ""
    issuer: str = ""


def _signatures(lines: Sequence[tuple[str, list[str]]]) -> list[_Signature]:
    """The signatures in `lines`, each begun by a NEWSIG line."""
    sigs: list[_Signature] = []
    for key, value in lines:
        if key == "NEWSIG":
            sigs.append(_Signature())
        elif not sigs:
            continue
        elif key in ("GOODSIG", "BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG") and value:
            sigs[-1].kind, sigs[-1].keyid = key, value[0].upper()
        elif key == "ERRSIG" and len(value) >= 6:
            # ERRSIG <keyid> <pkalgo> <hashalgo> <class> <time> <rc> [<issuer fpr>]
            sigs[-1] = _Signature(kind=key, keyid=value[0].upper(), hash_algo=value[2],
                                  errsig_rc=value[5], issuer="".join(value[6:7]).upper())
        elif key == "VALIDSIG" and len(value) >= 9:
            # VALIDSIG <fpr> <date> <time> <expire> <version> <reserved> <pkalgo> <hashalgo>
            #          <class> <primary fpr>: the signer is matched on the primary key.
            sigs[-1].hash_algo = value[7]
            sigs[-1].primary = (value[9] if len(value) > 9 else value[0]).upper()
    return sigs


_SIGNATURE_STATES = {
    "GOODSIG": "good, but not by an enabled, unexpired peer key",
    "BADSIG": "bad: the signed data was altered",
    "EXPSIG": "expired signature",
    "EXPKEYSIG": "by an expired key",
    "REVKEYSIG": "by a revoked key",
}


def _describe(sig: _Signature) -> str:
    """One signature for an error message: signer key id and what gpg made of it."""
    if sig.kind == "ERRSIG":
        state = "no such key among the enabled peer keys" if sig.errsig_rc == "9" \
            else f"cannot be checked (error {sig.errsig_rc or '?'})"
    else:
        state = _SIGNATURE_STATES.get(sig.kind, "not checked")
    return f"key id {sig.keyid or 'unknown'}: {state}"


class PgpEnvelope:
    """Seal and open OpenPGP messages for one route (protocol.md section 3).

    The private GNUPGHOME `home` holds the enabled own keys (secret) and the enabled peer keys
    (public) only, so a disabled key can never decrypt. Thread-safe."""

    scheme = "pgp"
    waits_on_processes = True

    def __init__(
        self,
        own: Keyset,
        peer: Keyset,
        options: PgpOptions,
        home: Path,
        *,
        max_plaintext_bytes: int,
        timeout_s: float = 10.0,
    ) -> None:
        """Create `home` (must not exist yet), import the enabled keys and preset each
        protected own key's passphrase in its agent. Raises EngineError when gpg fails."""
        self.own = own
        self.peer = peer
        self.options = options
        self.home = home
        self.max_plaintext_bytes = max_plaintext_bytes
        # base64url of armored, uncompressed OpenPGP is ~1.8x the plaintext, plus the packets.
        self.max_body_bytes = 2 * max_plaintext_bytes + 64 * 1024
        self.timeout_s = timeout_s
        self.cpu_seconds = GPG_CPU_SECONDS + max_plaintext_bytes // (16 << 20)
        self._close_lock = threading.Lock()
        self._closed = False
        self._protected_ids: frozenset[str] = frozenset().union(
            *(k.material.keyids for k in own.enabled() if k.material.passphrase is not None)
        )
        _create_home(home)
        try:
            self._gpg = _start(home, timeout_s)
            for key in own.enabled():
                self._import(key.material.secret or key.material.public, key)
            for key in peer.enabled():
                self._import(key.material.public, key)
            self._preset_passphrases(launch=False)  # _start launched the agent
        except BaseException:
            self.close()
            raise

    def _import(self, data: bytes, key: Key) -> None:
        if key.fingerprint not in _import(self._gpg, data):
            raise EngineError(f"gpg did not import key '{key.id}'")

    def _preset_passphrases(self, launch: bool = True) -> None:
        """Give the home's agent our passphrases; `launch`: start it first if it is gone
        (presetting does not start one; a dead agent made it fail, and a retry never ran)."""
        keys = [key for key in self.own.enabled() if key.material.passphrase is not None]
        if keys and launch:
            _launch_agent(self.home, self.timeout_s)
        for key in keys:
            _preset(self.home, key.material.keygrips, key.material.passphrase, self.timeout_s)

    def _run(self, args: list[str], data: bytes, *, bounded: bool = False) -> _Status:
        """Run gpg in the home (`bounded`: at most MAX_SIGNATURES signatures and
        self.cpu_seconds of CPU). If the agent asked for a passphrase of one of our protected
        keys, it lost its presets (it died and gpg started a new one): preset again, retry
        once."""
        if self._closed:
            # Its home is gone: gpg would report the keys missing, which reads as a verdict on
            # the message (4xx) or the keys. The gateway never does this (an envelope is closed
            # once no request holds it); should it ever, it is the engine's failure (500).
            raise EngineError("the GnuPG envelope is closed (its configuration was replaced)")
        limits: dict[str, int] = (
            {"max_signatures": MAX_SIGNATURES, "cpu_seconds": self.cpu_seconds} if bounded else {}
        )
        status = self._gpg.run(args, data, **limits)
        asked = {keyid.upper() for v in status.values("NEED_PASSPHRASE") for keyid in v[:2]}
        if status.has(*_PASSPHRASE_STATUSES) and asked & self._protected_ids:
            self._preset_passphrases()
            status = self._gpg.run(args, data, **limits)
        if _agent_failed(status):
            # The agent died or its socket broke during the call (gpg starts a new one for
            # the next call, without our passphrases): not the message's fault, and read as
            # a verdict it would give Google a 400. Once more, then the engine's failure.
            self._preset_passphrases()
            status = self._gpg.run(args, data, **limits)
            if _agent_failed(status):
                raise EngineError(f"gpg-agent failed during the call ({status.diagnosis()})")
        return status

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES["pgp"]

    def seal(self, plaintext: bytes) -> Sealed:
        """Sign with every own signer, encrypt to every peer recipient; base64url out.
        Raises TooLargeError, NoKeyError (nothing usable to seal with), EngineError."""
        if len(plaintext) > self.max_plaintext_bytes:
            raise TooLargeError(
                f"plaintext of {len(plaintext)} bytes is over the {self.max_plaintext_bytes} limit"
            )
        signers = self.own.signers()
        recipients = self.peer.recipients()
        if not signers:
            raise NoKeyError(f"keyset '{self.own.name}' has no active, unexpired signing key")
        if not recipients:
            raise NoKeyError(f"keyset '{self.peer.name}' has no active, unexpired encryption key")
        o = self.options
        args = ["--sign", "--encrypt", "--digest-algo", o.digest, "--cipher-algo", o.cipher,
                "--compress-algo", o.compression]
        if o.armor:
            args.append("--armor")
        for key in signers:
            args += ["--local-user", key.fingerprint]
        for key in recipients:
            args += ["--recipient", key.fingerprint]
        status = self._run(args, plaintext)
        if status.has("INV_SGNR", "INV_RECP"):
            raise NoKeyError("gpg found a key unusable (expired or revoked)")
        if (
            len(status.values("SIG_CREATED")) != len(signers)
            or not status.has("END_ENCRYPTION")
            or status.returncode != 0
        ):
            raise EngineError(f"gpg could not sign and encrypt ({status.diagnosis()})")
        body = b64url.encode(status.data, padding=o.base64_padding)
        return Sealed(
            body=body,
            signed_by=tuple(k.id for k in signers),
            encrypted_to=tuple(k.id for k in recipients),
        )

    def open(self, body: bytes) -> Opened:
        """Decode, decrypt with an enabled own key, verify a signature by an enabled peer key.
        Raises an EnvelopeError subclass on any failure of the message, EngineError if gpg
        itself fails; the plaintext is returned only when everything holds."""
        if len(body) > self.max_body_bytes:
            raise TooLargeError(
                f"body of {len(body)} bytes is over the {self.max_body_bytes} byte limit"
            )
        message = b64url.decode_body(body)
        recipients = _check_structure(message)
        hidden = recipients.count(_HIDDEN)
        if hidden * len(self.own.decryptors()) > MAX_RSA_DECRYPTIONS:
            raise MalformedError(f"{hidden} hidden recipients, each to be tried with every own "
                                 f"key: more than {MAX_RSA_DECRYPTIONS} RSA decryptions")
        cap = self.max_plaintext_bytes + 1
        args = ["--max-output", str(cap), "--decrypt"]
        status = self._run(args, message, bounded=True)
        if status.has("BADSIG", "EXPSIG") and not status.has("END_DECRYPTION") \
                and not status.flooded:
            # gpg --batch exits at the first bad or expired signature (mainproc.c: "if
            # (opt.batch && rc) g10_exit (1)"): the signatures after it are never checked nor
            # the MDC, so nothing
            # proves the data whole and a good signature beside the bad one would be lost.
            # Without --batch (and still without a tty: gpg can ask nothing) it checks every
            # signature, then the MDC; that run's status lines decide, by the same rules.
            status = self._run(["--no-batch", *args], message, bounded=True)
        if status.overflowed:
            raise MalformedError(f"gpg wrote more than {MAX_STDERR_BYTES} bytes of messages "
                                 "about the message")
        if status.flooded:
            raise MalformedError(f"more than {MAX_SIGNATURES} signatures")
        if status.returncode == -signal.SIGXCPU:
            raise MalformedError(f"gpg spent more than {self.cpu_seconds} s of CPU on the "
                                 "message (a flood of packets inside the encryption)")
        if status.returncode is not None and status.returncode < 0:
            raise EngineError("gpg was killed")
        if status.returncode and all(key == "FAILURE" for key, _ in status.lines):
            # The message passed _check_structure, so gpg says something about any message it
            # reads; nothing but a failure means gpg itself could not run (a bad option, a
            # fatal start-up error): not the sender's fault. Except for one thing of the
            # message it stops at silently: a wrong armor checksum (checked here only then).
            if _armor_checksum_fails(message):
                raise MalformedError("the ASCII armor's checksum does not match its data")
            raise EngineError(f"gpg exited before reading the message ({status.diagnosis()})")
        decrypted_by = self._check_encryption(status, message)
        if _MAX_OUTPUT_HIT.search(status.stderr) or len(status.data) >= cap:
            raise TooLargeError(f"plaintext is over the {self.max_plaintext_bytes} byte limit")
        verified_by = self._check_signatures(status)
        return Opened(plaintext=status.data, decrypted_by=decrypted_by, verified_by=verified_by)

    def _check_encryption(self, status: _Status, message: bytes) -> tuple[str, ...]:
        enc_to = {v[0].upper() for v in status.values("ENC_TO") if v}
        if not enc_to:
            if status.has("NEED_PASSPHRASE_SYM"):
                raise MalformedError("the message is encrypted with a passphrase, not to a key")
            raise MalformedError("not an OpenPGP message encrypted to a public key")
        no_seckey = {v[0].upper() for v in status.values("NO_SECKEY") if v}
        infos = status.values("DECRYPTION_INFO")
        for info in infos:
            mdc, cipher = [*info, "?", "?"][:2]
            if cipher not in ACCEPTED_CIPHERS:
                raise AlgorithmError(
                    f"cipher algorithm {_CIPHER_NAMES.get(cipher, 'unknown')} ({cipher}) is "
                    f"refused (accepted: {', '.join(ACCEPTED_CIPHERS.values())})",
                    layer="encryption")
            if mdc == "0":
                raise DecryptError("the message has no integrity protection")
        ok = (
            bool(infos)
            and status.has("DECRYPTION_OKAY")
            and status.has("GOODMDC")
            and not status.has("DECRYPTION_FAILED", "BADMDC")
        )
        # A session key recovered by an own key (DECRYPTION_KEY, DECRYPTION_INFO) makes any
        # failure a decryption failure, even if gpg also reports NO_SECKEY for another hidden
        # recipient (all hidden recipients share the key id 0000000000000000).
        recovered = bool(infos) or status.has("DECRYPTION_KEY")
        if not ok:
            if enc_to <= no_seckey and not recovered:
                raise UnknownKeyError(
                    "the message is encrypted to no enabled own key (recipient key ids: "
                    f"{', '.join(sorted(enc_to))})")
            if infos:
                raise DecryptError("the session key was decrypted but the data failed its "
                                   "integrity check: the message was altered or damaged")
            # Security: gpg stops at a session key that does not decrypt, but decrypts and
            # hashes all the data before a bad MDC; the same kind of work here, so that the
            # time (~4 ms for 1 MB) does not tell which layer failed (both 400, no oracle).
            _decrypt_in_vain(message)
            raise DecryptError("the session key could not be decrypted with the own key it "
                               "names (recipient key ids: "
                               f"{', '.join(sorted(enc_to - no_seckey))})")
        begin = status.index("BEGIN_DECRYPTION", len(status.lines))
        end = status.index("END_DECRYPTION", -1)
        plaintexts = [i for i, (key, _) in enumerate(status.lines) if key == "PLAINTEXT"]
        if len(plaintexts) != 1 or not begin < plaintexts[0] < end:
            raise MalformedError("the message does not hold exactly one encrypted literal")
        decryptors = self.own.decryptors()
        used = next(iter(status.values("DECRYPTION_KEY")), None)
        if used is not None and len(used) >= 2:
            found = [k.id for k in decryptors if k.fingerprint == used[1].upper()]
        else:
            found = [k.id for k in decryptors if k.material.keyids & (enc_to - no_seckey)]
        if not found:
            raise UnknownKeyError("the message was decrypted by no enabled own key")
        return tuple(found[:1])

    def _check_signatures(self, status: _Status) -> tuple[str, ...]:
        begin = status.index("BEGIN_DECRYPTION", 0)
        end = status.index("END_DECRYPTION", len(status.lines))
        sigs = _signatures(status.lines[begin:end])
        verifiers = self.peer.verifiers()
        trusted = {k.fingerprint: k for k in verifiers}
        good = [s for s in sigs if s.kind == "GOODSIG" and s.primary in trusted]
        accepted = [s for s in good if s.hash_algo in ACCEPTED_HASHES]
        if accepted:
            return tuple(dict.fromkeys(trusted[s.primary].id for s in accepted))
        refused_algo = [
            s for s in sigs
            if s.kind == "ERRSIG" and s.errsig_rc in ("4", "5")
            and any({s.keyid, s.issuer} & k.material.keyids for k in verifiers)
        ]
        if good or refused_algo:
            hashes = sorted({_HASH_NAMES.get(s.hash_algo, s.hash_algo or "unknown")
                             for s in good or refused_algo})
            raise AlgorithmError(
                f"the peer's signature uses the refused hash algorithm {', '.join(hashes)} "
                f"(accepted: {', '.join(ACCEPTED_HASHES.values())})", layer="signature")
        if not sigs:
            raise SignatureError("the message is not signed")
        found = "; ".join(_describe(s) for s in sigs)
        raise SignatureError(f"no good signature by an enabled peer key (signatures: {found})")

    def close(self) -> None:
        """Stop the home's gpg-agent and remove the home. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _remove_home(self.home)
