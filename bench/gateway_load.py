"""Gateway load benchmark: the real `python -m gateway run` process, an inbound route over TLS,
a stand-in partner that answers at once, wrk replaying pre-sealed requests; beside it, in the
same run and in alternating slices, the raw `cryptography` floor, the gpg ceiling (PGP), the
partner called directly, a plain proxy on the same stack and (JOSE) the issue's reference
gateway. Not a test: it asserts nothing about time.

    .venv/bin/python bench/gateway_load.py [--quick] [--scheme pgp jose] [--bits 2048 3072]
        [--size 1 64] [--concurrency 32] [--seconds 10] [--slices 3] [--workers 1]
        [--pin-workers] [--batch-scheduling] [--profile DIR]

Needs wrk (Debian: apt-get install wrk) and, for PGP, gpg.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

# Shared with the envelope benchmark (bench/envelopes.py, importable as this file's neighbour).
from envelopes import floor_round_trip, jose_keyset, make_pgp_key, write_pem

from gateway.config import JoseOptions
from gateway.envelope import CONTENT_TYPES, PLAINTEXT_CONTENT_TYPE
from gateway.jose import JoseEnvelope, load_jose_keyset
from gateway.snapshot import stop_agents
from gateway.tls import write_sandbox_certificates

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LUA = BENCH / "replay.lua"
PATH = "/cards-qr-v1/echo"
SIZES = {1: "1 KiB", 64: "64 KiB"}  # --size values, in KiB
# Issue 7's JOSE targets at 1 KiB and its straightforward gateway's measure, both x the floor.
ISSUE_REFERENCE = {2048: (0.5, 0.31), 3072: (0.8, 0.63)}
CLK_TCK = os.sysconf("SC_CLK_TCK")
GPG_NAMES = {"gpg", "gpg-agent", "gpgsm", "scdaemon", "keyboxd", "dirmngr"}
GPG = ("--batch", "--no-tty", "--pinentry-mode", "loopback", "--trust-model", "always")
# The gateway's default PGP route options (config.md: pgp.digest, pgp.cipher, compression none).
PGP_SEAL = ("--sign", "--encrypt", "--digest-algo", "SHA384", "--cipher-algo", "AES256",
            "--compress-algo", "none")


class BenchError(Exception):
    """Something the benchmark needs did not work: printed as is, exit status 1."""


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Messages: JSON of an exact size, the same on every run.


def _sized(message: dict[str, Any], size: int) -> bytes:
    message["padding"] = ""
    bare = len(json.dumps(message, separators=(",", ":")))
    if bare > size:
        raise BenchError(f"a message cannot be as small as {size} bytes")
    message["padding"] = "x" * (size - bare)
    return json.dumps(message, separators=(",", ":")).encode()


def request_plaintext(index: int, size: int) -> bytes:
    """What Google would send: a requestHeader with a request id, padded to `size` bytes."""
    return _sized({
        "requestHeader": {"requestId": f"bench-{index:06d}",
                          "requestTimestamp": {"epochMillis": str(int(time.time() * 1000))},
                          "protocolVersion": {"major": 1},
                          "paymentIntegratorAccountId": "PIAID-BENCH"},
        "clientMessage": "ping",
    }, size)


def answer_for(size: int) -> bytes:
    """The stand-in partner's answer to a body of `size` bytes: the same size (so that the
    response costs what the request costs), fixed content (so that the check can compare)."""
    return _sized({"responseHeader": {"responseTimestamp": {"epochMillis": "1"}},
                   "serverMessage": "pong"}, max(size, 128))


# ---------------------------------------------------------------------------------------------
# The stand-in partner: its own process, so that it does not take the gateway's event loop.


def serve_partner() -> int:
    from aiohttp import web

    answers: dict[int, bytes] = {}

    async def handle(request: web.Request) -> web.Response:
        size = len(await request.read())
        answer = answers.get(size)
        if answer is None:
            answer = answers[size] = answer_for(size)
        return web.Response(body=answer, content_type="application/json", charset="utf-8")

    async def main() -> None:
        def ready(site: Any) -> str:
            sockets = getattr(site._server, "sockets", None)
            assert sockets
            return f"PORT {sockets[0].getsockname()[1]}"

        await serve_until_signalled(handle, ready, port=0)

    return run_on_uvloop(main)


async def serve_until_signalled(handle: Callable[..., Any], ready: Callable[[Any], str], *,
                                port: int, **site: Any) -> None:
    """A stand-in server: POSTs to `handle` on 127.0.0.1:`port` (`site`: TCPSite options),
    `ready(site)` printed once listening, until SIGTERM or SIGINT."""
    from aiohttp import web

    app = web.Application(client_max_size=4 << 20)
    app.router.add_route("POST", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    tcp_site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024, **site)
    await tcp_site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(ready(tcp_site), flush=True)
    await stop.wait()
    await runner.cleanup()


def run_on_uvloop(main: Callable[[], Any]) -> int:
    """Run the coroutine function `main` on uvloop when installed (as the gateway does)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0


# ---------------------------------------------------------------------------------------------
# The plain proxy: the gateway's stack (uvloop, aiohttp server and client, the same TLS context
# and the same upstream session) forwarding bytes as they come, with no crypto, no logging and
# no metrics. Its cost per request is what any gateway built on this stack pays before its own
# work: with the floor, it bounds what such a gateway can reach on this machine
# (bench/README.md, "The plain-proxy bound").


def serve_plain_proxy(port: int, upstream: str, cert: str, key: str, cpu: str) -> int:
    if cpu != "-":  # --pin-workers: as the gateway's workers are
        os.sched_setaffinity(0, {int(cpu)})
    from aiohttp import web

    from gateway.config import ServerTls
    from gateway.tls import build_server_context
    from gateway.upstream import upstream_session

    context = build_server_context(ServerTls(Path(cert), Path(key)), "plain proxy")

    async def main() -> None:
        session = upstream_session()

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            async with session.post(upstream + request.raw_path, data=body, headers={
                    "Content-Type": request.headers.get("Content-Type", "")}) as answer:
                return web.Response(body=await answer.read(), status=answer.status,
                                    headers={"Content-Type": answer.headers["Content-Type"]})

        try:
            await serve_until_signalled(handle, lambda site: "READY", port=port,
                                        ssl_context=context, reuse_port=True)
        finally:
            await session.close()

    return run_on_uvloop(main)


# ---------------------------------------------------------------------------------------------
# The issue's reference: "a straightforward single-process aiohttp + jwcrypto gateway", the
# design issue 7 calibrated its JOSE targets against (about 0.63 of the floor at RSA-3072 and
# 0.31 at RSA-2048 on its machine). One process, jwcrypto's JWS and JWE objects, the crypto
# on the event loop; the same stack otherwise (uvloop, aiohttp, the gateway's TLS context and
# upstream session) and the same wire profile, so that its answers open with Google's keys.
# Measured beside the gateway, it translates the targets to this machine (bench/README.md,
# "The issue's reference").


def serve_reference(port: int, upstream: str, cert: str, key: str, keys: str) -> int:
    from aiohttp import web
    from jwcrypto import jwe, jwk, jws
    from jwcrypto.common import json_encode

    from gateway.config import ServerTls
    from gateway.tls import build_server_context
    from gateway.upstream import upstream_session

    def pem(name: str) -> jwk.JWK:
        return jwk.JWK.from_pem(Path(keys, name).read_bytes())

    own_sig, own_enc = pem("partner-sig.pem"), pem("partner-enc.pem")
    peer_sig, peer_enc = pem("google-sig.pub.pem"), pem("google-enc.pub.pem")
    jws_header = json_encode({"alg": "RS256", "kid": "partner-sig"})
    jwe_header = json_encode({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "google-enc"})
    context = build_server_context(ServerTls(Path(cert), Path(key)), "reference")

    async def main() -> None:
        session = upstream_session()

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                token = jwe.JWE(algs=["RSA-OAEP-256", "A256GCM"])
                token.deserialize(body.decode("ascii"), key=own_enc)
                signed = jws.JWS()
                signed.allowed_algs = ["RS256"]
                signed.deserialize(token.payload.decode("ascii"), key=peer_sig)
            except Exception:  # a reference: any failure is a 400
                return web.Response(status=400)
            async with session.post(upstream + request.raw_path, data=signed.payload, headers={
                    "Content-Type": PLAINTEXT_CONTENT_TYPE}) as answer:
                plaintext = await answer.read()
            out = jws.JWS(plaintext)
            out.add_signature(own_sig, alg="RS256", protected=jws_header)
            sealed = jwe.JWE(out.serialize(compact=True).encode("ascii"), protected=jwe_header)
            sealed.add_recipient(peer_enc)
            return web.Response(body=sealed.serialize(compact=True).encode("ascii"),
                                headers={"Content-Type": CONTENT_TYPES["jose"]})

        try:
            await serve_until_signalled(handle, lambda site: "READY", port=port,
                                        ssl_context=context)
        finally:
            await session.close()

    return run_on_uvloop(main)


class Reference:
    """The reference gateway for one JOSE case (its keys are the case's)."""

    def __init__(self, cleanup: contextlib.ExitStack, log: Path, upstream: str,
                 certs: tuple[Path, ...], keys: Path) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        with log.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "_reference", str(self.port),
                 upstream, str(certs[1]), str(certs[2]), str(keys)],
                stdout=subprocess.PIPE, stderr=err, start_new_session=True, cwd=REPO)
        cleanup.callback(stop_process, self.process)
        assert self.process.stdout is not None
        if self.process.stdout.readline().decode().strip() != "READY":
            raise BenchError(f"the reference gateway did not start; see {log}")


# ---------------------------------------------------------------------------------------------
# Processes: /proc figures, start and stop.


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of `pid` in clock ticks; (0, 0) once it is gone."""
    fields = _stat(pid)
    if fields is None:
        return 0, 0
    # After the state field: utime is field 14 of the whole line, i.e. index 11 here.
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def machine_ticks() -> tuple[int, int, int]:
    """(busy, idle, steal) ticks of all CPUs together, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq, idle + iowait, steal


def thread_ticks(pid: int) -> dict[int, int]:
    """utime + stime of each thread of `pid`, by thread id."""
    ticks = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = None
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (task / "stat").read_text()
                fields = text[text.rindex(")") + 2:].split()
            if fields is not None:
                ticks[int(task.name)] = int(fields[11]) + int(fields[12])
    return ticks


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names a path below `path` (gpg-agents detach from
    their parent, so they are found by their --homedir)."""
    me = os.getpid()
    return [pid for pid in _all_pids() if pid != me and str(path) in _cmdline(pid)]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> int | None:
    """SIGTERM, then SIGKILL to its process group (started with start_new_session)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CpuSample:
    at: float
    gateway: int  # ticks of the gateway's own processes (every worker)
    gpg: int  # ticks of its gpg children (reaped) and of its gpg-agents
    partner: int
    agents: dict[int, int]
    threads: dict[int, int]  # every gateway thread (tid -> ticks); a process's first is its loop
    machine: tuple[int, int, int]  # /proc/stat: (busy, idle, steal) ticks over all CPUs


class Partner:
    def __init__(self, cleanup: contextlib.ExitStack, log: Path) -> None:
        with log.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "_partner"],
                stdout=subprocess.PIPE, stderr=err, start_new_session=True, cwd=REPO,
            )
        cleanup.callback(stop_process, self.process)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise BenchError(f"the stand-in partner did not start; see {log}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"


class PlainProxy:
    """`processes` plain-proxy processes sharing one TLS port (SO_REUSEPORT), as the gateway's
    workers do; started once per run, idle while anything else is measured."""

    def __init__(self, cleanup: contextlib.ExitStack, log: Path, processes: int,
                 upstream: str, certs: tuple[Path, ...], pin: bool) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[bytes]] = []
        with log.open("wb") as err:
            cpus = sorted(os.sched_getaffinity(0))
            for index in range(processes):
                # As the gateway: pin_workers pins worker processes, of which 1 makes none.
                cpu = str(cpus[index % len(cpus)]) if pin and processes > 1 else "-"
                process = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "_plain_proxy",
                     str(self.port), upstream, str(certs[1]), str(certs[2]), cpu],
                    stdout=subprocess.PIPE, stderr=err, start_new_session=True, cwd=REPO)
                cleanup.callback(stop_process, process)
                self.processes.append(process)
        for process in self.processes:
            assert process.stdout is not None
            if process.stdout.readline().decode().strip() != "READY":
                raise BenchError(f"the plain proxy did not start; see {log}")

    def cpu_ticks(self) -> int:
        return sum(sum(cpu_ticks(process.pid)) for process in self.processes)


class GatewayProcess:
    """`python -m gateway run --config PATH`, its stderr (JSON log lines) in a file."""

    def __init__(self, config: Path, log: Path, runtime: Path, log_level: str,
                 workers: str, env: dict[str, str] | None = None) -> None:
        """`env`: extra environment variables for the gateway (the soak's private TMPDIR)."""
        self.log = log
        self.runtime = runtime
        self.workers = workers
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config),
             "--log-level", log_level],
            stdout=self._log_file, stderr=self._log_file, start_new_session=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.listening: dict[str, Any] = {}

    def wait_listening(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and entry.get("event") == "listening":
                        self.listening = entry
                        return entry
            if self.process.poll() is not None:
                tail = "\n".join("    " + line for line in
                                 self.log.read_text(errors="replace").splitlines()[-15:])
                hint = ""
                if self.workers != "1":
                    hint = (f"\n(it was started with workers: {self.workers}; if the log says "
                            "workers > 1 are not supported, this gateway cannot run that yet)")
                raise BenchError(f"the gateway exited with status {self.process.returncode} "
                                 f"before listening; the end of its log:\n{tail}{hint}")
            time.sleep(0.1)
        raise BenchError(f"the gateway did not log 'listening' within {timeout:.0f} s "
                         f"(log: {self.log})")

    def own_pids(self) -> list[int]:
        return [pid for pid in process_tree(self.process.pid) if _comm(pid) not in GPG_NAMES]

    def cpu(self, partner: Partner) -> CpuSample:
        gateway = gpg = 0
        threads: dict[int, int] = {}
        for pid in self.own_pids():
            own, children = cpu_ticks(pid)
            gateway += own
            gpg += children  # the gpg processes it ran and reaped
            threads |= thread_ticks(pid)
        agents = {pid: sum(cpu_ticks(pid)) for pid in processes_naming(self.runtime)
                  if _comm(pid) == "gpg-agent"}
        return CpuSample(time.perf_counter(), gateway, gpg, sum(cpu_ticks(partner.process.pid)),
                         agents, threads, machine_ticks())

    def peak_rss_mib(self) -> float:
        return sum(vm_hwm_kib(pid) for pid in self.own_pids()) / 1024

    def stop(self) -> int | None:
        code = stop_process(self.process, timeout=40)
        self._log_file.close()
        return code


@dataclass(frozen=True)
class Cpu:
    """CPU over one load window, in % of one core."""

    gateway: float  # every gateway process, all threads
    loop: float  # the busiest event-loop thread (a process's main thread)
    gpg: float  # gpg processes the gateway ran, and its gpg-agents
    partner: float
    load: float  # wrk
    machine: float  # every CPU of the machine busy (100 = all of them), anyone's work
    steal: float  # time the hypervisor gave to others, in % of all CPUs


def cpu_percent(before: CpuSample, after: CpuSample, pids: list[int], load_cpu_s: float,
                ) -> Cpu:
    wall = after.at - before.at
    agents = sum(t - before.agents.get(pid, 0) for pid, t in after.agents.items())

    def pct(ticks: float) -> float:
        return 100 * ticks / CLK_TCK / wall if wall > 0 else 0.0

    loops = [after.threads.get(pid, 0) - before.threads.get(pid, 0) for pid in pids]
    busy, idle, steal = (a - b for a, b in zip(after.machine, before.machine, strict=True))
    every = max(1, busy + idle + steal)
    return Cpu(pct(after.gateway - before.gateway), pct(max(loops, default=0)),
               pct(after.gpg - before.gpg + agents), pct(after.partner - before.partner),
               pct(load_cpu_s * CLK_TCK), 100 * busy / every, 100 * steal / every)


def cpu_seconds(before: CpuSample, after: CpuSample) -> float:
    """The gateway's CPU between two samples: its processes, the gpg it ran, its agents."""
    agents = sum(t - before.agents.get(pid, 0) for pid, t in after.agents.items())
    return (after.gateway - before.gateway + after.gpg - before.gpg + agents) / CLK_TCK


# ---------------------------------------------------------------------------------------------
# wrk


@dataclass
class Load:
    """Merged wrk runs: only 2xx with the right content type count as good."""

    good: int = 0
    bad: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    bad_kinds: Counter[str] = field(default_factory=Counter)
    histogram: Counter[int] = field(default_factory=Counter)  # microseconds -> requests
    load_cpu: float = 0.0  # wrk's own CPU seconds

    def add(self, other: Load) -> None:
        self.good += other.good
        self.bad += other.bad
        self.seconds += other.seconds
        self.errors.update(other.errors)
        self.bad_kinds.update(other.bad_kinds)
        self.histogram.update(other.histogram)
        self.load_cpu += other.load_cpu

    @property
    def per_second(self) -> float:
        return self.good / self.seconds if self.seconds else 0.0

    def uncounted(self) -> dict[str, int]:
        """What was not counted as good: by status or content type, and by socket error."""
        return dict(self.bad_kinds) | {f"socket {k}": v for k, v in self.errors.items()}

    def percentile_ms(self, p: float) -> float:
        total = sum(self.histogram.values())
        if not total:
            return math.nan
        rank, seen = math.ceil(total * p / 100), 0
        for value in sorted(self.histogram):
            seen += self.histogram[value]
            if seen >= rank:
                return value / 1000
        return max(self.histogram) / 1000


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, pool: Path, count: int, request_type: str, expected: str,
            connections: int, seconds: int) -> Load:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
            "-s", str(LUA), url, "--", str(pool), str(count), request_type, expected, PATH]
    before = os.times()
    done = subprocess.run(args, capture_output=True, timeout=seconds + 60, check=False)
    after = os.times()
    line = next((raw for raw in done.stdout.decode(errors="replace").splitlines()
                 if raw.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): "
                         f"{(done.stderr or done.stdout).decode(errors='replace')[-800:]}")
    result = json.loads(line.split(" ", 1)[1])
    return Load(
        good=result["good"], bad=result["bad"], seconds=result["duration_us"] / 1e6,
        errors=Counter({k: v for k, v in result["errors"].items() if v and k != "status"}),
        bad_kinds=Counter(result["bad_kinds"]),
        histogram=Counter({int(k): v for k, v in result["histogram"].items()}),
        load_cpu=(after.children_user + after.children_system)
        - (before.children_user + before.children_system),
    )


# ---------------------------------------------------------------------------------------------
# Baselines run in threads: the cryptography floor and the gpg ceiling.


@dataclass
class Runs:
    count: int = 0
    seconds: float = 0.0
    times: list[float] = field(default_factory=list)

    def add(self, other: Runs) -> None:
        self.count += other.count
        self.seconds += other.seconds
        self.times += other.times

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000 if self.times else math.nan


def in_threads(make: Callable[[int], Callable[[], object]], threads: int, seconds: float,
               stop: threading.Event) -> Runs:
    """`threads` loops of make(i)() for `seconds`; round trips over wall time."""
    trips = [make(i) for i in range(threads)]
    start = threading.Barrier(threads + 1)

    def loop(trip: Callable[[], object]) -> list[float]:
        times = []
        start.wait()
        deadline = time.perf_counter() + seconds
        while not stop.is_set() and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            trip()
            times.append(time.perf_counter() - t0)
        return times

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(loop, trip) for trip in trips]
        try:
            start.wait()
            began = time.perf_counter()
            results = [f.result() for f in futures]
        except BaseException:
            stop.set()  # Ctrl-C or a failed trip: the other loops end at once
            raise
        elapsed = time.perf_counter() - began
    times = [t for r in results for t in r]
    return Runs(len(times), elapsed, times)


def gpg(home: Path, *args: str, stdin: bytes = b"", timeout: float = 120,
        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["gpg", "--homedir", str(home), *GPG, *args], input=stdin,
                          capture_output=True, timeout=timeout, check=False)


def gpg_ok(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    done = gpg(home, *args, stdin=stdin)
    if done.returncode != 0:
        raise BenchError(f"gpg {' '.join(args[:3])} failed: "
                         f"{done.stderr.decode(errors='replace')[-600:]}")
    return done.stdout


def new_home(path: Path, *imports: Path) -> Path:
    path.mkdir(mode=0o700, parents=True)
    for file in imports:
        gpg_ok(path, "--import", str(file))
    return path


def primary_fingerprint(home: Path, who: str) -> str:
    listing = gpg_ok(home, "--with-colons", "--list-keys", who).decode()
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def unb64url(body: bytes) -> bytes:
    text = body.strip().rstrip(b"=")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


# ---------------------------------------------------------------------------------------------
# Keys and what each scheme's Google side does.


@dataclass
class RsaKeys:
    """Per RSA size, made with `cryptography`: the JOSE keys (as PEM files) and the floor's."""

    bits: int
    keys: dict[str, rsa.RSAPrivateKey]
    files: dict[str, tuple[Path, Path]]  # name -> (private PEM, public PEM)


def make_rsa_keys(directory: Path, bits: int) -> RsaKeys:
    names = ("partner-sig", "partner-enc", "google-sig", "google-enc")
    with ThreadPoolExecutor(max_workers=cores()) as pool:
        made = list(pool.map(
            lambda _: rsa.generate_private_key(public_exponent=65537, key_size=bits), names))
    keys = dict(zip(names, made, strict=True))
    return RsaKeys(bits, keys, {n: write_pem(k, directory, n) for n, k in keys.items()})


class Google:
    """The Google side of one (scheme, RSA size): seals requests, opens and checks answers."""

    scheme: str
    content_type: str

    def keysets_yaml(self) -> str:
        raise NotImplementedError

    def seal(self, plaintext: bytes) -> bytes:
        raise NotImplementedError

    def check(self, body: bytes, expected: bytes) -> None:
        """Raises BenchError unless `body` opens to `expected`, signed by the partner key."""
        raise NotImplementedError


class JoseGoogle(Google):
    scheme = "jose"
    content_type = CONTENT_TYPES["jose"]

    def __init__(self, keys: RsaKeys) -> None:
        f = keys.files
        self.files = f
        self.envelope = JoseEnvelope(
            load_jose_keyset(jose_keyset("google", [("google-sig", f["google-sig"][0], "sig"),
                                                    ("google-enc", f["google-enc"][0], "enc")])),
            load_jose_keyset(jose_keyset("partner", [
                ("partner-sig", f["partner-sig"][1], "sig"),
                ("partner-enc", f["partner-enc"][1], "enc")])),
            JoseOptions(sign_alg="RS256", key_alg="RSA-OAEP-256", enc="A256GCM"),
            max_plaintext_bytes=4 << 20,
        )

    def keysets_yaml(self) -> str:
        f = self.files
        return f"""\
            keysets:
              partner:
                type: jose
                keys:
                  - {{id: partner-sig, file: "{f['partner-sig'][0]}", use: sig}}
                  - {{id: partner-enc, file: "{f['partner-enc'][0]}", use: enc}}
              google:
                type: jose
                keys:
                  - {{id: google-sig, file: "{f['google-sig'][1]}", use: sig}}
                  - {{id: google-enc, file: "{f['google-enc'][1]}", use: enc}}
            """

    def seal(self, plaintext: bytes) -> bytes:
        return bytes(self.envelope.seal(plaintext).body)

    def check(self, body: bytes, expected: bytes) -> None:
        try:
            opened = self.envelope.open(body)
        except Exception as exc:
            raise BenchError(f"a JOSE answer did not open: {type(exc).__name__}: {exc}") from None
        if opened.plaintext != expected or opened.verified_by != ("partner-sig",):
            raise BenchError(f"a JOSE answer opened to something else (verified by "
                             f"{opened.verified_by})")


class PgpGoogle(Google):
    """The gpg command line as Google, in its own GNUPGHOME."""

    scheme = "pgp"
    content_type = CONTENT_TYPES["pgp"]

    def __init__(self, directory: Path, bits: int, slots: int) -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            partner, google = pool.map(
                lambda name: make_pgp_key(directory, f"{name}-{bits}", bits),
                ["partner", "google"])
        self.partner_files, self.google_files = partner, google
        self.home = new_home(directory / f"G{bits}", google[0], partner[1])
        self.partner_fpr = primary_fingerprint(self.home, f"partner-{bits}@example.test")
        self.google_fpr = primary_fingerprint(self.home, f"google-{bits}@example.test")
        # The gpg ceiling's pipelines: the partner's side, one home (and agent) each.
        self.ceiling_homes = [new_home(directory / f"C{bits}-{i}", partner[0], google[1])
                              for i in range(slots)]
        self.homes = [self.home, *self.ceiling_homes]

    def keysets_yaml(self) -> str:
        return f"""\
            keysets:
              partner:
                type: pgp
                keys: [{{id: partner, file: "{self.partner_files[0]}"}}]
              google:
                type: pgp
                keys: [{{id: google, file: "{self.google_files[1]}"}}]
            """

    def seal(self, plaintext: bytes) -> bytes:
        sealed = gpg_ok(self.home, *PGP_SEAL, "--local-user", self.google_fpr,
                        "--recipient", self.partner_fpr, stdin=plaintext)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=")

    def check(self, body: bytes, expected: bytes) -> None:
        done = gpg(self.home, "--status-fd", "2", "--decrypt", stdin=unb64url(body))
        status = [line.split()[1:] for line in done.stderr.decode(errors="replace").splitlines()
                  if line.startswith("[GNUPG:] ")]
        words = {s[0] for s in status if s}
        signers = {s[10] if len(s) > 10 else s[1] for s in status if s and s[0] == "VALIDSIG"}
        if (done.returncode != 0 or not {"DECRYPTION_OKAY", "GOODMDC", "GOODSIG"} <= words
                or signers != {self.partner_fpr}):
            raise BenchError(f"a PGP answer did not open and verify with gpg: {sorted(words)}")
        if done.stdout != expected:
            raise BenchError("a PGP answer opened to something else than the partner's answer")

    def pipeline(self, slot: int, messages: list[bytes], answer: bytes,
                 ) -> Callable[[], object]:
        """One gpg ceiling round trip: gpg --decrypt (and verify) Google's request, then
        gpg --sign --encrypt the answer to Google; in this slot's own GNUPGHOME."""
        home = self.ceiling_homes[slot]
        state = {"next": slot}

        def round_trip() -> None:
            message = messages[state["next"] % len(messages)]
            state["next"] += 1
            opened = gpg(home, "--status-fd", "2", "--decrypt", stdin=message)
            if opened.returncode != 0 or b"GOODSIG" not in opened.stderr:
                raise BenchError("the gpg ceiling could not open a request")
            gpg_ok(home, *PGP_SEAL, "--local-user", self.partner_fpr,
                   "--recipient", self.google_fpr, stdin=answer)

        return round_trip


def gateway_config(google: Google, route_port: int, admin_port: int, partner: Partner,
                   runtime: Path, certs: tuple[Path, ...], workers: str,
                   pgp_engine: str | None = None, pin_workers: bool = False,
                   batch_scheduling: bool = False) -> str:
    _, cert, key = certs
    head = f"""\
        admin: {{listen: "127.0.0.1:{admin_port}"}}
        reload: {{interval_s: 0}}
        runtime_dir: "{runtime}"
        workers: {workers}
        pin_workers: {str(pin_workers).lower()}
        batch_scheduling: {str(batch_scheduling).lower()}
        """
    routes = f"""\
        routes:
          - name: in
            direction: inbound
            listen: "127.0.0.1:{route_port}"
            tls: {{cert: "{cert}", key: "{key}"}}
            upstream: {{url: "{partner.url}", timeout_s: 30}}
            own_keys: partner
            peer_keys: google
        """
    text = (textwrap.dedent(head) + textwrap.dedent(google.keysets_yaml())
            + textwrap.dedent(routes))
    if pgp_engine is not None and google.scheme == "pgp":
        text += f"    pgp: {{engine: {pgp_engine}}}\n"
    return text


def post(port: int, body: bytes, content_type: str, ca: Path) -> tuple[int, str, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
    try:
        connection.request("POST", PATH, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def loop_lag(admin_port: int) -> dict[float, float] | None:
    """Cumulative bucket counts of gateway_event_loop_lag_seconds (None when not exported)."""
    try:
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", admin_port,
                                                           timeout=10)) as connection:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
    except OSError:
        return None
    buckets: dict[float, float] = {}
    for match in re.finditer(
            r'^gateway_event_loop_lag_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$',
            text, re.MULTILINE):
        le = float(match[1])
        buckets[le] = buckets.get(le, 0.0) + float(match[2])  # summed over workers, if labelled
    return buckets or None


def lag_p99_ms(before: dict[float, float] | None, after: dict[float, float] | None) -> str:
    if before is None or after is None:
        return "n/a"
    delta = {le: after[le] - before.get(le, 0) for le in after}
    total = delta.get(math.inf, 0)
    if total <= 0:
        return "n/a"
    for le in sorted(delta):
        if delta[le] >= 0.99 * total:
            return "> 1 s" if math.isinf(le) else f"<= {le * 1000:g}"
    return "n/a"


# ---------------------------------------------------------------------------------------------
# One case: scheme x RSA size x body size.


@dataclass
class CaseResult:
    scheme: str
    bits: int
    size: str
    concurrency: int
    gateway: Load = field(default_factory=Load)
    gateway_c1: Load = field(default_factory=Load)
    partner: Load = field(default_factory=Load)
    partner_c1: Load = field(default_factory=Load)
    plain: Load = field(default_factory=Load)
    plain_c1: Load = field(default_factory=Load)
    reference: Load = field(default_factory=Load)  # JOSE: the issue's reference gateway
    # CPU seconds spent during the load slices, for CPU per round trip.
    gateway_cpu_s: float = 0.0  # its processes and threads, and the gpg it ran
    plain_cpu_s: float = 0.0
    floor_cpu_s: float = 0.0  # this process (the floor's threads; the rest of it is idle then)
    floor: Runs = field(default_factory=Runs)
    floor_1: Runs = field(default_factory=Runs)
    ceiling: Runs = field(default_factory=Runs)
    ceiling_1: Runs = field(default_factory=Runs)
    cpu: list[Cpu] = field(default_factory=list)
    rss_mib: float = 0.0
    lag: str = "n/a"
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return f"{self.scheme} {self.bits} {self.size}"

    def mean_cpu(self, name: str) -> float:
        return statistics.fmean(getattr(c, name) for c in self.cpu) if self.cpu else math.nan


@dataclass
class Options:
    concurrency: int
    seconds: float
    slices: int
    workers: str
    pool: int
    log_level: str
    profile: Path | None
    pgp_engine: str | None = None
    pin_workers: bool = False
    batch_scheduling: bool = False


def slice_seconds(total: float, slices: int, fraction: float = 1.0) -> int:
    """wrk takes whole seconds."""
    return max(1, round(total * fraction / slices))


def write_pool(directory: Path, bodies: Sequence[bytes]) -> Path:
    directory.mkdir(parents=True)
    for i, body in enumerate(bodies):
        (directory / f"{i}.body").write_bytes(body)
    return directory


def run_case(google: Google, rsa_keys: RsaKeys, size_kib: int, opts: Options, root: Path,
             certs: tuple[Path, ...], partner: Partner, plain: PlainProxy,
             stop: threading.Event, say: Callable[[str], None]) -> CaseResult:
    size = size_kib * 1024
    result = CaseResult(google.scheme, rsa_keys.bits, SIZES[size_kib], opts.concurrency)
    tag = f"{google.scheme}-{rsa_keys.bits}-{size_kib}"
    threads = cores()

    # The pool, sealed as Google would; the same plaintexts for the direct calls.
    plaintexts = [request_plaintext(i, size) for i in range(opts.pool)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sealed = list(pool.map(google.seal, plaintexts))
    sealed_dir = write_pool(root / f"pool-{tag}", sealed)
    plain_dir = write_pool(root / f"plain-{tag}", plaintexts)
    answer = answer_for(size)

    runtime = root / f"rt-{tag}"
    route_port, admin_port = free_port(), free_port()
    config = root / f"config-{tag}.yaml"
    config.write_text(gateway_config(google, route_port, admin_port, partner, runtime, certs,
                                     opts.workers, opts.pgp_engine, opts.pin_workers,
                                     opts.batch_scheduling))
    gateway = GatewayProcess(config, root / f"gateway-{tag}.log", runtime, opts.log_level,
                             opts.workers)
    own = contextlib.ExitStack()
    try:
        reference = None
        if google.scheme == "jose":
            reference = Reference(own, root / f"reference-{tag}.log", partner.url, certs,
                                  rsa_keys.files["partner-sig"][0].parent)
        listening = gateway.wait_listening()
        route_port = int(str(listening["routes"]["in"]).rsplit(":", 1)[1])
        # A sample of answers must open and verify with Google's keys before any load.
        for body in sealed[:4]:
            status, content_type, answer_body = post(route_port, body, google.content_type,
                                                     certs[0])
            if status != 200 or content_type != google.content_type:
                raise BenchError(f"{result.name}: the gateway answered {status} "
                                 f"{content_type!r}; see {gateway.log}")
            google.check(answer_body, answer)
        say(f"  {result.name}: a sample of {min(4, len(sealed))} answers opened and verified "
            f"with Google's keys")
        # The plain proxy forwards the sealed bytes as they are: the partner's answer is JSON of
        # the sealed body's size, about the size of the gateway's sealed answer.
        status, content_type, answer_body = post(plain.port, sealed[0], google.content_type,
                                                 certs[0])
        if (status, content_type, answer_body) != (200, PLAINTEXT_CONTENT_TYPE,
                                                   answer_for(len(sealed[0]))):
            raise BenchError(f"{result.name}: the plain proxy answered {status} "
                             f"{content_type!r}")

        if reference is not None:
            status, content_type, answer_body = post(reference.port, sealed[0],
                                                     google.content_type, certs[0])
            if status != 200 or content_type != google.content_type:
                raise BenchError(f"{result.name}: the reference answered {status} "
                                 f"{content_type!r}; see {root}/reference-{tag}.log")
            google.check(answer_body, answer)

        gateway_url = f"https://127.0.0.1:{route_port}"

        def gateway_load(connections: int, seconds: int) -> Load:
            return run_wrk(gateway_url, sealed_dir, len(sealed), google.content_type,
                           google.content_type, connections, seconds)

        def plain_load(connections: int, seconds: int) -> Load:
            return run_wrk(plain.url, sealed_dir, len(sealed), google.content_type,
                           PLAINTEXT_CONTENT_TYPE, connections, seconds)

        def reference_load(connections: int, seconds: int) -> Load:
            assert reference is not None
            return run_wrk(reference.url, sealed_dir, len(sealed), google.content_type,
                           google.content_type, connections, seconds)

        def partner_load(connections: int, seconds: int) -> Load:
            return run_wrk(partner.url, plain_dir, len(plaintexts), PLAINTEXT_CONTENT_TYPE,
                           PLAINTEXT_CONTENT_TYPE, connections, seconds)

        signer, recipient = rsa_keys.keys["partner-sig"], rsa_keys.keys["partner-enc"]
        request = plaintexts[0]

        def floor(_: int) -> Callable[[], object]:
            return floor_round_trip(signer, recipient, "PKCS1v15", request)

        messages = [unb64url(body) for body in sealed]
        pgp = google if isinstance(google, PgpGoogle) else None

        # Warm up: agents started, connections made, caches filled.
        gateway_load(opts.concurrency, 1)
        plain_load(opts.concurrency, 1)
        if reference is not None:
            reference_load(opts.concurrency, 1)
        in_threads(floor, threads, 0.3, stop)
        if pgp is not None:
            in_threads(lambda i: pgp.pipeline(i, messages, answer), threads, 0.5, stop)

        full = slice_seconds(opts.seconds, opts.slices)
        half = slice_seconds(opts.seconds, opts.slices, 0.5)
        lag_before = loop_lag(admin_port)
        for n in range(1, opts.slices + 1):
            before = gateway.cpu(partner)
            load = gateway_load(opts.concurrency, full)
            after = gateway.cpu(partner)
            result.gateway.add(load)
            result.cpu.append(cpu_percent(before, after, gateway.own_pids(), load.load_cpu))
            result.gateway_cpu_s += cpu_seconds(before, after)
            times = os.times()
            floor_slice = in_threads(floor, threads, full, stop)
            result.floor_cpu_s += sum(os.times()[:2]) - sum(times[:2])
            result.floor.add(floor_slice)
            ceiling = ""
            if pgp is not None:
                ceiling_slice = in_threads(lambda i: pgp.pipeline(i, messages, answer),
                                           threads, full, stop)
                result.ceiling.add(ceiling_slice)
                ceiling = f", gpg ceiling {ceiling_slice.per_second:.1f}"
            ticks = plain.cpu_ticks()
            plain_slice = plain_load(opts.concurrency, full)
            result.plain_cpu_s += (plain.cpu_ticks() - ticks) / CLK_TCK
            result.plain.add(plain_slice)
            refers = ""
            if reference is not None:
                reference_slice = reference_load(opts.concurrency, full)
                result.reference.add(reference_slice)
                refers = f", reference {reference_slice.per_second:.0f}"
            result.gateway_c1.add(gateway_load(1, half))
            result.plain_c1.add(plain_load(1, half))
            result.partner_c1.add(partner_load(1, half))
            result.partner.add(partner_load(opts.concurrency, half))
            result.floor_1.add(in_threads(floor, 1, half, stop))
            if pgp is not None:
                result.ceiling_1.add(in_threads(
                    lambda i: pgp.pipeline(i, messages, answer), 1, half, stop))
            say(f"  {result.name} slice {n}/{opts.slices}: gateway {load.per_second:.1f} rt/s "
                f"(CPU {result.cpu[-1].gateway:.0f}%), floor {floor_slice.per_second:.1f}{ceiling}"
                f", plain proxy {plain_slice.per_second:.0f}{refers}")
        result.lag = lag_p99_ms(lag_before, loop_lag(admin_port))
        result.rss_mib = gateway.peak_rss_mib()
        if opts.profile is not None:
            profile(gateway, opts, tag, lambda seconds: gateway_load(opts.concurrency, seconds),
                    say)
    finally:
        own.close()
        result.exit_code = gateway.stop()
        stop_agents(runtime)
    if result.exit_code not in (0, None):
        say(f"  {result.name}: the gateway exited with status {result.exit_code} "
            f"(log: {gateway.log})")
    return result


# ---------------------------------------------------------------------------------------------
# Profile (py-spy attached to the gateway under the same load, after the measured slices).


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile(gateway: GatewayProcess, opts: Options, tag: str,
            load: Callable[[int], Load], say: Callable[[str], None]) -> None:
    """Two windows under the case's load: py-spy sampling every thread (beside each thread's
    CPU from /proc), then py-spy sampling only the thread holding the GIL."""
    spy = py_spy()
    assert opts.profile is not None
    if spy is None:
        say("  --profile: py-spy is not installed (.venv/bin/pip install py-spy); skipped")
        return
    opts.profile.mkdir(parents=True, exist_ok=True)
    seconds = max(3, slice_seconds(opts.seconds, opts.slices))
    possible = seconds * PROFILE_HZ
    say(f"  profile: py-spy at {PROFILE_HZ} Hz for {seconds} s per window, under the same load "
        f"(concurrency {opts.concurrency}); figures in % of one core")
    for mode in ("threads", "gil"):
        out = opts.profile / f"{tag}.{mode}.txt"
        args = [spy, "record", "--pid", str(gateway.process.pid), "--duration", str(seconds),
                "--rate", str(PROFILE_HZ), "--threads", "--format", "raw", "--output", str(out)]
        if mode == "gil":
            args.append("--gil")
        if opts.workers != "1":
            args.append("--subprocesses")
        recorder = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(0.5)  # attached
            before = {t: n for pid in gateway.own_pids() for t, n in thread_ticks(pid).items()}
            started = time.perf_counter()
            load(seconds)
            wall = time.perf_counter() - started
            after = {t: n for pid in gateway.own_pids() for t, n in thread_ticks(pid).items()}
            _, err = recorder.communicate(timeout=seconds + 60)
        finally:
            if recorder.poll() is None:
                recorder.kill()
                recorder.wait()
        if recorder.returncode != 0 or not out.exists():
            say(f"  py-spy failed: {err.decode(errors='replace')[-400:]}")
            return
        stacks = parse_stacks(out.read_text())
        if mode == "threads":
            cpu = {t: 100 * (n - before.get(t, 0)) / CLK_TCK / wall for t, n in after.items()}
            lines = summarize_threads(stacks, possible, cpu)
        else:
            lines = summarize_gil(stacks, possible)
        say(f"    ({out})")
        for text in lines:
            say("    " + text)


PROFILE_HZ = 200
# The executor's wait for work (SimpleQueue.get): py-spy does not see it as idle.
_WAITING = re.compile(r"^_worker \(.*concurrent/futures/thread\.py:\d+\)$")
_THREAD = re.compile(r"^thread \((?:0x)?([0-9A-Fa-f]+)\)(?:: (.*))?$")


@dataclass
class Stacks:
    """py-spy raw output: (thread id, thread name, frames root first) -> samples."""

    samples: Counter[tuple[int, str, tuple[str, ...]]] = field(default_factory=Counter)

    def threads(self) -> dict[int, str]:
        return {tid: name for tid, name, _ in self.samples}


def parse_stacks(text: str) -> Stacks:
    stacks = Stacks()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        tid, name = 0, "?"
        if frames and (match := _THREAD.match(frames[0])):
            tid, name = int(match[1], 10 if match[1].isdigit() else 16), match[2] or "?"
            frames = frames[1:]
        if frames:
            stacks.samples[tid, name, tuple(frames)] += int(count)
    return stacks


def _function(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)' so that lines of one function merge."""
    match = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    parts = Path(path).parts
    for anchor in ("site-packages", "gateway", "asyncio", "concurrent"):
        if anchor in parts:
            path = "/".join(parts[parts.index(anchor) + (anchor == "site-packages"):])
            break
    else:
        path = Path(path).name
    return f"{name} ({path})"


def _group(name: str) -> str:
    if name == "MainThread":
        return "event loop (MainThread)"
    if name.startswith(("crypto", "gpg")):
        return "crypto executor threads"
    return "other threads"


def summarize_threads(stacks: Stacks, possible: int, cpu: dict[int, float],
                      top: int = 10) -> list[str]:
    names = stacks.threads()
    lines = ["CPU by thread (/proc): " + ", ".join(
        f"{names.get(t, f'thread {t}')} {pct:.0f}%"
        for t, pct in sorted(cpu.items(), key=lambda item: -item[1]) if pct >= 1)
        + f"; all {sum(cpu.values()):.0f}%"]
    groups: dict[str, Counter[str]] = {}
    waiting = 0
    gateway_total: Counter[str] = Counter()
    for (_, name, frames), count in stacks.samples.items():
        if _WAITING.match(frames[-1]):
            waiting += count
            continue
        leaf = _function(frames[-1])
        if leaf.startswith("Runner.run ("):
            leaf = "(inside uvloop: socket I/O, callbacks, waiting in epoll)"
        groups.setdefault(_group(name), Counter())[leaf] += count
        for function in {_function(f) for f in frames
                         if "gateway/" in f and "gateway/__main__.py" not in f}:
            gateway_total[function] += count
    lines.append("py-spy, every thread not idle, by own samples (leaf function), % of one core "
                 f"(executor threads waiting for work left out: {100 * waiting / possible:.0f}%):")
    for group, counter in sorted(groups.items()):
        lines.append(f"  {group}: {100 * sum(counter.values()) / possible:.0f}%")
        lines += [f"    {100 * c / possible:5.1f}%  {f}" for f, c in counter.most_common(top)]
    lines.append("gateway functions by total samples (with what they call), % of one core:")
    lines += [f"    {100 * c / possible:5.1f}%  {f}" for f, c in gateway_total.most_common(top)]
    return lines


def summarize_gil(stacks: Stacks, possible: int, top: int = 15) -> list[str]:
    own: Counter[str] = Counter()
    by_group: Counter[str] = Counter()
    for (_, name, frames), count in stacks.samples.items():
        own[_function(frames[-1])] += count
        by_group[_group(name)] += count
    held = sum(own.values())
    return [
        f"py-spy --gil (only the thread holding the GIL): the GIL is held "
        f"{100 * held / possible:.0f}% of the time; by "
        + ", ".join(f"{g} {100 * c / possible:.0f}%" for g, c in by_group.most_common()),
        "  top functions holding the GIL (own samples, % of wall time):",
        *(f"    {100 * c / possible:5.1f}%  {f}" for f, c in own.most_common(top)),
    ]


# ---------------------------------------------------------------------------------------------
# Report


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN (printed "-") when there is no denominator."""
    return numerator / denominator if denominator else math.nan


def fmt(value: float, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def report(results: list[CaseResult], opts: Options) -> list[str]:
    n = cores()
    c = opts.concurrency
    out = [
        f"Gateway under load: wrk (1 thread) with {c} connections over TLS replaying pre-sealed "
        "requests; rt/s counts only 2xx answers with the scheme's content type; latency from "
        "wrk's histogram of every answer; RSS = peak (VmHWM) of the gateway's processes; lag = "
        "gateway_event_loop_lag_seconds p99 bucket over the load slices.",
        "",
        f"{'case':<18}{'rt/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'p99/p50':>8}"
        f"{'non-2xx':>8}{'RSS MiB':>8}{'lag p99 ms':>11}",
    ]
    for r in results:
        g = r.gateway
        p50, p99 = g.percentile_ms(50), g.percentile_ms(99)
        bad = g.bad + sum(g.errors.values())
        out.append(
            f"{r.name:<18}{fmt(g.per_second):>8}{fmt(p50):>9}{fmt(g.percentile_ms(90)):>9}"
            f"{fmt(p99):>9}{fmt(ratio(p99, p50), '.2f'):>8}{bad:>8}"
            f"{fmt(r.rss_mib, '.0f'):>8}{r.lag:>11}")
    out += [
        "",
        "CPU during the load slices, in % of one core (/proc): gateway = all its processes and "
        "threads; loop = its (busiest) event-loop thread; gpg = the gpg processes and agents it "
        f"ran; machine = all {n} CPUs busy, anyone's work (100 = all); steal = taken by the "
        "hypervisor.",
        "",
        f"{'case':<18}{'gateway':>8}{'loop':>6}{'gpg':>6}{'wrk':>6}{'partner':>8}"
        f"{'machine':>9}{'steal':>7}",
    ]
    for r in results:
        out.append(
            f"{r.name:<18}{fmt(r.mean_cpu('gateway'), '.0f'):>8}{fmt(r.mean_cpu('loop'), '.0f'):>6}"
            f"{fmt(r.mean_cpu('gpg'), '.0f') if r.scheme == 'pgp' else '-':>6}"
            f"{fmt(r.mean_cpu('load'), '.0f'):>6}{fmt(r.mean_cpu('partner'), '.0f'):>8}"
            f"{fmt(r.mean_cpu('machine'), '.0f'):>9}{fmt(r.mean_cpu('steal'), '.0f'):>7}")
    out += [
        "",
        f"Baselines, same run, alternating with the load: floor = `cryptography` in {n} "
        f"threads (RSA-OAEP unwrap + AES-GCM + verify + sign + AES-GCM + RSA-OAEP wrap); gpg "
        f"ceiling = {n} independent gpg --decrypt + gpg --sign --encrypt pipelines, own "
        f"GNUPGHOME each; partner = wrk straight at the stand-in partner, plain HTTP, "
        f"{c} connections.",
        "",
        f"{'case':<18}{'gateway':>9}{'floor':>9}{'gw/floor':>9}{'gpg ceil':>9}{'gw/gpg':>8}"
        f"{'partner':>10}{'gw/partner':>11}",
    ]
    for r in results:
        gw = r.gateway.per_second
        pgp = r.scheme == "pgp"
        out.append(
            f"{r.name:<18}{fmt(gw):>9}{fmt(r.floor.per_second):>9}"
            f"{fmt(ratio(gw, r.floor.per_second), '.2f'):>9}"
            f"{fmt(r.ceiling.per_second) if pgp else '-':>9}"
            f"{fmt(gw / r.ceiling.per_second, '.2f') if pgp and r.ceiling.per_second else '-':>8}"
            f"{fmt(r.partner.per_second, '.0f'):>10}"
            f"{fmt(ratio(gw, r.partner.per_second), '.3f'):>11}")
    out += [
        "",
        "The plain-proxy bound: plain = wrk at the plain proxy (the gateway's stack: uvloop, "
        "aiohttp server and client, the same TLS context, as many processes as workers; no "
        "crypto, no log, no metrics) forwarding the same sealed bodies to the partner; bound = "
        "1 / (1/plain + 1/floor), the rt/s of a gateway on this stack whose own work costs "
        "nothing beyond the floor's crypto; c1 added = plain-proxy p50 - partner-direct p50 at "
        "concurrency 1.",
        "",
        f"{'case':<18}{'plain':>9}{'bound':>9}{'bound/floor':>12}{'gw/bound':>9}"
        f"{'gw/plain':>9}{'plain c1 added':>15}",
    ]
    for r in results:
        gw, pl, fl = r.gateway.per_second, r.plain.per_second, r.floor.per_second
        bound = 1 / (1 / pl + 1 / fl) if pl and fl else math.nan
        c1 = r.plain_c1.percentile_ms(50) - r.partner_c1.percentile_ms(50)
        out.append(
            f"{r.name:<18}{fmt(pl, '.0f'):>9}{fmt(bound, '.0f'):>9}"
            f"{fmt(ratio(bound, fl), '.2f'):>12}"
            f"{fmt(gw / bound, '.2f'):>9}{fmt(ratio(gw, pl), '.2f'):>9}"
            f"{fmt(c1, '.2f'):>15}")
    jose = [r for r in results if r.scheme == "jose"]
    if jose:
        out += [
            "",
            "The issue's reference (JOSE): ref = wrk at a straightforward single-process aiohttp "
            "+ jwcrypto gateway (crypto on its event loop, jwcrypto's JWS/JWE objects; the same "
            "stack, TLS and wire profile), the design issue 7 measured at ~0.63 (RSA-3072) and "
            "~0.31 (RSA-2048) of the floor at 1 KiB on its machine when it set 0.8 and 0.5; "
            "ref-scaled target = the issue's target / ref on its machine x ref/floor here, the "
            "same gain over the reference on this machine (1 KiB only).",
            "",
            f"{'case':<18}{'gateway':>9}{'ref':>9}{'ref/floor':>10}{'gw/ref':>8}"
            f"{'gw/floor':>9}{'ref-scaled target':>18}",
        ]
        for r in jose:
            gw, ref, fl = r.gateway.per_second, r.reference.per_second, r.floor.per_second
            scaled = "-"
            if r.size == SIZES[1] and r.bits in ISSUE_REFERENCE and fl:
                target, measured = ISSUE_REFERENCE[r.bits]
                scaled = fmt(target / measured * ref / fl, ".2f")
            out.append(
                f"{r.name:<18}{fmt(gw):>9}{fmt(ref):>9}"
                f"{fmt(ratio(ref, fl), '.2f'):>10}"
                f"{fmt(ratio(gw, ref), '.2f'):>8}"
                f"{fmt(ratio(gw, fl), '.2f'):>9}{scaled:>18}")
    out += [
        "",
        "CPU per round trip in ms over the load slices (/proc ticks; the floor from this "
        "process's os.times()): gateway = its processes, threads, gpg and agents; own = gateway "
        "- plain - floor, the gateway's work beyond forwarding on this stack and the raw crypto "
        "(for PGP the floor is cryptography's, not gpg's).",
        "",
        f"{'case':<18}{'gateway':>9}{'plain':>9}{'floor':>9}{'own':>9}",
    ]
    for r in results:
        per = [cpu / n * 1000 if n else math.nan for cpu, n in (
            (r.gateway_cpu_s, r.gateway.good + r.gateway.bad), (r.plain_cpu_s, r.plain.good),
            (r.floor_cpu_s, r.floor.count))]
        out.append(f"{r.name:<18}" + "".join(f"{fmt(v, '.3f'):>9}" for v in per)
                   + f"{fmt(per[0] - per[1] - per[2], '.3f'):>9}")
    out += [
        "",
        "Concurrency 1 (medians): added = gateway p50 - partner-direct p50 (TLS to the gateway, "
        "plain HTTP to the partner); budget = floor round trip + 1 ms.",
        "",
        f"{'case':<18}{'gateway':>9}{'partner':>9}{'added':>8}{'floor rt':>10}{'budget':>8}"
        f"{'added/budget':>13}{'gpg rt':>8}",
    ]
    for r in results:
        added = r.gateway_c1.percentile_ms(50) - r.partner_c1.percentile_ms(50)
        budget = r.floor_1.median_ms + 1
        out.append(
            f"{r.name:<18}{fmt(r.gateway_c1.percentile_ms(50), '.2f'):>9}"
            f"{fmt(r.partner_c1.percentile_ms(50), '.2f'):>9}{fmt(added, '.2f'):>8}"
            f"{fmt(r.floor_1.median_ms, '.2f'):>10}{fmt(budget, '.2f'):>8}"
            f"{fmt(added / budget, '.2f'):>13}"
            f"{fmt(r.ceiling_1.median_ms, '.1f') if r.scheme == 'pgp' else '-':>8}")
    notes = []
    for r in results:
        for load, whose in ((r.gateway, ""), (r.reference, "the reference's answers ")):
            if kinds := load.uncounted():
                notes.append(f"{r.name}: {whose}not counted: {kinds}")
        if r.exit_code not in (0, None):
            notes.append(f"{r.name}: the gateway exited with status {r.exit_code}")
    if notes:
        out += ["", *notes]
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_partner"]:
        return serve_partner()
    if argv[:1] == ["_plain_proxy"] and len(argv) == 6:
        return serve_plain_proxy(int(argv[1]), argv[2], argv[3], argv[4], argv[5])
    if argv[:1] == ["_reference"] and len(argv) == 6:
        return serve_reference(int(argv[1]), argv[2], argv[3], argv[4], argv[5])
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Every figure comes from one run; see bench/README.md for what each means.")
    parser.add_argument("--quick", action="store_true",
                        help="RSA-2048, 1 KiB, 3 s per measurement (both schemes unless "
                             "--scheme): ~1 min")
    parser.add_argument("--scheme", nargs="+", choices=["pgp", "jose"], default=["pgp", "jose"])
    parser.add_argument("--bits", nargs="+", type=int, choices=[2048, 3072],
                        default=[2048, 3072])
    parser.add_argument("--size", nargs="+", type=int, choices=sorted(SIZES), default=[1, 64],
                        help="plaintext sizes in KiB (request and answer)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="wrk connections for the load (default 32)")
    parser.add_argument("--seconds", type=float, default=10,
                        help="load time per case, split into the slices; each baseline gets "
                             "as much, the concurrency-1 and direct runs half (default 10)")
    parser.add_argument("--slices", type=int, default=3,
                        help="load and baselines alternate this many times (default 3)")
    parser.add_argument("--workers", default="1",
                        help="the gateway's `workers` (an integer or auto; default 1)")
    parser.add_argument("--pin-workers", action="store_true",
                        help="the gateway's `pin_workers: true` (each worker on one CPU); the "
                             "plain proxy's processes are pinned alike")
    parser.add_argument("--batch-scheduling", action="store_true",
                        help="the gateway's `batch_scheduling: true` (its serving processes "
                             "under SCHED_BATCH)")
    parser.add_argument("--pool", type=int, default=32, help="pre-sealed requests per case")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the gateway's log level (default info: a line per request)")
    parser.add_argument("--pgp-engine", choices=["gnupg", "native"],
                        help="the PGP route's pgp.engine (default: not set, the gateway's own "
                             "default)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after each case's slices, attach py-spy to the gateway under the "
                             "same load and summarize where its CPU goes (raw stacks in DIR)")
    args = parser.parse_args(argv)
    if args.quick:
        args.bits, args.size = [2048], [1]
        if args.seconds == parser.get_default("seconds"):
            args.seconds = 3
    if args.workers != "auto" and not (args.workers.isdigit() and int(args.workers) >= 1):
        parser.error("--workers: an integer >= 1 or auto")
    if args.concurrency < 1 or args.slices < 1 or args.pool < 1 or args.seconds <= 0:
        parser.error("--concurrency, --slices, --pool and --seconds must be positive")
    if wrk_path() is None:
        print("error: wrk is not installed. On Debian: apt-get update && apt-get install -y wrk",
              file=sys.stderr)
        return 1
    if "pgp" in args.scheme and shutil.which("gpg") is None:
        print("error: gpg is not installed (needed for --scheme pgp)", file=sys.stderr)
        return 1
    opts = Options(args.concurrency, args.seconds, args.slices, args.workers, args.pool,
                   args.log_level, args.profile, args.pgp_engine, args.pin_workers,
                   args.batch_scheduling)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return bench(args, opts)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def say(text: str) -> None:
    print(text, flush=True)


def bench(args: argparse.Namespace, opts: Options) -> int:
    started = time.perf_counter()
    gpg_version = subprocess.run(["gpg", "--version"], capture_output=True, text=True,
                                 check=False).stdout.split("\n", 1)[0] \
        if shutil.which("gpg") else "no gpg"
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True,
                                 check=False).stdout.split("\n", 1)[0]
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    say(f"Python {platform.python_version()}, cryptography {version('cryptography')}, "
        f"jwcrypto {version('jwcrypto')}, aiohttp {version('aiohttp')}, {loop}; {gpg_version}; "
        f"{wrk_version.split(' Copyright')[0]}")
    say(f"{cores()} usable CPUs ({platform.machine()}), load average "
        f"{os.getloadavg()[0]:.2f} at start; the load generator, the partner and the gateway "
        "share them")
    engine = f", pgp.engine: {opts.pgp_engine}" if opts.pgp_engine else ""
    pin = ", pinned" if opts.pin_workers else ""
    pin += ", SCHED_BATCH" if opts.batch_scheduling else ""
    say(f"concurrency {opts.concurrency}, {opts.seconds:g} s of load per case in {opts.slices} "
        f"slices, workers: {opts.workers}{pin}{engine}, log level {opts.log_level}")
    say("")
    stop = threading.Event()
    results: list[CaseResult] = []
    root = Path(tempfile.mkdtemp(prefix="gwl-", dir="/tmp"))
    root.chmod(0o700)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, True)
        cleanup.callback(kill_leftovers, root)
        cleanup.callback(stop_agents, root)
        cleanup.callback(stop.set)
        certs = write_sandbox_certificates(root)
        partner = Partner(cleanup, root / "partner.log")
        plain = PlainProxy(cleanup, root / "plain-proxy.log",
                           cores() if opts.workers == "auto" else int(opts.workers),
                           partner.url, certs, opts.pin_workers)
        for bits in args.bits:
            say(f"RSA-{bits}: making keys")
            rsa_keys = make_rsa_keys(root, bits)
            sides: list[Google] = []
            for scheme in args.scheme:
                if scheme == "pgp":
                    pgp_side = PgpGoogle(root, bits, cores())
                    cleanup.callback(_kill_agents, pgp_side.homes)
                    sides.append(pgp_side)
                else:
                    sides.append(JoseGoogle(rsa_keys))
            for google in sides:
                for size in args.size:
                    results.append(run_case(google, rsa_keys, size, opts, root, certs, partner,
                                            plain, stop, say))
    say("")
    for line in report(results, opts):
        say(line)
    say("")
    say(f"{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.2f} "
        "at the end")
    return 0


def _kill_agents(homes: list[Path]) -> None:
    for home in homes:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=30, check=False)


def kill_leftovers(root: Path) -> None:
    """Whatever still names our temporary directory (an agent of a killed gateway, say)."""
    for pid in processes_naming(root):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
