"""Wires the listeners, the admin app and the lifecycle: start, drain on SIGTERM, stop."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import ssl
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.config import Config, load_config, usable_cores
from gateway.keys import expiring
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.proxy import Inflight, Proxy
from gateway.reload import Reloader
from gateway.snapshot import Current, Snapshot, build_snapshot, prepare_runtime_dir

log = logging.getLogger("gateway.app")


@dataclass(frozen=True)
class Bound:
    host: str
    port: int


class Gateway:
    """One process's gateway: a listener per route plus the admin listener."""

    def __init__(self, snapshot: Snapshot, workdir: Path, metrics: Metrics,
                 slots: int = 1) -> None:
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
        """Poll the configuration's files and reload on SIGHUP, until close()."""
        self._watching = True
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
        admin_app = web.Application()
        admin_app.router.add_get("/healthz", self._healthz)
        admin_app.router.add_get("/readyz", self._readyz)
        admin_app.router.add_get("/metrics", self._metrics)
        admin_app.router.add_get("/status", self._status)
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
                shutdown_timeout=config.shutdown_timeout_s,
            )
            await runner.setup()
            if route.server_ssl is not None:
                # The listener keeps its first context; each handshake switches to the
                # certificate of the configuration in service (hot certificate rotation).
                route.server_ssl.sni_callback = self._certificate_picker(name)
            site = web.TCPSite(runner, route.config.listen.host, route.config.listen.port,
                               ssl_context=route.server_ssl, backlog=1024)
            await site.start()
            self._runners[name] = runner
            self.routes[name] = _bound(site)
        self._spawn(self._measure_loop_lag())
        self.ready = True
        log.info("listening", extra={"fields": {
            "routes": {n: f"{b.host}:{b.port}" for n, b in self.routes.items()},
            "admin": f"{self.admin.host}:{self.admin.port}",
            "generation": self.current.snapshot.generation}})

    async def drain(self) -> int:
        """The sidecar order: /readyz 503 at once, wait drain_delay_s while still serving, stop
        accepting, let in-flight requests finish until shutdown_timeout_s. 0 if all finished."""
        config = self.current.snapshot.config
        self.draining = True
        log.info("draining", extra={"fields": {"drain_delay_s": config.drain_delay_s}})
        await asyncio.sleep(config.drain_delay_s)
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

    def _warn_expiring(self, snapshot: Snapshot) -> None:
        """Log each enabled key expiring within warn_expiry_days (start-up, reload, daily)."""
        now = datetime.now(UTC)
        within = timedelta(days=snapshot.config.warn_expiry_days)
        for keyset, key in expiring(snapshot.keysets.values(), within, now):
            assert key.expires is not None
            log.warning("key expires soon", extra={"fields": {
                "keyset": keyset.name, "key_id": key.id, "state": key.state.value,
                "expires": key.expires.isoformat(),
                "days_left": round((key.expires - now).total_seconds() / 86400, 1)}})

    async def _measure_loop_lag(self, period: float = 0.25) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(period)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - started - period))

    async def _warn_daily(self) -> None:
        while True:
            await asyncio.sleep(86400)
            self._warn_expiring(self.current.snapshot)

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

    def _describe(self, snapshot: Snapshot) -> None:
        self._warn_expiring(snapshot)
        self.metrics.config_generation.set(snapshot.generation)
        self.metrics.key_info.clear()
        self.metrics.key_expiry.clear()
        for keyset in snapshot.keysets.values():
            for key in keyset.keys:
                self.metrics.key_info.labels(keyset.name, key.id, key.state.value,
                                             key.fingerprint).set(1)
                if key.expires is not None:
                    self.metrics.key_expiry.labels(keyset.name, key.id).set(
                        key.expires.timestamp())

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.ready and not self.draining:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n" if self.draining else "starting\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _status(self, request: web.Request) -> web.Response:
        snapshot = self.current.snapshot
        last = self.reloader.last
        status = {
            "generation": snapshot.generation,
            "loaded_at": snapshot.loaded_at.isoformat(),
            "draining": self.draining,
            "last_reload": None if last is None else {
                "time": last.time.isoformat(), "result": last.result, "trigger": last.trigger,
                "error": last.error, "warnings": list(last.warnings)},
            "keysets": {
                name: [
                    {"id": k.id, "state": k.state.value, "fingerprint": k.fingerprint,
                     "type": keyset.type, "algorithm": k.algorithm,
                     "capabilities": list(k.capabilities), "private": k.private,
                     "expires": k.expires.isoformat() if k.expires else None}
                    for k in keyset.keys
                ]
                for name, keyset in snapshot.keysets.items()
            },
        }
        return web.Response(text=json.dumps(status, indent=2) + "\n",
                            content_type="application/json")


def _bound(site: web.TCPSite) -> Bound:
    sockets = getattr(site._server, "sockets", None)  # asyncio's or uvloop's server
    assert sockets, "the site is not listening"
    host, port = sockets[0].getsockname()[:2]
    return Bound(host, port)


async def build_gateway(config: Config, metrics: Metrics | None = None) -> Gateway:
    """Load every key and build the gateway for `config` (not started yet)."""
    workdir = prepare_runtime_dir(config.runtime_dir)
    slots = crypto_slots()
    try:
        snapshot = await asyncio.to_thread(build_snapshot, config, 1, workdir, slots)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Gateway(snapshot, workdir, metrics or Metrics(), slots)


def crypto_slots() -> int:
    """Crypto threads (and GnuPG homes per PGP route) for this process: the usable cores."""
    return usable_cores()


async def serve(config_path: Path) -> int:
    """`run`: serve until SIGTERM or SIGINT, then drain. Returns the exit status."""
    config = load_config(config_path)
    if config.workers != 1:
        log.error("workers other than 1 are not supported yet; set workers: 1",
                  extra={"fields": {"workers": config.workers}})
        return 1
    gateway = await build_gateway(config)
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
