"""Build everything one configuration needs (keysets, envelopes, TLS contexts) as one snapshot;
`Current` holds the snapshot in service and retires old ones when no request uses them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.affinity import planned_cpus
from gateway.config import Config, RouteConfig
from gateway.envelope import Envelope, EnvelopePool
from gateway.errors import ConfigError
from gateway.jose import JoseEnvelope, load_jose_keyset
from gateway.keys import Keyset, check_jose_keyset, check_route_keysets
from gateway.openpgp import NativePgpEnvelope, load_native_keyset
from gateway.pgp import PgpEnvelope, load_pgp_keyset
from gateway.scheduling import check_batch
from gateway.tls import build_client_context, build_server_context


@dataclass(frozen=True)
class RouteRuntime:
    config: RouteConfig
    envelope: Envelope
    server_ssl: ssl.SSLContext | None
    client_ssl: ssl.SSLContext | None


@dataclass
class Snapshot:
    """One configuration, fully loaded. Immutable once built; closed when retired."""

    config: Config
    generation: int
    keysets: Mapping[str, Keyset]
    routes: Mapping[str, RouteRuntime]
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def close(self) -> None:
        """Release every envelope (GnuPG homes and their agents). Idempotent."""
        for route in self.routes.values():
            route.envelope.close()


def build_snapshot(config: Config, generation: int, workdir: Path, slots: int = 1) -> Snapshot:
    """Load every key (disabled ones too), check each route's keysets and build its envelope and
    TLS contexts. PGP routes get `slots` GnuPG homes (one per crypto thread: a single gpg-agent
    is a bottleneck); `slots` 0 validates everything but builds no envelope. Raises
    ConfigError naming the place; on failure nothing is left behind."""
    # Checked with everything else, so that `check` and a reload that turns pin_workers on
    # refuse what `run` would refuse at the next start. (A pinned worker sees only its own CPU
    # here, which passes.)
    planned_cpus(config)
    check_batch(config)
    keysets: dict[str, Keyset] = {}
    native: dict[str, Keyset] = {}  # pgp keysets as the native engine parsed them
    routes: dict[str, RouteRuntime] = {}
    scratch = workdir / f"s{generation}"
    native_only = _native_only_keysets(config)
    try:
        for name, keyset_config in config.keysets.items():
            if keyset_config.type == "jose":
                keysets[name] = load_jose_keyset(keyset_config)
                check_jose_keyset(keysets[name], keyset_config)
                continue
            if any(r.scheme == "pgp" and r.pgp.engine == "native" and name in
                   (r.own_keys, r.peer_keys) for r in config.routes):
                native[name] = load_native_keyset(keyset_config)
            keysets[name] = native[name] if name in native_only else load_pgp_keyset(
                keyset_config, scratch)
        for index, route in enumerate(config.routes):
            engine_keysets = native if route.scheme == "pgp" and \
                route.pgp.engine == "native" else keysets
            own, peer = engine_keysets[route.own_keys], engine_keysets[route.peer_keys]
            check_route_keysets(own, peer, config.keysets[route.own_keys],
                                config.keysets[route.peer_keys])
            server_ssl = (
                build_server_context(route.tls, f"{route.place}.tls") if route.tls else None
            )
            client_ssl = build_client_context(route.upstream, f"{route.place}.upstream")
            if slots == 0:
                continue  # validation only (a supervisor): no envelopes, no GnuPG homes
            envelope: Envelope
            if route.scheme == "pgp" and route.pgp.engine == "native":
                envelope = NativePgpEnvelope(
                    own, peer, route.pgp, max_plaintext_bytes=config.limits.max_body_bytes)
            elif route.scheme == "pgp":
                homes: list[Envelope] = []
                try:
                    for slot in range(slots):
                        homes.append(PgpEnvelope(
                            own, peer, route.pgp, workdir / f"g{generation}r{index}s{slot}",
                            max_plaintext_bytes=config.limits.max_body_bytes,
                        ))
                except BaseException:
                    for home in homes:
                        home.close()
                    raise
                envelope = EnvelopePool(homes)
            else:
                envelope = JoseEnvelope(
                    own, peer, route.jose, max_plaintext_bytes=config.limits.max_body_bytes
                )
            routes[route.name] = RouteRuntime(route, envelope, server_ssl, client_ssl)
    except BaseException:
        for runtime in routes.values():
            runtime.envelope.close()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Snapshot(config=config, generation=generation, keysets=keysets, routes=routes)


def _native_only_keysets(config: Config) -> set[str]:
    """PGP keysets that only native-engine routes use: GnuPG need not load them."""
    users: dict[str, set[str]] = {}
    for route in config.routes:
        if route.scheme == "pgp":
            for name in (route.own_keys, route.peer_keys):
                users.setdefault(name, set()).add(route.pgp.engine)
    return {name for name, engines in users.items() if engines == {"native"}}


class Current:
    """The snapshot in service. Each request holds one snapshot from start to end; a replaced
    snapshot is closed once its last request finishes. Used from the event loop thread only."""

    def __init__(self, snapshot: Snapshot, retire: Callable[[Snapshot], None]) -> None:
        self._snapshot = snapshot
        self._users: dict[int, int] = {id(snapshot): 0}
        self._retiring: dict[int, Snapshot] = {}
        self._retire = retire

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @contextlib.contextmanager
    def use(self) -> Iterator[Snapshot]:
        snapshot = self._snapshot
        key = id(snapshot)
        self._users[key] += 1
        try:
            yield snapshot
        finally:
            self._users[key] -= 1
            if self._users[key] == 0 and key in self._retiring:
                self._finish(key)

    def swap(self, new: Snapshot) -> Snapshot:
        """Put `new` in service; the old one is retired when its last user is done."""
        old = self._snapshot
        self._snapshot = new
        self._users[id(new)] = 0
        self._retiring[id(old)] = old
        if self._users[id(old)] == 0:
            self._finish(id(old))
        return old

    def close(self) -> None:
        """Retire everything, in service or not (process exit)."""
        for key in list(self._retiring):
            self._finish(key)
        self._retire(self._snapshot)

    def _finish(self, key: int) -> None:
        snapshot = self._retiring.pop(key)
        del self._users[key]
        self._retire(snapshot)


def prepare_runtime_dir(root: Path) -> Path:
    """Make `root` (0700, ours) and a fresh private directory for this process below it, locked
    for as long as it lives (remove it with remove_runtime_dir); remove directories left there
    by processes that no longer run, stopping their gpg-agents."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = root.stat()
    except OSError as exc:
        raise ConfigError("runtime_dir", f"cannot create '{root}': {exc.strerror}") from None
    if info.st_uid != os.getuid():
        raise ConfigError("runtime_dir", f"'{root}' belongs to another user")
    if info.st_mode & 0o077:
        raise ConfigError("runtime_dir", f"'{root}' is readable by others; it must be 0700")
    for entry in root.glob("p*-*"):
        if entry.is_dir() and _stale(entry):
            stop_agents(entry)
            shutil.rmtree(entry, ignore_errors=True)
    mine = root / f"p{os.getpid()}-{secrets.token_hex(3)}"
    mine.mkdir(mode=0o700)
    # Held until remove_runtime_dir or the process's end (not inherited by gpg and its agents).
    lock = os.open(mine / _LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    _locks[mine] = lock
    return mine


def remove_runtime_dir(mine: Path) -> None:
    """Remove this process's directory (prepare_runtime_dir) and release its lock."""
    shutil.rmtree(mine, ignore_errors=True)
    lock = _locks.pop(mine, None)
    if lock is not None:
        os.close(lock)


_LOCK = "lock"
_locks: dict[Path, int] = {}


def _stale(entry: Path) -> bool:
    """Whether a process's directory outlived it: its lock can be taken. A directory without a
    lock (being made right now, or by an older version) counts as its process's while a process
    with that pid runs, this one aside: after a container restart the new process often gets
    the pid its predecessor had."""
    try:
        lock = os.open(entry / _LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pid_text = entry.name[1:].split("-", 1)[0]
        return pid_text.isdigit() and (int(pid_text) == os.getpid() or not _alive(int(pid_text)))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(lock)
    return True


def stop_agents(root: Path) -> None:
    """Stop every gpg-agent whose home lies below `root`."""
    # Sockets may live under /run/user rather than in the home: look for the homes themselves.
    for keys_dir in root.rglob("private-keys-v1.d"):
        subprocess.run(
            ["gpgconf", "--homedir", str(keys_dir.parent), "--kill", "gpg-agent"],
            check=False, capture_output=True, timeout=10,
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
