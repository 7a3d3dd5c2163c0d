"""Stand-in peers for end-to-end tests: a partner service and a Google, on port 0.

The stand-in Google seals and opens with implementations that are not ours (the gpg command
line, panva's jose), passed in as plain callables.
"""

from __future__ import annotations

import asyncio
import ssl
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
