"""Several worker processes: the supervisor resolves the listeners' ports, starts the workers,
serves the admin endpoints with their metrics summed, validates reloads and drains them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway import hangup
from gateway.admin import (
    build_admin_app,
    describe_keys,
    status_document,
    warn_about_keys,
    warn_daily,
)
from gateway.affinity import planned_cpus
from gateway.config import Config
from gateway.logs import pinned_level
from gateway.metrics import Metrics
from gateway.mirror import Mirror, load_mirrored
from gateway.reload import Reloader
from gateway.scheduling import check_batch
from gateway.snapshot import (
    Current,
    Snapshot,
    build_snapshot,
    prepare_runtime_dir,
    remove_runtime_dir,
)

log = logging.getLogger("gateway.supervisor")
RESTART_DELAY_S = 1.0


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process gets from its supervisor (environment variable GATEWAY_WORKER)."""

    index: int
    ports: dict[str, int]
    ready_file: Path
    config_pointer: Path  # the supervisor's mirror of the configuration in service
    cpu: int | None = None  # pin_workers: the one CPU this worker runs on
    # batch_scheduling as the supervisor started: a worker restarted after a reload that
    # changed it (which needs a restart) must not differ from its siblings.
    batch: bool = False

    def load_config(self, path: Path) -> Config:
        """`path`, the operator's config file, as the supervisor validated it (mirror.py)."""
        return load_mirrored(self.config_pointer, path)

    @classmethod
    def from_environment(cls) -> WorkerRole | None:
        text = os.environ.get("GATEWAY_WORKER")
        if not text:
            return None
        data = json.loads(text)
        cpu = data.get("cpu")
        return cls(int(data["index"]), {k: int(v) for k, v in data["ports"].items()},
                   Path(data["ready_file"]), Path(data["config_pointer"]),
                   None if cpu is None else int(cpu), data.get("batch") is True)

    def to_environment(self) -> str:
        return json.dumps({"index": self.index, "ports": self.ports,
                           "ready_file": str(self.ready_file),
                           "config_pointer": str(self.config_pointer), "cpu": self.cpu,
                           "batch": self.batch})


class Supervisor:
    def __init__(self, config: Config, workdir: Path,
                 cpus: tuple[int, ...] | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.cpus = cpus  # pin_workers: each worker's CPU, by index
        self.batch = config.batch_scheduling  # fixed until a restart, as the CPUs are
        self.metrics_dir = workdir / "metrics"
        self.metrics_dir.mkdir(mode=0o700)
        self.metrics = Metrics(role="supervisor")
        self.metrics.aggregate(str(self.metrics_dir))
        # Workers load the copy in service, never the operator's files (mirror.py).
        self.mirror = Mirror(workdir / "config")
        config = self.config = self.mirror.load(config.path)
        snapshot = build_snapshot(config, 1, workdir, slots=0)
        self.mirror.publish(config, snapshot.generation)
        self.current = Current(snapshot, lambda old: None)
        self.reloader = Reloader(config.path, self.current,
                                 self._build,
                                 self.metrics, on_swap=self._swapped, load=self.mirror.load)
        # The workers leave describing the configuration (gauges, expiry warnings) to us; the
        # generation gauge follows what every worker has applied (track_generation).
        describe_keys(self.metrics, snapshot, generation=False)
        warn_about_keys(snapshot)
        self.draining = False
        self.ports: dict[str, int] = {}
        self._reserved: list[socket.socket] = []
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self.states: list[dict[str, int | None]] = []  # worker_states(), every 0.2 s
        self._owed: set[int] = set()  # pids of workers that missed a reload while starting

    def reserve_ports(self) -> None:
        """Bind (without listening) each route's address with SO_REUSEPORT: port 0 becomes one
        concrete port that every worker then binds and listens on."""
        for route in self.config.routes:
            family = socket.AF_INET6 if ":" in route.listen.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((route.listen.host, route.listen.port))
            self._reserved.append(sock)
            self.ports[route.name] = sock.getsockname()[1]

    def _ready_file(self, index: int) -> Path:
        return self.workdir / f"ready-{index}"

    async def start_worker(self, index: int) -> None:
        self._ready_file(index).unlink(missing_ok=True)
        role = WorkerRole(index, self.ports, self._ready_file(index), self.mirror.pointer,
                          None if self.cpus is None else self.cpus[index], self.batch)
        env = {**os.environ, "GATEWAY_WORKER": role.to_environment(),
               "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        level = pinned_level()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(self.config.path),
            *(("--log-level", level) if level else ()), env=env)
        self.workers[index] = process
        task = asyncio.get_running_loop().create_task(self._watch(index, process))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, index: int, process: asyncio.subprocess.Process) -> None:
        waiting = asyncio.ensure_future(process.wait())
        while not waiting.done() and not self._ready_file(index).exists():
            await asyncio.wait([waiting], timeout=0.05)
        if process.pid in self._owed and not waiting.done():
            process.send_signal(signal.SIGHUP)
        self._owed.discard(process.pid)
        code = await waiting
        if self.draining:
            return
        log.error("worker exited; starting a new one",
                  extra={"fields": {"worker": index, "pid": process.pid, "exit": code}})
        await asyncio.sleep(RESTART_DELAY_S)
        if not self.draining:
            await self.start_worker(index)

    def worker_states(self) -> list[dict[str, int | None]]:
        """Each live worker's index, pid, the generation it serves (None until it listens), from
        the ready file it rewrites after each reload it applied, and its CPU (None: unpinned)."""
        states: list[dict[str, int | None]] = []
        for index, process in sorted(self.workers.items()):
            if process.returncode is not None:
                continue
            generation = None
            with contextlib.suppress(OSError, ValueError):
                generation = int(self._ready_file(index).read_text().split()[1])
            states.append({"index": index, "pid": process.pid, "generation": generation,
                           "cpu": None if self.cpus is None else self.cpus[index]})
        return states

    def refresh_generation(self) -> None:
        """gateway_config_generation: the oldest generation a live worker serves (a reload
        counts once every worker has applied it, not when the supervisor has checked it)."""
        self.states = self.worker_states()  # what /status shows, read off the loop
        served = [s["generation"] for s in self.states]
        if served and None not in served:
            self.metrics.config_generation.set(min(g for g in served if g is not None))

    async def track_generation(self, period: float = 0.2) -> None:
        while True:
            await asyncio.to_thread(self.refresh_generation)  # reads files: off the loop
            await asyncio.sleep(period)

    def not_ready(self) -> str | None:
        if self.draining:
            return "draining"
        ready = all(self._ready_file(i).exists() for i in self.workers)
        return None if ready and self.workers else "starting"

    def _build(self, config: Config, generation: int) -> Snapshot:
        """Validate a reload's configuration (in the reloader's thread) and publish its copy
        to the workers: file work, off the event loop. The swap follows at once; the workers
        are signalled after it."""
        snapshot = build_snapshot(config, generation, self.workdir, slots=0)
        self.mirror.publish(config, generation)
        return snapshot

    def _swapped(self, snapshot: Snapshot) -> None:
        describe_keys(self.metrics, snapshot, generation=False)
        warn_about_keys(snapshot)
        for index, process in self.workers.items():
            if process.returncode is not None:
                continue
            if self._ready_file(index).exists():
                process.send_signal(signal.SIGHUP)
            else:
                # Still starting: it may not handle SIGHUP yet. Signalled once it is ready
                # (it may have loaded this configuration already: one reload too many).
                self._owed.add(process.pid)

    async def drain(self) -> int:
        """/readyz 503 at once, drain_delay_s while workers still serve, then SIGTERM to every
        worker (each finishes its requests within shutdown_timeout_s). 1 if any was cut off."""
        self.draining = True
        config = self.current.snapshot.config
        log.info("draining", extra={"fields": {"drain_delay_s": config.drain_delay_s,
                                               "workers": len(self.workers)}})
        await asyncio.sleep(config.drain_delay_s)
        # A worker already dead (a replacement not yet started) was logged when it died: the
        # exit status tells whether the drain cut anything off.
        alive = [process for process in self.workers.values() if process.returncode is None]
        for process in alive:
            process.send_signal(signal.SIGTERM)
        codes = []
        for process in alive:
            try:
                async with asyncio.timeout(config.shutdown_timeout_s + 10):
                    codes.append(await process.wait())
            except TimeoutError:
                process.kill()
                codes.append(await process.wait())
        for sock in self._reserved:
            sock.close()
        return 0 if all(code == 0 for code in codes) else 1


async def supervise(config: Config) -> int:
    """`run` with workers > 1: serve until SIGTERM/SIGINT through `config.workers` processes."""
    cpus = planned_cpus(config)  # refused before anything is made
    check_batch(config)
    workdir = prepare_runtime_dir(config.runtime_dir)
    supervisor = await asyncio.to_thread(Supervisor, config, workdir, cpus)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task[object]] = {loop.create_task(supervisor.reloader.poll_forever()),
                                        loop.create_task(warn_daily(supervisor.current)),
                                        loop.create_task(supervisor.track_generation())}
    loop.add_signal_handler(
        signal.SIGHUP, lambda: tasks.add(loop.create_task(supervisor.reloader.reload("sighup"))))
    if hangup.take():  # one came while starting
        tasks.add(loop.create_task(supervisor.reloader.reload("sighup")))
    admin = web.AppRunner(build_admin_app(supervisor.not_ready, supervisor.metrics,
                                          lambda: status_document(supervisor.current.snapshot,
                                                                  supervisor.reloader,
                                                                  supervisor.draining,
                                                                  supervisor.states)),
                          handle_signals=False, access_log=None)
    await admin.setup()
    site = web.TCPSite(admin, config.admin_listen.host, config.admin_listen.port)
    await site.start()
    admin_port = getattr(site._server, "sockets", [])[0].getsockname()[1]
    supervisor.reserve_ports()
    for index in range(config.workers):
        await supervisor.start_worker(index)
    while supervisor.not_ready() is not None and not stop.is_set():
        await asyncio.sleep(0.05)
    await asyncio.to_thread(supervisor.refresh_generation)
    log.info("listening", extra={"fields": {
        "routes": {n: f"{r.listen.host}:{supervisor.ports[n]}"
                   for n, r in ((r.name, r) for r in config.routes)},
        "admin": f"{config.admin_listen.host}:{admin_port}", "workers": config.workers,
        "generation": supervisor.current.snapshot.generation}})
    await stop.wait()
    code = await supervisor.drain()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    loop.remove_signal_handler(signal.SIGHUP)
    hangup.ignore()
    await admin.cleanup()
    supervisor.current.close()
    remove_runtime_dir(workdir)
    return code
