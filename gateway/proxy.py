"""The aiohttp handler: route -> limit -> open/seal -> forward -> seal/open -> answer, and the one
table that maps errors to HTTP answers (protocol.md section 5)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.http import HttpProcessingError, HttpVersion11
from yarl import URL

from gateway.config import Limits
from gateway.envelope import PLAINTEXT_CONTENT_TYPE, Opened, Sealed
from gateway.errors import (
    EngineError,
    EnvelopeError,
    GatewayError,
    NoKeyError,
    TooLargeError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.metrics import Metrics
from gateway.snapshot import Current, RouteRuntime

T = TypeVar("T")
R = TypeVar("R", Sealed, Opened)
log = logging.getLogger("gateway.proxy")

SERVER = "cards-qr-gateway"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9:_-]{1,100}$")

# The local caller's error bodies (outbound): one fixed sentence per reason, no detail that
# could carry payment data.
_MESSAGES = {
    "malformed": "The message is not in the expected format.",
    "unknown_key": "The message is encrypted to none of our enabled keys.",
    "decrypt": "The message could not be decrypted.",
    "signature": "The message carries no good signature by an enabled peer key.",
    "algorithm": "The message uses an algorithm outside the accepted lists.",
    "no_key": "There is no usable active key to seal with.",
    "too_large": "The body is larger than the configured limit.",
    "upstream_unreachable": "The upstream could not be reached or gave no valid answer.",
    "upstream_timeout": "The upstream did not answer in time.",
    "overloaded": "Too many requests are in progress; retry later.",
    "engine": "The crypto engine failed; see the gateway's log.",
    "method": "Only POST is proxied.",
    "target": "The request target must be a path, not a full URL: this is not a forward proxy.",
    "request_timeout": "The request body did not arrive within the configured time.",
    "route_removed": "This route is not in the gateway's configuration any more.",
    "internal": "The gateway failed unexpectedly; see its log.",
}


@dataclass
class Failure(Exception):
    """An answer decided by the failure table; `reason` goes to logs and metrics."""

    status: int
    reason: str
    phase: str  # "request" or "response": which message failed
    headers: dict[str, str] | None = None


class _BodyTooLarge(Exception):
    """A body (request or upstream answer) is over `limits.max_body_bytes`."""


class Inflight:
    """Counts requests in progress across every route of this process (a drain waits for
    them), those of them past their body (limits.max_inflight bounds these: a body still
    arriving must not hold a slot, or a few heads sent without their bodies lock everyone
    out for body_timeout_s), and the bytes of the bodies still arriving (bounded too, by
    max_inflight x max_body_bytes: many connections sending large bodies at once)."""

    def __init__(self) -> None:
        self.count = 0
        self.processing = 0
        self.arriving_bytes = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Proxy:
    """Handles every request of one route, with the snapshot in service at its start."""

    def __init__(
        self,
        route_name: str,
        direction: str,
        current: Current,
        session: aiohttp.ClientSession,
        executor: Executor,
        gpg_executor: Executor,
        metrics: Metrics,
        inflight: Inflight,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.route_name = route_name
        self.direction = direction  # the route's at start-up: for answers once it is removed
        self.current = current
        self.session = session
        self.executor = executor
        self.gpg_executor = gpg_executor
        self.metrics = metrics
        self.inflight = inflight
        self.draining = draining

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        with self.current.use() as snapshot:
            route = snapshot.routes.get(self.route_name)
            limits = snapshot.config.limits
            direction = route.config.direction if route is not None else self.direction
            record: dict[str, Any] = {"route": self.route_name, "direction": direction}
            refused: Failure | None = None
            if route is None:
                # The route left the configuration; its listener lives until a restart. The
                # connection is closed: the client's next one may reach a pod that serves it.
                refused = Failure(503, "route_removed", "request",
                                  {"Retry-After": "30", "Connection": "close"})
            elif request.method != "POST":
                refused = Failure(405, "method", "request", {"Allow": "POST"})
            elif not request.raw_path.startswith("/"):
                # Only a path is forwarded onto the upstream's base URL: an absolute-form target
                # (`http://host/...`, RFC 9112 3.2.2) is refused before anything is read.
                refused = Failure(400, "target", "request", {"Connection": "close"})
            elif self.inflight.processing >= limits.inflight:
                # The connection is closed too: a client that ignores Retry-After then pays a
                # new handshake before each retry, instead of the gateway paying a read and a
                # 503 per retry on a kept-alive connection, which starved the admitted requests
                # (bench/README.md: 2xx ~75-110 -> ~280-345 rt/s under a 256-connection flood).
                refused = _overloaded()
            if refused is not None:
                record["reason"] = refused.reason
                response = self._failure(direction, refused)
            else:
                assert route is not None
                self.inflight.enter()
                try:
                    response = await self._admitted(request, route, limits, record)
                except Failure as failure:
                    record["reason"] = failure.reason
                    response = self._failure(direction, failure)
                except ConnectionError:
                    raise  # the client went away: aiohttp closes the connection, as ever
                except Exception as exc:  # a bug of ours: still answered, logged and counted
                    record["reason"] = "internal"
                    response = self._failure(direction, Failure(500, "internal", "request"))
                    # The type and where it was raised, never its text: that could quote
                    # the message.
                    log.error("unexpected error", extra={"fields": {
                        "route": self.route_name, "error": type(exc).__name__,
                        "at": _raised_at(exc)}})
                finally:
                    self.inflight.leave()
            response.headers["Server"] = SERVER
            if self.draining():
                response.headers["Connection"] = "close"
            if response.headers.get("Connection") == "close":
                response.force_close()  # aiohttp keeps the connection open despite the header
            elapsed = time.perf_counter() - started
        # Answered first, counted and logged after: the client does not wait for them (nor, at
        # low load, for the log writer's thread, which a log line wakes).
        unsent: str | None = "unfinished"  # cancelled while sending
        try:
            unsent = await self._send(request, response, limits.send_timeout_s)
        finally:
            if unsent is not None:  # the status below was decided, not delivered
                record["unsent"] = unsent
            self.metrics.requests.labels(self.route_name, direction, str(response.status)).inc()
            self.metrics.request_duration.labels(self.route_name, direction).observe(elapsed)
            record.update(status=response.status, duration_ms=round(elapsed * 1000, 2))
            log.info("request", extra={"fields": record})
        return response

    async def _send(self, request: web.BaseRequest, response: web.StreamResponse,
                    timeout: float) -> str | None:
        """Send the answer here rather than leave it to aiohttp, which waits for a client to
        take it for ever: one that pipelines requests and never reads held its connection,
        and with enough of them every max_connections slot. Past `timeout` the connection is
        dropped. Returns why the answer was not delivered ("send_timeout", "client_gone"), or
        None once it was handed to the connection."""
        try:
            async with asyncio.timeout(timeout):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            self.metrics.connections_closed.labels(self.route_name, "send_timeout").inc()
            if request.transport is not None:
                request.transport.abort()
            return "send_timeout"
        except ConnectionError:
            return "client_gone"  # aiohttp closes the connection
        return None

    async def _admitted(self, request: web.BaseRequest, route: RouteRuntime, limits: Limits,
                        record: dict[str, Any]) -> web.Response:
        """Read the body, then take a processing slot (or 503 if they filled meanwhile)."""
        if request.version >= HttpVersion11 and \
                request.headers.get("Expect", "").lower() == "100-continue":
            # Asked for only now, past the method, target and overload checks, and for a body
            # not declared too large: a client that waits for it before sending its body
            # (RFC 9110 10.1.1) gets it. Other expectations are ignored, as RFC 9110 allows.
            if request.content_length is not None and \
                    request.content_length > limits.max_body_bytes:
                raise Failure(413, "too_large", "request", {"Connection": "close"})
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_request(request, limits, self.inflight)
        if self.inflight.processing >= limits.inflight:
            raise _overloaded()
        self.inflight.processing += 1
        try:
            if route.config.direction == "inbound":
                return await self._inbound(request, route, limits, record, body)
            return await self._outbound(request, route, limits, record, body)
        finally:
            self.inflight.processing -= 1

    async def _inbound(self, request: web.BaseRequest, route: RouteRuntime, limits: Limits,
                       record: dict[str, Any], body: bytes) -> web.Response:
        cap = limits.max_body_bytes
        opened = await self._open(route, body, record)
        status, answer = await self._forward(
            route, request, opened.plaintext, PLAINTEXT_CONTENT_TYPE, cap
        )
        if not answer:
            return web.Response(status=status)
        try:
            sealed = await self._seal(route, answer, record, phase="response")
        except Failure as failure:
            if failure.reason == "no_key":
                log.error("cannot seal the partner's answer: no usable active key; the partner "
                          "has already processed the request",
                          extra={"fields": {"route": self.route_name}})
            raise
        return web.Response(status=status, body=sealed.body,
                            headers={"Content-Type": route.envelope.content_type})

    async def _outbound(self, request: web.BaseRequest, route: RouteRuntime, limits: Limits,
                        record: dict[str, Any], body: bytes) -> web.Response:
        cap = limits.max_body_bytes
        sealed = await self._seal(route, body, record, phase="request")
        status, answer = await self._forward(
            route, request, sealed.body, route.envelope.content_type, cap
        )
        if not answer:
            return web.Response(status=status)
        opened = await self._open(route, answer, record, phase="response")
        return web.Response(status=status, body=opened.plaintext,
                            headers={"Content-Type": PLAINTEXT_CONTENT_TYPE})

    async def _open(self, route: RouteRuntime, body: bytes, record: dict[str, Any],
                    phase: str = "request") -> Opened:
        return await self._crypto(route, "open", route.envelope.open, body, record, phase)

    async def _seal(self, route: RouteRuntime, plaintext: bytes, record: dict[str, Any],
                    phase: str) -> Sealed:
        return await self._crypto(route, "seal", route.envelope.seal, plaintext, record, phase)

    async def _crypto(self, route: RouteRuntime, op: str, function: Callable[[bytes], R],
                      data: bytes, record: dict[str, Any], phase: str) -> R:
        """Run one seal or open in the executor; count its time, failures and key uses."""
        started = time.perf_counter()
        try:
            if "request_id" not in record:
                # One executor job, not two: the requestId is read beside the first crypto op.
                result, record["request_id"] = await self._run(
                    route, partial(_with_request_id, function), data)
            else:
                result = await self._run(route, function, data)
        except (EnvelopeError, EngineError) as exc:
            self._crypto_failure(route, op, exc)
            raise Failure(_status_for(exc, route.config.direction, op), exc.reason,
                          phase) from None
        finally:
            self.metrics.crypto_duration.labels(self.route_name, op).observe(
                time.perf_counter() - started)
        keysets = {"own": route.config.own_keys, "peer": route.config.peer_keys}
        used = record.setdefault("key_ids", {})
        for role, key_id, key_op in result.key_uses():
            self.metrics.key_uses.labels(keysets[role], key_id, key_op).inc()
            used.setdefault(key_op, []).append(key_id)
        return result

    async def _forward(self, route: RouteRuntime, request: web.BaseRequest, body: bytes,
                       content_type: str, cap: int) -> tuple[int, bytes]:
        """One upstream exchange, never retried. Returns (status, body of at most `cap`)."""
        upstream = route.config.upstream
        url = URL(upstream.url + request.raw_path, encoded=True)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(upstream.timeout_s):
                async with self.session.post(
                    url,
                    data=body,
                    headers={"Content-Type": content_type},
                    ssl=route.client_ssl if route.client_ssl is not None else True,
                    proxy=upstream.proxy,
                    allow_redirects=False,
                ) as response:
                    refused = _not_an_answer(response)
                    if refused is not None:
                        raise UpstreamUnreachable(refused)
                    closed = _close_of_unframed_body(response)
                    answer = await _read_capped(response.content, response.content_length, cap)
                    if closed is not None and closed.done() and not closed.cancelled() \
                            and closed.exception() is not None:
                        # aiohttp ends such a body at a reset as at a clean close: cut short.
                        raise UpstreamUnreachable("connection reset during the answer")
                    return response.status, answer
        except _BodyTooLarge:
            raise Failure(502, "too_large", "response") from None
        except TimeoutError:
            raise self._upstream_failure(UpstreamTimeout("timed out")) from None
        except UpstreamError as exc:
            # Our own fixed texts (a status number, a header's name): no payload.
            log.warning("upstream exchange failed",
                        extra={"fields": {"route": self.route_name, "error": str(exc)}})
            raise self._upstream_failure(exc) from None
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("upstream exchange failed",
                        extra={"fields": {"route": self.route_name,
                                          "error": type(exc).__name__}})
            raise self._upstream_failure(UpstreamUnreachable(type(exc).__name__)) from None
        finally:
            self.metrics.upstream_duration.labels(self.route_name).observe(
                time.perf_counter() - started)

    def _upstream_failure(self, exc: UpstreamError) -> Failure:
        status = 504 if isinstance(exc, UpstreamTimeout) else 502
        return Failure(status, exc.reason, "response")

    async def _run(self, route: RouteRuntime, function: Callable[[bytes], T], data: bytes) -> T:
        executor = self.gpg_executor if route.envelope.waits_on_processes else self.executor
        return await asyncio.get_running_loop().run_in_executor(executor, function, data)

    def _crypto_failure(self, route: RouteRuntime, op: str, exc: GatewayError) -> None:
        reason = exc.reason if isinstance(exc, EnvelopeError) else None
        if reason is not None:
            self.metrics.crypto_failures.labels(self.route_name, op, reason).inc()
        # The message of our own errors never holds key material or plaintext (errors.py).
        log.warning("crypto failure", extra={"fields": {
            "route": self.route_name, "op": op, "reason": getattr(exc, "reason", "engine"),
            "detail": str(exc)}})

    def _failure(self, direction: str, failure: Failure) -> web.Response:
        headers = dict(failure.headers or {})
        if direction == "inbound":
            # Toward Google: empty and identical per row, whatever the cause (no oracle).
            return web.Response(status=failure.status, headers=headers)
        payload = {"error": failure.reason, "message": _MESSAGES[failure.reason]}
        headers["Content-Type"] = "application/json; charset=utf-8"
        return web.Response(status=failure.status, body=json.dumps(payload).encode(),
                            headers=headers)


def _status_for(exc: GatewayError, direction: str, op: str) -> int:
    """The failure table of protocol.md section 5 for crypto errors."""
    if isinstance(exc, EngineError):
        return 500
    assert isinstance(exc, EnvelopeError)
    inbound = direction == "inbound"
    if op == "open" and not inbound:
        return 502  # Google's answer cannot be opened: never pass it on.
    if op == "seal" and inbound:
        # The partner's answer: too large -> 502, nothing to seal with -> 500.
        return 502 if isinstance(exc, TooLargeError) else 500
    if isinstance(exc, TooLargeError):
        return 413
    if isinstance(exc, NoKeyError):
        return 500
    return 401 if exc.layer == "signature" else 400


def _overloaded() -> Failure:
    return Failure(503, "overloaded", "request", {"Retry-After": "1", "Connection": "close"})


async def _read_request(request: web.BaseRequest, limits: Limits, inflight: Inflight) -> bytes:
    """The request body, within max_body_bytes (413), body_timeout_s (408: a slow body) and,
    with the other bodies still arriving, max_inflight x max_body_bytes (503)."""
    budget = limits.inflight * limits.max_body_bytes
    held = 0

    def arriving(size: int) -> None:
        nonlocal held
        if inflight.arriving_bytes + size > budget:
            raise _overloaded()
        inflight.arriving_bytes += size
        held += size

    try:
        async with asyncio.timeout(limits.body_timeout_s):
            body = await _read_capped(request.content, request.content_length,
                                      limits.max_body_bytes, arriving)
    except _BodyTooLarge:
        # Closed, as when the declared length was refused before 100 Continue: the rest of the
        # body is not read, and lingering to discard it only costs.
        raise Failure(413, "too_large", "request", {"Connection": "close"}) from None
    except TimeoutError:
        raise Failure(408, "request_timeout", "request", {"Connection": "close"}) from None
    except (HttpProcessingError, web.RequestPayloadError):
        # Broken framing (chunked) or content coding: the body cannot be had.
        raise Failure(400, "malformed", "request", {"Connection": "close"}) from None
    finally:
        inflight.arriving_bytes -= held
    if not body:
        raise Failure(400, "malformed", "request")
    return body


def _not_an_answer(response: aiohttp.ClientResponse) -> str | None:
    """Why the upstream's answer cannot be passed on, or None. Its status must be a final HTTP
    one: aiohttp hands over a 101 as if it were final (the partner's answer then lost behind a
    protocol switch that never happens) and takes any three digits, 000-099 and 600-999 too,
    which are not HTTP statuses (RFC 9110 15). Its body must be the bytes as the upstream
    meant them: no content coding in any Content-Encoding line (aiohttp reads only the first
    one) and no transfer coding but chunked (aiohttp passes a gzip transfer coding's bytes on
    as they are): they would reach Google sealed, or the local caller, as if they were the
    message."""
    if not 200 <= response.status <= 599:
        return f"upstream answered with status {response.status}"
    for header, allowed in (("Content-Encoding", "identity"), ("Transfer-Encoding", "chunked")):
        for value in response.headers.getall(header, ()):
            if any(token.strip().lower() not in ("", allowed) for token in value.split(",")):
                return f"upstream answered with a coding in {header}"
    return None


def _close_of_unframed_body(response: aiohttp.ClientResponse) -> asyncio.Future[None] | None:
    """For an answer whose body ends where the connection does (neither Content-Length nor
    chunked), the future aiohttp settles when the connection closes: with an exception when it
    was reset rather than closed cleanly, i.e. the body may have been cut short. (A reset that
    lands before aiohttp hands the response over has already been forgotten: not seen.)"""
    if response.content_length is not None or \
            "chunked" in response.headers.get("Transfer-Encoding", "").lower():
        return None
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    closed = protocol.closed if protocol is not None else None
    if closed is not None:  # retrieve its exception whenever it comes, checked or not
        closed.add_done_callback(lambda future: future.cancelled() or future.exception())
    return closed


async def _read_capped(stream: aiohttp.StreamReader, declared: int | None, cap: int,
                       arriving: Callable[[int], None] = lambda size: None) -> bytes:
    """Read a whole body, never buffering more than `cap` bytes. Raises _BodyTooLarge.
    `arriving(size)` is told of each chunk before it is kept (and may raise)."""
    if declared is not None and declared > cap:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(min(65536, cap + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise _BodyTooLarge
        arriving(len(chunk))
        chunks.append(chunk)


def _raised_at(exc: BaseException) -> str:
    """'file.py:line' of the innermost frame of `exc`'s traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def _with_request_id(function: Callable[[bytes], R], data: bytes) -> tuple[R, str | None]:
    """Seal or open `data`, and read the requestId of the plaintext (the input of a seal)."""
    result = function(data)
    return result, _request_id(result.plaintext if isinstance(result, Opened) else data)


def _request_id(plaintext: bytes) -> str | None:
    """requestHeader.requestId of a JSON message, only if it has the documented shape."""
    try:
        message = json.loads(plaintext)
    except (ValueError, RecursionError):  # RecursionError: nested ~1000 deep, valid or not
        return None
    if not isinstance(message, dict):
        return None
    header = message.get("requestHeader")
    value = header.get("requestId") if isinstance(header, dict) else None
    return value if isinstance(value, str) and _REQUEST_ID.match(value) else None
