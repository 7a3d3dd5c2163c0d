"""Wires the listeners, the admin app and the lifecycle: start, drain on SIGTERM, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import HttpProcessingError

from gateway import hangup
from gateway.admin import (
    build_admin_app,
    describe_keys,
    status_document,
    warn_about_keys,
    warn_daily,
)
from gateway.affinity import pin
from gateway.config import Config, Limits, ServerTls, load_config, usable_cores
from gateway.logs import count_drops
from gateway.metrics import Metrics
from gateway.mirror import applied_generation
from gateway.proxy import Inflight, Proxy
from gateway.reload import Reloader
from gateway.scheduling import batch
from gateway.snapshot import (
    Current,
    Snapshot,
    build_snapshot,
    prepare_runtime_dir,
    remove_runtime_dir,
)
from gateway.supervisor import WorkerRole, supervise
from gateway.upstream import upstream_session

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
        count_drops(metrics.log_records_dropped.inc)
        # One crypto thread per slot: RSA in `cryptography` runs outside the GIL, so slots =
        # cores keeps every core busy without oversubscribing it. GnuPG calls wait on gpg and
        # its agent (two processes, one after the other, plus a process start): one more
        # thread (and GnuPG home) than slots fills the gaps (bench/README.md).
        self.slots = slots
        self.gpg_slots = gpg_slots(slots)
        self.executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="crypto")
        self.gpg_executor = ThreadPoolExecutor(max_workers=self.gpg_slots,
                                               thread_name_prefix="gpg")
        self.current = Current(snapshot, self._retire)
        self.inflight = Inflight()
        self.draining = False
        self.ready = False
        self.routes: dict[str, Bound] = {}
        self.admin: Bound | None = None
        self._runners: dict[str, web.BaseRunner] = {}
        self._admin_runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._watching = False
        self.reloader = Reloader(
            snapshot.config.path, self.current,
            lambda config, generation: build_snapshot(config, generation, workdir,
                                                      gpg_slots(slots)),
            metrics, on_swap=self._describe,
            load=load_config if worker is None else worker.load_config)
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
            self._spawn(warn_daily(self.current))
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: self._spawn(self.reloader.reload("sighup")))
        if hangup.take():  # one came while starting
            self._spawn(self.reloader.reload("sighup"))

    def _spawn(self, coroutine: Coroutine[object, object, object]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Bind every listener (port 0 picks a free port; see `routes` and `admin`)."""
        config = self.current.snapshot.config
        limits = config.limits
        self._session = upstream_session()
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
            if self.worker is not None and name not in self.worker.ports:
                # Added by a reload since the supervisor started (a replacement worker loads
                # the newest configuration): the supervisor has no port for it, and the other
                # workers do not serve it either. Not served until a restart, as warned then.
                log.warning("route not served until a restart", extra={"fields": {
                    "route": name, "worker": self.worker.index}})
                continue
            proxy = Proxy(name, route.config.direction, self.current, self._session,
                          self.executor, self.gpg_executor, self.metrics, self.inflight,
                          draining=lambda: self.draining)
            # aiohttp's low-level server: every request reaches Proxy.handle. Behind a router,
            # aiohttp answered some itself (404 for a target with a newline, `*` or
            # host:port; 417 for an unknown Expect), with text bodies and its version banner
            # toward Google, unlogged and uncounted; and it sent 100 Continue before any check.
            server = web.Server(
                proxy.handle, access_log=None,
                keepalive_timeout=limits.idle_timeout_s,
                max_field_size=limits.max_header_bytes,
                max_line_size=limits.max_header_bytes,
                max_headers=limits.max_headers,
            )
            runner = web.ServerRunner(
                server, handle_signals=False,
                # drain() has already given requests shutdown_timeout_s; what is still running
                # when the runner is cleaned up is cut off. aiohttp waits its shutdown_timeout
                # twice there: with shutdown_timeout_s, a cut-off drain took 3x as long as
                # configured, past the pod's grace period (its SIGKILL skips the cleanup).
                shutdown_timeout=min(config.shutdown_timeout_s, _CLEANUP_GRACE_S),
            )
            await runner.setup()
            assert runner.server is not None
            ConnectionGuard(name, runner.server, self.current, self.metrics).install()
            if route.server_ssl is not None:
                # The listener keeps its first context; each handshake switches to the
                # certificate of the configuration in service (hot certificate rotation).
                assert route.config.tls is not None
                route.server_ssl.sni_callback = self._certificate_picker(
                    name, route.config.tls, route.server_ssl)
            port = route.config.listen.port if self.worker is None else self.worker.ports[name]
            # Workers bind the same ports (the supervisor resolved port 0) and the kernel
            # spreads connections among them.
            site = _Site(runner, route.config.listen.host, port,
                         ssl_context=route.server_ssl, backlog=1024,
                         reuse_port=self.worker is not None,
                         tls_timeout=limits.header_timeout_s)
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
            self._report_to_supervisor()
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
            hangup.ignore()
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
        self.gpg_executor.shutdown(wait=True, cancel_futures=True)
        remove_runtime_dir(self.workdir)

    async def _measure_loop_lag(self, period: float = 0.25) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(period)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - started - period))

    def _retire(self, snapshot: Snapshot) -> None:
        # Closing stops gpg-agents (subprocesses): off the event loop.
        future = asyncio.get_running_loop().run_in_executor(None, snapshot.close)
        self._closing.add(future)
        future.add_done_callback(self._closing.discard)

    def _certificate_picker(
        self, name: str, first: ServerTls, context: ssl.SSLContext,
    ) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
        """Each handshake takes the newest context of the route that the listener can take.
        A handshake keeps what its first context decided beyond certificates and trust
        (client certificates required or not, the minimum version): after a reload that
        changes those (a restart is needed, reload.listener_changes warns) the listener stays
        on its last context that matches, certificate included. Switching anyway made a
        listener whose client_ca was removed refuse every client: certificates still
        required, with no CA left to check them."""
        choices = (first.client_ca is not None, first.min_version)
        latest = context

        def pick(connection: ssl.SSLObject, server_name: str | None,
                 context: ssl.SSLContext) -> None:
            nonlocal latest
            route = self.current.snapshot.routes.get(name)
            tls = route.config.tls if route is not None else None
            if route is not None and route.server_ssl is not None and tls is not None \
                    and (tls.client_ca is not None, tls.min_version) == choices:
                latest = route.server_ssl
            if latest is not context:
                connection.context = latest

        return pick

    def _not_ready(self) -> str | None:
        if self.draining:
            return "draining"
        return None if self.ready else "starting"

    def _report_to_supervisor(self) -> None:
        """A worker's ready file: its pid and the supervisor's generation it serves, rewritten
        (atomically) after each reload it applied."""
        assert self.worker is not None
        generation = applied_generation(self.current.snapshot.config) or 0
        ready = self.worker.ready_file
        aside = ready.with_name(ready.name + ".new")
        aside.write_text(f"{os.getpid()} {generation}")
        os.replace(aside, ready)

    def _describe(self, snapshot: Snapshot) -> None:
        if self.worker is not None and self.ready:
            self._report_to_supervisor()
        if self.worker is None:  # a worker's supervisor describes the configuration
            warn_about_keys(snapshot)
            describe_keys(self.metrics, snapshot)

class ConnectionGuard:
    """Bounds a listener's connections: at most limits.max_connections open (more are closed at
    once); each request head (request line + headers) must arrive within limits.header_timeout_s
    (slowloris: the first head's clock starts at the connection, a keep-alive request's at its
    first byte) and within limits.max_header_bytes in all (431, or a close while an earlier
    request is still being answered). Limits are read from the configuration in service when a
    connection opens, so they apply live to new connections."""

    _degraded = False  # set once an aiohttp without a reachable parser has been seen

    def __init__(self, route: str, server: web.Server, current: Current,
                 metrics: Metrics) -> None:
        self.route = route
        self.server = server
        self.current = current
        self.metrics = metrics
        self._made = server.connection_made

    def install(self) -> None:
        self.server.connection_made = self._connection_made  # type: ignore[method-assign]

    def closed(self, reason: str) -> None:
        self.metrics.connections_closed.labels(self.route, reason).inc()

    def _connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        limits = self.current.snapshot.config.limits
        if len(self.server.connections) >= limits.max_connections:
            self.closed("max_connections")
            transport.abort()
            return
        self._made(handler, transport)
        # aiohttp feeds every byte of the connection to its HTTP parser (`_parser` since 3.10,
        # `_request_parser` before): a meter in front of it sees each head as it arrives.
        for attribute in ("_parser", "_request_parser"):
            parser = getattr(handler, attribute, None)
            if parser is not None:
                setattr(handler, attribute, _HeadMeter(self, limits, handler, transport, parser))
                return
        # An aiohttp without either: only the first head's time is bounded. Said once, loudly:
        # the whole-head size bound and later heads' timeout are then not enforced.
        if not ConnectionGuard._degraded:
            ConnectionGuard._degraded = True
            log.error("this aiohttp hides its HTTP parser: limits.max_header_bytes in all and "
                      "the header timeout of keep-alive requests are not enforced",
                      extra={"fields": {"route": self.route}})
        asyncio.get_running_loop().call_later(
            limits.header_timeout_s, self._check_first_head, handler, transport)

    def _check_first_head(self, handler: Any, transport: asyncio.Transport) -> None:
        # aiohttp counts a request once its head is parsed; none yet means a slow client.
        if getattr(handler, "_request_count", 1) == 0 and not transport.is_closing():
            self.closed("header_timeout")
            transport.abort()


_CLOSING = b"\r\nContent-Length: 0\r\nConnection: close\r\nServer: cards-qr-gateway\r\n\r\n"
_HEAD_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large" + _CLOSING
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request" + _CLOSING
_NOTHING: tuple[list[Any], bool, bytes] = ([], False, b"")


class _HeadMeter:
    """Stands in front of one connection's HTTP parser (everything else is delegated to it).

    Between the end of a request's body and the end of the next head, bytes belong to that
    head: they are counted against max_header_bytes before the parser buffers them, and the head
    must end within header_timeout_s. A completed head is also measured from the parsed message
    and from its bytes as sent, up to its blank line (a head and its body may share one read;
    the parsed message leaves out optional whitespace). Bytes that follow the end of a body in
    the same read are not counted (one read at most, still under aiohttp's per-line and
    max_headers bounds); the clock of a head pipelined that way starts at the next read."""

    def __init__(self, guard: ConnectionGuard, limits: Limits, handler: Any,
                 transport: asyncio.Transport, parser: Any) -> None:
        self._guard = guard
        self._limits = limits
        self._handler = handler
        self._transport = transport
        self._parser = parser
        self._body: Any = None  # the payload of the last request, until it is complete
        self._head_bytes = 0
        self._tail = b""  # the head's last bytes so far: its end may straddle two reads
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._refused = False
        self._start_clock()  # the first head's clock starts at the connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def feed_data(self, data: bytes) -> Any:
        if self._refused:
            return _NOTHING
        if self._body is not None and self._body.is_eof():
            self._body = None  # what follows is the next head
        raw_head = 0  # the head's size as sent, when it ends in this read
        if self._body is None and data:
            if self._timer is None:
                self._start_clock()
            end = _head_end(self._tail, data)
            if end is not None:
                raw_head = self._head_bytes + end
            self._tail = (self._tail + data[-3:])[-3:]
            self._head_bytes += len(data)
        try:
            result = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            if self._body is not None:
                # A malformed body (e.g. chunked): its reader fails at once (400) instead of
                # waiting for the rest until body_timeout_s.
                self._refused = True
                self.stop_clock()
                self._guard.closed("bad_request")
                self._body.set_exception(exc)
                self._body.feed_eof()
                return _NOTHING
            # A malformed head, or a line over aiohttp's per-line bound. Answered here rather
            # than by aiohttp, whose 400 quotes the offending bytes and logs an error.
            if self._head_bytes > self._limits.max_header_bytes:
                return self._refuse("header_bytes", _HEAD_TOO_LARGE)
            return self._refuse("bad_request", _BAD_REQUEST)
        messages = result[0]
        limit = self._limits.max_header_bytes
        if messages:
            # The parsed size leaves out optional whitespace, which a head sent in one read
            # could pad to many times the limit (within aiohttp's per-line bounds).
            if raw_head > limit or any(_head_size(message) > limit for message, _ in messages):
                return self._refuse("header_bytes", _HEAD_TOO_LARGE)
            self.stop_clock()
            self._head_bytes = 0
            self._tail = b""
            body = messages[-1][1]
            self._body = None if body.is_eof() else body
        elif self._body is None and self._head_bytes > limit:
            return self._refuse("header_bytes", _HEAD_TOO_LARGE)
        return result

    def _refuse(self, reason: str, answer: bytes) -> tuple[list[Any], bool, bytes]:
        """Answer (empty body) and close; only close while an earlier request is answered."""
        self._refused = True
        self.stop_clock()
        self._guard.closed(reason)
        busy = getattr(self._handler, "_request_in_progress", True) or \
            getattr(self._handler, "_messages", True)
        if not self._transport.is_closing():
            if not busy:
                self._transport.write(answer)
            self._transport.close()
        return _NOTHING

    def _start_clock(self) -> None:
        # The timer holds the meter weakly: aiohttp lets go of a connection's parser when the
        # connection is lost, and the meter (with the handler and transport it holds) is freed
        # then, its timer cancelled, not header_timeout_s later. A flood of short connections
        # would otherwise pile up, TLS buffers and all.
        self._timer = self._loop.call_later(
            self._limits.header_timeout_s, _head_timed_out, weakref.ref(self))

    def __del__(self) -> None:
        # A loop's timers are its own thread's: freed there (aiohttp letting go of the parser),
        # the timer is cancelled at once; freed anywhere else (the cycle collector runs in
        # whichever thread allocates), the cancel is handed to the loop.
        timer, self._timer = self._timer, None
        if timer is None:
            return
        if threading.get_ident() == self._loop_thread:
            timer.cancel()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(timer.cancel)

    def stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def head_timed_out(self) -> None:
        self._timer = None
        if not self._refused and not self._transport.is_closing():
            self._guard.closed("header_timeout")
            self._transport.abort()


def _head_timed_out(meter: weakref.ref[_HeadMeter]) -> None:
    alive = meter()
    if alive is not None:
        alive.head_timed_out()


def _head_end(tail: bytes, data: bytes) -> int | None:
    """Where a head's blank line ends, counted from the start of `data`, or None if not in it.
    `tail` is the last bytes read before (at most 3): the CRLFCRLF may straddle two reads.
    `data` is searched, not copied: a head and a 64 KiB body often share a read."""
    across = (tail + data[:3]).find(b"\r\n\r\n")
    if across >= 0:
        return across - len(tail) + 4
    end = data.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else None


def _head_size(message: Any) -> int:
    """Request line and header lines with their CRLFs, as sent (less optional whitespace)."""
    target = message.path.encode("utf-8", "surrogateescape")
    size = len(message.method) + 1 + len(target) + len(" HTTP/1.1\r\n") + 2
    return size + sum(len(name) + len(value) + 4 for name, value in message.raw_headers)


_CLEANUP_GRACE_S = 0.5


class _Site(web.TCPSite):
    """aiohttp's TCPSite with the TLS handshake and the TLS close bounded by `tls_timeout`
    (limits.header_timeout_s). Left to the loop's defaults, a client that connected and never
    finished its handshake held its connection 60 s, uncounted by max_connections (the guard
    sees a connection once its handshake is done), and one refused with a 431 that never
    answered the close held its max_connections slot 30 s."""

    def __init__(self, *args: Any, tls_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls_timeout = tls_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # what TCPSite.start does, with the two timeouts
        server = self._runner.server
        assert server is not None
        tls: dict[str, Any] = {} if self._ssl_context is None else {
            "ssl_handshake_timeout": self._tls_timeout, "ssl_shutdown_timeout": self._tls_timeout}
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port, **tls)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


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
        snapshot = await asyncio.to_thread(build_snapshot, config, 1, workdir, gpg_slots(slots))
    except BaseException:
        remove_runtime_dir(workdir)
        raise
    role = "single" if worker is None else "worker"
    return Gateway(snapshot, workdir, metrics or Metrics(role=role), slots, worker)


def crypto_slots() -> int:
    """Crypto threads for this process: the usable cores."""
    return usable_cores()


def gpg_slots(slots: int) -> int:
    """GnuPG threads, and GnuPG homes (each with its agent) per gnupg-engine route, beside
    `slots` crypto threads: one more, because a gpg call leaves its core idle while it starts
    and while gpg and its agent wait on each other (3 instead of 2 on 2 cores: 0.73-0.84 ->
    0.81-0.92 of the gpg ceiling, bench/README.md)."""
    return slots + 1


def load_run_config(config_path: Path) -> Config:
    """The configuration `run` serves: the operator's file, or in a worker the supervisor's
    copy of what it validated (mirror.py). Raises ConfigError."""
    worker = WorkerRole.from_environment()
    return load_config(config_path) if worker is None else worker.load_config(config_path)


async def serve(config: Config) -> int:
    """`run` with `config` (load_run_config's): serve until SIGTERM or SIGINT, then drain.
    Returns the exit status."""
    worker = WorkerRole.from_environment()
    if worker is None and config.workers > 1:
        return await supervise(config)
    if worker is not None and worker.cpu is not None:
        pin(worker.cpu)  # first: gpg-agents started while building inherit it
    elif worker is None and config.pin_workers:
        log.warning("pin_workers has no effect with workers 1: it binds worker processes")
    if worker.batch if worker is not None else config.batch_scheduling:
        batch()  # likewise: the crypto threads and gpg processes started later inherit it
        log.info("batch scheduling", extra={"fields": {"policy": "SCHED_BATCH"}})
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
