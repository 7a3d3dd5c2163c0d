"""The configuration in service, copied: with workers > 1 each worker loads the configuration
from the supervisor's copy of the config file and of every file it names (keys, certificates,
passphrase files), never from the files the operator edits. A worker (re)started after an edit
that failed validation, or reloading while the files change again, then gets exactly what the
supervisor validated and serves.

Layout, in the supervisor's private runtime directory (mode 0700, files 0600):

    config/g<N>/<absolute path of each file>   one staged copy per load attempt
    config/current -> g<N>                     the copy in service (swapped atomically)

A copy is staged, then loaded and built from (so what is validated is the copy itself), and
published only once the supervisor has swapped it in. Each load in a worker resolves `current`
once, so it never mixes two generations.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

from gateway.config import Config, load_config


class Mirror:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pointer = directory / "current"
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._numbers = itertools.count(1)

    def load(self, path: Path) -> Config:
        """Load `path` from the operator's files, copy it and every file it names, and load
        the copy (which the caller then builds and, on success, publishes). Raises
        ConfigError (or OSError), leaving nothing staged."""
        original = load_config(path)
        staged = self.directory / f"g{next(self._numbers)}"
        try:
            staged.mkdir(mode=0o700)
            for file in original.files():
                target = staged / file.relative_to(file.anchor)
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                data = file.read_bytes()
                descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as out:
                    out.write(data)
            return load_config(original.path, root=staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def publish(self, config: Config, generation: int) -> None:
        """Point `current` at `config`'s copy (loaded by load()), the supervisor's `generation`
        beside it, and remove every other copy but the one it replaces (a worker may be
        reading it right now)."""
        assert config.root is not None and config.root.parent == self.directory
        (self.directory / f"{config.root.name}{_GENERATION}").write_text(str(generation))
        keep = {config.root.name}
        if self.pointer.is_symlink():
            keep.add(os.readlink(self.pointer))
        link = self.directory / "current.new"
        link.unlink(missing_ok=True)
        link.symlink_to(config.root.name)
        os.replace(link, self.pointer)
        for entry in self.directory.iterdir():
            if entry.name.removesuffix(_GENERATION) in keep or entry.is_symlink():
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.endswith(_GENERATION):
                entry.unlink(missing_ok=True)


_GENERATION = ".generation"


def applied_generation(config: Config) -> int | None:
    """The supervisor's generation of a configuration a worker loaded from the mirror (None
    for one that was not)."""
    if config.root is None:
        return None
    try:
        return int((config.root.parent / f"{config.root.name}{_GENERATION}").read_text())
    except (OSError, ValueError):
        return None


def load_mirrored(pointer: Path, path: Path) -> Config:
    """A worker's load: `path` (the operator's config path) from the copy in service."""
    return load_config(path, root=pointer.resolve(strict=True))
