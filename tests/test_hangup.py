"""hangup.py: SIGHUP remembered before the loop handles it, ignored after."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from gateway import hangup


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    before = signal.getsignal(signal.SIGHUP)
    hangup.take()
    yield
    signal.signal(signal.SIGHUP, before)


def test_a_held_hangup_is_remembered_once() -> None:
    hangup.hold()
    assert hangup.take() is False
    os.kill(os.getpid(), signal.SIGHUP)  # would end this process by default
    assert hangup.take() is True
    assert hangup.take() is False


def test_an_ignored_hangup_is_not_remembered() -> None:
    hangup.ignore()
    os.kill(os.getpid(), signal.SIGHUP)
    assert hangup.take() is False
