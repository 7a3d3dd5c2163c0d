"""`pin_workers`: each worker process bound to one CPU of the usable set.

A worker hands every seal and open from its event loop to its crypto thread and back. Between
threads on two CPUs each hand-off wakes the other CPU (an inter-processor interrupt, costly in a
VM); on one CPU it is a plain context switch: ~86 -> ~33 us of CPU per idle hand-off on the
benchmark VM (bench/README.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from gateway.config import Config, cpu_quota, usable_cores
from gateway.errors import ConfigError
from gateway.scheduling import every_thread

__all__ = ["allowed_cpus", "pin", "planned_cpus", "worker_cpus"]


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity)."""
    return os.sched_getaffinity(0)


def planned_cpus(config: Config) -> tuple[int, ...] | None:
    """Each worker's CPU when `config` pins workers on this machine, else None (pin_workers
    off, or a single process). Raises ConfigError when pinning cannot be done well here."""
    if not config.pin_workers or config.workers < 2:
        return None
    return worker_cpus(config.workers, allowed_cpus(), cpu_quota())


def worker_cpus(workers: int, allowed: Iterable[int], quota: float | None) -> tuple[int, ...]:
    """The CPU of each worker: the allowed CPUs in order, round-robin.

    `quota` is the cgroup's CPU quota in cores (None: none). Raises ConfigError when
    - the quota is below the allowed CPUs: they are shared with other containers (a Kubernetes
      CPU limit without the static CPU manager), and every such pod would pin its workers to
      the same first CPUs;
    - there are fewer workers than allowed CPUs: the others would stay idle, while each worker
      runs the crypto threads sized for its share of all of them on one CPU."""
    cpus = sorted(allowed)
    if not cpus:
        raise ConfigError("pin_workers", "this process may run on no CPU")
    if quota is not None and quota < len(cpus):
        raise ConfigError(
            "pin_workers",
            f"the CPU quota of {quota:g} cores is below the {len(cpus)} CPUs this process may "
            "run on: they are shared, so pinning would crowd the workers onto CPUs others use. "
            "Pin only with exclusive CPUs (Kubernetes: the static CPU manager policy and "
            "integer CPU requests equal to limits), or set pin_workers: false",
        )
    if workers < len(cpus):
        raise ConfigError(
            "pin_workers",
            f"{workers} workers on {len(cpus)} CPUs: pinned, {len(cpus) - workers} would stay "
            "idle. Set workers: auto (one per CPU), or pin_workers: false",
        )
    return tuple(cpus[index % len(cpus)] for index in range(workers))


def pin(cpu: int) -> None:
    """Bind every thread of this process to `cpu`; threads and processes (gpg) started later
    inherit it. usable_cores() is read first (it is cached: read after, it would say 1, and the
    defaults sized from the cores would shrink). Raises ConfigError when it cannot be done."""
    usable_cores()
    try:
        every_thread(lambda tid: os.sched_setaffinity(tid, {cpu}))
    except OSError as exc:
        raise ConfigError("pin_workers", f"cannot bind this worker to CPU {cpu}: "
                                         f"{exc.strerror}") from None
