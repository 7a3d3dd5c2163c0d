"""SIGHUP outside the event loop's care. Its default action kills the process, and the loop
handles it (reload) only once the gateway is built: from process start until then, and after
the loop gives it back while shutting down, a SIGHUP (an operator's `kill -HUP`, a supervisor's
reload, a poll) must not kill a gateway. Before: remembered, and acted on once the loop takes
over. After: ignored."""

from __future__ import annotations

import signal
from types import FrameType

_pending = False


def hold() -> None:
    """Until the loop takes SIGHUP over: remember one instead of dying of it."""
    signal.signal(signal.SIGHUP, _remember)


def _remember(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = True


def take() -> bool:
    """Whether a SIGHUP came while held (and forget it)."""
    global _pending
    pending, _pending = _pending, False
    return pending


def ignore() -> None:
    """Once the loop has given SIGHUP back (shutting down): ignore it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
