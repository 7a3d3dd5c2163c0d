"""A failing upstream, both directions: the partner service behind an inbound route (plain HTTP
or TLS) and Google behind an outbound route (TLS). Every fault gets the answer of protocol.md's
failure table, the upstream sees the request exactly once (never retried), nothing crosses in
the wrong form (no plaintext to Google, no ciphertext to the partner, no upstream bytes or
headers passed on unopened or unsealed), the log and the metrics name the reason, and the next
request succeeds. Byte-level faults come from tests.peers.RawPeer (asyncio streams)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway import proxy
from gateway.app import Gateway
from gateway.envelope import CONTENT_TYPES, PLAINTEXT_CONTENT_TYPE
from gateway.proxy import _MESSAGES
from tests.e2e import ANSWER, REQUEST, Google, Pki, google_for, post, running_gateway
from tests.peers import Behaviour, Exchange, RawPeer, raw_answer
from tests.work_count import module_with

pytestmark = pytest.mark.e2e

TIMEOUT = 0.5  # upstream.timeout_s
CAP = 65536  # limits.max_body_bytes
LEAK = b"Set-Cookie: upstream-secret=1\r\nX-Upstream: leak\r\n"  # must never be passed on
SIDES = ["inbound-http", "inbound-https", "outbound-https"]


# -- the rig: one gateway route in front of one RawPeer ----------------------------------------


async def nothing(exchange: Exchange) -> bool:
    """A placeholder behaviour (each test sets the real one): hang up."""
    return False


def route_config(google: Google, runtime_dir: Path, pki: Pki, direction: str, url: str) -> str:
    ca = f", ca: {pki.ca}" if url.startswith("https") else ""
    listener = (f"\n            tls: {{cert: {pki.cert}, key: {pki.key}}}"
                if direction == "inbound" else "")
    return f"""
        admin: {{listen: "127.0.0.1:0"}}
        reload: {{interval_s: 0}}
        runtime_dir: {runtime_dir}
        limits: {{max_body_bytes: {CAP}}}
        {google.keysets()}
        routes:
          - name: {"in" if direction == "inbound" else "out"}
            direction: {direction}
            listen: "127.0.0.1:0"{listener}
            upstream: {{url: "{url}", timeout_s: {TIMEOUT}{ca}}}
            own_keys: partner
            peer_keys: google{google.route_block}
    """


@dataclass
class Rig:
    google: Google
    pki: Pki
    direction: str
    peer: RawPeer
    gateway: Gateway
    answer: bytes  # what a healthy upstream answers: plaintext (partner) or sealed (Google)
    answer_type: str
    sealed_request: bytes  # Google's sealed request to the inbound route
    caplog: pytest.LogCaptureFixture
    good_tls: ssl.SSLContext | None = None

    @property
    def route(self) -> str:
        return "in" if self.direction == "inbound" else "out"

    def good(self) -> Behaviour:
        return raw_answer(self.answer, self.answer_type)

    async def call(self) -> tuple[int, dict[str, str], bytes]:
        if self.direction == "inbound":
            return await post(self.gateway, "in", self.sealed_request,
                              ctx=self.pki.client_context(), path="/cards-qr-v1/transfer")
        return await post(self.gateway, "out", REQUEST, path="/cards-qr-v1/echo/PIAID-1")

    def metric(self, name: str, **labels: str) -> float:
        text = self.gateway.metrics.render().decode()
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} "):
                return float(line.split()[-1])
        return 0.0

    def requests_logged(self) -> list[dict[str, Any]]:
        return [dict(record.fields) for record in self.caplog.records  # type: ignore[attr-defined]
                if record.name == "gateway.proxy" and record.getMessage() == "request"]

    async def settle(self, limit: float = 5) -> None:
        """Wait until the peer serves no connection: the gateway has dropped what it held."""
        async with asyncio.timeout(limit):
            while self.peer.busy:
                await asyncio.sleep(0.02)

    async def check_upstream_got_it_once(self, requests: int = 1) -> None:
        """Exactly `requests` requests, in the form this side's upstream must get."""
        assert len(self.peer.requests) == requests
        for got in self.peer.requests:
            if self.direction == "inbound":
                # The partner gets the plaintext JSON, never the ciphertext.
                assert got.body == REQUEST
                assert got.headers["content-type"] == PLAINTEXT_CONTENT_TYPE
            else:
                # Google gets it sealed, never the plaintext.
                assert got.headers["content-type"] == CONTENT_TYPES[self.google.scheme]
                assert REQUEST not in got.body and b"req-0001" not in got.body
                opened, _ = await asyncio.to_thread(self.google.open, got.body)
                assert opened == REQUEST

    async def check_healthy(self, requests: int) -> None:
        """The next request, to an upstream that behaves, goes through."""
        self.peer.behaviour = self.good()
        self.peer.ssl_context = self.good_tls
        labels = {"route": self.route, "direction": self.direction, "code": "200"}
        before = self.metric("gateway_requests_total", **labels)
        status, headers, body = await self.call()
        assert status == 200
        assert "Set-Cookie" not in headers and "X-Upstream" not in headers
        if self.direction == "inbound":
            assert headers["Content-Type"] == CONTENT_TYPES[self.google.scheme]
            assert (await asyncio.to_thread(self.google.open, body))[0] == ANSWER
        else:
            assert (body, headers["Content-Type"]) == (ANSWER, PLAINTEXT_CONTENT_TYPE)
        await self.check_upstream_got_it_once(requests)
        assert self.metric("gateway_requests_total", **labels) == before + 1


@asynccontextmanager
async def rig(request: pytest.FixtureRequest, side: str, scheme: str, behaviour: Behaviour,
              *, tls: ssl.SSLContext | None = None, refused: bool = False) -> AsyncIterator[Rig]:
    """A gateway route (`side`: inbound-http, inbound-https or outbound-https) whose upstream
    is a RawPeer doing `behaviour` (with the server context `tls`, when given, instead of the
    good one). `refused`: the peer is not started, so its port refuses connections."""
    google = google_for(request, scheme)
    pki: Pki = request.getfixturevalue("pki")
    runtime_dir: Path = request.getfixturevalue("runtime_dir")
    tmp_path: Path = request.getfixturevalue("tmp_path")
    caplog: pytest.LogCaptureFixture = request.getfixturevalue("caplog")
    caplog.set_level(logging.INFO, logger="gateway.proxy")
    direction, transport = side.split("-")
    good_tls = pki.server_context() if transport == "https" else None
    peer = RawPeer(behaviour, ssl_context=tls or good_tls)
    # `refused`: a port nobody listens on (until check_healthy). The probe keeps it bound, not
    # listening, until the gateway has bound its own port-0 listeners: released earlier, the
    # kernel could give the same port to the gateway, which would then forward to itself.
    probe = socket.socket() if refused else None
    if probe is not None:
        probe.bind(("127.0.0.1", 0))
        peer.port = probe.getsockname()[1]
    else:
        await peer.start()
    sealed_request = await asyncio.to_thread(google.seal, REQUEST)
    if direction == "inbound":
        answer, answer_type = ANSWER, PLAINTEXT_CONTENT_TYPE
    else:
        answer = await asyncio.to_thread(google.seal, ANSWER)
        answer_type = CONTENT_TYPES[google.scheme]
    text = route_config(google, runtime_dir, pki, direction, peer.url)
    try:
        async with running_gateway(tmp_path, text) as gateway:
            if probe is not None:
                probe.close()
            yield Rig(google, pki, direction, peer, gateway, answer, answer_type,
                      sealed_request, caplog, good_tls)
    finally:
        if probe is not None:
            probe.close()
        await peer.stop()


def proxy_timers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float | None, asyncio.Timeout]]:
    """Every asyncio.timeout the proxy sets from now on, with its delay in seconds."""
    timers: list[tuple[float | None, asyncio.Timeout]] = []

    def timeout(delay: float | None) -> asyncio.Timeout:
        timers.append((delay, asyncio.timeout(delay)))
        return timers[-1][1]

    monkeypatch.setattr(proxy, "asyncio", module_with(asyncio, timeout=timeout))
    return timers


def check_failure(rig: Rig, status: int, headers: dict[str, str], body: bytes,
                  expected: int, reason: str) -> None:
    """The table's answer, in the fixed form of each direction, and its reason recorded."""
    assert status == expected
    assert headers["Server"] == "cards-qr-gateway"
    assert "Set-Cookie" not in headers and "X-Upstream" not in headers
    assert "Retry-After" not in headers
    if rig.direction == "inbound":
        # Toward Google: empty, identical for every cause of the row.
        assert body == b""
        assert headers.get("Content-Length", "0") == "0"
    else:
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        assert json.loads(body) == {"error": reason, "message": _MESSAGES[reason]}
    [logged] = rig.requests_logged()
    assert (logged["status"], logged["reason"]) == (expected, reason)
    assert logged["route"] == rig.route and logged["direction"] == rig.direction
    assert rig.metric("gateway_requests_total", route=rig.route, direction=rig.direction,
                      code=str(expected)) == 1
    assert rig.metric("gateway_upstream_duration_seconds_count", route=rig.route) == 1


# -- faults at the byte level ---------------------------------------------------------------

# A Fault makes a behaviour from the healthy answer (body, content type).
Fault = Callable[[bytes, str], Behaviour]


def head(content_type: str, framing: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode() + b"\r\n" + LEAK +
            framing + b"\r\n")


def reset_after(data: Callable[[bytes, str], bytes], pause: float = 0.1) -> Fault:
    """Send `data`, let it arrive, then RST."""

    def fault(body: bytes, content_type: str) -> Behaviour:
        async def behaviour(exchange: Exchange) -> bool:
            await exchange.send(data(body, content_type))
            await asyncio.sleep(pause)
            exchange.reset()
            return False

        return behaviour

    return fault


def close_after(data: Callable[[bytes, str], bytes]) -> Fault:
    """Send `data`, then a clean close (FIN)."""

    def fault(body: bytes, content_type: str) -> Behaviour:
        async def behaviour(exchange: Exchange) -> bool:
            await exchange.send(data(body, content_type))
            return False

        return behaviour

    return fault


def hold_after(data: Callable[[bytes, str], bytes]) -> Fault:
    """Send `data`, then nothing, until the gateway hangs up."""

    def fault(body: bytes, content_type: str) -> Behaviour:
        async def behaviour(exchange: Exchange) -> bool:
            await exchange.send(data(body, content_type))
            await exchange.wait_for_client_close()
            return False

        return behaviour

    return fault


def trickle(body: bytes, content_type: str) -> Behaviour:
    """The head at once (with Content-Length), then the body a byte every 50 ms: each byte is
    quick, the whole is not (timeout_s covers the body too)."""

    async def behaviour(exchange: Exchange) -> bool:
        if not await exchange.send(head(content_type, b"Content-Length: %d\r\n" % len(body))):
            return False
        for byte in body:
            await asyncio.sleep(0.05)
            if not await exchange.send(bytes([byte])):
                break
        return False

    return behaviour


def endless(framing: bytes, chunked: bool = False) -> Fault:
    """A body without end, 16 KiB at a time, until the gateway hangs up. Past 64 MiB the peer
    resets instead, so a gateway that read without bound would see a failed exchange, not an
    over-limit one."""

    def fault(body: bytes, content_type: str) -> Behaviour:
        async def behaviour(exchange: Exchange) -> bool:
            piece = b"7" * 16384
            if chunked:
                piece = b"%x\r\n%s\r\n" % (len(piece), piece)
            if not await exchange.send(head(content_type, framing)):
                return False
            while exchange.peer.sent < 64 * 1024 * 1024:
                if not await exchange.send(piece):
                    return False
            exchange.reset()
            return False

        return behaviour

    return fault


def endless_headers(body: bytes, content_type: str) -> Behaviour:
    """A head without end: header lines, 100 bytes each, until the gateway hangs up (64 MiB at
    most, then a reset)."""

    async def behaviour(exchange: Exchange) -> bool:
        if not await exchange.send(b"HTTP/1.1 200 OK\r\n"):
            return False
        index = 0
        while exchange.peer.sent < 64 * 1024 * 1024:
            lines = b"".join(b"X-Pad-%08d: %s\r\n" % (index + i, b"p" * 80) for i in range(100))
            index += 100
            if not await exchange.send(lines):
                return False
        exchange.reset()
        return False

    return behaviour


def gzipped(body: bytes, content_type: str) -> Behaviour:
    packed = gzip.compress(body)
    return raw_answer(packed, content_type,
                      extra=LEAK + b"Content-Encoding: gzip\r\n")


def answered(data: Callable[[bytes, str], bytes]) -> Fault:
    """Send `data` as a whole answer and keep the connection for the next request."""

    def fault(body: bytes, content_type: str) -> Behaviour:
        async def behaviour(exchange: Exchange) -> bool:
            return await exchange.send(data(body, content_type))

        return behaviour

    return fault


def coded(codings: bytes) -> Fault:
    """The answer gzipped, with `codings` (header lines) saying so in ways aiohttp does not
    decode: a second Content-Encoding line, a list in one line, a transfer coding."""
    if b"Transfer-Encoding" in codings:
        return answered(lambda b, t: head(t, codings) + chunk(gzip.compress(b)) + chunk(b""))
    return answered(lambda b, t: head(t, b"Content-Length: %d\r\n" % len(gzip.compress(b))
                                      + codings) + gzip.compress(b))


def status_line(status: bytes) -> Fault:
    """A well-framed answer whose status is not a final HTTP status."""
    return answered(lambda b, t: head(t, b"Content-Length: %d\r\n" % len(b)).replace(
        b"HTTP/1.1 200 OK", b"HTTP/1.1 " + status, 1) + b)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


GARBAGE = b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe not HTTP at all \x01\x02\r\n\r\n"

# fault -> (behaviour, status, reason); the same row for both directions.
FAULTS: dict[str, tuple[Fault, int, str]] = {
    "reset_in_status_line": (reset_after(lambda b, t: b"HTTP/1.1 20"), 502,
                             "upstream_unreachable"),
    "reset_in_headers": (reset_after(lambda b, t: head(t, b"")[:40]), 502,
                         "upstream_unreachable"),
    "reset_in_body": (reset_after(lambda b, t: head(t, b"Content-Length: %d\r\n" % len(b)) +
                                  b[:len(b) // 2]), 502, "upstream_unreachable"),
    "reset_in_chunked_body": (reset_after(lambda b, t: head(t, b"Transfer-Encoding: chunked\r\n")
                                          + chunk(b[:len(b) // 2])), 502,
                              "upstream_unreachable"),
    "closed_in_body": (close_after(lambda b, t: head(t, b"Content-Length: %d\r\n" % len(b)) +
                                   b[:len(b) // 2]), 502, "upstream_unreachable"),
    "closed_before_answer": (close_after(lambda b, t: b""), 502, "upstream_unreachable"),
    "slow_headers": (hold_after(lambda b, t: b""), 504, "upstream_timeout"),
    "slow_headers_half_sent": (hold_after(lambda b, t: head(t, b"")[:40]), 504,
                               "upstream_timeout"),
    "slow_body": (trickle, 504, "upstream_timeout"),
    "garbage": (hold_after(lambda b, t: GARBAGE), 502, "upstream_unreachable"),
    "garbage_then_close": (close_after(lambda b, t: GARBAGE * 3), 502, "upstream_unreachable"),
    "bad_chunk_size": (hold_after(lambda b, t: head(t, b"Transfer-Encoding: chunked\r\n") +
                                  b"zz\r\n" + b + b"\r\n"), 502, "upstream_unreachable"),
    "bad_content_length": (hold_after(lambda b, t: head(t, b"Content-Length: 12x\r\n") + b),
                           502, "upstream_unreachable"),
    "conflicting_content_lengths": (hold_after(lambda b, t: head(
        t, b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(b), len(b) + 7)) + b), 502,
                                    "upstream_unreachable"),
    "huge_with_content_length": (endless(b"Content-Length: %d\r\n" % (100 * CAP)), 502,
                                 "too_large"),
    "huge_chunked": (endless(b"Transfer-Encoding: chunked\r\n", chunked=True), 502, "too_large"),
    "huge_until_close": (endless(b"Connection: close\r\n"), 502, "too_large"),
    "huge_head": (endless_headers, 502, "upstream_unreachable"),
    "content_encoding": (gzipped, 502, "upstream_unreachable"),
    "content_encoding_second_line": (coded(b"Content-Encoding: identity\r\n"
                                           b"Content-Encoding: gzip\r\n"), 502,
                                     "upstream_unreachable"),
    "content_encoding_list": (coded(b"Content-Encoding: identity, gzip\r\n"), 502,
                              "upstream_unreachable"),
    "transfer_coding": (coded(b"Transfer-Encoding: gzip, chunked\r\n"), 502,
                        "upstream_unreachable"),
    "status_101": (status_line(b"101 Switching Protocols"), 502, "upstream_unreachable"),
    "status_099": (status_line(b"099 Low"), 502, "upstream_unreachable"),
    "status_600": (status_line(b"600 High"), 502, "upstream_unreachable"),
}
# The gateway must have dropped the connection itself (it answered before the peer ended).
CUT = {"slow_headers", "slow_headers_half_sent", "slow_body", "garbage", "bad_chunk_size",
       "bad_content_length", "huge_with_content_length", "huge_chunked", "huge_until_close",
       "huge_head"}


# A partner over TLS: each kind of fault once more, through the TLS layer (resets, closes, slow
# and endless streams, garbage); framing and parsing faults are the same as over plain HTTP.
OVER_TLS = {"reset_in_headers", "reset_in_body", "reset_in_chunked_body", "closed_in_body",
            "slow_headers", "slow_body", "garbage", "huge_chunked", "huge_until_close"}


@pytest.mark.parametrize(("fault", "side"), [
    (fault, side) for fault in FAULTS for side in SIDES
    if side != "inbound-https" or fault in OVER_TLS
])
async def test_upstream_fault(request: pytest.FixtureRequest, side: str, fault: str) -> None:
    make, expected, reason = FAULTS[fault]
    async with rig(request, side, "jose", nothing) as r:
        r.peer.behaviour = make(r.answer, r.answer_type)
        with pytest.MonkeyPatch.context() as spying:
            timers = proxy_timers(spying)
            status, headers, body = await r.call()
        check_failure(r, status, headers, body, expected, reason)
        # A 504 is the upstream deadline's doing: the one timer that ran out is timeout_s's
        # (so it came no sooner, and nothing else stood in for it).
        expired = [delay for delay, timer in timers if timer.expired()]
        assert expired == ([TIMEOUT] if expected == 504 else [])
        if fault in CUT:
            await r.settle()  # the gateway hung up: the peer stopped serving
        if fault.startswith("huge"):
            # Read bounded: the cap, plus what the sockets buffer, not the 64 MiB on offer.
            assert r.peer.sent < 16 * 1024 * 1024
        await r.check_upstream_got_it_once()
        assert r.peer.connections == 1
        assert r.answer[:16] not in body  # nothing of the upstream's answer passed on
        await r.check_healthy(requests=2)


@pytest.mark.parametrize("side", SIDES)
async def test_a_reset_in_an_unframed_body_is_not_taken_for_its_end(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, side: str,
) -> None:
    """No Content-Length, not chunked: the body ends with the connection, and aiohttp ends it at
    a reset as at a FIN. The gateway used to seal the partner's cut answer and send it to Google
    with a 200 (outbound: 502 `malformed`); it now tells a reset from a close (502). The reset
    comes once the gateway reads the body, as a cut stream's does: one that lands before aiohttp
    hands the response over is not visible (see _close_of_unframed_body)."""
    reading = asyncio.Event()
    read_capped = proxy._read_capped

    async def spy(*args: Any) -> bytes:
        reading.set()
        return await read_capped(*args)

    monkeypatch.setattr(proxy, "_read_capped", spy)

    def fault(body: bytes, content_type: str) -> Behaviour:
        async def behaviour(exchange: Exchange) -> bool:
            cut = body[:len(body) // 2]
            await exchange.send(head(content_type, b"Connection: close\r\n") + cut)
            async with asyncio.timeout(5):
                await reading.wait()
            await asyncio.sleep(0.05)
            exchange.reset()
            return False

        return behaviour

    async with rig(request, side, "jose", nothing) as r:
        r.peer.behaviour = fault(r.answer, r.answer_type)
        status, headers, body = await r.call()
        check_failure(r, status, headers, body, 502, "upstream_unreachable")
        await r.check_upstream_got_it_once()
        assert r.answer[:16] not in body
        await r.check_healthy(requests=2)


@pytest.mark.parametrize("side", SIDES)
async def test_an_unframed_answer_ends_at_a_clean_close(
    request: pytest.FixtureRequest, side: str,
) -> None:
    """The other side of the test above: no Content-Length, not chunked, then a FIN is a
    whole answer in HTTP/1.1 (an HTTP/1.0-style upstream keeps working)."""
    async with rig(request, side, "jose", nothing) as r:
        r.peer.behaviour = close_after(lambda b, t: head(t, b"Connection: close\r\n") + b)(
            r.answer, r.answer_type)
        status, _, body = await r.call()
        assert status == 200
        if r.direction == "inbound":
            assert (await asyncio.to_thread(r.google.open, body))[0] == ANSWER
        else:
            assert body == ANSWER
        await r.check_upstream_got_it_once()
        await r.check_healthy(requests=2)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_kept_alive_connection_the_upstream_dropped_is_not_reused(
    request: pytest.FixtureRequest, side: str, how: str,
) -> None:
    """The upstream answers in full (keep-alive), then drops the idle connection: the next
    request opens a new one instead of failing on the dead one (a POST is never retried)."""

    async with rig(request, side, "jose", nothing) as r:
        good = r.good()

        async def answer_then_drop(exchange: Exchange) -> bool:
            await good(exchange)
            await asyncio.sleep(0.05)
            if how == "reset":
                exchange.reset()
            return False

        r.peer.behaviour = answer_then_drop
        first = await r.call()
        assert first[0] == 200
        await r.settle()
        await r.check_healthy(requests=2)
        assert r.peer.connections == 2


@pytest.mark.parametrize("side", SIDES)
async def test_clean_kept_alive_connections_are_reused(
    request: pytest.FixtureRequest, side: str,
) -> None:
    # The pool discards connections holding stray bytes (see the stray-answer test), never the
    # clean ones: keep-alive toward upstreams is what spares a TLS handshake per request.
    async with rig(request, side, "jose", nothing) as r:
        r.peer.behaviour = r.good()
        for _ in range(3):
            assert (await r.call())[0] == 200
        assert r.peer.connections == 1


@pytest.mark.parametrize("side", SIDES)
async def test_connection_refused(request: pytest.FixtureRequest, side: str) -> None:
    async with rig(request, side, "jose", nothing,
                   refused=True) as r:
        r.peer.behaviour = r.good()
        status, headers, body = await r.call()
        check_failure(r, status, headers, body, 502, "upstream_unreachable")
        # Nobody listened; now the upstream comes up on that port: no failure is remembered.
        await r.peer.start(port=r.peer.port)
        await r.check_healthy(requests=1)
        assert r.peer.connections == 1


# -- TLS toward the upstream ----------------------------------------------------------------


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def bad_server_certs(pki: Pki) -> dict[str, trustme.LeafCert]:
    return {
        # localhost and 127.0.0.1, but from a CA the gateway does not trust.
        "untrusted_ca": trustme.CA().issue_cert("localhost", "127.0.0.1"),
        # From the trusted CA, but for another name.
        "wrong_hostname": pki._server_ca.issue_cert("partner.example"),
    }


@pytest.mark.parametrize("side", ["inbound-https", "outbound-https"])
@pytest.mark.parametrize("fault", ["untrusted_ca", "wrong_hostname"])
async def test_upstream_tls_failure(request: pytest.FixtureRequest, side: str, fault: str,
                                    bad_server_certs: dict[str, trustme.LeafCert]) -> None:
    tls = server_context(bad_server_certs[fault])
    async with rig(request, side, "jose", nothing,
                   tls=tls) as r:
        r.peer.behaviour = r.good()
        status, headers, body = await r.call()
        check_failure(r, status, headers, body, 502, "upstream_unreachable")
        await r.settle()
        # One connection, refused at the handshake: no request crossed, none retried.
        assert (r.peer.connections, r.peer.handshake_failures, r.peer.requests) == (1, 1, [])
        await r.check_healthy(requests=1)
        assert r.peer.connections == 2


# -- the wrong kind of answer ---------------------------------------------------------------

PLAIN_ERROR = b'{"errorResponseCode":"INVALID_PAYLOAD_ENCRYPTION"}'


@pytest.mark.parametrize("scheme", ["pgp", "jose"])
@pytest.mark.parametrize(("content_type", "status", "payload"), [
    ("text/plain", 200, ANSWER),
    ("application/json; charset=utf-8", 200, ANSWER),
    ("application/json", 400, PLAIN_ERROR),
], ids=["text-plain", "json-plaintext", "json-error-400"])
async def test_google_answers_plaintext_instead_of_sealed(
    request: pytest.FixtureRequest, scheme: str, content_type: str, status: int,
    payload: bytes,
) -> None:
    async with rig(request, "outbound-https", scheme,
                   raw_answer(payload, content_type, status, LEAK)) as r:
        answer_status, headers, body = await r.call()
        # Google's answer does not open: 502, never passed on as if it were plaintext.
        check_failure(r, answer_status, headers, body, 502, "malformed")
        assert payload not in body and b"errorResponseCode" not in body
        assert r.metric("gateway_crypto_failures_total", route="out", op="open",
                        reason="malformed") == 1
        await r.check_upstream_got_it_once()
        await r.check_healthy(requests=2)


@pytest.mark.parametrize("scheme", ["pgp", "jose"])
@pytest.mark.parametrize("kind", ["html-error-page", "sealed-looking"])
async def test_partner_answers_something_else_than_json(
    request: pytest.FixtureRequest, scheme: str, kind: str,
) -> None:
    async def run(r: Rig) -> tuple[bytes, int]:
        if kind == "html-error-page":
            payload, status = b"<html><body>500 oops</body></html>", 500
            r.peer.behaviour = raw_answer(payload, "text/html", status, LEAK)
        else:
            # The ciphertext it was never sent, under the sealed content type.
            payload, status = r.sealed_request, 200
            r.peer.behaviour = raw_answer(payload, CONTENT_TYPES[r.google.scheme], status,
                                          LEAK)
        return payload, status

    async with rig(request, "inbound-http", scheme,
                   nothing) as r:
        payload, partner_status = await run(r)
        status, headers, body = await r.call()
        # The gateway never parses the partner's plaintext: whatever it is, it is sealed (bytes
        # in, bytes out), its status kept, and it never reaches Google as is.
        assert status == partner_status
        assert headers["Content-Type"] == CONTENT_TYPES[r.google.scheme]
        assert "Set-Cookie" not in headers and "X-Upstream" not in headers
        assert body != payload and payload not in body
        opened, signers = await asyncio.to_thread(r.google.open, body)
        assert opened == payload
        assert signers and all(s.startswith("partner") for s in signers)
        [logged] = r.requests_logged()
        assert logged["status"] == partner_status and "reason" not in logged
        assert r.metric("gateway_requests_total", route="in", direction="inbound",
                        code=str(partner_status)) == 1
        await r.check_upstream_got_it_once()
        await r.check_healthy(requests=2)




STRAY = b'{"responseHeader":{"responseTimestamp":{"epochMillis":"3"}},"stray":true}'


@pytest.mark.parametrize("side", SIDES)
async def test_a_stray_answer_on_an_idle_connection_is_not_the_next_answer(
    request: pytest.FixtureRequest, side: str,
) -> None:
    """The upstream answers, then sends a second, unsolicited answer on the idle kept-alive
    connection (a buggy service; or a server's 408 on an idle connection). The next request
    must get its own answer, never the stray one: for the partner, the stray answer of one
    request would be sealed and given to Google as the answer to another."""
    async with rig(request, side, "jose", nothing) as r:
        good = r.good()
        stray = STRAY
        if r.direction == "outbound":
            stray = await asyncio.to_thread(r.google.seal, STRAY)
        stray_type = r.answer_type

        async def answer_then_stray(exchange: Exchange) -> bool:
            await good(exchange)
            await asyncio.sleep(0.05)
            return await raw_answer(stray, stray_type)(exchange)

        r.peer.behaviour = answer_then_stray
        assert (await r.call())[0] == 200
        await asyncio.sleep(0.2)  # the stray answer has arrived on the idle connection
        r.peer.behaviour = good
        status, _, body = await r.call()
        assert status == 200
        if r.direction == "inbound":
            body = (await asyncio.to_thread(r.google.open, body))[0]
        assert body == ANSWER
