"""snapshot.py: one configuration per request, retired when unused; the runtime directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.snapshot import Current, Snapshot, prepare_runtime_dir, remove_runtime_dir


def snapshot(generation: int) -> Snapshot:
    return Snapshot(config=Config(path=Path("/x"), keysets={}, routes=()),
                    generation=generation, keysets={}, routes={})


def test_requests_keep_their_snapshot_and_old_ones_retire_when_unused() -> None:
    retired: list[int] = []
    current = Current(snapshot(1), lambda s: retired.append(s.generation))
    with current.use() as first:
        current.swap(snapshot(2))
        assert first.generation == 1
        assert current.snapshot.generation == 2
        assert retired == []  # still in use by the request that started on it
        with current.use() as second:
            assert second.generation == 2
    assert retired == [1]
    current.swap(snapshot(3))  # unused: retired at once
    assert retired == [1, 2]
    current.close()
    assert retired == [1, 2, 3]


def test_runtime_dir_is_private_and_stale_homes_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "rt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = root / f"p{dead.pid}-abcdef"
    (stale / "g1r0").mkdir(parents=True)
    root.chmod(0o700)
    live = root / f"p{os.getppid()}-123456"
    live.mkdir()
    mine = prepare_runtime_dir(root)
    assert mine.parent == root and mine.name.startswith(f"p{os.getpid()}-")
    assert oct(mine.stat().st_mode & 0o777) == "0o700"
    assert not stale.exists()
    assert live.exists()
    remove_runtime_dir(mine)
    assert not mine.exists()


def test_runtime_dirs_are_told_apart_by_their_locks_not_only_by_pids(tmp_path: Path) -> None:
    root = tmp_path / "rt"
    root.mkdir(mode=0o700)
    # After a container restart the new process has its predecessor's pid: that directory
    # is not ours. Nor is one whose lock nobody holds, whatever runs with its pid now.
    same_pid = root / f"p{os.getpid()}-abcdef"
    unlocked = root / f"p{os.getppid()}-abcdef"
    for entry in (same_pid, unlocked):
        entry.mkdir()
    (unlocked / "lock").touch()
    # A live process's directory, its lock held, though the pid in its name is long gone.
    held = root / "p999999999-abcdef"
    held.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         f"fd = os.open({str(held / 'lock')!r}, os.O_WRONLY | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        mine = prepare_runtime_dir(root)
        assert sorted(p.name for p in root.iterdir()) == sorted([held.name, mine.name])
        # Ours is locked while we live: another process's start leaves it alone.
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from gateway.snapshot import prepare_runtime_dir, remove_runtime_dir; "
             f"remove_runtime_dir(prepare_runtime_dir(Path({str(root)!r})))"],
            capture_output=True, text=True, timeout=60, check=False)
        assert other.returncode == 0, other.stderr
        assert mine.exists() and held.exists()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    remove_runtime_dir(mine)
    assert sorted(p.name for p in root.iterdir()) == [held.name]
    again = prepare_runtime_dir(root)  # the holder is gone: its directory goes
    assert sorted(p.name for p in root.iterdir()) == [again.name]
    remove_runtime_dir(again)


def test_runtime_dir_readable_by_others_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "open"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    with pytest.raises(ConfigError) as info:
        prepare_runtime_dir(root)
    assert info.value.place == "runtime_dir"


def test_build_failure_leaves_nothing_behind(jose_keys: Any, runtime_dir: Path,
                                             tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.snapshot import build_snapshot

    path = tmp_path / "config.yaml"
    path.write_text(f"""
keysets:
  partner: {{type: jose, keys: [{{id: partner-sig-a, file: {jose_keys.private('partner-sig-a')}}},
                                {{id: partner-enc-a, file: {jose_keys.private('partner-enc-a')}}}]}}
  google: {{type: jose, keys: [{{id: google-sig-a, file: {jose_keys.public('google-sig-a')}}}]}}
routes:
  - {{name: r, direction: inbound, listen: "127.0.0.1:0", upstream: {{url: "http://x"}},
     own_keys: partner, peer_keys: google}}
""")
    with pytest.raises(ConfigError, match="no active, unexpired key that can be encrypted to"):
        build_snapshot(load_config(path), 1, runtime_dir)
    assert list(runtime_dir.iterdir()) == []


def test_the_route_engine_chooses_the_pgp_envelope(pgp_keys: Any, runtime_dir: Path,
                                                   tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.envelope import EnvelopePool
    from gateway.openpgp import NativePgpEnvelope
    from gateway.snapshot import build_snapshot

    path = tmp_path / "config.yaml"
    route = ('{{name: {n}, direction: inbound, listen: "127.0.0.1:0", own_keys: partner, '
             'peer_keys: google, upstream: {{url: "http://x"}}, pgp: {{engine: {e}}}}}')
    path.write_text(f"""
keysets:
  partner: {{type: pgp, keys: [{{id: p, file: {pgp_keys.sec('partner-a')}}}]}}
  google: {{type: pgp, keys: [{{id: g, file: {pgp_keys.pub('google-a')}}}]}}
routes:
  - {route.format(n="native", e="native")}
  - {route.format(n="gnupg", e="gnupg")}
""")
    snapshot = build_snapshot(load_config(path), 1, runtime_dir, slots=2)
    try:
        assert isinstance(snapshot.routes["native"].envelope, NativePgpEnvelope)
        pool = snapshot.routes["gnupg"].envelope
        assert isinstance(pool, EnvelopePool) and len(pool) == 2
        assert snapshot.keysets["partner"].keys[0].fingerprint == pgp_keys.fingerprint(
            "partner-a")
    finally:
        snapshot.close()


@pytest.mark.skipif(Path(f"/run/user/{os.getuid()}").is_dir(),
                    reason="gpg-agent puts its sockets under /run/user here, not in the homes")
def test_a_runtime_dir_too_long_for_gpg_agents_sockets_names_its_place(
    pgp_keys: Any, session_tmp: Path, tmp_path: Path,
) -> None:
    """gpg-agent's sockets live in the GnuPG homes below runtime_dir, and a Unix socket path
    holds 107 bytes: past that, the error names runtime_dir (it was gpgconf's EngineError,
    a traceback in `check`), and nothing is left behind."""
    from gateway.config import load_config
    from gateway.snapshot import build_snapshot

    root = session_tmp / ("r" * 80)
    path = tmp_path / "config.yaml"
    path.write_text(f"""
keysets:
  partner: {{type: pgp, keys: [{{id: p, file: {pgp_keys.sec('partner-a')}}}]}}
  google: {{type: pgp, keys: [{{id: g, file: {pgp_keys.pub('google-a')}}}]}}
routes:
  - {{name: r, direction: inbound, listen: "127.0.0.1:0", own_keys: partner,
     peer_keys: google, upstream: {{url: "http://x"}}}}
""")
    workdir = prepare_runtime_dir(root)
    with pytest.raises(ConfigError) as info:
        build_snapshot(load_config(path), 1, workdir)
    assert info.value.place == "runtime_dir" and "S.gpg-agent.browser" in info.value.message
    assert [p.name for p in workdir.iterdir()] == ["lock"]  # prepare_runtime_dir's own
