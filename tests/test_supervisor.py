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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import affinity, supervisor
from gateway.config import cpu_quota, load_config
from gateway.errors import ConfigError
from tests.e2e import ANSWER, REQUEST, JoseGoogle, Pki, config, thread_policies
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


async def killed(process: asyncio.subprocess.Process) -> None:
    """A gateway the test did not stop, and its workers, killed."""
    if process.returncode is None:
        # The workers first: they hold the stderr pipe that wait() reads to its end.
        for pid in children(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        await process.wait()


def thread_cpus(pid: int) -> dict[int, tuple[int, ...]]:
    """The CPUs each thread of process `pid` may run on."""
    return {int(task.name): tuple(sorted(os.sched_getaffinity(int(task.name))))
            for task in Path(f"/proc/{pid}/task").iterdir()}


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
    # Pinned where this machine allows it: the gateway runs on at most 2 CPUs (taskset, so that
    # 2 workers cover them on a bigger machine too); refused only under a CPU quota below them.
    # The other test runs unpinned.
    cpus = sorted(affinity.allowed_cpus())[:2]
    taskset = ["taskset", "-c", ",".join(map(str, cpus))]
    try:
        pinned: list[int | None] = list(affinity.worker_cpus(2, cpus, cpu_quota()))
    except ConfigError:
        pinned = [None, None]
    path.write_text(textwrap.dedent(config(
        google, runtime_dir, pki, inbound_url=partner.url,
        top={"workers": 2, "pin_workers": str(pinned[0] is not None).lower(),
             "batch_scheduling": "true"})))
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    process = await asyncio.create_subprocess_exec(
        *taskset, sys.executable, "-m", "gateway", "run", "--config", str(path), "--log-level",
        "info", stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
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

            # The workers serve generation 1; the gauge follows them, not the supervisor.
            status = json.loads(await get("/status"))
            assert [w["generation"] for w in status["workers"]] == [1, 1]
            # pin_workers: every thread of each worker (the crypto threads started by the
            # requests above among them) runs on its worker's CPU alone.
            assert [w["cpu"] for w in status["workers"]] == pinned
            cpu_of = {state["pid"]: state["cpu"] for state in status["workers"]}
            for pid, cpu in cpu_of.items():
                assert set(thread_cpus(pid).values()) == {tuple(cpus) if cpu is None else (cpu,)}
                # batch_scheduling: every thread of each worker, not the supervisor's.
                assert thread_policies(pid) == {os.SCHED_BATCH}
            assert thread_policies(process.pid) == {os.SCHED_OTHER}
            assert total(await get("/metrics"), "gateway_config_generation") == 1
            process.send_signal(signal.SIGHUP)
            for _ in range(3):  # the supervisor validates, then each worker reloads
                await next_event(process.stderr, "reloaded", generation=2)
            assert json.loads(await get("/status"))["generation"] == 2
            for _ in range(50):  # the supervisor reads the workers' reports every 0.2 s
                status = json.loads(await get("/status"))
                if [w["generation"] for w in status["workers"]] == [2, 2]:
                    break
                await asyncio.sleep(0.1)
            assert [w["generation"] for w in status["workers"]] == [2, 2]
            await asyncio.sleep(0.5)
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
            new = next(pid for pid in replaced if pid not in workers)
            if pinned[0] is not None:  # the replacement runs on the CPU of the one it replaced
                assert set(thread_cpus(new).values()) == {(cpu_of[workers[0]],)}

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        await killed(process)
    assert all(not Path(f"/proc/{pid}").exists() for pid in replaced)
    assert list(runtime_dir.iterdir()) == []


class Events:
    """The gateway's JSON log lines (supervisor and workers share its stderr), read in order."""

    def __init__(self, stderr: asyncio.StreamReader) -> None:
        self.stderr = stderr
        self.seen: list[dict[str, Any]] = []

    async def until(self, event: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.stderr.readline()
                assert line, "the gateway exited"
                entry: dict[str, Any] = json.loads(line)
                self.seen.append(entry)
                if entry["event"] == event and all(entry.get(k) == v for k, v in fields.items()):
                    return entry

    async def for_a_while(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await self.until("(none)", timeout=seconds)


async def test_workers_get_what_the_supervisor_validated_and_survive_hangups_while_starting(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    """A worker (re)started after an edit that failed validation serves the configuration in
    service (the supervisor's copy of it and of every file it names), and a reload while a
    worker starts neither kills it nor passes it by."""
    google = JoseGoogle(jose_keys, node_jose)
    key = tmp_path / "partner-sig.jwk"  # our own copy: this test breaks it
    key.write_bytes(jose_keys.private("partner-sig-a").read_bytes())
    soon = datetime.now(UTC) + timedelta(days=10)  # within warn_expiry_days
    good = textwrap.dedent(config(google, runtime_dir, pki, inbound_url=partner.url,
                                  top={"workers": 2}, expiring_recipient=soon)).replace(
        str(jose_keys.private("partner-sig-a")), str(key))
    path = tmp_path / "config.yaml"
    path.write_text(good)
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path), "--log-level", "info",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stderr is not None
    events = Events(process.stderr)
    try:
        listening = await events.until("listening", workers=2)
        port = int(listening["routes"]["in"].rsplit(":", 1)[1])
        admin = f"http://127.0.0.1:{int(listening['admin'].rsplit(':', 1)[1])}"
        warned = [e for e in events.seen if e["event"] == "key expires soon"]
        assert [(e["key_id"], e["days_left"]) for e in warned] == [("google-enc-a", 10.0)]

        async def served() -> list[int]:
            async def one() -> int:
                async with aiohttp.ClientSession() as fresh, fresh.post(
                        f"https://localhost:{port}/cards-qr-v1/echo", data=sealed,
                        ssl=pki.client_context()) as response:
                    return response.status
            return await asyncio.gather(*(one() for _ in range(8)))

        async def page(name: str) -> str:
            async with aiohttp.ClientSession() as session, \
                    session.get(admin + name) as response:
                return await response.text()

        async def ready() -> str:
            return await page("/readyz")

        async def replace_worker(index: int) -> int:
            """Kill worker `index`; return its replacement's pid as soon as it exists."""
            old = set(children(process.pid))
            os.kill(workers[index], signal.SIGKILL)
            await events.until("worker exited; starting a new one", worker=index)
            while not (new := set(children(process.pid)) - old):
                await asyncio.sleep(0.005)
            workers[index] = new.pop()
            return workers[index]

        workers = sorted(children(process.pid))
        # A broken key file, then a config that is not YAML: both rejected, and a worker
        # replaced after each starts from the copy in service.
        for index, broken in ((0, lambda: key.write_text("not a key")),
                              (1, lambda: path.write_text(good + "\n  ]: ][\n"))):
            broken()
            process.send_signal(signal.SIGHUP)
            await events.until("reload failed; the previous configuration stays in service")
            await replace_worker(index)
            await events.until("listening", worker=index)
            assert await served() == [200] * 8
            assert await ready() == "ready\n"
        # The operator fixes both, adds a route and turns batch_scheduling on (neither applies
        # until a restart); a reload lands while a replaced worker is still starting.
        key.write_bytes(jose_keys.private("partner-sig-a").read_bytes())
        added = ('\n  - {name: in2, direction: inbound, listen: "127.0.0.1:0", own_keys: partner,'
                 f' peer_keys: google, upstream: {{url: "{partner.url}"}}}}\n')
        path.write_text(good.replace(
            "workers: 2", "workers: 2\nwarn_expiry_days: 29\nbatch_scheduling: true") + added)
        starting = await replace_worker(0)
        process.send_signal(signal.SIGHUP)
        await events.until("reloaded", generation=2)  # the supervisor's
        await events.until("listening", worker=0)
        await events.for_a_while(3)
        exits = [e for e in events.seen if e["event"] == "worker exited; starting a new one"]
        assert [e["pid"] for e in exits if e["pid"] == starting] == []
        # Both workers serve the new generation, the one that was starting too (it may have
        # loaded it at start, or reloaded it on the SIGHUP owed to it).
        for _ in range(50):
            states = json.loads(await page("/status"))["workers"]
            if [w["generation"] for w in states] == [2, 2]:
                break
            await asyncio.sleep(0.1)
        assert [w["generation"] for w in states] == [2, 2]
        assert [w["cpu"] for w in states] == [None, None]  # pin_workers is off by default
        for state in states:
            assert set(thread_cpus(state["pid"]).values()) == {
                tuple(sorted(os.sched_getaffinity(0)))}
            # batch_scheduling: off as the supervisor started, for a worker started after the
            # reload that turned it on too.
            assert thread_policies(state["pid"]) == {os.SCHED_OTHER}
        # Logged by the supervisor at start and at the reload, not by every worker.
        assert len([e for e in events.seen if e["event"] == "key expires soon"]) == 2
        assert await served() == [200] * 8
        assert await ready() == "ready\n"
        # A worker that starts on the configuration with the added route serves the others.
        await replace_worker(1)
        await events.until("route not served until a restart", route="in2", worker=1)
        await events.until("listening", worker=1)
        assert thread_policies(workers[1]) == {os.SCHED_OTHER}
        assert await served() == [200] * 8
        assert await ready() == "ready\n"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        await killed(process)
    assert list(runtime_dir.iterdir()) == []


async def test_pinning_on_shared_cpus_is_refused_before_anything_starts(
    jose_keys: JoseKeys, node_jose: NodeJose, runtime_dir: Path, pki: Pki, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 8 CPUs allowed, a quota of 2 cores: a Kubernetes CPU limit on a shared node.
    monkeypatch.setattr(affinity, "allowed_cpus", lambda: set(range(8)))
    monkeypatch.setattr(affinity, "cpu_quota", lambda: 2.0)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(config(JoseGoogle(jose_keys, node_jose), runtime_dir, pki,
                                           inbound_url="http://127.0.0.1:1",
                                           top={"workers": 8, "pin_workers": "true"})))
    with pytest.raises(ConfigError) as info:
        await supervisor.supervise(load_config(path))
    assert str(info.value).startswith("pin_workers: the CPU quota of 2 cores is below the 8")
    assert list(runtime_dir.iterdir()) == []  # no runtime dir, no worker, no listener
