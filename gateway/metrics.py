"""Every metric of config.md, named once, registered on an injected registry."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Crypto runs from ~0.1 ms (JOSE at RSA-2048) to seconds (gpg under load).
_CRYPTO_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _process_id() -> int:
    return _pid[0]


# A worker (PROMETHEUS_MULTIPROC_DIR set) writes each value to its own pid's file, and
# prometheus-client asks for the pid on every inc and observe, to notice a fork: a getpid
# system call each time, ~5 % of a worker's event-loop time under load (py-spy). This process's
# pid, refreshed in a forked child, tells the same.
if getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=_process_id)


class _Unexported:
    """Stands in for a metric this process must not write: with several workers, the traffic
    metrics come from the workers and the configuration's from their supervisor."""

    def labels(self, *values: str) -> _Unexported:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def clear(self) -> None:
        pass


class Metrics:
    """The gateway's metrics. Label values come from the configuration, never from requests.

    `role` "single" registers everything; "worker" (several processes, prometheus-client's
    multiprocess mode) leaves out what describes the configuration; "supervisor" has only that,
    plus the workers' aggregated files through `aggregate()`."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 role: str = "single") -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        traffic = ("requests", "request_duration", "upstream_duration", "crypto_duration",
                   "crypto_failures", "key_uses", "loop_lag", "connections_closed",
                   "log_records_dropped")
        configuration = ("key_expiry", "key_info", "config_reloads", "config_generation")
        dropped = {"single": ("worker_reloads",), "worker": configuration,
                   "supervisor": (*traffic, "worker_reloads")}[role]

        # A metric a role leaves out is never made: in multiprocess mode making one (or a child
        # of one) already writes its file, which the supervisor would sum in beside its own
        # (a second gateway_config_generation, per worker pid).
        def made(name: str, kind: Any, *args: Any, **kwargs: Any) -> Any:
            return _Unexported() if name in dropped else kind(*args, registry=registry,
                                                              **kwargs)

        self.requests = made(
            "requests", Counter,
            "gateway_requests_total", "Requests answered, by route, direction and HTTP status.",
            ["route", "direction", "code"],
        )
        self.request_duration = made(
            "request_duration", Histogram,
            "gateway_request_duration_seconds", "Time from request start to answer.",
            ["route", "direction"], buckets=_REQUEST_BUCKETS,
        )
        self.upstream_duration = made(
            "upstream_duration", Histogram,
            "gateway_upstream_duration_seconds", "Time spent on the upstream exchange.",
            ["route"], buckets=_REQUEST_BUCKETS,
        )
        self.crypto_duration = made(
            "crypto_duration", Histogram,
            "gateway_crypto_duration_seconds", "Time spent sealing or opening one message.",
            ["route", "op"], buckets=_CRYPTO_BUCKETS,
        )
        self.crypto_failures = made(
            "crypto_failures", Counter,
            "gateway_crypto_failures_total", "Messages that could not be sealed or opened.",
            ["route", "op", "reason"],
        )
        self.key_uses = made(
            "key_uses", Counter,
            "gateway_key_uses_total", "Uses of each key: sign, encrypt, decrypt, verify.",
            ["keyset", "key_id", "op"],
        )
        self.key_expiry = made(
            "key_expiry", Gauge,
            "gateway_key_expiry_timestamp_seconds", "Expiry of each key that has one.",
            ["keyset", "key_id"],
        )
        self.key_info = made(
            "key_info", Gauge,
            "gateway_key_info", "One per configured key.",
            ["keyset", "key_id", "state", "fingerprint"],
        )
        self.config_reloads = made(
            "config_reloads", Counter,
            "gateway_config_reloads_total", "Configuration reload attempts.",
            ["result"],
        )
        self.config_generation = made(
            "config_generation", Gauge,
            "gateway_config_generation", "Generation of the configuration in service.",
        )
        self.connections_closed = made(
            "connections_closed", Counter,
            "gateway_connections_closed_total",
            "Client connections the gateway closed on a bound (header_timeout, header_bytes, "
            "max_connections, send_timeout) or on malformed HTTP (bad_request).",
            ["route", "reason"],
        )
        self.loop_lag = made(
            "loop_lag", Histogram,
            "gateway_event_loop_lag_seconds",
            "How late the event loop runs a timer: stalls delay every request.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.log_records_dropped = made(
            "log_records_dropped", Counter,
            "gateway_log_records_dropped_total",
            "Log records dropped because stderr did not keep up (the log queue was full): "
            "requests are never held up for a log line.",
        )
        self.worker_reloads = made(
            "worker_reloads", Counter,
            "gateway_worker_reloads_total",
            "Reloads applied by worker processes (workers > 1) after their supervisor validated "
            "them; a failure means that worker still serves its previous configuration.",
            ["result"],
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)  # both series exist from the start
            self.worker_reloads.labels(result)

    def aggregate(self, directory: str) -> None:
        """Export the traffic metrics the workers write under `directory` (summed)."""
        MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        return generate_latest(self.registry)
