"""affinity.py: which CPU each worker gets, when pinning is refused (by `run`, `check` and a
reload alike: build_snapshot asks), and that pin() binds every thread of the process (run in a
child process: the test's own affinity is left alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import affinity
from gateway.affinity import planned_cpus, worker_cpus
from gateway.config import Config, usable_cores
from gateway.errors import ConfigError
from gateway.snapshot import build_snapshot


def test_workers_take_the_allowed_cpus_in_order_round_robin() -> None:
    assert worker_cpus(2, {3, 1}, None) == (1, 3)
    assert worker_cpus(3, {5, 2}, 2.0) == (2, 5, 2)
    assert worker_cpus(1, {7}, None) == (7,)


def refusal(workers: int, allowed: set[int], quota: float | None) -> str:
    with pytest.raises(ConfigError) as info:
        worker_cpus(workers, allowed, quota)
    return str(info.value)


def test_pinning_is_refused_on_shared_cpus_and_where_cpus_would_idle() -> None:
    # A CPU quota below the allowed CPUs: a Kubernetes CPU limit without exclusive CPUs.
    assert refusal(8, set(range(8)), 2.0).startswith(
        "pin_workers: the CPU quota of 2 cores is below the 8 CPUs")
    # A fractional quota is below too, though usable_cores() rounds it up to 4.
    assert refusal(4, set(range(4)), 3.5).startswith(
        "pin_workers: the CPU quota of 3.5 cores is below the 4 CPUs")
    assert refusal(2, set(range(8)), None).startswith(
        "pin_workers: 2 workers on 8 CPUs: pinned, 6 would stay idle")
    assert refusal(1, set(), None) == "pin_workers: this process may run on no CPU"


def test_the_plan_follows_the_configuration(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setattr(affinity, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(affinity, "cpu_quota", lambda: None)

    def config(**fields: object) -> Config:
        return Config(path=tmp_path / "config.yaml", keysets={}, routes=(), **fields)  # type: ignore[arg-type]

    assert planned_cpus(config(workers=2, pin_workers=True)) == (0, 1)
    assert planned_cpus(config(workers=2)) is None
    assert planned_cpus(config(workers=1, pin_workers=True)) is None  # no worker processes
    monkeypatch.setattr(affinity, "cpu_quota", lambda: 1.5)
    # `check` and reloads build a snapshot: they refuse what `run` would refuse at start.
    with pytest.raises(ConfigError) as info:
        build_snapshot(config(workers=2, pin_workers=True), 1, tmp_path)
    assert str(info.value).startswith("pin_workers: the CPU quota of 1.5 cores")
    assert list(tmp_path.iterdir()) == []


CHILD = textwrap.dedent("""\
    import json, os, sys, threading
    from gateway.affinity import pin
    from gateway.config import usable_cores
    from gateway.errors import ConfigError
    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    try:
        pin(int(sys.argv[1]))
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        after = threading.Thread(target=stop.wait)
        after.start()
        print(json.dumps({"usable_cores": usable_cores(),
                          "threads": {tid: sorted(os.sched_getaffinity(int(tid)))
                                      for tid in os.listdir("/proc/self/task")}}))
    stop.set()
""")


def run_child(cpu: int) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(cpu)], capture_output=True,
                          text=True, timeout=60, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_pin_binds_every_thread_and_the_threads_started_after() -> None:
    cpu = max(os.sched_getaffinity(0))
    result = run_child(cpu)
    threads = result["threads"]
    assert isinstance(threads, dict)
    assert len(threads) == 3  # main, one started before pin(), one after
    assert all(cpus == [cpu] for cpus in threads.values()), threads
    # The cores were counted before pinning: the defaults sized from them do not shrink.
    assert result["usable_cores"] == usable_cores()


def test_pin_to_a_cpu_not_allowed_is_a_config_error() -> None:
    result = run_child(4095)
    assert result["error"] == "pin_workers: cannot bind this worker to CPU 4095: Invalid argument"
