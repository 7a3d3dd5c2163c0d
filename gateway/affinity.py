"""`pin_workers`: each worker process bound to one CPU of the usable set.

A worker hands every seal and open from its event loop to its crypto thread and back. Between
threads on two CPUs each hand-off wakes the other CPU (an inter-processor interrupt, costly in a
VM); on one CPU it is a plain context switch. On 2 cores, JOSE 2048 1 KiB with `workers: auto`:
~86 -> ~33 us of CPU per idle hand-off, and +20-26 % round trips per second (bench/README.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from gateway.config import usable_cores
from gateway.errors import ConfigError

__all__ = ["allowed_cpus", "pin", "worker_cpus"]


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity)."""
    return os.sched_getaffinity(0)


def worker_cpus(workers: int, allowed: Iterable[int], cores: int) -> tuple[int, ...]:
    """The CPU of each worker: the allowed CPUs in order, round-robin.

    `cores` is what the process may use (usable_cores: its affinity capped by a CPU quota).
    Raises ConfigError when the quota is below the allowed CPUs: the CPUs are then shared with
    other containers (a Kubernetes CPU limit without the static CPU manager), and pinning would
    put every such pod's workers on the same first CPUs."""
    cpus = sorted(allowed)
    if not cpus:
        raise ConfigError("pin_workers", "this process may run on no CPU")
    if cores < len(cpus):
        raise ConfigError(
            "pin_workers",
            f"the CPU quota allows {cores} core(s) of the {len(cpus)} CPUs this process may run "
            "on: they are shared, so pinning would crowd the workers onto CPUs others use. "
            "Pin only with exclusive CPUs (Kubernetes: the static CPU manager policy and "
            "integer CPU requests equal to limits), or set pin_workers: false",
        )
    return tuple(cpus[index % len(cpus)] for index in range(workers))


def pin(cpu: int) -> None:
    """Bind every thread of this process to `cpu`; threads and processes (gpg) started later
    inherit it. usable_cores() is read first (it is cached: read after, it would say 1, and the
    defaults sized from the cores would shrink). Raises ConfigError when it cannot be done."""
    usable_cores()
    try:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), {cpu})
    except OSError as exc:
        raise ConfigError("pin_workers", f"cannot bind this worker to CPU {cpu}: "
                                         f"{exc.strerror}") from None
