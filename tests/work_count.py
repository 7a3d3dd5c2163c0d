"""The work a hostile message costs, counted instead of timed.

Speed and memory are measured in benchmarks, never asserted as wall-clock limits in tests (these
machines are shared and noisy). A test that proves a message is refused with bounded work counts
that work instead: the calls into the code that does it (a packet parser, an RSA operation, a
gpg run), the bytes a decompressor hands back, or the limit and timeout the code sets. A count
does not depend on the machine, and it grows when a cap is taken away.
"""

from __future__ import annotations

import bz2
import zlib
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

__all__ = ["Call", "count_calls", "count_inflated", "module_with"]


def module_with(module: ModuleType, **names: Any) -> SimpleNamespace:
    """A stand-in for `module`: the same names, but for those given. Set as the attribute a
    module under test imported `module` under, it spies on that module's use of it alone."""
    return SimpleNamespace(**{**vars(module), **names})


@dataclass
class Call:
    """One call of a spied function: its arguments, and what it returned (None while it runs,
    or if it raised)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    result: Any = None


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[Call]:
    """Every call of `owner.name` from now on, in order; the real function still does the work.

    A call is recorded before it runs, so one that raises counts too. `owner` is the module (or
    instance) the code under test looks the name up in."""
    calls: list[Call] = []
    real = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        call = Call(args, kwargs)
        calls.append(call)
        call.result = real(*args, **kwargs)
        return call.result

    monkeypatch.setattr(owner, name, spy)
    return calls


class _CountingDecompressor:
    """A zlib or bz2 decompressor object that reports the size of each piece it hands back."""

    def __init__(self, inner: Any, pieces: list[int]) -> None:
        self._inner = inner
        self._pieces = pieces

    def decompress(self, *args: Any, **kwargs: Any) -> bytes:
        out: bytes = self._inner.decompress(*args, **kwargs)
        self._pieces.append(len(out))
        return out

    def flush(self, *args: Any) -> bytes:
        out: bytes = self._inner.flush(*args)
        self._pieces.append(len(out))
        return out

    def __getattr__(self, name: str) -> Any:  # eof, unconsumed_tail, unused_data, ...
        return getattr(self._inner, name)


_DECOMPRESSORS = ((zlib, "decompressobj"), (bz2, "BZ2Decompressor"))


def count_inflated(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[int]:
    """The size of every piece of output that the zlib and bz2 decompressors `module` makes
    from now on hand back: their sum is the bytes a message made it decompress.

    `module` (only it) sees stand-ins for zlib and bz2 that are the real modules but for the
    decompressor they make."""
    pieces: list[int] = []
    patched = 0
    for library, factory in _DECOMPRESSORS:
        name = library.__name__
        if getattr(module, name, None) is not library:
            continue
        patched += 1
        make = getattr(library, factory)

        def counting(*args: Any, _make: Any = make, **kwargs: Any) -> _CountingDecompressor:
            return _CountingDecompressor(_make(*args, **kwargs), pieces)

        monkeypatch.setattr(module, name, module_with(library, **{factory: counting}))
    assert patched, f"{module.__name__} imports neither zlib nor bz2"
    return pieces
