"""Watch the configuration (content hashes, SIGHUP), build the new snapshot aside and swap it in,
or keep the old one serving and count the failure (ghostunnel's all-or-nothing rule)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.config import Config, combined_digest, file_digests, files_digest, load_config
from gateway.errors import ConfigError
from gateway.keys import utcnow
from gateway.logs import apply_level
from gateway.metrics import Metrics
from gateway.snapshot import Current, Snapshot

log = logging.getLogger("gateway.reload")
_EXPIRY_RETRY = timedelta(minutes=1)


@dataclass(frozen=True)
class ReloadStatus:
    time: datetime
    result: str  # "success" or "failure"
    trigger: str  # "sighup", "poll", "expiry" or "api"
    error: str | None = None
    warnings: tuple[str, ...] = ()


class Reloader:
    """Reloads the configuration at `path` into `current`. One reload at a time; each builds
    everything (config, keys, GnuPG homes, TLS contexts) before the single swap."""

    def __init__(self, path: Path, current: Current,
                 build: Callable[[Config, int], Snapshot], metrics: Metrics,
                 on_swap: Callable[[Snapshot], None],
                 load: Callable[[Path], Config] = load_config) -> None:
        """`load`: how `path` becomes a Config (a supervisor stages a mirror, a worker loads
        the supervisor's mirror: mirror.py)."""
        self.path = path
        self.load = load
        self.current = current
        self.build = build
        self.metrics = metrics
        self.on_swap = on_swap
        self.last: ReloadStatus | None = None
        self._lock = asyncio.Lock()
        self._generation = current.snapshot.generation
        # The files of the last attempt (of the configuration in service until one fails):
        # what a poll hashes. After a failure those of the failed configuration, even ones that
        # did not exist yet, so that the same broken content is not retried (nor counted) at
        # every poll, and a missing file that appears is.
        self._watched = current.snapshot.config.files()
        self._seen = files_digest(self._watched)
        self._expiry = self._next_expiry()

    async def poll_forever(self) -> None:
        """Every `reload.interval_s` of the configuration in service, reload if the content of
        the config file or of any file it names changed. 0 disables polling (SIGHUP only)."""
        while True:
            interval = self.current.snapshot.config.reload_interval_s
            await asyncio.sleep(interval if interval > 0 else 1.0)
            if interval > 0:
                await self.poll()

    async def poll(self) -> bool | None:
        """One poll: None when nothing changed since the last attempt, else the reload's result.
        Content that already failed is not tried (nor counted) again until it changes. Once an
        enabled key's expiry has passed, the keys are loaded again (trigger "expiry"), once:
        which parts a key uses, and so its expiry, is decided when it is loaded, and a PGP key
        whose newest encryption subkey ran out still has an older one, as gpg would use."""
        if self._expiry is not None and utcnow() >= self._expiry:
            self._expiry = None  # a reload that succeeds sets the next one
            reloaded = await self.reload("expiry")
            if not reloaded and self._expiry is None:
                # Failed (a key file unreadable right now, say): the expired key would stay
                # in use until some other reload; tried again in a minute, each failure logged.
                self._expiry = utcnow() + _EXPIRY_RETRY
            return reloaded
        digests = await asyncio.to_thread(file_digests, self._watched)
        digest = combined_digest(digests)
        if digest == self._seen:
            return None
        self._seen = digest
        return await self.reload("poll", before=digests)

    async def reload(self, trigger: str, *, before: dict[Path, str] | None = None) -> bool:
        """Load, validate and build the whole new configuration, then swap it in. On any failure
        the old configuration keeps serving. Returns True when the new one is in service.
        `before`: the watched files' digests just taken (by poll), not taken again."""
        async with self._lock:
            old = self.current.snapshot.config
            # Each file as it was before the attempt read it: one rewritten in place during
            # the attempt (read half-written, say) must be tried again at the next poll, not
            # taken as seen because its finished content was hashed afterwards.
            if before is None:
                before = await asyncio.to_thread(file_digests, self._watched)
            try:
                try:
                    config = await asyncio.to_thread(self.load, self.path)
                except ConfigError as exc:
                    await self._note_seen(exc.files or (self.path,), before)
                    raise
                # Hash what we are about to read: a change during the build is seen next poll.
                await self._note_seen(config.files(), before)
                warnings = listener_changes(old, config)
                snapshot = await asyncio.to_thread(self.build, config, self._generation + 1)
            except Exception as exc:  # any failure keeps the old configuration in service
                # Our errors name the place and never hold key material; others give the type.
                error = str(exc) if isinstance(exc, ConfigError) else type(exc).__name__
                self._count(trigger, "failure")
                self.last = ReloadStatus(datetime.now(UTC), "failure", trigger, error)
                log.error("reload failed; the previous configuration stays in service",
                          extra={"fields": {"trigger": trigger, "error": error,
                                            "generation": self._generation}})
                return False
            self._generation += 1
            for warning in warnings:
                log.warning("listener change needs a restart; the rest applies",
                            extra={"fields": {"change": warning}})
            self.current.swap(snapshot)
            self._expiry = self._next_expiry()
            apply_level(config.log_level)
            self.on_swap(snapshot)
            self._count(trigger, "success")
            self.last = ReloadStatus(datetime.now(UTC), "success", trigger,
                                     warnings=tuple(warnings))
            log.info("reloaded", extra={"fields": {"trigger": trigger,
                                                    "generation": self._generation}})
            return True

    async def _note_seen(self, files: tuple[Path, ...], before: dict[Path, str]) -> None:
        """Watch `files` from now on, as they are now; but if one that was watched already
        changed during the attempt, leave the next poll to try again."""
        self._watched = files
        after = await asyncio.to_thread(file_digests, files)
        self._seen = combined_digest(after)
        if any(after[f] != before[f] for f in after if f in before):
            self._seen = ""

    def _count(self, trigger: str, result: str) -> None:
        # config.md: gateway_config_reloads_total counts the operator's attempts (SIGHUP, a
        # change seen by polling). A reload because a key expired is logged and in /status.
        if trigger != "expiry":
            self.metrics.config_reloads.labels(result).inc()
            self.metrics.worker_reloads.labels(result).inc()

    def _next_expiry(self) -> datetime | None:
        """The soonest expiry still to come among the enabled keys in service."""
        now = utcnow()
        return min((key.expires for keyset in self.current.snapshot.keysets.values()
                    for key in keyset.keys
                    if key.enabled and key.expires is not None and key.expires > now),
                   default=None)


def listener_changes(old: Config, new: Config) -> list[str]:
    """What the new configuration changes that only a restart can apply."""
    changes: list[str] = []
    if old.admin_listen != new.admin_listen:
        changes.append(f"admin.listen {old.admin_listen} -> {new.admin_listen}")
    if old.workers != new.workers:
        changes.append(f"workers {old.workers} -> {new.workers}")
    if old.pin_workers != new.pin_workers and max(old.workers, new.workers) > 1:
        changes.append(f"pin_workers {old.pin_workers} -> {new.pin_workers}".lower())
    if old.batch_scheduling != new.batch_scheduling:
        changes.append(
            f"batch_scheduling {old.batch_scheduling} -> {new.batch_scheduling}".lower())
    if old.runtime_dir != new.runtime_dir:
        changes.append(f"runtime_dir {old.runtime_dir} -> {new.runtime_dir}: the GnuPG homes "
                       "stay where they are until a restart")
    before = {r.name: r for r in old.routes}
    after = {r.name: r for r in new.routes}
    for name in sorted(after.keys() - before.keys()):
        changes.append(f"route '{name}' added: not served until a restart")
    for name in sorted(before.keys() - after.keys()):
        changes.append(f"route '{name}' removed: its listener answers 503 until a restart")
    for name in sorted(after.keys() & before.keys()):
        a, b = before[name], after[name]
        if a.listen != b.listen:
            changes.append(f"{b.place}.listen {a.listen} -> {b.listen}")
        if (a.tls is None) != (b.tls is None):
            changes.append(f"{b.place}.tls: plain/TLS choice changed")
        elif a.tls and b.tls and (a.tls.client_ca is None) != (b.tls.client_ca is None):
            changes.append(f"{b.place}.tls.client_ca: client certificates required or not")
        elif a.tls and b.tls and a.tls.min_version != b.tls.min_version:
            changes.append(f"{b.place}.tls.min_version {a.tls.min_version} -> "
                           f"{b.tls.min_version}")
    for field in ("idle_timeout_s", "max_header_bytes", "max_headers"):
        if getattr(old.limits, field) != getattr(new.limits, field):
            changes.append(f"limits.{field} applies to listeners: restart to change it")
    if old.limits.header_timeout_s != new.limits.header_timeout_s and \
            any(r.tls for r in new.routes):
        changes.append("limits.header_timeout_s applies to request heads now and to TLS "
                       "handshakes after a restart")
    return changes
