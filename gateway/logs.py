"""Structured logs: one JSON object per line on stderr, fields passed as `extra={"fields": ...}`.

Exception text from third-party libraries can carry payload bytes, so only the exception's type
is logged, never its message or traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import Any


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


def setup_logging(level: str) -> None:
    """Send every log record to stderr as JSON at `level` (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would duplicate ours and its server errors log tracebacks.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
