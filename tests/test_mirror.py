"""mirror.py: the supervisor's copy of the configuration in service and of every file it names,
which workers load instead of the operator's files."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.mirror import Mirror, applied_generation, load_mirrored

CONFIG = """
keysets:
  partner:
    type: pgp
    keys:
      - {id: partner-2026, file: keys/p.asc, passphrase_file: pw}
  google:
    type: pgp
    keys:
      - {id: google-2026, file: ABSOLUTE/g.asc}
routes:
  - name: in
    direction: inbound
    listen: "127.0.0.1:8443"
    upstream: {url: "http://127.0.0.1:3000"}
    own_keys: partner
    peer_keys: google
runtime_dir: run
"""


@pytest.fixture
def operator(tmp_path: Path) -> Path:
    """The operator's files: a relative key, a passphrase file, a key at an absolute path
    elsewhere, and the config naming them."""
    base = tmp_path / "etc"
    (base / "keys").mkdir(parents=True)
    (base / "keys/p.asc").write_text("partner key")
    (base / "pw").write_text("s3cret\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "g.asc").write_text("google key")
    (base / "config.yaml").write_text(
        textwrap.dedent(CONFIG).replace("ABSOLUTE", str(elsewhere)))
    return base / "config.yaml"


def test_load_reads_the_copy_and_names_the_originals(operator: Path, tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "mirror")
    config = mirror.load(operator)
    assert config.root is not None and config.root.parent == mirror.directory
    partner = config.keysets["partner"].keys[0]
    google = config.keysets["google"].keys[0]
    originals = (operator, operator.parent / "keys/p.asc", operator.parent / "pw",
                 tmp_path / "elsewhere/g.asc")
    assert config.path == operator
    assert set(config.files()) == set(originals)
    for read_from in (partner.file, google.file):
        assert read_from.is_relative_to(config.root)
    assert partner.file.read_text() == "partner key" and google.file.read_text() == "google key"
    assert partner.passphrase == "s3cret"
    # runtime_dir is a place to create, relative to the operator's config: never mirrored.
    assert config.runtime_dir == operator.parent / "run"
    # Private: directories 0700, files 0600.
    for copy in (config.root / p.relative_to("/") for p in originals):
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.root.stat().st_mode) == 0o700


def test_workers_get_the_published_copy_whatever_the_operator_does_since(
    operator: Path, tmp_path: Path,
) -> None:
    mirror = Mirror(tmp_path / "mirror")
    mirror.publish(mirror.load(operator), 7)
    (operator.parent / "keys/p.asc").write_text("edited key")
    operator.write_text("not: [yaml")
    worker = load_mirrored(mirror.pointer, operator)
    assert worker.keysets["partner"].keys[0].file.read_text() == "partner key"
    assert applied_generation(worker) == 7  # what the worker then reports it serves
    assert worker.files()[0] == operator
    # The operator's edit fails to load: nothing staged, the copy in service unchanged.
    with pytest.raises(ConfigError):
        mirror.load(operator)
    assert sorted(p.name for p in mirror.directory.iterdir()) == [
        "current", "g1", "g1.generation"]
    assert load_mirrored(mirror.pointer, operator).keysets["partner"].keys[0].file.read_text() \
        == "partner key"


def test_publish_keeps_the_copy_it_replaces_and_drops_older_ones(
    operator: Path, tmp_path: Path,
) -> None:
    mirror = Mirror(tmp_path / "mirror")
    for _ in range(3):
        staged = mirror.load(operator)
        mirror.publish(staged, 1)
        mirror.load(operator)  # staged, never published (its build failed, say)
    assert staged.root is not None and os.readlink(mirror.pointer) == staged.root.name == "g5"
    names = sorted(p.name for p in mirror.directory.iterdir())
    # previous, current (each with its generation), the unpublished last
    assert names == ["current", "g3", "g3.generation", "g5", "g5.generation", "g6"]
    mirror.publish(mirror.load(operator), 1)
    assert sorted(p.name for p in mirror.directory.iterdir()) == [
        "current", "g5", "g5.generation", "g7", "g7.generation"]
