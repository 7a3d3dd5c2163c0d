"""batch_scheduling: batch() puts every thread of the process, and what it starts later, under
SCHED_BATCH (run in a child process: the policy is the test process's otherwise); check_batch()
refuses where the system does, without changing any policy itself; build_snapshot asks it, so
`check` and a reload refuse what `run` would."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.scheduling import batch, check_batch
from gateway.snapshot import build_snapshot

CHILD = textwrap.dedent("""\
    import errno, json, os, subprocess, sys, threading
    from gateway.errors import ConfigError
    from gateway.scheduling import batch
    if sys.argv[1] == "refused":
        def refuse(*args):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        os.sched_setscheduler = refuse
    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    try:
        batch()
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        after = threading.Thread(target=stop.wait)
        after.start()
        child = subprocess.Popen(["sleep", "30"])  # as gpg and its agents are started
        print(json.dumps({"threads": [os.sched_getscheduler(int(tid))
                                      for tid in os.listdir("/proc/self/task")],
                          "process": os.sched_getscheduler(child.pid)}))
        child.kill()
        child.wait()
    stop.set()
""")


def run_child(mode: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          timeout=60, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_batch_sets_every_thread_and_what_starts_later() -> None:
    result = run_child("allowed")
    assert result["threads"] == [os.SCHED_BATCH] * 3  # main, one started before, one after
    assert result["process"] == os.SCHED_BATCH


def test_batch_refused_is_a_config_error() -> None:
    assert run_child("refused") == {
        "error": "batch_scheduling: cannot set this process's threads to SCHED_BATCH: "
                 "Operation not permitted"}


def config(tmp_path: Path, on: bool) -> Config:
    return Config(path=tmp_path / "config.yaml", keysets={}, routes=(), batch_scheduling=on)


def refuse(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the system refuse every policy change; returns the threads that asked."""
    asked: list[int] = []

    def refused(pid: int, policy: int, param: os.sched_param) -> None:
        asked.append(threading.get_ident())
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    return asked


def test_check_batch_probes_in_a_thread_of_its_own(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.sched_setscheduler
    asked: list[tuple[int, int, int]] = []  # (thread, pid argument, policy)

    def recorded(pid: int, policy: int, param: os.sched_param) -> None:
        asked.append((threading.get_ident(), pid, policy))
        real(pid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", recorded)
    before = os.sched_getscheduler(0)
    check_batch(config(tmp_path, True))
    # Really set, in another thread (pid 0: that thread only), and the caller untouched.
    assert [(pid, policy) for _, pid, policy in asked] == [(0, os.SCHED_BATCH)]
    assert asked[0][0] != threading.get_ident()
    assert os.sched_getscheduler(0) == before


def test_check_batch_refuses_where_the_system_does(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    asked = refuse(monkeypatch)
    check_batch(config(tmp_path, False))  # off: nothing asked
    assert asked == []
    with pytest.raises(ConfigError) as info:
        check_batch(config(tmp_path, True))
    assert str(info.value) == \
        "batch_scheduling: this system refuses SCHED_BATCH: Operation not permitted"
    assert len(asked) == 1 and asked[0] != threading.get_ident()


def test_without_sched_batch_it_is_refused(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "SCHED_BATCH")
    for call in (batch, lambda: check_batch(config(tmp_path, True))):
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == \
            "batch_scheduling: SCHED_BATCH is a Linux scheduling policy; this system has none"


def test_build_snapshot_refuses_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse(monkeypatch)
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(ConfigError) as info:
        build_snapshot(config(tmp_path, True), 1, workdir)
    assert str(info.value).startswith("batch_scheduling: this system refuses SCHED_BATCH")
    assert list(workdir.iterdir()) == []
