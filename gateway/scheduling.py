"""`batch_scheduling`: the serving processes' threads under Linux's SCHED_BATCH policy.

A serving process's event loop and its crypto threads wake one another several times per
request: a seal or open handed over and its result handed back, a TLS record in, an upstream
answer. Under the normal policy each thread that wakes preempts the one running on its CPU. On
the benchmark VM that made ~12 context switches per JOSE request (all the workers' threads
together). Under SCHED_BATCH a woken thread waits until the running one blocks or has used its
time slice: half the switches, and ~10 % less CPU per JOSE round trip (bench/README.md).

The price is the same property toward everything else: a woken gateway thread no longer
preempts other work on its CPU either, so on CPUs shared with busy neighbours each wake-up may
wait out their time slice. Hence off by default, and only for CPUs the gateway has to itself.
Unprivileged processes may switch between the normal and the batch policy; nothing else (nice
value, priority) changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

from gateway.config import Config
from gateway.errors import ConfigError

__all__ = ["batch", "check_batch", "every_thread"]


def every_thread(apply: Callable[[int], object]) -> None:
    """`apply(tid)` for every thread of this process (Linux thread ids; a thread that ends
    meanwhile is skipped). OSError from `apply` propagates."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            apply(int(tid))


def batch() -> None:
    """Put every thread of this process under SCHED_BATCH; threads and processes (gpg and its
    agents) started later inherit it. Raises ConfigError when it cannot be done."""
    policy = _batch_policy()
    try:
        every_thread(lambda tid: os.sched_setscheduler(tid, policy, os.sched_param(0)))
    except OSError as exc:
        raise ConfigError("batch_scheduling",
                          f"cannot set this process's threads to SCHED_BATCH: {exc.strerror}"
                          ) from None


def check_batch(config: Config) -> None:
    """Refuse `batch_scheduling: true` where it cannot be set, before any process relies on it
    (the probe is a thread of its own, so nothing here changes policy). Raises ConfigError."""
    if not config.batch_scheduling:
        return
    policy = _batch_policy()
    failure: list[OSError] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))  # this thread only
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=probe, name="batch-probe")
    thread.start()
    thread.join()
    if failure:
        raise ConfigError("batch_scheduling",
                          f"this system refuses SCHED_BATCH: {failure[0].strerror}")


def _batch_policy() -> int:
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        raise ConfigError("batch_scheduling", "SCHED_BATCH is a Linux scheduling policy; this "
                                              "system has none")
    return int(policy)
