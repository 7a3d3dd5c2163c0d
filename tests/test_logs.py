"""logs.py: JSON lines with the contract's fields, and never payment data, keys or passphrases,
whatever path a request takes (the real process at debug level)."""

from __future__ import annotations

import asyncio
import fcntl
import io
import itertools
import json
import logging
import os
import select
import signal
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from gateway import logs
from gateway.logs import JsonFormatter, count_drops, setup_logging
from gateway.metrics import Metrics
from tests.e2e import Google, Pki, config, google_for
from tests.jose_fixtures import JoseKeys
from tests.peers import StandIn, json_answer, slow
from tests.pgp_fixtures import PgpKeys, b64url, unb64url

pytestmark = pytest.mark.e2e

CARD = "4111111111111111"
CRYPTOGRAM = "AgAAAAAABk4DWZ4C28yUQAAAAAA="
TRANSFER = json.dumps({
    "requestHeader": {"requestId": "log-test-0001", "requestTimestamp": {"epochMillis": "1"},
                      "protocolVersion": {"major": 1}, "paymentIntegratorAccountId": "PIAID-1"},
    "cardData": {"cardNumber": CARD, "expirationMonth": 12, "expirationYear": 2030,
                 "cryptogram": CRYPTOGRAM, "cardNetwork": {"cardScheme": "VISA"}},
    "qrCode": "000201",
}).encode()
ANSWER = json.dumps({"responseHeader": {}, "echo": {"cardNumber": CARD,
                                                    "cryptogram": CRYPTOGRAM}}).encode()


def test_formatter_keeps_fields_and_drops_exception_text() -> None:
    line_of_raise = sys._getframe().f_lineno + 2
    try:
        raise ValueError(f"card {CARD}")
    except ValueError:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "boom", None,
                                   sys.exc_info())
    record.fields = {"route": "in", "status": 500}  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "boom" and line["level"] == "error"
    assert line["route"] == "in" and line["status"] == 500
    assert line["exception"] == "ValueError"
    assert line["where"] == [f"tests/test_logs.py:{line_of_raise} in "
                             "test_formatter_keeps_fields_and_drops_exception_text"]
    assert CARD not in json.dumps(line)
    assert datetime.fromisoformat(line["ts"]).tzinfo is not None


@pytest.fixture(params=["pgp", "jose"])
def google(request: pytest.FixtureRequest) -> Google:
    return google_for(request, request.param)


async def test_no_payment_data_in_logs_or_metrics_on_any_path(
    google: Google, partner_and_google: tuple[StandIn, StandIn], runtime_dir: Path, pki: Pki,
    tmp_path: Path, pgp_keys: PgpKeys, jose_keys: JoseKeys,
) -> None:
    partner, service = partner_and_google
    expires = datetime.now(UTC) + timedelta(days=10)
    text = config(google, runtime_dir, pki, inbound_url=partner.url, outbound_url=service.url,
                  upstream_extra=f", ca: {pki.ca}", timeout_s=1,
                  limits="limits: {max_body_bytes: 8192}", expiring_recipient=expires)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    good = await asyncio.to_thread(google.seal, TRANSFER)
    raw = bytearray(unb64url(good) if google.scheme == "pgp" else good)
    raw[-12] ^= 1
    tampered = b64url(bytes(raw)) if google.scheme == "pgp" else bytes(raw)
    inbound = [
        good,
        await asyncio.to_thread(google.seal, TRANSFER, "stranger_signer"),
        await asyncio.to_thread(google.seal, TRANSFER, "wrong_recipient"),
        await asyncio.to_thread(google.seal, TRANSFER, "unsigned"),
        tampered,
        TRANSFER,  # plaintext where ciphertext belongs
        TRANSFER * 200,  # over the limit
    ]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path), "--log-level", "debug",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stderr is not None
    try:
        early = b""
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            early += line
            entry = json.loads(line)
            if entry["event"] == "listening":
                break
        ports = {name: int(str(a).rsplit(":", 1)[1]) for name, a in entry["routes"].items()}
        admin = int(str(entry["admin"]).rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as session:
            statuses = []
            for body in inbound:
                async with session.post(f"https://localhost:{ports['in']}/cards-qr-v1/transfer",
                                        data=body, ssl=pki.client_context()) as response:
                    statuses.append(response.status)
            partner.handler = slow(2, json_answer(ANSWER))  # the partner times out
            async with session.post(f"https://localhost:{ports['in']}/cards-qr-v1/transfer",
                                    data=good, ssl=pki.client_context()) as response:
                statuses.append(response.status)
            outbound_url = f"http://127.0.0.1:{ports['out']}/cards-qr-v1/echo/PIAID-1"
            for handler in (service.handler, json_answer(ANSWER)):  # sealed, then plaintext
                service.handler = handler
                async with session.post(outbound_url, data=TRANSFER) as response:
                    statuses.append(response.status)
            async with session.post(outbound_url, data=TRANSFER * 200) as response:
                statuses.append(response.status)
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                metrics = await response.text()
        process.send_signal(signal.SIGTERM)
        logs = (early + await process.stderr.read()).decode()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert statuses == [200, 401, 400, 401, 400, 400, 413, 504, 200, 502, 413]
    entries = [json.loads(line) for line in logs.splitlines()]
    requests = [e for e in entries if e["event"] == "request"]
    assert len(requests) == len(statuses)
    assert {"ts", "level", "route", "status", "duration_ms"} <= set(requests[0])
    assert requests[0]["request_id"] == "log-test-0001"
    assert requests[0]["key_ids"]["decrypt"] and requests[0]["key_ids"]["sign"]
    assert any(e["event"] == "key expires soon" for e in entries)
    secrets = [CARD, CARD[:6] + CARD[-4:], CRYPTOGRAM, CRYPTOGRAM[:16]]
    if google.scheme == "pgp":
        passphrase = pgp_keys.passphrase("partner-pw")
        assert passphrase is not None
        secrets.append(passphrase)
    else:
        secrets.append(str(jose_keys.jwk("partner-sig-a")["d"])[:24])
    for secret in secrets:
        assert secret not in logs, secret
        assert secret not in metrics, secret


class StalledStream(io.StringIO):
    """A stderr whose reader has stalled: every write waits until `drain()`."""

    def __init__(self) -> None:
        super().__init__()
        self._open = threading.Event()

        self.writing = threading.Event()  # the writer is blocked in write()

    def write(self, text: str) -> int:
        self.writing.set()
        self._open.wait()
        return super().write(text)

    def drain(self) -> None:
        self._open.set()


@pytest.fixture
def own_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """setup_logging may replace the root logger's handlers and level and the drop hook: all
    three are put back after the test."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logs, "_outbox", None)


@pytest.mark.usefixtures("own_logging")
def test_a_stalled_stderr_never_holds_up_logging_and_drops_are_counted() -> None:
    stream = StalledStream()
    metrics = Metrics()
    writer = setup_logging("info", records=8, stream=stream)
    count_drops(metrics.log_records_dropped.inc)
    logger = logging.getLogger("tests.stalled")
    done = threading.Event()

    def log_many() -> None:
        logger.info("line", extra={"fields": {"i": 0}})
        stream.writing.wait(60)  # the writer holds its first batch: that one record
        for i in range(1, 50):
            logger.info("line", extra={"fields": {"i": i}})
        done.set()

    threading.Thread(target=log_many, daemon=True).start()
    # Liveness, not speed: with a blocking handler this thread would never finish.
    assert done.wait(60), "logging waited on a stalled stderr"
    dropped = metrics.registry.get_sample_value("gateway_log_records_dropped_total")
    stream.drain()
    writer.stop()
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    written = [e["i"] for e in entries if e["event"] == "line"]
    notes = [e for e in entries if e["event"] == "log records dropped"]
    # The writer holds one record, the queue 8 more: the rest is dropped, counted and reported.
    assert written == list(range(9))
    assert dropped == 50 - len(written)
    assert [n["count"] for n in notes] == [50 - len(written)]
    assert notes[0]["level"] == "warning"


class CountingStream(StalledStream):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.mark.usefixtures("own_logging")
def test_records_queued_meanwhile_are_written_in_one_batch() -> None:
    """What gathers while the writer is busy goes out in one write: not a system call and a
    wake per line."""
    stream = CountingStream()
    writer = setup_logging("info", stream=stream)
    logger = logging.getLogger("tests.batch")
    logger.info("line", extra={"fields": {"i": 0}})
    assert stream.writing.wait(60)
    for i in range(1, 101):
        logger.info("line", extra={"fields": {"i": i}})
    stream.drain()
    writer.stop()
    assert [json.loads(line)["i"] for line in stream.getvalue().splitlines()] == list(range(101))
    # The first line alone, then the 100 in as few writes as stay atomic on a pipe.
    assert stream.writes[0].count("\n") == 1
    rest = stream.writes[1:]
    assert all(t.endswith("\n") and len(t.encode()) <= select.PIPE_BUF for t in rest)
    # Each write is full: the next write's first line would not have fitted in it.
    for text, after in itertools.pairwise(rest):
        assert len(text.encode()) + len(after.splitlines(keepends=True)[0].encode()) \
            > select.PIPE_BUF


def test_a_batch_is_cut_at_pipe_buf_between_whole_lines() -> None:
    """Workers share their supervisor's stderr: a write up to PIPE_BUF bytes is atomic on a
    pipe, so no other process's line lands inside one of ours."""
    short, accented, long = "a" * 99 + "\n", "é" * 999 + "\n", "b" * 5000 + "\n"
    chunks = list(logs._chunks([short] * 50 + [long] + [accented] * 3))
    assert [count for count, _ in chunks] == [40, 10, 1, 2, 1]
    assert all(len(text.encode()) <= select.PIPE_BUF for _, text in chunks if long not in text)
    assert "".join(text for _, text in chunks) == short * 50 + long + accented * 3


@pytest.mark.parametrize("google", ["jose"], indirect=True)
async def test_the_gateway_keeps_answering_while_nobody_reads_its_stderr(
    google: Google, partner_and_google: tuple[StandIn, StandIn], runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    """The real process, its stderr a one-page pipe that is read up to `listening` and then left
    alone: 100 requests later (a few KiB of log lines each) it still answers every one, and
    every line arrives once stderr is read again."""
    partner, _ = partner_and_google
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(config(google, runtime_dir, pki, inbound_url=partner.url)))
    good = await asyncio.to_thread(google.seal, TRANSFER)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path), "--log-level", "debug",
        stderr=write_end, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(write_end)
    stderr = os.fdopen(read_end, "rb")
    try:
        while True:
            entry = json.loads(await asyncio.wait_for(asyncio.to_thread(stderr.readline), 30))
            if entry["event"] == "listening":
                break
        port = int(str(entry["routes"]["in"]).rsplit(":", 1)[1])
        admin = int(str(entry["admin"]).rsplit(":", 1)[1])
        url = f"https://localhost:{port}/cards-qr-v1/transfer"
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            statuses = []
            for _ in range(100):
                async with session.post(url, data=good, ssl=pki.client_context()) as response:
                    statuses.append(response.status)
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                metrics = await response.text()
        assert statuses == [200] * 100
        assert "gateway_log_records_dropped_total 0.0" in metrics
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(asyncio.to_thread(stderr.read), 60)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        stderr.close()
    entries = [json.loads(line) for line in rest.splitlines()]
    assert sum(e["event"] == "request" for e in entries) == 100
    assert not any(e["event"] == "log records dropped" for e in entries)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError(f"card {CARD}")


@pytest.mark.usefixtures("own_logging")
def test_a_record_that_cannot_be_formatted_does_not_stop_the_writer() -> None:
    """A field whose text cannot be made (json.dumps falls back on str(), which raises) is
    written as one line naming the exception's type, with nothing of the record's text, and the
    records after it are written as usual."""
    stream = io.StringIO()
    writer = setup_logging("info", stream=stream)
    logger = logging.getLogger("tests.unprintable")
    logger.info("bad", extra={"fields": {"value": Unprintable()}})
    logger.info("after", extra={"fields": {"n": 1}})
    writer.stop()
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in entries] == ["log record could not be written", "after"]
    assert entries[0]["exception"] == "RuntimeError" and entries[0]["logger"] == "tests.unprintable"
    assert CARD not in stream.getvalue()
