"""proxy.py end to end: the real gateway on port 0 with real TLS, between a stand-in partner
service and a stand-in Google that seals and opens with the gpg command line or panva's jose."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import gateway.app as app_module
import gateway.proxy as proxy_module
from gateway.app import Gateway
from gateway.envelope import CONTENT_TYPES
from tests.e2e import (
    ANSWER,
    PLAINTEXT_TYPE,
    REQUEST,
    Google,
    Pki,
    config,
    google_for,
    google_service,
    memory_handshake,
    post,
    post_until_closed,
    raw_exchange,
    running_gateway,
)
from tests.peers import ConnectProxy, StandIn, echo_partner, json_answer, slow

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["pgp", "pgp-native", "jose"])
def google(request: pytest.FixtureRequest) -> Google:
    return google_for(request, request.param)


@pytest.fixture
async def partner() -> AsyncIterator[StandIn]:
    service = await StandIn(json_answer(ANSWER)).start()
    yield service
    await service.stop()


# -- the happy paths ------------------------------------------------------------------------


async def test_inbound_opens_forwards_plaintext_and_seals_the_answer(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    async with running_gateway(tmp_path, text) as gateway:
        status, headers, body = await post(
            gateway, "in", sealed, ctx=pki.client_context(), path="/cards-qr-v1/transfer",
            headers={"Authorization": "Bearer secret", "Cookie": "a=b", "X-Trace": "t"})
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPES[google.scheme]
    plaintext, signers = await asyncio.to_thread(google.open, body)
    assert plaintext == ANSWER
    assert signers and all(s.startswith("partner") for s in signers)
    [call] = partner.calls
    assert call.path == "/cards-qr-v1/transfer"
    assert call.body == REQUEST
    assert call.headers["Content-Type"] == PLAINTEXT_TYPE
    assert not {"Authorization", "Cookie", "X-Trace"} & set(call.headers)


async def test_outbound_seals_the_request_and_opens_google_answer(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    service = google_service(google, expect=REQUEST)
    service.ssl_context = pki.server_context()
    await service.start()
    text = config(google, runtime_dir, pki, outbound_url=service.url + "/gsp",
                  upstream_extra=f", ca: {pki.ca}")
    try:
        async with running_gateway(tmp_path, text) as gateway:
            status, headers, body = await post(
                gateway, "out", REQUEST, path="/cards-qr-v1/echo/PIAID-1",
                headers={"Authorization": "Bearer local", "Content-Type": "application/json"})
    finally:
        await service.stop()
    assert (status, body) == (200, ANSWER)
    assert headers["Content-Type"] == PLAINTEXT_TYPE
    [call] = service.calls
    assert call.path == "/gsp/cards-qr-v1/echo/PIAID-1"
    assert call.headers["Content-Type"] == CONTENT_TYPES[google.scheme]
    assert "Authorization" not in call.headers
    assert REQUEST not in call.body


async def test_partner_status_is_kept_and_empty_answers_stay_empty(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    partner = await StandIn(json_answer(b"", status=204)).start()
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    try:
        async with running_gateway(tmp_path, config(google, runtime_dir, pki,
                                                     inbound_url=partner.url)) as gateway:
            status, _headers, body = await post(gateway, "in", sealed, ctx=pki.client_context())
            partner.handler = json_answer(ANSWER, status=404)
            status404, _, body404 = await post(gateway, "in", sealed, ctx=pki.client_context())
    finally:
        await partner.stop()
    assert (status, body) == (204, b"")
    assert status404 == 404
    assert (await asyncio.to_thread(google.open, body404))[0] == ANSWER


# -- the failure table, inbound: empty bodies, the partner never called -------------------


@pytest.mark.parametrize(("variant", "expected"), [
    ("not_base64", 400),
    ("garbage", 400),
    ("empty", 400),
    ("wrong_recipient", 400),
    ("stranger_signer", 401),
    ("unsigned", 401),
])
async def test_inbound_crypto_failures(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
    variant: str, expected: int,
) -> None:
    if variant == "not_base64":
        body = b"%%% not base64url and not a JWE %%%"
    elif variant == "garbage":
        body = b"QUJDREVGR0hJSktMTU5PUA.e30.e30.e30.e30"
    elif variant == "empty":
        body = b""
    else:
        body = await asyncio.to_thread(google.seal, REQUEST, variant)
    async with running_gateway(tmp_path, config(google, runtime_dir, pki,
                                                inbound_url=partner.url)) as gateway:
        status, _headers, answer = await post(gateway, "in", body, ctx=pki.client_context())
        metrics = gateway.metrics.render().decode()
    assert (status, answer) == (expected, b"")
    assert partner.calls == []
    assert f'gateway_requests_total{{code="{expected}",direction="inbound",route="in"}} 1.0' \
        in metrics


async def test_inbound_body_over_the_limit_is_413(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  limits=f"limits: {{max_body_bytes: {len(sealed) - 1}}}")
    async with running_gateway(tmp_path, text) as gateway:
        status, headers, body = await post(gateway, "in", sealed, ctx=pki.client_context())
    assert (status, body, headers.get("Connection")) == (413, b"", "close")
    assert partner.calls == []


async def test_inbound_partner_failures(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    partner = await StandIn(slow(3, json_answer(ANSWER))).start()
    closed = await StandIn(json_answer(ANSWER)).start()
    closed_url = closed.url
    try:
        text = config(google, runtime_dir, pki, inbound_url=partner.url, timeout_s=0.5,
                      limits="limits: {max_body_bytes: 4096}")
        async with running_gateway(tmp_path, text) as gateway:
            timed_out = await post(gateway, "in", sealed, ctx=pki.client_context())
            partner.handler = json_answer(b"x" * 5000)
            too_large = await post(gateway, "in", sealed, ctx=pki.client_context())
        assert len(partner.calls) == 2  # once each: never retried
        text = config(google, runtime_dir, pki, inbound_url=closed_url)
        async with running_gateway(tmp_path, text) as gateway:
            # Stopped only now: released earlier, its port could go to the gateway's listeners.
            await closed.stop()
            refused = await post(gateway, "in", sealed, ctx=pki.client_context())
    finally:
        await partner.stop()
        await closed.stop()
    assert timed_out[0::2] == (504, b"")
    assert too_large[0::2] == (502, b"")
    assert refused[0::2] == (502, b"")


async def test_no_cookie_set_by_an_upstream_is_sent_back_on_later_requests(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    """The upstream session is shared by every request of the process: a cookie one answer
    sets must not ride along on the next request (hidden state across Google's requests)."""
    sealed = await asyncio.to_thread(google.seal, REQUEST)

    async def with_cookie(request: aiohttp.web.Request, body: bytes) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=ANSWER, headers={
            "Content-Type": PLAINTEXT_TYPE, "Set-Cookie": "affinity=pod-7; Path=/"})

    partner = await StandIn(with_cookie).start()
    # A host name, not an address: aiohttp's default jar ignores cookies from addresses.
    text = config(google, runtime_dir, pki, inbound_url=f"http://localhost:{partner.port}")
    try:
        async with running_gateway(tmp_path, text) as gateway:
            for _ in range(2):
                assert (await post(gateway, "in", sealed, ctx=pki.client_context()))[0] == 200
    finally:
        await partner.stop()
    assert len(partner.calls) == 2
    assert [c.headers.get("Cookie") for c in partner.calls] == [None, None]


async def test_non_post_is_405(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path, config(google, runtime_dir, pki,
                                                inbound_url=partner.url)) as gateway:
        status, headers, body = await post(gateway, "in", b"", ctx=pki.client_context(),
                                           method="GET")
    assert (status, body, headers["Allow"]) == (405, b"", "POST")
    assert partner.calls == []


async def test_overload_is_503_with_retry_after_and_the_connection_closed(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    """Past max_inflight: 503 + Retry-After at once, and the gateway closes the connection (a
    client that ignores Retry-After must reconnect before it can send the next request)."""
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    partner = await StandIn(slow(1.5, json_answer(ANSWER))).start()
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  limits="limits: {max_inflight: 1}")
    try:
        async with running_gateway(tmp_path, text) as gateway:
            first = asyncio.create_task(post(gateway, "in", sealed, ctx=pki.client_context()))
            while not partner.calls:
                await asyncio.sleep(0.02)
            # Read to the end of the stream: a connection kept alive would time out.
            lines, body = await post_until_closed(gateway, "in", sealed, pki, 5)
            assert (await first)[0] == 200
    finally:
        await partner.stop()
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert {b"Retry-After: 1", b"Connection: close", b"Content-Length: 0"} <= set(lines[1:])
    assert body == b""
    assert len(partner.calls) == 1


async def held_open(gateway: Gateway, pki: Pki, head: bytes,
                    body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection that sent `head` and `body` and then sends nothing more."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gateway.routes["in"].port, ssl=pki.client_context(),
        server_hostname="localhost")
    writer.write(head + body)
    await writer.drain()
    return reader, writer


async def jose_inbound(request: pytest.FixtureRequest, partner: StandIn, runtime_dir: Path,
                       pki: Pki, limits: str) -> tuple[Google, bytes, str]:
    """Google (panva's jose), a request it sealed, and the config of one inbound route."""
    google = google_for(request, "jose")
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    return google, sealed, config(google, runtime_dir, pki, inbound_url=partner.url,
                                  limits=f"limits: {{{limits}}}")


def head_of(length: int) -> bytes:
    return (b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


async def test_bodies_still_arriving_hold_no_processing_slot(
    partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Heads sent without their bodies once held every max_inflight slot for body_timeout_s:
    Google got 503 until then. The slots count only requests past their body."""
    google, sealed, text = await jose_inbound(request, partner, runtime_dir, pki,
                                              "max_inflight: 2, body_timeout_s: 20")
    async with running_gateway(tmp_path, text) as gateway:
        idle = [await held_open(gateway, pki, head_of(1000)) for _ in range(4)]
        await asyncio.sleep(0.3)
        status, _, body = await post(gateway, "in", sealed, ctx=pki.client_context())
        for _, writer in idle:
            writer.close()
    assert status == 200
    assert (await asyncio.to_thread(google.open, body))[0] == ANSWER


async def test_bodies_arriving_at_once_are_bounded_in_bytes(
    partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """What the bodies still arriving hold together is bounded by max_inflight x
    max_body_bytes: past it, 503 + Retry-After; once they are gone, requests pass again."""
    _, sealed, text = await jose_inbound(request, partner, runtime_dir, pki,
                                         "max_inflight: 1, max_body_bytes: 4096")
    assert 4096 - 4000 < len(sealed) <= 4096
    async with running_gateway(tmp_path, text) as gateway:
        _, writer = await held_open(gateway, pki, head_of(4000), b"x" * 3990)
        await asyncio.sleep(0.3)
        refused = await post(gateway, "in", sealed, ctx=pki.client_context())
        writer.close()
        await asyncio.sleep(0.3)
        admitted = await post(gateway, "in", sealed, ctx=pki.client_context())
    assert (refused[0], refused[1].get("Retry-After"), refused[2]) == (503, "1", b"")
    assert admitted[0] == 200
    assert len(partner.calls) == 1


def never_reading(port: int, pki: Pki, one: bytes, count: int) -> None:
    """Send `count` pipelined copies of the request `one` over TLS, never reading, and more
    until the gateway drops the connection."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    with pki.client_context().wrap_socket(sock, server_hostname="localhost") as tls, \
            contextlib.suppress(OSError):
        tls.sendall(one * count)
        for _ in range(300):  # more until the gateway has dropped us (30 s)
            time.sleep(0.1)
            tls.sendall(one)


async def test_a_client_that_never_reads_its_answers_is_dropped(
    partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests pipelined by clients that never read their answers held their connections
    for ever, and with them every max_connections slot: Google was refused."""
    google, sealed, text = await jose_inbound(
        request, partner, runtime_dir, pki, "max_connections: 2, send_timeout_s: 1")
    # Enough answers (~15 MB) to fill every buffer on the way, the kernel's included.
    one, count = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", 100_000
    caplog.set_level(logging.INFO, logger="gateway")
    async with running_gateway(tmp_path, text) as gateway:
        port = gateway.routes["in"].port
        stuck = [asyncio.create_task(asyncio.to_thread(never_reading, port, pki, one, count))
                 for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*stuck), 30)  # both dropped
        metrics = gateway.metrics.render().decode()
        status, _, body = await post(gateway, "in", sealed, ctx=pki.client_context())
    assert 'gateway_connections_closed_total{reason="send_timeout",route="in"} 2.0' in metrics
    # Their request lines say that the status they carry never reached the client.
    unsent = [getattr(r, "fields", {}).get("unsent") for r in caplog.records
              if r.getMessage() == "request"]
    assert unsent.count("send_timeout") == 2
    assert set(unsent) <= {None, "send_timeout", "client_gone"}  # pipelined after the drop
    assert status == 200
    assert (await asyncio.to_thread(google.open, body))[0] == ANSWER


async def test_inbound_answer_with_nothing_to_seal_is_500(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=3)
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url, expiring_recipient=expires)
    async with running_gateway(tmp_path, text) as gateway:
        await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
        status, _, body = await post(gateway, "in", sealed, ctx=pki.client_context())
    assert (status, body) == (500, b"")
    assert len(partner.calls) == 1  # the partner processed it: the gateway logs an error


# A plaintext nested deeper than CPython's json can parse: the gateway never parses the
# plaintext but for its best-effort requestId, which must not fail the request.
NESTED = b"[" * 5000 + b"]" * 5000
PAN = "4111111111111111"


async def test_a_deeply_nested_plaintext_is_forwarded_in_both_directions(
    request: pytest.FixtureRequest, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    google = google_for(request, "jose")
    partner = await StandIn(json_answer(NESTED)).start()
    service = google_service(google, answer=NESTED, expect=NESTED)
    service.ssl_context = pki.server_context()
    await service.start()
    sealed = await asyncio.to_thread(google.seal, NESTED)
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  outbound_url=service.url, upstream_extra=f", ca: {pki.ca}")
    try:
        async with running_gateway(tmp_path, text) as gateway:
            inbound = await post(gateway, "in", sealed, ctx=pki.client_context())
            outbound = await post(gateway, "out", NESTED)
    finally:
        await partner.stop()
        await service.stop()
    assert inbound[0] == 200
    assert (await asyncio.to_thread(google.open, inbound[2]))[0] == NESTED
    assert [call.body for call in partner.calls] == [NESTED]
    assert (outbound[0], outbound[2]) == (200, NESTED)
    assert len(service.calls) == 1


async def test_an_unexpected_error_is_answered_logged_and_counted_without_its_text(
    request: pytest.FixtureRequest, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    google = google_for(request, "jose")

    def broken(plaintext: bytes) -> str:
        raise RuntimeError(f"card {PAN}")

    monkeypatch.setattr(proxy_module, "_request_id", broken)
    caplog.set_level(logging.INFO, logger="gateway.proxy")
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    service = await StandIn(json_answer(ANSWER), ssl_context=pki.server_context()).start()
    text = config(google, runtime_dir, pki, inbound_url=partner.url, outbound_url=service.url,
                  upstream_extra=f", ca: {pki.ca}")
    try:
        async with running_gateway(tmp_path, text) as gateway:
            inbound = await post(gateway, "in", sealed, ctx=pki.client_context())
            outbound = await post(gateway, "out", REQUEST)
            metrics = gateway.metrics.render().decode()
    finally:
        await service.stop()
    assert (inbound[0], inbound[2]) == (500, b"")
    assert (outbound[0], error_of(outbound[2])) == (500, "internal")
    assert (partner.calls, service.calls) == ([], [])
    for route, direction in (("in", "inbound"), ("out", "outbound")):
        assert (f'gateway_requests_total{{code="500",direction="{direction}",'
                f'route="{route}"}} 1.0') in metrics
    errors = [record.fields for record in caplog.records  # type: ignore[attr-defined]
              if record.getMessage() == "unexpected error"]
    assert [(e["error"], e["at"].startswith("test_proxy.py:")) for e in errors] == \
        [("RuntimeError", True)] * 2
    requests = [record.fields for record in caplog.records  # type: ignore[attr-defined]
                if record.getMessage() == "request"]
    assert [(r["status"], r["reason"]) for r in requests] == [(500, "internal")] * 2
    assert PAN not in caplog.text


# -- the failure table, outbound: JSON errors for the local caller --------------------------


def error_of(body: bytes) -> str:
    payload: dict[str, Any] = json.loads(body)
    assert set(payload) == {"error", "message"}
    return str(payload["error"])


async def test_outbound_failures(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    service = StandIn(json_answer(ANSWER), ssl_context=pki.server_context())
    await service.start()
    try:
        text = config(google, runtime_dir, pki, outbound_url=service.url, timeout_s=0.5,
                      upstream_extra=f", ca: {pki.ca}", limits="limits: {max_body_bytes: 2048}")
        async with running_gateway(tmp_path, text) as gateway:
            # Google's answer is plaintext, not sealed: never passed on.
            plain = await post(gateway, "out", REQUEST)
            assert plain[0] == 502 and error_of(plain[2]) == "malformed"
            assert ANSWER not in plain[2]
            # Sealed to someone else.
            wrong = await asyncio.to_thread(google.seal, ANSWER, "wrong_recipient")
            service.handler = json_answer(wrong)
            status, _, body = await post(gateway, "out", REQUEST)
            assert status == 502 and error_of(body) in ("unknown_key", "decrypt")
            # Signed by a stranger.
            stranger = await asyncio.to_thread(google.seal, ANSWER, "stranger_signer")
            service.handler = json_answer(stranger)
            status, _, body = await post(gateway, "out", REQUEST)
            assert (status, error_of(body)) == (502, "signature")
            # Empty answer: status passed on, body empty.
            service.handler = json_answer(b"", status=503)
            assert (await post(gateway, "out", REQUEST))[0::2] == (503, b"")
            # Too slow.
            service.handler = slow(2, json_answer(ANSWER))
            status, _, body = await post(gateway, "out", REQUEST)
            assert (status, error_of(body)) == (504, "upstream_timeout")
            # Our request over the limit, and empty.
            status, _, body = await post(gateway, "out", b"{" + b" " * 3000 + b"}")
            assert (status, error_of(body)) == (413, "too_large")
            status, _, body = await post(gateway, "out", b"")
            assert (status, error_of(body)) == (400, "malformed")
            # A caller that takes the gateway for a forward proxy sends a full URL.
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.routes["out"].port)
            writer.write(b"POST http://vgw.example/gsp/cards-qr-v1/echo/1 HTTP/1.1\r\n"
                         b"Host: vgw.example\r\nContent-Length: %d\r\n\r\n" % len(REQUEST)
                         + REQUEST)
            answer = await asyncio.wait_for(reader.read(), 5)  # and the connection closed
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400 ")
            assert error_of(answer.partition(b"\r\n\r\n")[2]) == "target"
            calls = len(service.calls)
    finally:
        await service.stop()
    assert calls == 5
    text = config(google, runtime_dir, pki, outbound_url=service.url,
                  upstream_extra=f", ca: {pki.ca}")
    # Bound, never listening: connections are refused and the gateway's port-0 listeners
    # cannot be given this port (it would then send the request to itself).
    with socket.socket() as hold:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its TIME_WAITs
        hold.bind(("127.0.0.1", service.port))
        async with running_gateway(tmp_path, text) as gateway:
            status, _, body = await post(gateway, "out", REQUEST)
    assert (status, error_of(body)) == (502, "upstream_unreachable")


async def test_outbound_with_nothing_to_seal_is_500(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    service = await StandIn(echo_partner()).start()
    expires = datetime.now(UTC) + timedelta(seconds=3)
    text = config(google, runtime_dir, pki, outbound_url=service.url,
                  expiring_recipient=expires)
    try:
        async with running_gateway(tmp_path, text) as gateway:
            await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
            status, _, body = await post(gateway, "out", REQUEST)
    finally:
        await service.stop()
    assert (status, error_of(body)) == (500, "no_key")
    assert service.calls == []


# -- TLS ------------------------------------------------------------------------------------


async def test_tls_1_1_and_weak_ciphers_are_refused(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    async with running_gateway(tmp_path, config(google, runtime_dir, pki,
                                                inbound_url=partner.url)) as gateway:
        old = pki.client_context()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, on purpose
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            permissive = pki.server_context()
            permissive.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
        # The client can speak TLS 1.1 (to a permissive server); the gateway refuses it.
        assert memory_handshake(old, permissive).version() == "TLSv1.1"
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(gateway, "in", sealed, ctx=old)
        weak = pki.client_context()
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("AES256-GCM-SHA384")  # RSA key exchange: not on Google's list
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(gateway, "in", sealed, ctx=weak)
        tls12 = pki.client_context()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert (await post(gateway, "in", sealed, ctx=tls12))[0] == 200
    assert len(partner.calls) == 1


async def test_client_certificate_required_and_checked(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  tls_extra=f", client_ca: {pki.client_ca}")
    async with running_gateway(tmp_path, text) as gateway:
        for ctx in (pki.client_context(), pki.client_context(rogue=True)):
            with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
                await post(gateway, "in", sealed, ctx=ctx)
        status, _, _ = await post(gateway, "in", sealed, ctx=pki.client_context(with_cert=True))
    assert status == 200
    assert len(partner.calls) == 1


async def test_mutual_tls_toward_the_upstream_and_pinning(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    service = google_service(google, expect=REQUEST)
    service.ssl_context = pki.server_context(require_client=True)
    await service.start()
    try:
        mtls = (f", ca: {pki.ca}, client_cert: {pki.client_cert}, "
                f"client_key: {pki.client_key}")
        text = config(google, runtime_dir, pki, outbound_url=service.url, upstream_extra=mtls)
        async with running_gateway(tmp_path, text) as gateway:
            assert (await post(gateway, "out", REQUEST))[0::2] == (200, ANSWER)
        # Without a client certificate the upstream refuses; with a CA that did not sign the
        # upstream's certificate, the gateway refuses.
        for extra in (f", ca: {pki.ca}", f", ca: {pki.client_ca}, client_cert: "
                      f"{pki.client_cert}, client_key: {pki.client_key}"):
            text = config(google, runtime_dir, pki, outbound_url=service.url,
                          upstream_extra=extra)
            async with running_gateway(tmp_path, text) as gateway:
                status, _, body = await post(gateway, "out", REQUEST)
            assert (status, error_of(body)) == (502, "upstream_unreachable")
    finally:
        await service.stop()
    assert len(service.calls) == 1


async def test_outbound_through_an_egress_proxy(
    google: Google, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    service = google_service(google, expect=REQUEST)
    service.ssl_context = pki.server_context()
    await service.start()
    proxy = await ConnectProxy().start()
    try:
        text = config(google, runtime_dir, pki, outbound_url=service.url,
                      upstream_extra=f", ca: {pki.ca}, proxy: '{proxy.url}'")
        async with running_gateway(tmp_path, text) as gateway:
            assert (await post(gateway, "out", REQUEST))[0::2] == (200, ANSWER)
    finally:
        await proxy.stop()
        await service.stop()
    assert proxy.targets == [f"localhost:{service.port}"]


async def test_slow_body_and_too_many_headers_are_refused_and_the_gateway_stays_healthy(
    google: Google, partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  limits="limits: {body_timeout_s: 0.5, max_headers: 10}")
    async with running_gateway(tmp_path, text) as gateway:
        port = gateway.routes["in"].port
        head = (b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Length: 1000\r\n\r\n")
        slow_body = await raw_exchange(port, pki, head, b"x" * 10, pause=1.0)
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(20))
        crowded = await raw_exchange(
            port, pki, b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n" + many +
            b"Content-Length: 0\r\n\r\n")
        assert (await post(gateway, "in", sealed, ctx=pki.client_context()))[0] == 200
    assert slow_body.startswith(b"HTTP/1.1 408 ")
    assert crowded.split(b" ", 2)[1] in (b"400", b"431")
    assert len(partner.calls) == 1


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  data: bytes) -> int | None:
    """Send `data` a byte every 0.05 s; the index at which the gateway closed, or None."""
    for index, byte in enumerate(data):
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return index
        if reader.at_eof():
            return index
        await asyncio.sleep(0.05)
    return None


async def test_slowloris_heads_and_too_many_connections_are_closed(
    request: pytest.FixtureRequest, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = google_for(request, "jose")  # listener behaviour: one scheme is enough
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  limits="limits: {header_timeout_s: 0.5, max_connections: 2}")
    async with running_gateway(tmp_path, text) as gateway:
        port = gateway.routes["in"].port

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_context(),
                                                 server_hostname="localhost")

        # A head that trickles in, a byte at a time: closed after header_timeout_s.
        reader, writer = await connect()
        closed_at = await trickle(reader, writer,
                                  b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: x\r\n" * 3)
        assert closed_at is not None and closed_at < 100
        writer.close()
        # Two idle connections fill the listener; a third is closed at once.
        held = [await connect(), await connect()]
        third_reader, third_writer = await connect()
        assert await asyncio.wait_for(third_reader.read(), 5) == b""
        third_writer.close()
        for _, held_writer in held:
            held_writer.close()
        await asyncio.sleep(0.2)
        assert (await post(gateway, "in", sealed, ctx=pki.client_context()))[0] == 200
        metrics = gateway.metrics.render().decode()
    assert 'gateway_connections_closed_total{reason="header_timeout",route="in"} 1.0' in metrics
    assert 'reason="max_connections",route="in"}' in metrics


def live_head_meters() -> int:
    gc.collect()
    return sum(isinstance(o, app_module._HeadMeter) for o in gc.get_objects())


async def test_a_closed_connection_is_freed_at_once_not_at_its_head_timeout(
    request: pytest.FixtureRequest, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    """A connection's head timer holds its meter, handler and transport: closing the connection
    cancels it, so a flood of short connections does not pile up for header_timeout_s."""
    google = google_for(request, "jose")
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  limits="limits: {header_timeout_s: 600}")
    async with running_gateway(tmp_path, text) as gateway:
        port = gateway.routes["in"].port
        before = live_head_meters()
        writers = []
        for _ in range(20):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=pki.client_context(), server_hostname="localhost")
            writer.write(b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: x\r\n")  # half a head
            await writer.drain()
            writers.append(writer)
        assert await settles(lambda: live_head_meters() == before + 20)  # one per connection
        for writer in writers:
            writer.close()
            await writer.wait_closed()
        del writers, writer
        assert await settles(lambda: live_head_meters() == before)


async def settles(condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds within a few seconds (the gateway's side of a connect or a
    close lands a few loop iterations after the client's)."""
    for _ in range(100):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer from a raw connection: (status, body); (0, b"") once closed."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        return 0, b""
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def test_request_heads_over_max_header_bytes_in_all_are_431(
    request: pytest.FixtureRequest, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = google_for(request, "jose")  # listener behaviour: one scheme is enough
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  limits="limits: {max_header_bytes: 1024, header_timeout_s: 5}")
    line = b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"
    # 20 lines of 60 bytes: each far below the per-line bound, 1200 bytes together.
    crowd = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 48) for i in range(20))
    async with running_gateway(tmp_path, text) as gateway:
        port = gateway.routes["in"].port

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_context(),
                                                 server_hostname="localhost")

        # A whole head in one write, then one that never ends, in pieces.
        whole = await raw_exchange(port, pki, line + crowd + b"Content-Length: 0\r\n\r\n")
        reader, writer = await connect()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            for index in range(0, len(crowd), 100):
                writer.write((line if index == 0 else b"") + crowd[index:index + 100])
                await writer.drain()
                await asyncio.sleep(0.02)
        pieces = await read_answer(reader)
        writer.close()
        # The second request of a keep-alive connection, after a good one.
        reader, writer = await connect()
        writer.write(line + b"Content-Length: %d\r\n\r\n" % len(sealed) + sealed)
        first = await read_answer(reader)
        writer.write(line + crowd + b"Content-Length: 0\r\n\r\n")
        second = await read_answer(reader)
        writer.close()
        # A head near the limit whose body arrives with it is not a head over the limit.
        near = line + b"X-Pad: " + b"p" * 800 + b"\r\nContent-Length: %d\r\n\r\n" % len(sealed)
        assert len(near) < 1024 < len(near + sealed)
        near_answer = await raw_exchange(port, pki, near, sealed)
        assert (await post(gateway, "in", sealed, ctx=pki.client_context()))[0] == 200
        metrics = gateway.metrics.render().decode()
    assert whole.startswith(b"HTTP/1.1 431 ")
    assert pieces[0] in (0, 431)
    assert first[0] == 200 and second == (431, b"")
    assert near_answer.startswith(b"HTTP/1.1 200 ")
    assert len(partner.calls) == 3
    assert 'gateway_connections_closed_total{reason="header_bytes",route="in"} 3.0' in metrics


async def test_a_keep_alive_request_head_that_trickles_is_closed(
    request: pytest.FixtureRequest, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = google_for(request, "jose")
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  limits="limits: {header_timeout_s: 0.5}")
    head = b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
    async with running_gateway(tmp_path, text) as gateway:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gateway.routes["in"].port, ssl=pki.client_context(),
            server_hostname="localhost")
        writer.write(head % len(sealed) + sealed)
        first = await read_answer(reader)
        # Idle between requests for longer than header_timeout_s: that is idle_timeout_s's.
        await asyncio.sleep(1.0)
        writer.write(head % len(sealed) + sealed)
        second = await read_answer(reader)
        # Then a head that trickles in, a byte at a time: closed after header_timeout_s.
        closed_at = await trickle(reader, writer, head * 3)
        writer.close()
        metrics = gateway.metrics.render().decode()
    assert first[0] == second[0] == 200
    assert closed_at is not None and closed_at < 100
    assert 'gateway_connections_closed_total{reason="header_timeout",route="in"} 1.0' in metrics
