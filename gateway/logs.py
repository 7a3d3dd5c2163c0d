"""Structured logs: one JSON object per line on stderr, fields passed as `extra={"fields": ...}`.

Exception text from third-party libraries can carry payload bytes, so only the exception's type
is logged, never its message or traceback.

Writing to stderr is I/O, and stderr is a pipe whose reader (the container runtime's log
driver) can stall: a blocked write on the event loop would stop every request. So a record is
only queued where it is logged, and one writer thread formats and writes it. The queue is
bounded (QUEUE_RECORDS): while it is full, records are dropped, never waited for, and counted
(`gateway_log_records_dropped_total`); once the writer catches up it says how many it lost in a
"log records dropped" line.

The writer takes what is queued as one batch and writes it in as few writes as stay atomic
on a pipe (PIPE_BUF bytes of whole lines: workers share their supervisor's stderr). When the
queue is then empty it lingers (LINGER_S) before it waits again: a lone record is written at
once, and under load records gather while it lingers, so a request's log line rarely has to
wake the writer (a futex wake and a context switch per line otherwise) and a system call
carries many lines. A line is thus written at most LINGER_S after it was logged, unless stderr
is slower than the lines come.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import select
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
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
            if records.empty():  # with a backlog, on at once
                time.sleep(LINGER_S)

    def _write(self, batch: list[logging.LogRecord]) -> None:
        """One line per record, and a "log records dropped" line if any were dropped since the
        last batch; written in as few writes as PIPE_BUF allows (_chunks)."""
        dropped = self._outbox.take_unreported()
        if dropped:
            note = logging.LogRecord("gateway.logs", logging.WARNING, __file__, 0,
                                     "log records dropped", None, None)
            note.fields = {"count": dropped, "reason": "stderr was not keeping up"}
            batch.append(note)
        for lines, text in _chunks([self._line(record) + "\n" for record in batch]):
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: the lines are lost, counted
                for _ in range(lines):
                    self._outbox.on_drop()

    def _line(self, record: logging.LogRecord) -> str:
        try:
            return self._formatter.format(record)
        except Exception as exc:  # one bad record must not end the writer
            # Its type only: the record's own text may hold what a log must not.
            return json.dumps({"level": "error", "event": "log record could not be written",
                               "logger": record.name, "exception": type(exc).__name__})


def _chunks(lines: list[str]) -> Iterator[tuple[int, str]]:
    """Whole lines joined into texts of at most PIPE_BUF bytes (a longer line alone), with
    their line counts. Workers share their supervisor's stderr, often a pipe: a write of up to
    PIPE_BUF bytes is atomic there, a longer one may be split around another process's lines,
    which would break the one-JSON-object-per-line contract."""
    count, size = 0, 0
    parts: list[str] = []
    for line in lines:
        length = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
        if parts and size + length > select.PIPE_BUF:
            yield count, "".join(parts)
            count, size, parts = 0, 0, []
        count, size = count + 1, size + length
        parts.append(line)
    if parts:
        yield count, "".join(parts)


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
