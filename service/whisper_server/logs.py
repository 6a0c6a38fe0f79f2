"""One JSON line per log record on stdout, for the HTTP process and the engine process alike. A warning or error
that repeats is written once an interval, with the count of the repeats left out since the last line: asyncio alone
logs an accept that fails for want of file descriptors, with its traceback, on every attempt (a million lines in two
minutes under a connection flood)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

REPEAT_INTERVAL_SECONDS = 10.0
MAX_KINDS = 1024


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RepeatFilter(logging.Filter):
    """Passes the first warning or error of a kind (logger, message template, exception type) and then one an
    interval, carrying `repeats`: how many of that kind were left out before it. Info lines all pass."""

    def __init__(self, interval_seconds: float = REPEAT_INTERVAL_SECONDS):
        super().__init__()
        self.interval = interval_seconds
        self.kinds: dict[tuple, tuple[float, int]] = {}  # kind -> (when last written, left out since)
        self.lock = threading.Lock()  # records come from the event loop, the thread pool and the metrics server

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        # The first line of the template: asyncio's messages go on with the socket or the task in question.
        kind = (record.name, str(record.msg).split("\n", 1)[0], record.exc_info[0] if record.exc_info else None)
        now = time.monotonic()
        with self.lock:
            if kind not in self.kinds and len(self.kinds) >= MAX_KINDS:  # forget kinds quiet for an interval
                self.kinds = {k: v for k, v in self.kinds.items() if now - v[0] < self.interval}
            written, left_out = self.kinds.get(kind, (float("-inf"), 0))
            if now - written < self.interval:
                self.kinds[kind] = (written, left_out + 1)
                return False
            self.kinds[kind] = (now, 0)
        if left_out:
            record.fields = {**getattr(record, "fields", {}), "repeats": left_out}
        return True


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
