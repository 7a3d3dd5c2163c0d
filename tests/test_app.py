"""app.py: admin endpoints and the drain, in process and as the real `run` process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

import gateway.app as app_module
from gateway.app import Gateway
from tests.e2e import (
    ANSWER,
    REQUEST,
    JoseGoogle,
    Pki,
    config,
    google_for,
    post,
    post_until_closed,
    running_gateway,
    thread_policies,
)
from tests.jose_fixtures import JoseKeys, NodeJose
from tests.peers import StandIn, json_answer, slow

pytestmark = pytest.mark.e2e


@pytest.fixture
def google(jose_keys: JoseKeys, node_jose: NodeJose) -> JoseGoogle:
    return JoseGoogle(jose_keys, node_jose)


@pytest.fixture
async def slow_partner() -> AsyncIterator[StandIn]:
    service = await StandIn(slow(1.5, json_answer(ANSWER))).start()
    yield service
    await service.stop()


async def admin_get(gateway: Gateway, path: str) -> tuple[int, str]:
    assert gateway.admin is not None
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{gateway.admin.port}{path}"
    ) as response:
        return response.status, await response.text()


async def test_admin_endpoints(google: JoseGoogle, runtime_dir: Path, pki: Pki,
                               tmp_path: Path) -> None:
    partner = await StandIn(json_answer(ANSWER)).start()
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    try:
        soon = datetime.now(UTC) + timedelta(days=10, hours=1)  # within warn_expiry_days
        text = config(google, runtime_dir, pki, inbound_url=partner.url,
                      expiring_recipient=soon)
        async with running_gateway(tmp_path, text) as gateway:
            assert (await post(gateway, "in", sealed, ctx=pki.client_context()))[0] == 200
            assert await admin_get(gateway, "/healthz") == (200, "ok\n")
            assert await admin_get(gateway, "/readyz") == (200, "ready\n")
            status, metrics = await admin_get(gateway, "/metrics")
            _, status_text = await admin_get(gateway, "/status")
    finally:
        await partner.stop()
    assert status == 200
    assert 'gateway_requests_total{code="200",direction="inbound",route="in"} 1.0' in metrics
    assert 'gateway_key_uses_total{key_id="partner-enc-a",keyset="partner",op="decrypt"} 1.0' \
        in metrics
    assert 'gateway_key_uses_total{key_id="google-sig-a",keyset="google",op="verify"} 1.0' \
        in metrics
    assert 'gateway_key_uses_total{key_id="google-enc-a",keyset="google",op="encrypt"} 1.0' \
        in metrics
    assert "gateway_config_generation 1.0" in metrics
    state = json.loads(status_text)
    assert state["generation"] == 1
    ids = {k["id"]: k for k in state["keysets"]["partner"]}
    assert set(ids) == {"partner-sig-a", "partner-enc-a"}
    assert ids["partner-sig-a"]["capabilities"] == ["sign"]
    warnings = {k["id"]: k["warnings"] for keys in state["keysets"].values() for k in keys}
    assert warnings == {"partner-sig-a": [], "partner-enc-a": [], "google-sig-a": [],
                        "google-enc-a": ["expires in 10 days (warn_expiry_days 30)"]}
    assert '"d"' not in status_text and '"p"' not in status_text


async def test_drain_finishes_requests_in_flight(
    google: JoseGoogle, slow_partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=slow_partner.url,
                  top={"drain_delay_s": 0.2, "shutdown_timeout_s": 5})
    async with running_gateway(tmp_path, text) as gateway:
        request = asyncio.create_task(post(gateway, "in", sealed, ctx=pki.client_context()))
        while not slow_partner.calls:
            await asyncio.sleep(0.02)
        drain = asyncio.create_task(gateway.drain())
        await asyncio.sleep(0.05)
        assert (await admin_get(gateway, "/readyz"))[0] == 503
        assert (await admin_get(gateway, "/healthz"))[0] == 200
        status, headers, _ = await request
        assert await drain == 0
    assert status == 200
    assert headers.get("Connection") == "close"


async def test_while_draining_each_answer_closes_its_connection(
    google: JoseGoogle, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    """During drain_delay_s requests are still served, and the gateway closes each connection
    after its answer (not only says so in a header), so clients reconnect to other pods."""
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    partner = await StandIn(json_answer(ANSWER)).start()
    text = config(google, runtime_dir, pki, inbound_url=partner.url,
                  top={"drain_delay_s": 5, "shutdown_timeout_s": 5})
    try:
        async with running_gateway(tmp_path, text) as gateway:
            drain = asyncio.create_task(gateway.drain())
            while not gateway.draining:
                await asyncio.sleep(0.01)
            # To the end of the stream, well before drain_delay_s ends the listeners.
            head, _ = await post_until_closed(gateway, "in", sealed, pki, 2)
            assert await drain == 0
    finally:
        await partner.stop()
    assert head[0] == b"HTTP/1.1 200 OK" and b"Connection: close" in head[1:]


async def test_a_route_removed_by_a_reload_answers_503_closes_and_is_counted(
    google: JoseGoogle, runtime_dir: Path, pki: Pki, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A route that left the configuration keeps its listener until a restart: each request
    there is a 503 + Retry-After that closes its connection, inbound empty and outbound the
    JSON error, logged and counted like every other answer, and the partner is not called."""
    caplog.set_level(logging.INFO, logger="gateway.proxy")
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    partner = await StandIn(json_answer(ANSWER)).start()
    text = config(google, runtime_dir, pki, inbound_url=partner.url, outbound_url=partner.url)
    try:
        async with running_gateway(tmp_path, text) as gateway:
            path = tmp_path / "config.yaml"
            path.write_text(path.read_text().replace("- name: in\n", "- name: in2\n")
                            .replace("- name: out\n", "- name: out2\n"))
            assert await gateway.reload()
            head, body = await post_until_closed(gateway, "in", sealed, pki, 2)
            status, headers, answer = await post(gateway, "out", REQUEST)
            metrics = (await admin_get(gateway, "/metrics"))[1]
    finally:
        await partner.stop()
    assert head[0] == b"HTTP/1.1 503 Service Unavailable" and body == b""
    assert b"Retry-After: 30" in head[1:] and b"Connection: close" in head[1:]
    assert status == 503 and headers["Retry-After"] == "30"
    assert json.loads(answer)["error"] == "route_removed"
    for route, direction in (("in", "inbound"), ("out", "outbound")):
        assert (f'gateway_requests_total{{code="503",direction="{direction}",route="{route}"}}'
                " 1.0") in metrics
    logged = [record.fields for record in caplog.records  # type: ignore[attr-defined]
              if record.getMessage() == "request"]
    assert [(f["route"], f["status"], f["reason"]) for f in logged] == [
        ("in", 503, "route_removed"), ("out", 503, "route_removed")]
    assert partner.calls == []


async def test_drain_cut_off_by_the_timeout_returns_1(
    google: JoseGoogle, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    """Within shutdown_timeout_s and a little: the pod's grace period is sized on it (a
    cut-off drain once took 3x as long, past it)."""
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    stuck = await StandIn(slow(4, json_answer(ANSWER))).start()
    text = config(google, runtime_dir, pki, inbound_url=stuck.url,
                  top={"shutdown_timeout_s": 2})
    try:
        async with running_gateway(tmp_path, text) as gateway:
            request = asyncio.create_task(post(gateway, "in", sealed,
                                               ctx=pki.client_context()))
            while not stuck.calls:
                await asyncio.sleep(0.02)
            started = time.monotonic()
            assert await gateway.drain() == 1
            took = time.monotonic() - started
            with pytest.raises(aiohttp.ClientError):
                await request
    finally:
        await stuck.stop()
    assert 2 <= took < 3.5


async def read_listening(stderr: asyncio.StreamReader) -> dict[str, object]:
    while line := await stderr.readline():
        entry = json.loads(line)
        if entry["event"] == "listening":
            return dict(entry)
    raise AssertionError("the gateway exited before listening")


async def test_run_process_drains_on_sigterm(
    google: JoseGoogle, slow_partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    path = tmp_path / "config.yaml"
    # batch_scheduling with workers: 1 puts the one process under SCHED_BATCH.
    path.write_text(textwrap.dedent(config(google, runtime_dir, pki,
                                           inbound_url=slow_partner.url,
                                           top={"batch_scheduling": "true"})))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    try:
        listening = await asyncio.wait_for(read_listening(process.stderr), 30)
        routes = listening["routes"]
        assert isinstance(routes, dict)
        port = int(str(routes["in"]).rsplit(":", 1)[1])
        # No core files: one would hold card data and keys.
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(session.post(
                f"https://localhost:{port}/cards-qr-v1/echo", data=sealed,
                ssl=pki.client_context()))
            while not slow_partner.calls:
                await asyncio.sleep(0.02)
            # Every thread: the crypto thread that opened the request, the log writer too.
            assert len(list(Path(f"/proc/{process.pid}/task").iterdir())) > 2
            assert thread_policies(process.pid) == {os.SCHED_BATCH}
            process.send_signal(signal.SIGTERM)
            response = await request
            assert response.status == 200
            body = await response.read()
            response.release()
        remaining = await process.stderr.read()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (await asyncio.to_thread(google.open, body))[0] == ANSWER
    events = [json.loads(line)["event"] for line in remaining.splitlines()]
    assert "draining" in events
    assert b"4111" not in remaining and REQUEST not in remaining


async def test_admin_answers_while_every_crypto_slot_is_busy(
    google: JoseGoogle, runtime_dir: Path, pki: Pki, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    partner = await StandIn(json_answer(ANSWER)).start()
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    try:
        async with running_gateway(tmp_path, text) as gateway:
            envelope = gateway.current.snapshot.routes["in"].envelope
            real_open = envelope.open

            def slow_open(body: bytes) -> object:
                time.sleep(1.0)  # a crypto call that holds its executor thread
                return real_open(body)

            monkeypatch.setattr(envelope, "open", slow_open)
            requests = [asyncio.create_task(post(gateway, "in", sealed,
                                                 ctx=pki.client_context()))
                        for _ in range(gateway.slots + 2)]
            await asyncio.sleep(0.2)
            assert await admin_get(gateway, "/healthz") == (200, "ok\n")
            # Answered while every crypto thread was still held by a request.
            pending = sum(not r.done() for r in requests)
            statuses = [status for status, _, _ in await asyncio.gather(*requests)]
            _, metrics = await admin_get(gateway, "/metrics")
    finally:
        await partner.stop()
    assert statuses == [200] * (gateway.slots + 2)
    assert pending == gateway.slots + 2
    assert "gateway_event_loop_lag_seconds_count" in metrics


def recording(function: Callable[[bytes], Any], names: list[str]) -> Callable[[bytes], Any]:
    """`function`, noting the name of each thread that calls it."""
    def spy(data: bytes) -> Any:
        names.append(threading.current_thread().name)
        return function(data)
    return spy


@pytest.mark.parametrize(("kind", "threads"), [
    ("jose", "crypto"), ("pgp-native", "crypto"), ("pgp", "gpg"),
])
async def test_each_engine_runs_in_its_executor(
    kind: str, threads: str, runtime_dir: Path, pki: Pki, tmp_path: Path,
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-process crypto (jwcrypto, the native engine) on `slots` crypto threads; gpg calls,
    which wait on gpg and its agent, on `slots + 1` gpg threads, each with its GnuPG home."""
    google = google_for(request, kind)
    partner = await StandIn(json_answer(ANSWER)).start()
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    names: list[str] = []
    try:
        async with running_gateway(tmp_path, config(google, runtime_dir, pki,
                                                    inbound_url=partner.url)) as gateway:
            envelope = gateway.current.snapshot.routes["in"].envelope
            for op in ("open", "seal"):
                monkeypatch.setattr(envelope, op, recording(getattr(envelope, op), names))
            answers = await asyncio.gather(*(post(gateway, "in", sealed,
                                                  ctx=pki.client_context()) for _ in range(8)))
            homes = len(getattr(envelope, "_all", ()))
    finally:
        await partner.stop()
    assert [status for status, _, _ in answers] == [200] * 8
    assert len(names) == 16 and all(n.startswith(f"{threads}_") for n in names)
    assert gateway.gpg_slots == gateway.slots + 1
    assert homes == (gateway.gpg_slots if kind == "pgp" else 0)


@pytest.mark.parametrize("freed_in", ["loop", "thread"])
async def test_a_head_meters_timer_is_cancelled_on_the_loop_wherever_the_meter_is_freed(
    monkeypatch: pytest.MonkeyPatch, freed_in: str
) -> None:
    """A closed connection's _HeadMeter cancels its head timer when it is freed. A loop's
    timers belong to its thread: freed in another (the cycle collector runs where it pleases),
    the cancel is handed to the loop rather than made from there."""
    cancels: list[int] = []
    real = asyncio.TimerHandle.cancel

    def cancel(self: asyncio.TimerHandle) -> None:
        cancels.append(threading.get_ident())
        real(self)

    monkeypatch.setattr(asyncio.TimerHandle, "cancel", cancel)
    limits = SimpleNamespace(header_timeout_s=600, max_header_bytes=1024)
    meters = [app_module._HeadMeter(None, limits, None, None, None)]  # type: ignore[arg-type]
    timer = meters[0]._timer
    assert timer is not None and not timer.cancelled()
    if freed_in == "loop":
        meters.clear()
    else:
        await asyncio.to_thread(meters.clear)
        await asyncio.sleep(0)  # the loop runs what it was handed
    assert timer.cancelled()
    assert cancels == [threading.get_ident()]


def test_head_end_is_found_however_the_head_is_split() -> None:
    """_HeadMeter measures a head as sent up to its blank line, which may straddle reads."""
    chooser = random.Random(7)
    for _ in range(3000):
        head = b"POST / HTTP/1.1\r\nA: b" + b" " * chooser.randint(0, 4) + b"\r\n\r\n"
        stream = head + b"body\r\n\r\nnext"
        cuts = sorted(chooser.sample(range(1, len(stream)), chooser.randint(1, 8)))
        tail, before, found = b"", 0, None
        for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            end = app_module._head_end(tail, stream[start:stop])
            if end is not None:
                found = before + end
                break
            tail, before = (tail + stream[start:stop][-3:])[-3:], stop
        assert found == len(head), (cuts, found)

