"""affinity.py: which CPU each worker gets, when pinning is refused, and that pin() binds every
thread of the process (run in a child process: the test's own affinity is left alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gateway.affinity import worker_cpus
from gateway.errors import ConfigError


def test_workers_take_the_allowed_cpus_in_order_round_robin() -> None:
    assert worker_cpus(2, {3, 1}, 2) == (1, 3)
    assert worker_cpus(3, {5, 2}, 2) == (2, 5, 2)
    assert worker_cpus(1, {7}, 1) == (7,)


def test_pinning_is_refused_on_shared_cpus() -> None:
    # A CPU quota of 2 cores over 8 allowed CPUs: a Kubernetes CPU limit without exclusive CPUs.
    with pytest.raises(ConfigError) as info:
        worker_cpus(2, range(8), 2)
    assert str(info.value).startswith("pin_workers: the CPU quota allows 2 core(s) of the 8 CPUs")
    with pytest.raises(ConfigError):
        worker_cpus(1, (), 1)


CHILD = textwrap.dedent("""\
    import json, os, sys, threading
    from gateway.affinity import pin
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
        print(json.dumps({tid: sorted(os.sched_getaffinity(int(tid)))
                          for tid in os.listdir("/proc/self/task")}))
    stop.set()
""")


def run_child(cpu: int) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(cpu)], capture_output=True,
                          text=True, timeout=60, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_pin_binds_every_thread_and_the_threads_started_after() -> None:
    cpu = max(os.sched_getaffinity(0))
    threads = run_child(cpu)
    assert len(threads) == 3  # main, one started before pin(), one after
    assert all(cpus == [cpu] for cpus in threads.values()), threads


def test_pin_to_a_cpu_not_allowed_is_a_config_error() -> None:
    result = run_child(4095)
    assert result["error"] == "pin_workers: cannot bind this worker to CPU 4095: Invalid argument"
