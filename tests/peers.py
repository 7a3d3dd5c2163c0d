"""Stand-in peers for end-to-end tests: a partner service and a Google, on port 0.

The stand-in Google seals and opens with implementations that are not ours (the gpg command
line, panva's jose), passed in as plain callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """A recording HTTP(S) server whose behaviour a test can replace at any time."""

    handler: Handler
    ssl_context: ssl.SSLContext | None = None
    calls: list[Call] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = "localhost" if self.ssl_context else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> StandIn:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append(Call(request.path_qs, dict(request.headers), body))
        return await self.handler(request, body)


def json_answer(payload: bytes, status: int = 200) -> Handler:
    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=status, body=payload,
                            headers={"Content-Type": "application/json; charset=utf-8"})

    return handler


def echo_partner() -> Handler:
    """A partner service that answers every request with a small JSON echo of its path."""

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        payload = b'{"responseHeader":{"responseTimestamp":{"epochMillis":"1"}},"path":"' + \
            request.path.encode() + b'","received":' + str(len(body)).encode() + b"}"
        return web.Response(body=payload,
                            headers={"Content-Type": "application/json; charset=utf-8"})

    return handler


def slow(seconds: float, then: Handler) -> Handler:
    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await then(request, body)

    return handler


@dataclass
class ConnectProxy:
    """A minimal egress HTTP proxy that only tunnels CONNECT, recording the targets."""

    targets: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


# -- byte-level faults ----------------------------------------------------------------------


@dataclass
class RawRequest:
    head: bytes
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Exchange:
    """One request on a RawPeer connection, for a behaviour to answer (or not) byte by byte."""

    peer: RawPeer
    request: RawRequest
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def closed_by_client(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    async def send(self, data: bytes) -> bool:
        """Write `data`; False once the client has gone (the peer then stops writing)."""
        if self.closed_by_client():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError):
            return False
        self.peer.sent += len(data)
        return True

    async def wait_for_client_close(self, limit: float = 10) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(limit):
                while await self.reader.read(65536):
                    pass

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0, then close), not a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


# A behaviour answers one request; True keeps the connection open for the next one.
Behaviour = Callable[[Exchange], Awaitable[bool]]


@dataclass
class RawPeer:
    """An HTTP/1.1 peer at the byte level, for faults aiohttp's server cannot make: it reads each
    request (head and Content-Length body), records it, then lets `behaviour` write whatever it
    likes. With `ssl_context` the TLS handshake starts after accept, so a connection is counted
    even when its handshake fails; replace `behaviour` or `ssl_context` at any time."""

    behaviour: Behaviour
    ssl_context: ssl.SSLContext | None = None
    connections: int = 0  # TCP connections accepted
    handshake_failures: int = 0
    requests: list[RawRequest] = field(default_factory=list)
    sent: int = 0  # bytes the behaviours managed to write
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = "localhost" if self.ssl_context else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    @property
    def busy(self) -> bool:
        """A connection is still being served."""
        return any(not task.done() for task in self._tasks)

    async def start(self, port: int = 0) -> RawPeer:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            if self.ssl_context is not None:
                try:
                    await writer.start_tls(self.ssl_context)
                except (ssl.SSLError, ConnectionError):
                    self.handshake_failures += 1
                    return
            while (request := await _read_request(reader)) is not None:
                self.requests.append(request)
                if not await self.behaviour(Exchange(self, request, reader, writer)):
                    break
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    try:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    except asyncio.IncompleteReadError:
        return None
    return RawRequest(head, headers, body)


def raw_answer(body: bytes, content_type: str, status: int = 200,
               extra: bytes = b"") -> Behaviour:
    """A well-formed answer with Content-Length, keeping the connection open."""

    async def behaviour(exchange: Exchange) -> bool:
        head = (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
                % (status, content_type.encode(), len(body), extra))
        return await exchange.send(head + body)

    return behaviour
