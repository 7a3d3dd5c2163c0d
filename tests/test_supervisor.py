"""supervisor.py: `workers` > 1 as the real process: shared ports, summed metrics, reload in
every worker, a crashed worker replaced, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import ANSWER, REQUEST, JoseGoogle, Pki, config
from tests.jose_fixtures import JoseKeys, NodeJose
from tests.peers import StandIn, json_answer

pytestmark = pytest.mark.e2e


@pytest.fixture
async def partner() -> AsyncIterator[StandIn]:
    service = await StandIn(json_answer(ANSWER)).start()
    yield service
    await service.stop()


async def next_event(stderr: asyncio.StreamReader, event: str, **fields: Any) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(stderr.readline(), 30)
        assert line, "the gateway exited"
        entry: dict[str, Any] = json.loads(line)
        if entry["event"] == event and all(entry.get(k) == v for k, v in fields.items()):
            return entry


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(parts[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def total(metrics: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def assert_each_family_once(metrics: str) -> None:
    """One TYPE line per metric, and no sample with a worker's pid: what the supervisor sums
    is the workers' traffic, never a copy of its own configuration metrics."""
    types = [line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    assert not [s for f in text_string_to_metric_families(metrics) for s in f.samples
                if "pid" in s.labels]


async def test_two_workers_share_the_listener_and_the_supervisor_sums_them(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = JoseGoogle(jose_keys, node_jose)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(config(google, runtime_dir, pki, inbound_url=partner.url,
                                           top={"workers": 2})))
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path), "--log-level", "info",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stderr is not None
    try:
        listening = await next_event(process.stderr, "listening", workers=2)
        port = int(listening["routes"]["in"].rsplit(":", 1)[1])
        admin = f"http://127.0.0.1:{int(listening['admin'].rsplit(':', 1)[1])}"
        workers = children(process.pid)
        assert len(workers) == 2
        for pid in workers:  # the command line's level reaches the workers
            assert b"--log-level\0info" in Path(f"/proc/{pid}/cmdline").read_bytes()

        async with aiohttp.ClientSession() as session:
            async def request() -> int:
                # A new connection each time, so the kernel spreads them over the workers.
                async with aiohttp.ClientSession() as fresh, fresh.post(
                    f"https://localhost:{port}/cards-qr-v1/echo", data=sealed,
                    ssl=pki.client_context()) as response:
                    assert (await asyncio.to_thread(google.open, await response.read()))[0] \
                        == ANSWER
                    return response.status

            async def get(page: str) -> str:
                async with session.get(admin + page) as response:
                    return await response.text()

            statuses = await asyncio.gather(*(request() for _ in range(20)))
            assert statuses == [200] * 20
            metrics = await get("/metrics")
            assert total(metrics, "gateway_requests_total", route="in", code="200") == 20
            assert total(metrics, "gateway_key_uses_total", key_id="partner-sig-a") == 20
            infos = [s for f in text_string_to_metric_families(metrics) for s in f.samples
                     if s.name == "gateway_key_info"]
            assert len(infos) == 4  # once per key, not once per worker
            assert await get("/readyz") == "ready\n"

            process.send_signal(signal.SIGHUP)
            for _ in range(3):  # the supervisor validates, then each worker reloads
                await next_event(process.stderr, "reloaded", generation=2)
            assert json.loads(await get("/status"))["generation"] == 2
            metrics = await get("/metrics")
            assert total(metrics, "gateway_worker_reloads_total", result="success") == 2
            assert total(metrics, "gateway_worker_reloads_total", result="failure") == 0
            assert_each_family_once(metrics)
            generation = [s for f in text_string_to_metric_families(metrics) for s in f.samples
                          if s.name == "gateway_config_generation"]
            assert [(s.labels, s.value) for s in generation] == [({}, 2.0)]
            assert total(metrics, "gateway_config_reloads_total", result="success") == 1

            os.kill(workers[0], signal.SIGKILL)
            await next_event(process.stderr, "worker exited; starting a new one")
            await next_event(process.stderr, "listening", worker=0)
            assert await asyncio.gather(*(request() for _ in range(6))) == [200] * 6
            assert_each_family_once(await get("/metrics"))
            replaced = children(process.pid)
            assert len(replaced) == 2 and workers[0] not in replaced

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            # The workers first: they hold the stderr pipe that wait() reads to its end.
            for pid in children(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()
    assert all(not Path(f"/proc/{pid}").exists() for pid in replaced)
    assert list(runtime_dir.iterdir()) == []
