"""Structured logs: one JSON object per line on stderr, fields passed as `extra={"fields": ...}`.

Exception text from third-party libraries can carry payload bytes, so only the exception's type
is logged, never its message or traceback.

Writing to stderr is I/O, and stderr is a pipe whose reader (the container runtime's log
driver) can stall: a blocked write on the event loop would stop every request. So a record is
only queued where it is logged, and one writer thread formats and writes it. The queue is
bounded (QUEUE_RECORDS): while it is full, records are dropped, never waited for, and counted
(`gateway_log_records_dropped_total`); once the writer catches up it says how many it lost in a
"log records dropped" line.

The writer takes what is queued as one batch, writes it with one flush, then lingers
(LINGER_S) before it waits again: a lone record is written at once, and under load records
gather while it lingers, so a request's log line rarely has to wake the writer (a futex wake,
and a context switch, per line otherwise) and a batch costs one write system call, not one per
line. A line is thus written at most LINGER_S after it was logged.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

QUEUE_RECORDS = 4096
LINGER_S = 0.01
BATCH_RECORDS = 512  # at most per write


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["where"] = frames(record.exc_info[2])
        return json.dumps(entry, default=str, ensure_ascii=False)


def frames(tb: TracebackType | None) -> list[str]:
    """Where an exception went through, innermost last, as "file:line in function": enough to
    find a bug, with nothing of the values involved."""
    return [f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} in {frame.name}"
            for frame in traceback.extract_tb(tb)][-12:]


class _Outbox(logging.handlers.QueueHandler):
    """Hands each record to the writer thread as it is (the writer formats it) and never blocks:
    a record that finds the queue full is dropped and counted."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self._lock = threading.Lock()
        self._unreported = 0
        self.on_drop: Callable[[], None] = lambda: None

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._unreported += 1
            self.on_drop()

    def take_unreported(self) -> int:
        with self._lock:
            count, self._unreported = self._unreported, 0
        return count


class _Writer(logging.handlers.QueueListener):
    """The thread that formats and writes; after each record, it reports the drops since the
    last report. It writes to the stream itself, not through a logging.Handler: at exit,
    logging.shutdown() takes every handler's lock, which a write blocked on a stalled stderr
    would hold for ever."""

    def __init__(self, outbox: _Outbox, stream: TextIO) -> None:
        super().__init__(outbox.queue)
        self._outbox = outbox
        self._stream = stream
        self._formatter = JsonFormatter()

    def stop(self, timeout: float = 5.0) -> None:
        """Write out what is queued; a stderr that stays blocked is given up on after
        `timeout` s (the thread is a daemon: it does not hold the process up). Once only."""
        if self._thread is None:
            return
        try:
            self.queue.put(None, timeout=timeout)  # type: ignore[attr-defined]
        except queue.Full:
            return
        self._thread.join(timeout)
        self._thread = None

    def _monitor(self) -> None:
        """Until the sentinel: wait for a record, take it and what else is queued (at most
        BATCH_RECORDS), write them, then linger."""
        records: queue.Queue[logging.LogRecord | None] = self.queue  # type: ignore[assignment]
        while True:
            batch = [records.get()]
            while len(batch) < BATCH_RECORDS and batch[-1] is not None:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            self._write([r for r in batch if r is not None])
            if done:
                return
            time.sleep(LINGER_S)

    def _write(self, batch: list[logging.LogRecord]) -> None:
        """One line per record, and a "log records dropped" line if any were dropped since the
        last batch; one write and one flush for them all."""
        dropped = self._outbox.take_unreported()
        if dropped:
            note = logging.LogRecord("gateway.logs", logging.WARNING, __file__, 0,
                                     "log records dropped", None, None)
            note.fields = {"count": dropped, "reason": "stderr was not keeping up"}
            batch.append(note)
        if not batch:
            return
        text = "".join(self._line(record) + "\n" for record in batch)
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: the lines are lost, and counted
            for _ in batch:
                self._outbox.on_drop()

    def _line(self, record: logging.LogRecord) -> str:
        try:
            return self._formatter.format(record)
        except Exception as exc:  # one bad record must not end the writer
            # Its type only: the record's own text may hold what a log must not.
            return json.dumps({"level": "error", "event": "log record could not be written",
                               "logger": record.name, "exception": type(exc).__name__})


_outbox: _Outbox | None = None
_pinned: str | None = None  # the level `run --log-level` gave, which reloads do not change


def setup_logging(level: str, records: int = QUEUE_RECORDS,
                  stream: TextIO | None = None, *, pinned: bool = False,
                  ) -> logging.handlers.QueueListener:
    """Send every log record to `stream` (stderr) as JSON at `level` (debug, info, warning,
    error), through a queue of at most `records` records and one writer thread, which is
    returned (started; stopped, and the queue written out, at exit). `pinned`: the level came
    from the command line and stays whatever a reloaded configuration says."""
    global _outbox, _pinned
    _pinned = level if pinned else None
    outbox = _Outbox(queue.Queue(records))
    writer = _Writer(outbox, stream if stream is not None else sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [outbox]
    root.setLevel(level.upper())
    # aiohttp's access log would duplicate ours and its server errors log tracebacks.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    writer.start()
    atexit.register(writer.stop)
    _outbox = outbox
    return writer


def apply_level(level: str) -> None:
    """A reloaded configuration's log_level, unless the command line pinned one."""
    if _pinned is None:
        logging.getLogger().setLevel(level.upper())


def pinned_level() -> str | None:
    """The level `run --log-level` gave, if any (a supervisor passes it on to its workers)."""
    return _pinned


def count_drops(count: Callable[[], None]) -> None:
    """Call `count` for every record dropped from now on (a metric's inc)."""
    if _outbox is not None:
        _outbox.on_drop = count
