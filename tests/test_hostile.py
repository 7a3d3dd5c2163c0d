"""Hostile clients against the real `python -m gateway run` process (one for the module): real
TLS, slowloris heads and bodies, oversized and malformed heads, too many connections, non-POST
methods, wrong content types and random bodies. After each case the process is alive, /healthz
answers and a good sealed request still gets its sealed answer; the partner only ever sees
good requests; the log stays JSON without body bytes; /metrics counts the closes by reason.

Raw input goes over blocking sockets wrapped in TLS; the stand-in partner runs on an event loop
in a thread of its own, so every test (hypothesis's included) is a plain function."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.envelope import CONTENT_TYPES
from tests.conftest import kill_agents
from tests.e2e import ANSWER, REQUEST, Google, Pki, config, google_for
from tests.peers import StandIn, json_answer

pytestmark = pytest.mark.e2e

T = TypeVar("T")
LIMITS = ("limits: {header_timeout_s: 0.5, body_timeout_s: 0.5, max_connections: 8, "
          "max_headers: 16, max_header_bytes: 4096, max_body_bytes: 65536}")
# In every hostile body and head: it must never reach the log.
MARKER = b"HostileMarker7qZx"
JOSE_TYPE = CONTENT_TYPES["jose"]
POST_LINE = b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"


class LoopThread:
    """An event loop in a thread of its own, for the stand-in partner."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Running:
    """The gateway process and what the tests need to talk to it."""

    process: subprocess.Popen[bytes]
    port: int
    admin: int
    pki: Pki
    google: Google
    partner: StandIn
    sealed: bytes
    reader: threading.Thread
    lines: list[bytes] = field(default_factory=list)
    closed: set[str] = field(default_factory=set)  # reasons the tests have seen counted

    def context(self) -> ssl.SSLContext:
        return self.pki.client_context()


def read_stderr(process: subprocess.Popen[bytes], lines: list[bytes],
                listening: threading.Event) -> None:
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line)
        if b'"event": "listening"' in line:
            listening.set()
    listening.set()  # the process exited: let the fixture see it


@pytest.fixture(scope="module")
def gateway(request: pytest.FixtureRequest, pki: Pki, session_tmp: Path) -> Iterator[Running]:
    google = google_for(request, "jose")  # listener behaviour: one scheme is enough
    loop = LoopThread()
    partner = loop.run(StandIn(json_answer(ANSWER)).start())
    base = Path(tempfile.mkdtemp(prefix="hostile-", dir=session_tmp))
    runtime = base / "rt"
    runtime.mkdir(mode=0o700)
    path = base / "config.yaml"
    path.write_text(textwrap.dedent(config(google, runtime, pki, inbound_url=partner.url,
                                           limits=LIMITS)))
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[bytes] = []
    listening = threading.Event()
    reader = threading.Thread(target=read_stderr, args=(process, lines, listening), daemon=True)
    reader.start()
    try:
        assert listening.wait(60) and process.poll() is None, b"".join(lines).decode()
        event = next(json.loads(line) for line in lines if b'"listening"' in line)
        running = Running(
            process, int(event["routes"]["in"].rsplit(":", 1)[1]),
            int(event["admin"].rsplit(":", 1)[1]), pki, google, partner,
            google.seal(REQUEST), reader, lines)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(10)
        assert process.stderr is not None
        process.stderr.close()
        loop.run(partner.stop())
        loop.close()
        kill_agents(base)
        shutil.rmtree(base, ignore_errors=True)


# -- talking to it --------------------------------------------------------------------------


def connect(gw: Running, timeout: float = 10) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    try:
        return gw.context().wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def read_answer(tls: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer: (status, headers, body); status 0 if the gateway closed first."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                return 0, {}, b""
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, v in (line.split(":", 1) for line in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = tls.recv(65536)
            if not chunk:
                break
            body += chunk
    except (ConnectionError, ssl.SSLError):
        return 0, {}, b""
    return int(status_line.split(" ", 2)[1]), headers, body


def send(tls: ssl.SSLSocket, data: bytes) -> bool:
    """False once the gateway has closed the connection."""
    try:
        tls.sendall(data)
    except (ConnectionError, ssl.SSLError):
        return False
    return True


def exchange(gw: Running, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(gw) as tls:
        send(tls, data)
        return read_answer(tls)


def trickle(tls: ssl.SSLSocket, data: bytes, every: float = 0.05) -> int | None:
    """Send `data` a byte at a time; the index at which the gateway closed, or None."""
    tls.settimeout(every)
    for index in range(len(data)):
        if not send(tls, data[index:index + 1]):
            return index
        try:
            if tls.recv(65536) == b"":
                return index
        except TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError):
            return index
    return None


def post(gw: Running, body: bytes, content_type: str = JOSE_TYPE,
         method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPSConnection("localhost", gw.port, context=gw.context(),
                                             timeout=10)
    try:
        connection.request(method, "/cards-qr-v1/echo", body=body,
                           headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        connection.close()


def admin_get(gw: Running, page: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin}{page}", timeout=10) as answer:
        return answer.status, answer.read().decode()


def total(metrics: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


REASONS = ("header_timeout", "header_bytes", "max_connections", "bad_request")


def counted(gw: Running) -> dict[str, float]:
    """The listener's closes by reason, and the requests answered (by status and in all)."""
    metrics = admin_get(gw, "/metrics")[1]
    counts = {reason: total(metrics, "gateway_connections_closed_total", route="in",
                            reason=reason) for reason in REASONS}
    for code in ("400", "405", "408", "413", "431"):
        counts[code] = total(metrics, "gateway_requests_total", route="in", code=code)
    counts["requests"] = total(metrics, "gateway_requests_total", route="in")
    return counts


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What changed, without the unchanged."""
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def expect(gw: Running, before: dict[str, float], changes: dict[str, float]) -> None:
    assert delta(before, counted(gw)) == changes
    gw.closed.update(set(changes) & set(REASONS))


def assert_healthy(gw: Running) -> None:
    """The process lives, /healthz answers, a good request gets its sealed answer, and the
    partner has only ever been called with good requests."""
    assert gw.process.poll() is None, "the gateway exited"
    assert admin_get(gw, "/healthz") == (200, "ok\n")
    calls = len(gw.partner.calls)
    status, headers, body = post(gw, gw.sealed)
    assert status == 200
    assert headers["content-type"] == JOSE_TYPE
    assert gw.google.open(body)[0] == ANSWER
    assert len(gw.partner.calls) == calls + 1
    assert all(call.body == REQUEST for call in gw.partner.calls)


def refused(status: int, *allowed: int) -> bool:
    """An answer in `allowed`, or the connection closed without one (status 0)."""
    return status in (0, *allowed)


# -- too many connections -------------------------------------------------------------------


def test_connections_beyond_max_connections_are_closed(gateway: Running) -> None:
    """First in the module: a request refused before its body ended (the slow body's 408)
    keeps its connection counted for aiohttp's lingering_time (10 s) even once the client has
    gone, which would take a slot from this test."""
    time.sleep(0.3)  # the health checks' connections are gone
    before = counted(gateway)
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(8):
            tls = connect(gateway)
            held.append(tls)
            # A first request at once, so header_timeout_s does not close it while idle.
            send(tls, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_answer(tls)[0] == 405
        with connect(gateway) as extra:
            extra.settimeout(5)
            try:
                closed = extra.recv(1) == b""
            except (ConnectionError, ssl.SSLError):
                closed = True
        assert closed
        # The connections held still work.
        request = (POST_LINE + b"Content-Length: %d\r\n\r\n" % len(gateway.sealed) +
                   gateway.sealed)
        for tls in held:
            send(tls, request)
        for tls in held:
            status, headers, body = read_answer(tls)
            assert status == 200 and headers["content-type"] == JOSE_TYPE
        assert gateway.google.open(body)[0] == ANSWER
        expect(gateway, before, {"max_connections": 1, "405": 8,
                                                   "requests": 16})
    finally:
        for tls in held:
            tls.close()
    time.sleep(0.3)
    assert_healthy(gateway)


# -- slow clients ---------------------------------------------------------------------------


# Nothing at all, or the first bytes of a ClientHello.
@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"])
def test_a_tls_handshake_that_never_ends_is_closed_at_the_head_timeout(
    gateway: Running, sent: bytes,
) -> None:
    """The handshake gets header_timeout_s (0.5 s here) like a head: it held the connection 60
    s (the loop's default), uncounted by max_connections, which sees connections once their
    handshake is done."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        try:
            closed = sock.recv(1) == b""
        except ConnectionError:
            closed = True
        assert closed and time.monotonic() - started < 5
    assert_healthy(gateway)


def test_refused_connections_free_their_slots_soon(gateway: Running) -> None:
    """Connections refused with a 431 whose clients never answer the TLS close: their
    max_connections slots come back after header_timeout_s (0.5 s here), not the 30 s of the
    loop's TLS shutdown timeout, during which every new client was turned away."""
    time.sleep(0.6)  # earlier tests' connections are gone
    big = POST_LINE + b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"a" * 300) for i in range(14)) + \
        b"Content-Length: 0\r\n\r\n"
    held = []
    try:
        for _ in range(8):  # max_connections
            tls = connect(gateway)
            send(tls, big)
            assert read_answer(tls)[0] == 431
            held.append(tls)  # kept open, never closed from this side
        time.sleep(1.5)
        with connect(gateway, timeout=5) as tls:
            send(tls, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_answer(tls)[0] == 405
    finally:
        for tls in held:
            tls.close()
    assert_healthy(gateway)


def test_slowloris_head_is_closed(gateway: Running) -> None:
    before = counted(gateway)
    with connect(gateway) as tls:
        closed_at = trickle(tls, POST_LINE * 10)
    # header_timeout_s 0.5 at a byte per 0.05 s: about the tenth byte; generously bounded.
    assert closed_at is not None and closed_at < 100
    expect(gateway, before, {"header_timeout": 1})
    assert_healthy(gateway)


def test_slowloris_head_on_a_keep_alive_connection_is_closed(gateway: Running) -> None:
    before = counted(gateway)
    with connect(gateway) as tls:
        send(tls, POST_LINE + b"Content-Length: %d\r\n\r\n" % len(gateway.sealed) +
             gateway.sealed)
        assert read_answer(tls)[0] == 200
        closed_at = trickle(tls, POST_LINE * 10)
    assert closed_at is not None and closed_at < 100
    expect(gateway, before, {"header_timeout": 1, "requests": 1})
    assert_healthy(gateway)


def test_slowloris_body_is_408_or_closed(gateway: Running) -> None:
    before = counted(gateway)
    with connect(gateway) as tls:
        send(tls, POST_LINE + b"Content-Type: application/jose\r\nContent-Length: 1000\r\n\r\n"
             + MARKER)
        status, _, body = read_answer(tls)
    assert refused(status, 408) and body == b""
    expect(gateway, before, {"408": 1, "requests": 1})
    assert_healthy(gateway)


# -- heads too large ------------------------------------------------------------------------


def test_oversized_header_line_is_refused(gateway: Running) -> None:
    before = counted(gateway)
    status, _, _ = exchange(gateway, POST_LINE + b"X-Big: " + MARKER * 300 +
                            b"\r\nContent-Length: 0\r\n\r\n")
    assert refused(status, 431)
    expect(gateway, before, {"header_bytes": 1})
    assert_healthy(gateway)


def test_oversized_request_line_is_refused(gateway: Running) -> None:
    before = counted(gateway)
    status, _, _ = exchange(gateway, b"POST /" + MARKER * 300 + b" HTTP/1.1\r\n\r\n")
    assert refused(status, 431)
    expect(gateway, before, {"header_bytes": 1})
    assert_healthy(gateway)


def test_oversized_head_in_all_is_431(gateway: Running) -> None:
    # 14 lines of ~310 bytes: each far below the per-line bound, ~4.3 KiB together.
    lines = b"".join(b"X-Pad-%02d: %s\r\n" % (i, MARKER * 18) for i in range(14))
    before = counted(gateway)
    status, _, body = exchange(gateway, POST_LINE + lines + b"Content-Length: 0\r\n\r\n")
    assert (status, body) == (431, b"")
    # The same head, never finished, in pieces.
    with connect(gateway) as tls:
        for index in range(0, len(lines), 512):
            if not send(tls, (POST_LINE if index == 0 else b"") + lines[index:index + 512]):
                break
        status, _, _ = read_answer(tls)
    assert refused(status, 431)
    expect(gateway, before, {"header_bytes": 2})
    assert_healthy(gateway)


def test_a_head_padded_with_whitespace_is_measured_as_sent(gateway: Running) -> None:
    """Optional whitespace around header values is not in the parsed head: 14 short lines each
    padded to ~3.7 KiB (under the per-line bound), ~52 KiB in all, in one write, reached the
    handler (its empty body then a 400) instead of the 431 of a head over max_header_bytes."""
    lines = b"".join(b"X-Pad-%02d:%sv\r\n" % (i, b" " * 3700) for i in range(14))
    before = counted(gateway)
    status, _, body = exchange(gateway, POST_LINE + lines + b"Content-Length: 0\r\n\r\n")
    assert (status, body) == (431, b"")
    expect(gateway, before, {"header_bytes": 1})
    assert_healthy(gateway)


def test_too_many_headers_are_refused(gateway: Running) -> None:
    before = counted(gateway)
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(20))
    status, _, _ = exchange(gateway, POST_LINE + lines + b"Content-Length: 0\r\n\r\n")
    assert refused(status, 400, 431)
    expect(gateway, before, {"bad_request": 1})
    assert_healthy(gateway)


# -- malformed HTTP -------------------------------------------------------------------------


MALFORMED = {
    "garbage": b"\x16\x03\x01\x02\x00" + MARKER + bytes(range(256)) + b"\r\n\r\n",
    "bad_request_line": b"POST " + MARKER + b"\r\n\r\n",
    "bad_version": b"POST /cards-qr-v1/echo HTTP/7.3\r\nHost: x\r\n\r\n",
    "http_0_9_get": b"GET /cards-qr-v1/echo\r\n\r\n",
    "http_0_9_post": b"POST /cards-qr-v1/echo\r\n\r\n" + MARKER,
    "nul_in_target": b"POST /cards-qr-v1/\x00echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul_in_header": POST_LINE + b"X-A: a\x00" + MARKER + b"\r\nContent-Length: 0\r\n\r\n",
    "invalid_chunked": POST_LINE + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n" + MARKER
    + b"\r\n0\r\n\r\n",
    "content_length_and_chunked": POST_LINE + b"Content-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + MARKER[:5] + b"\r\n0\r\n\r\n",
    "two_content_lengths": POST_LINE + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n"
    + MARKER[:7],
    "negative_content_length": POST_LINE + b"Content-Length: -5\r\n\r\n" + MARKER,
    "huge_content_length": POST_LINE + b"Content-Length: 99999999999999999999999\r\n\r\n"
    + MARKER,
    "content_length_over_the_limit": POST_LINE + b"Content-Length: 99999999\r\n\r\n" + MARKER,
    "header_without_colon": POST_LINE + MARKER + b"\r\nContent-Length: 0\r\n\r\n",
    "bad_gzip_body": POST_LINE + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
    % (len(MARKER) + 2) + b"\x1f\x8b" + MARKER,
    "bare_lf_head": b"POST /cards-qr-v1/echo HTTP/1.1\nHost: x\nContent-Length: 0\n\n",
}
EXPECTED = {"content_length_over_the_limit": (413,), "http_0_9_get": (400, 405)}


@pytest.mark.parametrize(("head", "status"), [
    # A newline once decoded: forwarded as it is (the stand-in partner's router says 404).
    (b"POST /cards-qr-v1/echo%0a HTTP/1.1", 404),
    (b"POST /cards-qr-v1/echo HTTP/1.1\r\nExpect: x", 200),  # an expectation we ignore
    (b"OPTIONS * HTTP/1.1", 405),
    (b"CONNECT evil.example:443 HTTP/1.1", 405),  # or closed: its body is a tunnel's bytes
    (b"POST * HTTP/1.1", 400),  # the parser's refusal, answered by the connection guard
])
def test_every_request_is_answered_by_the_gateway_never_by_aiohttp(
    gateway: Running, head: bytes, status: int,
) -> None:
    """Behind aiohttp's router some requests got aiohttp's own answers (404, 417: text
    bodies, its version in Server), uncounted and unlogged; 100-continue before any check."""
    before = counted(gateway)
    calls = len(gateway.partner.calls)
    body = gateway.sealed
    with connect(gateway) as tls:
        send(tls, head + b"\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body))
        send(tls, body)
        got, headers, answer = read_answer(tls)
    assert refused(got, status) if head.startswith(b"CONNECT") else got == status
    assert headers.get("server", "cards-qr-gateway") == "cards-qr-gateway"
    assert b"aiohttp" not in answer and b"Not Found" not in answer
    changes = delta(before, counted(gateway))
    if status == 200:
        assert gateway.google.open(answer)[0] == ANSWER
        assert gateway.partner.calls[calls].path == head.split(b" ")[1].decode()
    elif status == 404:  # the partner's answer, sealed
        assert b"404: Not Found" in gateway.google.open(answer)[0]
    elif status == 400:
        assert answer == b"" and changes == {"bad_request": 1}
    else:
        assert answer == b"" and changes[str(status)] == 1
    assert_healthy(gateway)


def test_expect_100_continue_is_answered_after_the_checks(gateway: Running) -> None:
    """A client that waits for 100 Continue before its body gets it (without it: nothing
    until body_timeout_s, then 408), and only once the request passed the checks."""
    body = gateway.sealed
    with connect(gateway) as tls:
        send(tls, b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"
                  b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        tls.settimeout(5)
        assert tls.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        send(tls, body)
        status, _, answer = read_answer(tls)
    assert status == 200 and gateway.google.open(answer)[0] == ANSWER
    with connect(gateway) as tls:
        send(tls, b"GET /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert read_answer(tls)[0] == 405  # its first answer, no 100 before it
    with connect(gateway) as tls:  # a body declared over max_body_bytes (65536): not invited
        send(tls, b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 65537\r\n\r\n")
        assert read_answer(tls)[0] == 413


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_http_is_refused(gateway: Running, case: str) -> None:
    calls = len(gateway.partner.calls)
    before = counted(gateway)
    status, _, body = exchange(gateway, MALFORMED[case])
    assert refused(status, *EXPECTED.get(case, (400,))), status
    assert MARKER not in body
    # Counted once: refused by the listener (bad_request), or answered as a request.
    changed = delta(before, counted(gateway))
    assert changed == {"bad_request": 1} or (
        changed.pop("requests") == 1 and list(changed.values()) == [1]), changed
    gateway.closed.update(set(changed) & set(REASONS))
    assert len(gateway.partner.calls) == calls
    assert_healthy(gateway)


@pytest.mark.parametrize("target", [b"http://evil.example/cards-qr-v1/echo",
                                    b"HTTPS://localhost/cards-qr-v1/echo"])
def test_a_request_target_that_is_not_a_path_is_400_before_any_crypto(
    gateway: Running, target: bytes
) -> None:
    """An absolute-form target (RFC 9112 3.2.2), with a good sealed body: 400 at once, nothing
    opened, the partner never called. It once got as far as the forward, whose URL it broke:
    aiohttp's own 500 page, after the message had been opened."""
    calls = len(gateway.partner.calls)
    before = counted(gateway)
    opened = total(admin_get(gateway, "/metrics")[1], "gateway_crypto_duration_seconds_count",
                   route="in", op="open")
    status, _, body = exchange(gateway, b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(gateway.sealed)
                               + gateway.sealed)
    assert (status, body) == (400, b"")
    expect(gateway, before, {"400": 1, "requests": 1})
    assert total(admin_get(gateway, "/metrics")[1], "gateway_crypto_duration_seconds_count",
                 route="in", op="open") == opened
    assert len(gateway.partner.calls) == calls
    assert_healthy(gateway)


def test_malformed_chunked_body_after_its_head_is_refused(gateway: Running) -> None:
    """The head alone first, so the error comes while the request's body is being read."""
    calls = len(gateway.partner.calls)
    before = counted(gateway)
    with connect(gateway) as tls:
        send(tls, POST_LINE + b"Content-Type: application/jose\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + MARKER[:5] + b"\r\n")
        time.sleep(0.1)
        send(tls, b"ZZ\r\n" + MARKER + b"\r\n0\r\n\r\n")
        status, _, body = read_answer(tls)
    assert refused(status, 400) and MARKER not in body
    expect(gateway, before, {"bad_request": 1, "400": 1, "requests": 1})
    assert len(gateway.partner.calls) == calls
    assert_healthy(gateway)


# -- methods and content types --------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_non_post_is_405_with_allow(gateway: Running, method: str) -> None:
    status, headers, body = post(gateway, gateway.sealed, method=method)
    assert (status, headers["allow"], body) == (405, "POST", b"")
    assert_healthy(gateway)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json",
                                          "multipart/form-data; boundary=x", ""])
def test_content_type_decides_nothing(gateway: Running, content_type: str) -> None:
    """protocol.md section 5: the body is parsed for what it must be, whatever it says it is:
    a sealed body opens, plain JSON is not a JWE (400), and the partner never sees it."""
    calls = len(gateway.partner.calls)
    status, headers, body = post(gateway, gateway.sealed, content_type=content_type)
    assert status == 200 and headers["content-type"] == JOSE_TYPE
    assert gateway.google.open(body)[0] == ANSWER
    status, _, body = post(gateway, REQUEST, content_type=content_type)
    assert (status, body) == (400, b"")
    assert len(gateway.partner.calls) == calls + 1
    assert_healthy(gateway)


# -- random bodies --------------------------------------------------------------------------


def b64u(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


segment = st.binary(max_size=300).map(b64u)
bodies = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda a, b: a + MARKER + b, st.binary(max_size=512), st.binary(max_size=512)),
    # JWE-shaped: five base64url segments, the marker among them.
    st.lists(segment, min_size=4, max_size=4).map(lambda s: b".".join([*s, MARKER])),
    st.lists(segment, min_size=1, max_size=8).map(b".".join),
    # A real JWE with a part of it changed.
    st.tuples(st.integers(0, 4), segment),
)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_random_bodies_are_400_or_401_and_never_reach_the_partner(
    gateway: Running, body: bytes | tuple[int, bytes],
) -> None:
    if isinstance(body, tuple):
        index, replacement = body
        parts = gateway.sealed.split(b".")
        parts[index] = replacement
        body = b".".join(parts)
    calls = len(gateway.partner.calls)
    status, _, answer = post(gateway, body)
    assert status in (400, 401) and answer == b""
    assert len(gateway.partner.calls) == calls
    assert_healthy(gateway)


# -- after everything -----------------------------------------------------------------------


def test_zz_metrics_count_the_closes_and_the_log_holds_no_body(gateway: Running) -> None:
    """Runs last (module order): the counters of everything above, then a clean drain."""
    status, metrics = admin_get(gateway, "/metrics")
    assert status == 200
    # Each test above checked its own counts; here the exposition has them all, by reason.
    for reason in gateway.closed:
        assert f'gateway_connections_closed_total{{reason="{reason}",route="in"}}' in metrics
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(30) == 0
    gateway.reader.join(10)  # the stderr reader has taken the last lines
    log = b"".join(gateway.lines)
    entries = [json.loads(line) for line in gateway.lines]  # every line is JSON
    assert {"listening", "draining"} <= {entry["event"] for entry in entries}
    assert MARKER not in log
    assert REQUEST not in log
    for part in gateway.sealed.split(b"."):
        assert len(part) < 16 or part not in log

