"""The admin listener's endpoints (/healthz, /readyz, /metrics, /status), shared by a gateway
process and the supervisor of several workers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.keys import days_left, expiring, key_warnings, valid_too_long
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.reload import Reloader
from gateway.snapshot import Current, Snapshot

log = logging.getLogger("gateway.app")  # where operators have always found the expiry warning


def build_admin_app(ready: Callable[[], str | None], metrics: Metrics,
                    status: Callable[[], dict[str, Any]]) -> web.Application:
    """`ready()` returns None when ready, else why not ("starting", "draining")."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        reason = ready()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"{reason}\n")

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def status_page(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(status(), indent=2) + "\n",
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/status", status_page)
    return app


def status_document(snapshot: Snapshot, reloader: Reloader, draining: bool,
                    workers: list[dict[str, int | None]] | None = None) -> dict[str, Any]:
    """What /status shows: generation (validated; with `workers`, each worker's own under
    "workers"), last reload, every key's public facts (no material) and what an operator must
    hear about it (expiring within warn_expiry_days, valid too long)."""
    last = reloader.last
    now = datetime.now(UTC)
    within = timedelta(days=snapshot.config.warn_expiry_days)
    extra = {} if workers is None else {"workers": workers}
    return {
        **extra,
        "generation": snapshot.generation,
        "loaded_at": snapshot.loaded_at.isoformat(),
        "draining": draining,
        "last_reload": None if last is None else {
            "time": last.time.isoformat(), "result": last.result, "trigger": last.trigger,
            "error": last.error, "warnings": list(last.warnings)},
        "keysets": {
            name: [
                {"id": k.id, "state": k.state.value, "fingerprint": k.fingerprint,
                 "type": keyset.type, "algorithm": k.algorithm,
                 "capabilities": list(k.capabilities), "private": k.private,
                 "expires": k.expires.isoformat() if k.expires else None,
                 "warnings": key_warnings(keyset, k, within, now)}
                for k in keyset.keys
            ]
            for name, keyset in snapshot.keysets.items()
        },
    }


def warn_about_keys(snapshot: Snapshot) -> None:
    """Log each enabled key expiring within warn_expiry_days, and each of our PGP keys valid
    for more than two years (start-up, reload, daily; `check` prints the same)."""
    now = datetime.now(UTC)
    within = timedelta(days=snapshot.config.warn_expiry_days)
    for keyset, key in expiring(snapshot.keysets.values(), within, now):
        assert key.expires is not None
        log.warning("key expires soon", extra={"fields": {
            "keyset": keyset.name, "key_id": key.id, "state": key.state.value,
            "expires": key.expires.isoformat(),
            "days_left": days_left(key, now)}})
    for keyset in snapshot.keysets.values():
        for key in keyset.keys:
            if valid_too_long(keyset, key, now):
                log.warning("key valid for more than two years", extra={"fields": {
                    "keyset": keyset.name, "key_id": key.id, "state": key.state.value,
                    "expires": key.expires.isoformat() if key.expires else None,
                    "rule": "Google: one year, two at most"}})


async def warn_daily(current: Current) -> None:
    """warn_about_keys once a day, for the configuration in service then."""
    while True:
        await asyncio.sleep(86400)
        warn_about_keys(current.snapshot)


def describe_keys(metrics: Metrics, snapshot: Snapshot, *, generation: bool = True) -> None:
    """Set the gauges that describe the configuration: generation (unless a supervisor's,
    which follows its workers), key info and expiry (keys that left the configuration
    disappear)."""
    if generation:
        metrics.config_generation.set(snapshot.generation)
    metrics.key_info.clear()
    metrics.key_expiry.clear()
    for keyset in snapshot.keysets.values():
        for key in keyset.keys:
            metrics.key_info.labels(keyset.name, key.id, key.state.value, key.fingerprint).set(1)
            if key.expires is not None:
                metrics.key_expiry.labels(keyset.name, key.id).set(key.expires.timestamp())
