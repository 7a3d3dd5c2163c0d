"""Wires the listeners, the admin app and the lifecycle: start, drain on SIGTERM, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import ssl
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.admin import build_admin_app, describe_keys, status_document
from gateway.config import Config, load_config, usable_cores
from gateway.keys import expiring
from gateway.metrics import Metrics
from gateway.proxy import Inflight, Proxy
from gateway.reload import Reloader
from gateway.snapshot import Current, Snapshot, build_snapshot, prepare_runtime_dir
from gateway.supervisor import WorkerRole, supervise

log = logging.getLogger("gateway.app")


@dataclass(frozen=True)
class Bound:
    host: str
    port: int


class Gateway:
    """One process's gateway: a listener per route plus the admin listener."""

    def __init__(self, snapshot: Snapshot, workdir: Path, metrics: Metrics,
                 slots: int = 1, worker: WorkerRole | None = None) -> None:
        self.worker = worker
        self.workdir = workdir
        self.metrics = metrics
        # One crypto thread per slot: RSA in `cryptography` and gpg subprocesses run outside
        # the GIL, so slots = cores keeps every core busy without oversubscribing it.
        self.slots = slots
        self.executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="crypto")
        self.current = Current(snapshot, self._retire)
        self.inflight = Inflight()
        self.draining = False
        self.ready = False
        self.routes: dict[str, Bound] = {}
        self.admin: Bound | None = None
        self._runners: dict[str, web.AppRunner] = {}
        self._admin_runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._watching = False
        self.reloader = Reloader(
            snapshot.config.path, self.current,
            lambda config, generation: build_snapshot(config, generation, workdir, slots),
            metrics, on_swap=self._describe)
        self._describe(snapshot)

    async def reload(self, trigger: str = "api") -> bool:
        """Reload the configuration file now (what SIGHUP does)."""
        return await self.reloader.reload(trigger)

    def watch(self) -> None:
        """Poll the configuration's files and reload on SIGHUP, until close(). A worker only
        reloads on SIGHUP: its supervisor polls, validates and signals every worker."""
        self._watching = True
        if self.worker is None:
            self._spawn(self.reloader.poll_forever())
            self._spawn(self._warn_daily())
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: self._spawn(self.reloader.reload("sighup")))

    def _spawn(self, coroutine: Coroutine[object, object, object]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Bind every listener (port 0 picks a free port; see `routes` and `admin`)."""
        config = self.current.snapshot.config
        limits = config.limits
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        if self.worker is None:
            admin_app = build_admin_app(self._not_ready, self.metrics, lambda: status_document(
                self.current.snapshot, self.reloader, self.draining))
            self._admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
            await self._admin_runner.setup()
            admin_site = web.TCPSite(self._admin_runner, config.admin_listen.host,
                                     config.admin_listen.port)
            await admin_site.start()
            self.admin = _bound(admin_site)
        for name, route in self.current.snapshot.routes.items():
            proxy = Proxy(name, self.current, self._session, self.executor, self.metrics,
                          self.inflight, draining=lambda: self.draining)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", proxy.handle)
            runner = web.AppRunner(
                app, handle_signals=False, access_log=None,
                keepalive_timeout=limits.idle_timeout_s,
                max_field_size=limits.max_header_bytes,
                max_line_size=limits.max_header_bytes,
                max_headers=limits.max_headers,
                shutdown_timeout=config.shutdown_timeout_s,
            )
            await runner.setup()
            assert runner.server is not None
            ConnectionGuard(name, runner.server, self.current, self.metrics).install()
            if route.server_ssl is not None:
                # The listener keeps its first context; each handshake switches to the
                # certificate of the configuration in service (hot certificate rotation).
                route.server_ssl.sni_callback = self._certificate_picker(name)
            port = route.config.listen.port if self.worker is None else self.worker.ports[name]
            # Workers bind the same ports (the supervisor resolved port 0) and the kernel
            # spreads connections among them.
            site = web.TCPSite(runner, route.config.listen.host, port,
                               ssl_context=route.server_ssl, backlog=1024,
                               reuse_port=self.worker is not None)
            await site.start()
            self._runners[name] = runner
            self.routes[name] = _bound(site)
        self._spawn(self._measure_loop_lag())
        self.ready = True
        fields: dict[str, object] = {
            "routes": {n: f"{b.host}:{b.port}" for n, b in self.routes.items()},
            "generation": self.current.snapshot.generation}
        if self.admin is not None:
            fields["admin"] = f"{self.admin.host}:{self.admin.port}"
        if self.worker is not None:
            fields["worker"] = self.worker.index
            self.worker.ready_file.write_text(str(os.getpid()))
        log.info("listening", extra={"fields": fields})

    async def drain(self) -> int:
        """The sidecar order: /readyz 503 at once, wait drain_delay_s while still serving, stop
        accepting, let in-flight requests finish until shutdown_timeout_s. 0 if all finished."""
        config = self.current.snapshot.config
        self.draining = True
        # A worker's supervisor has already waited drain_delay_s while /readyz said 503.
        delay = config.drain_delay_s if self.worker is None else 0.0
        log.info("draining", extra={"fields": {"drain_delay_s": delay}})
        await asyncio.sleep(delay)
        for runner in self._runners.values():
            for site in list(runner.sites):
                await site.stop()
        try:
            async with asyncio.timeout(config.shutdown_timeout_s):
                await self.inflight.wait_idle()
            code = 0
        except TimeoutError:
            log.error("shutdown timeout cut requests off",
                      extra={"fields": {"in_flight": self.inflight.count}})
            code = 1
        await self.close()
        return code

    async def close(self) -> None:
        """Close every listener, the upstream session, the executor and the GnuPG homes."""
        if self._watching:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        self.current.close()
        await asyncio.gather(*self._closing)
        self.executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def _measure_loop_lag(self, period: float = 0.25) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(period)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - started - period))

    async def _warn_daily(self) -> None:
        while True:
            await asyncio.sleep(86400)
            warn_expiring(self.current.snapshot)

    def _retire(self, snapshot: Snapshot) -> None:
        # Closing stops gpg-agents (subprocesses): off the event loop.
        future = asyncio.get_running_loop().run_in_executor(None, snapshot.close)
        self._closing.add(future)
        future.add_done_callback(self._closing.discard)

    def _certificate_picker(
        self, name: str
    ) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
        def pick(connection: ssl.SSLObject, server_name: str | None,
                 context: ssl.SSLContext) -> None:
            route = self.current.snapshot.routes.get(name)
            if route is not None and route.server_ssl is not None \
                    and route.server_ssl is not context:
                connection.context = route.server_ssl

        return pick

    def _not_ready(self) -> str | None:
        if self.draining:
            return "draining"
        return None if self.ready else "starting"

    def _describe(self, snapshot: Snapshot) -> None:
        if self.worker is None:  # a worker's supervisor describes the configuration
            warn_expiring(snapshot)
            describe_keys(self.metrics, snapshot)

def warn_expiring(snapshot: Snapshot) -> None:
        """Log each enabled key expiring within warn_expiry_days (start-up, reload, daily)."""
        now = datetime.now(UTC)
        within = timedelta(days=snapshot.config.warn_expiry_days)
        for keyset, key in expiring(snapshot.keysets.values(), within, now):
            assert key.expires is not None
            log.warning("key expires soon", extra={"fields": {
                "keyset": keyset.name, "key_id": key.id, "state": key.state.value,
                "expires": key.expires.isoformat(),
                "days_left": round((key.expires - now).total_seconds() / 86400, 1)}})



class ConnectionGuard:
    """Bounds a listener's connections: at most limits.max_connections open (more are closed at
    once), and one whose first request head has not arrived within limits.header_timeout_s is
    closed (slowloris). Limits are read from the configuration in service, so they apply live."""

    def __init__(self, route: str, server: web.Server, current: Current,
                 metrics: Metrics) -> None:
        self.route = route
        self.server = server
        self.current = current
        self.metrics = metrics
        self._made = server.connection_made

    def install(self) -> None:
        self.server.connection_made = self._connection_made  # type: ignore[method-assign]

    def _connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        limits = self.current.snapshot.config.limits
        if len(self.server.connections) >= limits.max_connections:
            self.metrics.connections_closed.labels(self.route, "max_connections").inc()
            transport.abort()
            return
        self._made(handler, transport)
        asyncio.get_running_loop().call_later(
            limits.header_timeout_s, self._check_head, handler, transport)

    def _check_head(self, handler: Any, transport: asyncio.Transport) -> None:
        # aiohttp counts a request once its head is parsed; none yet means a slow client.
        if getattr(handler, "_request_count", 1) == 0 and not transport.is_closing():
            self.metrics.connections_closed.labels(self.route, "header_timeout").inc()
            transport.abort()


def _bound(site: web.TCPSite) -> Bound:
    sockets = getattr(site._server, "sockets", None)  # asyncio's or uvloop's server
    assert sockets, "the site is not listening"
    host, port = sockets[0].getsockname()[:2]
    return Bound(host, port)


async def build_gateway(config: Config, metrics: Metrics | None = None,
                        worker: WorkerRole | None = None) -> Gateway:
    """Load every key and build the gateway for `config` (not started yet)."""
    workdir = prepare_runtime_dir(config.runtime_dir)
    # The cores are shared among the workers: as many crypto threads in all as cores.
    slots = max(1, crypto_slots() // (config.workers if worker is not None else 1))
    try:
        snapshot = await asyncio.to_thread(build_snapshot, config, 1, workdir, slots)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    role = "single" if worker is None else "worker"
    return Gateway(snapshot, workdir, metrics or Metrics(role=role), slots, worker)


def crypto_slots() -> int:
    """Crypto threads (and GnuPG homes per PGP route) for this process: the usable cores."""
    return usable_cores()


async def serve(config_path: Path) -> int:
    """`run`: serve until SIGTERM or SIGINT, then drain. Returns the exit status."""
    config = load_config(config_path)
    worker = WorkerRole.from_environment()
    if worker is None and config.workers > 1:
        return await supervise(config)
    gateway = await build_gateway(config, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP's default action kills the process: take it over before announcing the listeners.
    gateway.watch()
    try:
        await gateway.start()
    except BaseException:
        await gateway.close()
        raise
    await stop.wait()
    return await gateway.drain()
