"""Bounded soak: the real gateway under saturating load for a while, with a key rotation and two
broken reloads in the middle; every answer must be 200 with the scheme's content type and the
gateway's resources must stay bounded. Unlike the benchmarks, this one asserts: exit status 1
when any check fails.

    .venv/bin/python bench/soak.py [--seconds 60] [--scheme jose|pgp] [--workers 1]
        [--window 5] [--warmup 5] [--concurrency 32]

One gateway (`python -m gateway run`), one inbound route over TLS, the stand-in partner of
bench/gateway_load.py, RSA-2048 keys, 1 KiB bodies; wrk with bench/replay.lua at concurrency 32
in consecutive windows, the gateway's processes sampled between windows (/proc). In the middle,
while wrk runs, SIGHUP after each configuration change (docs/key-rotation.md, C for JOSE, A for
PGP, gnupg engine):

  1. our new keys added read-only (C2 / A2); from the next window on, half of the requests are
     encrypted to the new key (C4 / A4: Google switched, older messages still arrive);
  2. the new keys active, the old ones read-only (C6 / A6): answers signed by the new key;
  3. broken reload: the new (active) private key file corrupted -> refused, old config serves;
  4. broken reload: a config file with an unknown field -> refused, old config serves;
  5. both restored -> reload accepted.

Needs wrk (Debian: apt-get install wrk) and, for PGP, gpg. See bench/README.md, "Soak".
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from envelopes import make_pgp_key, write_pem
from gateway_load import (
    PGP_SEAL,
    BenchError,
    GatewayProcess,
    Load,
    Partner,
    PgpGoogle,
    _comm,
    _kill_agents,
    answer_for,
    cores,
    free_port,
    gateway_config,
    gpg,
    gpg_ok,
    kill_leftovers,
    post,
    primary_fingerprint,
    process_tree,
    processes_naming,
    request_plaintext,
    run_wrk,
    unb64url,
    write_pool,
    wrk_path,
)

import gateway as gateway_package
from gateway.config import JoseOptions, KeyConfig, KeysetConfig, KeyState
from gateway.envelope import CONTENT_TYPES
from gateway.jose import JoseEnvelope, load_jose_keyset
from gateway.snapshot import stop_agents
from gateway.tls import write_sandbox_certificates

BITS = 2048
SIZES = {1: 1024, 64: 64 * 1024}
# Tolerances of the end sample against the start sample (after warm-up). Documented in
# bench/README.md; a leak of one object per request or per reload goes far beyond them.
RSS_GROWTH = 0.20  # VmRSS summed over the gateway's processes: at most +20 %
FILE_FD_SLACK = 4  # fds that are not sockets (files, pipes, eventfds...): at most +4 in all
# Sockets vary with the upstream keep-alive pool (up to one connection per concurrent request):
# at most +concurrency + 8.
SOCKET_FD_SLACK = 8
# Threads: asyncio's default executor grows lazily up to min(32, cores + 4) per process.
THREAD_SLACK = min(32, (os.cpu_count() or 1) + 4)


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# The keys of each stage of the rotation, as config YAML (the `keysets:` block).


@dataclass
class Stage:
    """What gateway_config() needs of a `google` side: the keysets block and the scheme."""

    scheme: str
    yaml: str

    def keysets_yaml(self) -> str:
        return self.yaml


class JoseSide:
    """Google's side and our keys for a JOSE rotation (runbook section C)."""

    scheme = "jose"
    content_type = CONTENT_TYPES["jose"]

    def __init__(self, root: Path) -> None:
        names = ["partner-sig", "partner-enc", "google-sig", "google-enc",
                 "partner-sig-2", "partner-enc-2"]
        with ThreadPoolExecutor(max_workers=cores()) as pool:
            keys = list(pool.map(
                lambda _: rsa.generate_private_key(public_exponent=65537, key_size=BITS), names))
        self.files = {n: write_pem(k, root, n) for n, k in zip(names, keys, strict=True)}
        f = self.files

        def keyset(name: str, keys: list[tuple[str, Path, str, KeyState]]) -> KeysetConfig:
            return KeysetConfig(name=name, type="jose", place=f"keysets.{name}", keys=tuple(
                KeyConfig(id=i, file=p, state=s, use=u,  # type: ignore[arg-type]
                          place=f"keysets.{name}.keys[{n}]")
                for n, (i, p, u, s) in enumerate(keys)))

        google = load_jose_keyset(keyset("google", [
            ("google-sig", f["google-sig"][0], "sig", KeyState.ACTIVE),
            ("google-enc", f["google-enc"][0], "enc", KeyState.ACTIVE)]))
        options = JoseOptions(sign_alg="RS256", key_alg="RSA-OAEP-256", enc="A256GCM")
        ro, act = KeyState.READ_ONLY, KeyState.ACTIVE
        # Google before and after it took on our new keys (it verifies with either).
        self.old = JoseEnvelope(google, load_jose_keyset(keyset("partner", [
            ("partner-sig", f["partner-sig"][1], "sig", act),
            ("partner-enc", f["partner-enc"][1], "enc", act)])),
            options, max_plaintext_bytes=4 << 20)
        self.new = JoseEnvelope(google, load_jose_keyset(keyset("partner", [
            ("partner-sig", f["partner-sig"][1], "sig", ro),
            ("partner-enc", f["partner-enc"][1], "enc", ro),
            ("partner-sig-2", f["partner-sig-2"][1], "sig", act),
            ("partner-enc-2", f["partner-enc-2"][1], "enc", act)])),
            options, max_plaintext_bytes=4 << 20)
        self.old_signer, self.new_signer = "partner-sig", "partner-sig-2"
        self.old_decrypter, self.new_decrypter = "partner-enc", "partner-enc-2"
        self.corruptible = f["partner-sig-2"][0]  # the new signing key, active from stage 3

    def stage(self, n: int) -> Stage:
        f = self.files
        old = "" if n < 3 else ", state: read-only"
        new = {1: None, 2: ", state: read-only", 3: ""}[n]
        lines = [
            "keysets:",
            "  partner:",
            "    type: jose",
            "    keys:",
            f'      - {{id: partner-sig, file: "{f["partner-sig"][0]}", use: sig{old}}}',
            f'      - {{id: partner-enc, file: "{f["partner-enc"][0]}", use: enc{old}}}',
        ]
        if new is not None:
            lines += [
                f'      - {{id: partner-sig-2, file: "{f["partner-sig-2"][0]}", use: sig{new}}}',
                f'      - {{id: partner-enc-2, file: "{f["partner-enc-2"][0]}", use: enc{new}}}',
            ]
        lines += [
            "  google:",
            "    type: jose",
            "    keys:",
            f'      - {{id: google-sig, file: "{f["google-sig"][1]}", use: sig}}',
            f'      - {{id: google-enc, file: "{f["google-enc"][1]}", use: enc}}',
        ]
        return Stage("jose", "\n".join(lines) + "\n")

    def seal(self, plaintext: bytes, to_new: bool) -> bytes:
        return bytes((self.new if to_new else self.old).seal(plaintext).body)

    def check(self, body: bytes, expected: bytes, signer: str) -> None:
        try:
            opened = self.new.open(body)
        except Exception as exc:
            raise BenchError(f"a JOSE answer did not open: {type(exc).__name__}: {exc}") from None
        if opened.plaintext != expected:
            raise BenchError("a JOSE answer opened to something else than the partner's answer")
        if opened.verified_by != (signer,):
            raise BenchError(f"a JOSE answer was signed by {opened.verified_by}, not {signer}")


class PgpSide:
    """Google's side (the gpg command line) and our keys for a PGP rotation (section A)."""

    scheme = "pgp"
    content_type = CONTENT_TYPES["pgp"]

    def __init__(self, root: Path, cleanup: contextlib.ExitStack) -> None:
        self.google = PgpGoogle(root, BITS, 0)  # partner + google keys, Google's GNUPGHOME
        cleanup.callback(_kill_agents, self.google.homes)
        self.new_files = make_pgp_key(root, f"partner2-{BITS}", BITS)
        gpg_ok(self.google.home, "--import", str(self.new_files[1]))
        self.old_fpr = self.google.partner_fpr
        self.new_fpr = primary_fingerprint(self.google.home, f"partner2-{BITS}@example.test")
        self.old_signer, self.new_signer = "partner", "partner-2"
        self.old_decrypter, self.new_decrypter = "partner", "partner-2"
        self.corruptible = self.new_files[0]

    def stage(self, n: int) -> Stage:
        g = self.google
        old = "" if n < 3 else ", state: read-only"
        new = {1: None, 2: ", state: read-only", 3: ""}[n]
        keys = [f'{{id: partner, file: "{g.partner_files[0]}"{old}}}']
        if new is not None:
            keys.append(f'{{id: partner-2, file: "{self.new_files[0]}"{new}}}')
        text = f"""\
            keysets:
              partner:
                type: pgp
                keys: [{", ".join(keys)}]
              google:
                type: pgp
                keys: [{{id: google, file: "{g.google_files[1]}"}}]
            """
        return Stage("pgp", textwrap.dedent(text))

    def seal(self, plaintext: bytes, to_new: bool) -> bytes:
        g = self.google
        sealed = gpg_ok(g.home, *PGP_SEAL, "--local-user", g.google_fpr,
                        "--recipient", self.new_fpr if to_new else self.old_fpr, stdin=plaintext)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=")

    def check(self, body: bytes, expected: bytes, signer: str) -> None:
        done = gpg(self.google.home, "--status-fd", "2", "--decrypt", stdin=unb64url(body))
        status = [line.split()[1:] for line in done.stderr.decode(errors="replace").splitlines()
                  if line.startswith("[GNUPG:] ")]
        words = {s[0] for s in status if s}
        signers = {s[10] if len(s) > 10 else s[1] for s in status if s and s[0] == "VALIDSIG"}
        want = self.new_fpr if signer == self.new_signer else self.old_fpr
        if done.returncode != 0 or not {"DECRYPTION_OKAY", "GOODMDC", "GOODSIG"} <= words:
            raise BenchError(f"a PGP answer did not open and verify with gpg: {sorted(words)}")
        if signers != {want}:
            raise BenchError(f"a PGP answer was signed by {signers}, not {signer} ({want})")
        if done.stdout != expected:
            raise BenchError("a PGP answer opened to something else than the partner's answer")


# ---------------------------------------------------------------------------------------------
# /proc samples of the gateway's processes.


def _status_field(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _fds(pid: int) -> tuple[int, int]:
    """(sockets, other fds) of `pid`."""
    sockets = other = 0
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:"):
                sockets += 1
            else:
                other += 1
    return sockets, other


def _entries(directory: Path) -> list[str]:
    """Every path below `directory`, relative, directories marked with '/' (sorted)."""
    for _ in range(5):  # a retired GnuPG home may vanish while it is walked
        if not directory.exists():
            return []
        try:
            return sorted(str(p.relative_to(directory)) + ("/" if p.is_dir() else "")
                          for p in directory.rglob("*"))
        except OSError:
            time.sleep(0.1)
    return ["(could not be listed)"]


@dataclass
class Sample:
    at: float
    pids: list[int]
    rss_kib: int
    hwm_kib: int
    sockets: int
    files: int
    threads: int
    agents: list[int]
    runtime: list[str]  # entries below the runtime_dir
    homes: int  # GnuPG homes below it (directories holding private-keys-v1.d)
    tmp: list[str]  # entries of the gateway's private TMPDIR

    @property
    def process_dirs(self) -> int:
        return sum(1 for e in self.runtime if e.count("/") == 1 and e.endswith("/"))

    @property
    def fds(self) -> int:
        return self.sockets + self.files


def agents_of(runtime: Path) -> list[int]:
    return [pid for pid in processes_naming(runtime) if _comm(pid) == "gpg-agent"]


def sample(gateway: GatewayProcess, runtime: Path, tmp: Path, started: float) -> Sample:
    pids = gateway.own_pids()
    sockets = files = 0
    for pid in pids:
        s, f = _fds(pid)
        sockets, files = sockets + s, files + f
    runtime_entries = _entries(runtime)
    return Sample(
        at=time.monotonic() - started, pids=pids,
        rss_kib=sum(_status_field(p, "VmRSS") for p in pids),
        hwm_kib=sum(_status_field(p, "VmHWM") for p in pids),
        sockets=sockets, files=files,
        threads=sum(_status_field(p, "Threads") for p in pids),
        agents=agents_of(runtime), runtime=runtime_entries,
        homes=sum(1 for e in runtime_entries if e.endswith("private-keys-v1.d/")),
        tmp=_entries(tmp),
    )


# ---------------------------------------------------------------------------------------------
# The admin listener and the gateway's log.


def fetch(admin_port: int, path: str) -> str:
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", admin_port,
                                                       timeout=10)) as connection:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.read().decode()


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics(admin_port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for match in _METRIC.finditer(fetch(admin_port, "/metrics")):
        labels = frozenset(_LABEL.findall(match[2] or ""))
        key = (match[1], labels)
        out[key] = out.get(key, 0.0) + float(match[3])
    return out


def metric(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


def by_label(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
             label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in values.items():
        if n == name:
            for k, lv in ls:
                if k == label:
                    out[lv] = out.get(lv, 0.0) + v
    return out


class LogReader:
    """The gateway's JSON log lines, read as they come (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.entries: list[dict[str, Any]] = []
        self.requests: Counter[int] = Counter()  # status of every `request` line
        self.other_lines = 0

    def read(self) -> None:
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for raw in data[:end].splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                self.other_lines += 1
                continue
            if not isinstance(entry, dict):
                self.other_lines += 1
            elif entry.get("event") == "request":
                self.requests[int(entry.get("status", 0))] += 1
            else:
                self.entries.append(entry)

    def events(self, event: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.entries[since:] if e.get("event") == event]


# ---------------------------------------------------------------------------------------------
# The soak.


@dataclass
class Window:
    index: int
    label: str  # "warm-up" or the number
    pool: str
    load: Load
    after: Sample
    generation: float
    events: list[str] = field(default_factory=list)


@dataclass
class Soak:
    args: argparse.Namespace
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reloads: list[str] = field(default_factory=list)

    def fail(self, text: str) -> None:
        self.failures.append(text)
        say(f"  FAIL: {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="What it checks and the tolerances: bench/README.md, section Soak.")
    parser.add_argument("--scheme", choices=["jose", "pgp"], default="jose")
    parser.add_argument("--seconds", type=int, default=60,
                        help="load after the warm-up, in consecutive wrk windows (default 60)")
    parser.add_argument("--window", type=int, default=5,
                        help="seconds per wrk window; the gateway is sampled between windows "
                             "(default 5; at least 7 windows are run)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="seconds of load before the start sample (default 5)")
    parser.add_argument("--workers", default="1",
                        help="the gateway's `workers` (an integer or auto; default 1)")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--size", type=int, choices=sorted(SIZES), default=1,
                        help="request and answer plaintext size in KiB (default 1)")
    parser.add_argument("--pool", type=int, default=32, help="pre-sealed requests per pool")
    parser.add_argument("--max-inflight", type=int,
                        help="the gateway's limits.max_inflight (default: concurrency + 16, "
                             "room for the probes beside wrk)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs, configs) and print its path")
    args = parser.parse_args(argv)
    if args.workers != "auto" and not (args.workers.isdigit() and int(args.workers) >= 1):
        parser.error("--workers: an integer >= 1 or auto")
    if min(args.seconds, args.window, args.warmup, args.concurrency, args.pool) < 1:
        parser.error("--seconds, --window, --warmup, --concurrency and --pool must be positive")
    if args.seconds < 7:
        parser.error("--seconds: at least 7 (7 windows of at least 1 s)")
    if wrk_path() is None:
        print("error: wrk is not installed. On Debian: apt-get update && apt-get install -y wrk",
              file=sys.stderr)
        return 1
    if args.scheme == "pgp" and shutil.which("gpg") is None:
        print("error: gpg is not installed (needed for --scheme pgp)", file=sys.stderr)
        return 1

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    soak = Soak(args)
    windows_n = max(7, round(args.seconds / args.window))
    window_s = max(1, args.seconds // windows_n) if args.seconds / args.window < 7 \
        else args.window
    gpg_version = subprocess.run(["gpg", "--version"], capture_output=True, text=True,
                                 check=False).stdout.split("\n", 1)[0] \
        if shutil.which("gpg") else "no gpg"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    say(f"soak: scheme {args.scheme}{' (pgp.engine gnupg)' if args.scheme == 'pgp' else ''}, "
        f"RSA-{BITS}, {args.size} KiB bodies, workers {args.workers}, concurrency "
        f"{args.concurrency}, max_inflight {args.max_inflight or args.concurrency + 16}; "
        f"{args.warmup} s warm-up + {windows_n} windows of {window_s} s")
    say(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, gateway from "
        f"{Path(gateway_package.__file__ or '?').parent} (commit {commit or '?'}), Python "
        f"{platform.python_version()}, {gpg_version}; {cores()} usable CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start")

    root = Path(tempfile.mkdtemp(prefix="gws-", dir="/tmp"))
    root.chmod(0o700)
    exit_code: int | None = None
    with contextlib.ExitStack() as cleanup:
        if args.keep:
            cleanup.callback(say, f"kept: {root}")
        else:
            cleanup.callback(shutil.rmtree, root, True)
        cleanup.callback(kill_leftovers, root)
        cleanup.callback(stop_agents, root)
        certs = write_sandbox_certificates(root)
        partner = Partner(cleanup, root / "partner.log")
        say("making keys and sealing the request pools")
        side: JoseSide | PgpSide = JoseSide(root) if args.scheme == "jose" \
            else PgpSide(root, cleanup)
        size = SIZES[args.size]
        plaintexts = [request_plaintext(i, size) for i in range(args.pool)]
        with ThreadPoolExecutor(max_workers=cores()) as pool:
            old_bodies = list(pool.map(lambda p: side.seal(p, False), plaintexts))
            # After Google took on our new key: every other request to it, the rest (sealed
            # earlier, retried, in batches) still to the old one.
            mixed_bodies = list(pool.map(lambda ip: side.seal(ip[1], ip[0] % 2 == 0),
                                         enumerate(plaintexts)))
        pools = {"old": (write_pool(root / "pool-old", old_bodies), old_bodies),
                 "mixed": (write_pool(root / "pool-mixed", mixed_bodies), mixed_bodies)}
        answer = answer_for(size)

        runtime = root / "rt"
        private_tmp = root / "tmp"
        private_tmp.mkdir(mode=0o700)
        route_port, admin_port = free_port(), free_port()
        config_path = root / "config.yaml"
        max_inflight = args.max_inflight or args.concurrency + 16

        def config_text(stage: int) -> str:
            # The probes come on top of wrk's connections: room for them under max_inflight
            # (16 per core by default: exactly 32 on 2 cores), else they and some of wrk's
            # requests rightly get 503.
            return f"limits: {{max_inflight: {max_inflight}}}\n" + gateway_config(
                side.stage(stage), route_port, admin_port,  # type: ignore[arg-type]
                partner, runtime, certs, args.workers, "gnupg" if args.scheme == "pgp" else None)

        def install(text: str, path: Path = config_path) -> None:
            """As the runbook does it: write a copy, then move it into place."""
            copy = path.with_name(path.name + ".next")
            copy.write_text(text)
            os.replace(copy, path)

        install(config_text(1))
        check = subprocess.run([sys.executable, "-m", "gateway", "check", "--config",
                                str(config_path)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise BenchError(f"gateway check refused the soak's config:\n{check.stderr}")
        gateway = GatewayProcess(config_path, root / "gateway.log", runtime, "info",
                                 args.workers, env={"TMPDIR": str(private_tmp)})
        cleanup.callback(gateway.stop)
        log = LogReader(gateway.log)
        listening = gateway.wait_listening()
        deadline = time.monotonic() + 120
        while "admin" not in listening:  # a worker's line; its supervisor's comes once all are
            log.read()
            listening = next((e for e in log.events("listening") if "admin" in e), listening)
            if gateway.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the gateway's supervisor did not log 'listening' (log: "
                                 f"{gateway.log})")
            time.sleep(0.1)
        route_port = int(str(listening["routes"]["in"]).rsplit(":", 1)[1])
        admin_port = int(str(listening["admin"]).rsplit(":", 1)[1])
        say(f"gateway pid {gateway.process.pid} listening on {route_port} (admin {admin_port}); "
            f"its runtime_dir {runtime}, TMPDIR {private_tmp}")
        workers = len(gateway.own_pids()) - 1 if args.workers != "1" else 0
        ca = certs[0]
        url = f"https://127.0.0.1:{route_port}"

        def probe(signer: str, what: str) -> str:
            """Two answers, one request to each of our keys when both are in service, opened
            and verified as Google would: still serving, signed by `signer`."""
            bodies = [mixed_bodies[0], mixed_bodies[1]] if state["pool"] == "mixed" \
                else old_bodies[:2]
            try:
                for body in bodies:
                    status, content_type, answer_body = post(route_port, body,
                                                             side.content_type, ca)
                    if status != 200 or content_type != side.content_type:
                        raise BenchError(f"answered {status} {content_type!r}")
                    side.check(answer_body, answer, signer)
            except (BenchError, OSError) as exc:
                soak.fail(f"probe after {what}: {exc}")
                return "probe FAILED"
            return f"probe ok (signed by {signer})"

        def reload(what: str, expect: str) -> str:
            """SIGHUP, then wait for the supervisor's (or the single process's) counter and,
            on success, every process's `reloaded` line of the new generation."""
            before = metrics(admin_port)
            generation = metric(before, "gateway_config_generation")
            counted = metric(before, "gateway_config_reloads_total", result=expect)
            other = "failure" if expect == "success" else "success"
            other_count = metric(before, "gateway_config_reloads_total", result=other)
            log.read()
            since = len(log.entries)
            t0 = time.monotonic()
            os.kill(gateway.process.pid, signal.SIGHUP)
            deadline = t0 + 120
            want_lines = 1 + workers if expect == "success" else 1
            event = "reloaded" if expect == "success" else \
                "reload failed; the previous configuration stays in service"
            while time.monotonic() < deadline:
                time.sleep(0.1)
                now = metrics(admin_port)
                log.read()
                lines = log.events(event, since)
                if expect == "success":
                    lines = [e for e in lines if e.get("generation") == generation + 1]
                # With workers the generation gauge follows the workers' reports (read by the
                # supervisor every 0.2 s), which may come a moment after their log lines.
                if metric(now, "gateway_config_reloads_total", result=expect) > counted \
                        and len(lines) >= want_lines and (
                            expect != "success"
                            or metric(now, "gateway_config_generation") > generation):
                    break
                if metric(now, "gateway_config_reloads_total", result=other) > other_count:
                    break
            elapsed = time.monotonic() - t0
            now = metrics(admin_port)
            log.read()
            got_expected = metric(now, "gateway_config_reloads_total", result=expect) - counted
            got_other = metric(now, "gateway_config_reloads_total", result=other) - other_count
            new_generation = metric(now, "gateway_config_generation")
            lines = log.events(event, since)
            errors = [str(e.get("error")) for e in log.events(
                "reload failed; the previous configuration stays in service", since)]
            status = json.loads(fetch(admin_port, "/status"))
            last = status.get("last_reload") or {}
            summary = (f"{what}: {expect} expected; reloads_total {expect} +{got_expected:g}, "
                       f"{other} +{got_other:g}; generation {generation:g} -> "
                       f"{new_generation:g}; {len(lines)} '{event.split(';')[0]}' log line(s)"
                       f"{' (supervisor + workers)' if workers and expect == 'success' else ''}"
                       f"; /status last_reload {last.get('result')}"
                       f"{': ' + str(last.get('error')) if last.get('error') else ''}"
                       f"; {elapsed:.1f} s after SIGHUP")
            soak.reloads.append(summary)
            ok = (got_expected == 1 and got_other == 0 and last.get("result") == expect
                  and len(lines) >= want_lines
                  and new_generation == (generation + 1 if expect == "success" else generation))
            if expect == "failure" and not errors:
                ok = False
            if not ok:
                soak.fail(f"reload '{what}' did not go as expected: {summary}")
            short = (f"reload {'ok' if expect == 'success' else 'refused'} "
                     f"g{new_generation:g} {elapsed:.1f}s" + ("" if ok else " UNEXPECTED"))
            return short

        corrupt = side.corruptible
        corrupt_saved = corrupt.read_bytes()

        def rotate_add() -> list[str]:
            install(config_text(2))
            result = reload("rotation step 1, new keys read-only", "success")
            return [f"add new keys read-only: {result}",
                    probe(side.old_signer, "rotation step 1")]

        def rotate_promote() -> list[str]:
            install(config_text(3))
            return [f"promote new keys: {reload('rotation step 2, new keys active', 'success')}",
                    probe(side.new_signer, "rotation step 2")]

        def break_key() -> list[str]:
            install("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
                    if args.scheme == "jose" else
                    "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nbm90IGEga2V5\n"
                    "-----END PGP PRIVATE KEY BLOCK-----\n", corrupt)
            return [f"corrupt key file: {reload('broken reload 1, corrupt key file', 'failure')}",
                    probe(side.new_signer, "the corrupt key file")]

        def break_config() -> list[str]:
            corrupt.write_bytes(corrupt_saved)
            install(config_text(3).replace("reload: {interval_s: 0}",
                                           "reload: {interval_s: 0, intervall_s: 5}"))
            return [f"config with unknown field: "
                    f"{reload('broken reload 2, unknown config field', 'failure')}",
                    probe(side.new_signer, "the broken config")]

        def restore() -> list[str]:
            install(config_text(3))
            return [f"restored: {reload('restore after the broken reloads', 'success')}",
                    probe(side.new_signer, "the restore")]

        # Actions mid-window, at windows 1, 1+step, ...; at least one clean window after.
        step = max(1, (windows_n - 2) // 5)
        actions: dict[int, Callable[[], list[str]]] = {
            1 + k * step: action for k, action in
            enumerate([rotate_add, rotate_promote, break_key, break_config, restore])}
        promote_window = 1 + step
        state = {"pool": "old"}
        windows: list[Window] = []
        uses_at: dict[int, Any] = {}

        def settle(timeout: float = 60) -> None:
            """wrk leaves up to `concurrency` requests in flight (a PGP gateway needs a second
            or more for them): wait until no request has finished for 0.5 s, so that every
            sample sees the gateway idle (its gpg pipes and threads gone)."""
            deadline = time.monotonic() + timeout
            last = metric(metrics(admin_port), "gateway_requests_total")
            while time.monotonic() < deadline:
                time.sleep(0.5)
                now = metric(metrics(admin_port), "gateway_requests_total")
                if now == last:
                    return
                last = now
            soak.fail(f"the gateway was still answering {timeout:.0f} s after wrk stopped")

        def one_window(index: int, label: str, seconds: int,
                       action: Callable[[], list[str]] | None) -> Window:
            pool_dir, bodies = pools[state["pool"]]
            with ThreadPoolExecutor(max_workers=1) as runner:
                future = runner.submit(run_wrk, url, pool_dir, len(bodies), side.content_type,
                                       side.content_type, args.concurrency, seconds)
                events: list[str] = []
                if action is not None:
                    time.sleep(seconds / 2 - 0.5 if seconds > 1 else 0.2)
                    events = action()
                load = future.result()
            settle()
            after = sample(gateway, runtime, private_tmp, began)
            values = metrics(admin_port)
            uses_at[index] = values
            window = Window(index, label, state["pool"], load, after,
                            metric(values, "gateway_config_generation"), events)
            bad = load.bad + sum(load.errors.values())
            say(f"  {label:>7}  {load.per_second:7.1f} rt/s  {bad} non-2xx/errors  "
                f"RSS {after.rss_kib / 1024:.1f} MiB  fds {after.fds}  "
                f"gen {window.generation:g}  {'; '.join(events)}")
            if bad:
                soak.fail(f"window {label}: {bad} answers not 200 {side.content_type} or socket "
                          f"errors: {dict(load.bad_kinds)} {dict(load.errors)}")
            windows.append(window)
            return window

        say(f"warm-up ({args.warmup} s), then {windows_n} windows; reloads mid-window at windows "
            f"{', '.join(str(i) for i in sorted(actions))}")
        one_window(0, "warm-up", args.warmup, None)
        start = windows[-1].after
        for i in range(1, windows_n + 1):
            if i - 1 in actions and actions[i - 1] is rotate_add:
                state["pool"] = "mixed"  # Google now encrypts to our new key (C4 / A4)
            one_window(i, str(i), window_s, actions.get(i))
        end = windows[-1].after
        final_metrics = uses_at[windows[-1].index]
        log.read()

        # Key uses: the new key decrypts, signs after promotion; the old one stops signing.
        promoted = uses_at[promote_window]
        new_decrypts = metric(final_metrics, "gateway_key_uses_total", keyset="partner",
                              key_id=side.new_decrypter, op="decrypt")
        old_decrypts_after = metric(final_metrics, "gateway_key_uses_total", keyset="partner",
                                    key_id=side.old_decrypter, op="decrypt") - metric(
            promoted, "gateway_key_uses_total", keyset="partner", key_id=side.old_decrypter,
            op="decrypt")
        new_signs = metric(final_metrics, "gateway_key_uses_total", keyset="partner",
                           key_id=side.new_signer, op="sign")
        old_signs_after = metric(final_metrics, "gateway_key_uses_total", keyset="partner",
                                 key_id=side.old_signer, op="sign") - metric(
            promoted, "gateway_key_uses_total", keyset="partner", key_id=side.old_signer,
            op="sign")
        codes = by_label(final_metrics, "gateway_requests_total", "code")
        crypto_failures = metric(final_metrics, "gateway_crypto_failures_total")

        # Stop (SIGTERM, graceful drain) and look at what is left.
        tree = process_tree(gateway.process.pid)
        t0 = time.monotonic()
        exit_code = gateway.stop()
        stop_s = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while agents_of(runtime) and time.monotonic() < deadline:
            time.sleep(0.2)
        left_agents = agents_of(runtime)
        left_processes = [p for p in tree if Path(f"/proc/{p}").exists()
                          and _comm(p) not in ("", "gpg-agent")]
        left_runtime = _entries(runtime)
        left_tmp = _entries(private_tmp)
        log.read()

        report(soak, windows, start, end, window_s, codes, crypto_failures, log, side,
               new_decrypts, old_decrypts_after, new_signs, old_signs_after, exit_code, stop_s,
               left_agents, left_processes, left_runtime, left_tmp, runtime, private_tmp)
    say(f"{time.monotonic() - began:.0f} s in all; load average {os.getloadavg()[0]:.2f} "
        "at the end")
    if soak.failures:
        say("SOAK FAILED (see the FAIL lines)")
        return 1
    say("SOAK PASSED")
    return 0


def report(soak: Soak, windows: list[Window], start: Sample, end: Sample, window_s: int,
           codes: dict[str, float], crypto_failures: float, log: LogReader,
           side: JoseSide | PgpSide, new_decrypts: float, old_decrypts_after: float,
           new_signs: float, old_signs_after: float, exit_code: int | None, stop_s: float,
           left_agents: list[int], left_processes: list[int], left_runtime: list[str],
           left_tmp: list[str], runtime: Path, private_tmp: Path) -> None:
    args = soak.args
    say("")
    say(f"Windows (wrk -c{args.concurrency}; rt/s counts only 200 {side.content_type}; "
        "figures sampled after each window; RSS/HWM summed over the gateway's processes):")
    say(f"{'window':>7} {'t s':>5} {'pool':>6} {'rt/s':>7} {'2xx':>6} {'non-2xx':>8} "
        f"{'sock err':>8} {'RSS MiB':>8} {'HWM MiB':>8} {'fds':>5} {'thr':>4} {'agents':>6} "
        f"{'gen':>4}  reloads during the window")
    total = Load()
    for w in windows:
        a = w.after
        say(f"{w.label:>7} {a.at:5.0f} {w.pool:>6} {w.load.per_second:7.1f} {w.load.good:6d} "
            f"{w.load.bad:8d} {sum(w.load.errors.values()):8d} {a.rss_kib / 1024:8.1f} "
            f"{a.hwm_kib / 1024:8.1f} {a.fds:5d} {a.threads:4d} {len(a.agents):6d} "
            f"{w.generation:4g}  {'; '.join(e for e in w.events if not e.startswith('probe ok'))}")
        if w.label != "warm-up":
            total.add(w.load)
    bad = total.bad + sum(total.errors.values())
    say(f"{'all':>7} {'':>5} {'':>6} {total.per_second:7.1f} {total.good:6d} {total.bad:8d} "
        f"{sum(total.errors.values()):8d}   (after the warm-up)")
    say("")
    say("Reloads (SIGHUP, mid-window under load):")
    for line in soak.reloads:
        say(f"  {line}")
    say("")
    say(f"Key uses (gateway_key_uses_total, keyset partner): {side.new_decrypter} decrypt "
        f"{new_decrypts:g}; {side.new_signer} sign {new_signs:g}; after the promotion window: "
        f"{side.old_signer} sign {old_signs_after:g}, {side.old_decrypter} decrypt "
        f"{old_decrypts_after:g} (requests still sealed to it)")
    say(f"Gateway's own count (gateway_requests_total by code): "
        f"{ {k: int(v) for k, v in sorted(codes.items())} }; request log lines by status: "
        f"{dict(sorted(log.requests.items()))}; gateway_crypto_failures_total {crypto_failures:g}")

    def row(name: str, a: float, b: float, limit: str, ok: bool, unit: str = "") -> None:
        say(f"  {name:<34}{a:>10g}{b:>10g}{b - a:>+10g}{unit:<4} {limit:<28} "
            f"{'ok' if ok else 'FAIL'}")
        if not ok:
            soak.fail(f"{name}: {a:g} at the start, {b:g} at the end (limit: {limit})")

    say("")
    say(f"Start (after the warm-up, t={start.at:.0f} s) and end (after the last window, "
        f"t={end.at:.0f} s), gateway processes {start.pids} / {end.pids}:")
    say(f"  {'':<34}{'start':>10}{'end':>10}{'change':>10}     {'limit':<28} check")
    rss_limit = start.rss_kib * (1 + RSS_GROWTH)
    row("VmRSS MiB (sum)", round(start.rss_kib / 1024, 1), round(end.rss_kib / 1024, 1),
        f"<= +{RSS_GROWTH:.0%} ({rss_limit / 1024:.1f} MiB)", end.rss_kib <= rss_limit)
    row("VmHWM MiB (sum, peak)", round(start.hwm_kib / 1024, 1), round(end.hwm_kib / 1024, 1),
        "(reported)", True)
    row("open fds, not sockets", start.files, end.files, f"<= +{FILE_FD_SLACK}",
        end.files <= start.files + FILE_FD_SLACK)
    row("open fds, sockets", start.sockets, end.sockets,
        f"<= +{args.concurrency + SOCKET_FD_SLACK} (keep-alive pool)",
        end.sockets <= start.sockets + args.concurrency + SOCKET_FD_SLACK)
    row("threads", start.threads, end.threads, f"<= +{THREAD_SLACK} per process",
        end.threads <= start.threads + THREAD_SLACK * len(end.pids))
    row("gpg-agents of its runtime dir", len(start.agents), len(end.agents), "== start",
        len(end.agents) == len(start.agents))
    row("GnuPG homes in its runtime dir", start.homes, end.homes, "== start",
        end.homes == start.homes)
    row("process dirs in its runtime dir", start.process_dirs, end.process_dirs, "== start",
        end.process_dirs == start.process_dirs)
    row("entries below its runtime dir", len(start.runtime), len(end.runtime), "(reported)",
        True)
    row("entries in its TMPDIR", len(start.tmp), len(end.tmp), "== 0",
        not start.tmp and not end.tmp)
    say("")
    say("Checks:")

    def check(ok: bool, text: str) -> None:
        say(f"  {'ok  ' if ok else 'FAIL'} {text}")
        if not ok:
            soak.failures.append(text)

    check(bad == 0 and all(w.load.bad == 0 and not sum(w.load.errors.values())
                           for w in windows),
          f"every answer 200 {side.content_type}, no socket error or timeout "
          f"({total.good} after the warm-up, {windows[0].load.good} in the warm-up)")
    check(set(codes) <= {"200"}, f"the gateway counted only 200s: {codes}")
    check(set(log.requests) <= {200}, "the gateway logged only status 200 requests")
    check(crypto_failures == 0, "no crypto failure")
    check(new_decrypts > 0, f"the new key decrypts ({side.new_decrypter})")
    check(new_signs > 0, f"the new key signs after promotion ({side.new_signer})")
    check(old_signs_after == 0, f"the old key no longer signs after promotion "
                                f"({side.old_signer}: {old_signs_after:g})")
    unexpected = [e for e in log.entries if e.get("level") in ("warning", "error", "critical")
                  and e.get("event") != "reload failed; the previous configuration stays in "
                                        "service"]
    check(not unexpected, "no other warning or error in the gateway's log"
          + (f": {unexpected[:5]}" if unexpected else ""))
    check(log.other_lines == 0, f"every log line is JSON ({log.other_lines} are not)")
    check(exit_code == 0, f"SIGTERM: the gateway drained and exited 0 (status {exit_code}, "
                          f"{stop_s:.1f} s)")
    check(not left_processes, f"no gateway process left ({left_processes})")
    check(not left_agents, f"no gpg-agent of its runtime dir left ({left_agents})")
    check(not left_runtime, f"its runtime dir {runtime.name}/ is empty after exit "
                            f"({left_runtime[:10]})")
    check(not left_tmp, f"nothing left in its TMPDIR ({left_tmp[:10]})")
    failures = [f for f in soak.failures if f.startswith("reload") or f.startswith("probe")]
    check(not failures, "every reload went as expected and every probe answer verified "
                        "(signer as the rotation step says)")


if __name__ == "__main__":
    sys.exit(main())
