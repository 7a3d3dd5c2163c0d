"""Shared fixtures: short private GnuPG homes under /tmp, keys generated once per session."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.e2e import partner_and_google, pki  # noqa: F401
from tests.jose_fixtures import *  # noqa: F403
from tests.pgp_fixtures import *  # noqa: F403

# Property tests run the same examples every time, so CI cannot turn red on a new random draw;
# explore more by raising max_examples locally (e.g. OPENPGP_DIFFERENTIAL_EXAMPLES).
settings.register_profile("gateway", derandomize=True, database=None)
settings.load_profile("gateway")


def kill_agents(root: Path) -> None:
    """Stop every gpg-agent whose home lies below `root` (agents outlive their tests)."""
    for keys_dir in root.rglob("private-keys-v1.d"):
        subprocess.run(
            ["gpgconf", "--homedir", str(keys_dir.parent), "--kill", "gpg-agent"],
            check=False,
            capture_output=True,
            timeout=10,
        )


@pytest.fixture(scope="session")
def session_tmp() -> Iterator[Path]:
    """A short directory under /tmp (GnuPG socket paths must stay under ~100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="gwt-", dir="/tmp"))
    root.chmod(0o700)
    yield root
    kill_agents(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def runtime_dir(session_tmp: Path) -> Iterator[Path]:
    """A fresh private runtime_dir for one test; its gpg-agents are stopped afterwards."""
    path = Path(tempfile.mkdtemp(prefix="rt-", dir=session_tmp))
    path.chmod(0o700)
    yield path
    kill_agents(path)
    shutil.rmtree(path, ignore_errors=True)
