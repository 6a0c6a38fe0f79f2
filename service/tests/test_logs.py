"""The log cannot flood: a warning or error that repeats is written once an interval, with the count of the repeats
left out; info lines (the request log) all pass."""

from __future__ import annotations

import io
import json
import logging

from whisper_server import logs


def test_a_repeated_error_is_written_once_an_interval_with_its_count(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonLogFormatter())
    handler.addFilter(logs.RepeatFilter(interval_seconds=10))
    logger = logging.getLogger("test.repeats")
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    for second in range(30):  # 100 failed accepts a second, each with its traceback, for 30 s
        now[0] = 1000.0 + second
        for _ in range(100):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("socket.accept() out of system resource\nsocket: <fd=15>", exc_info=True)
        logger.info("request")
        logger.warning("connection refused")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    accepts = [line for line in lines if line["message"].startswith("socket.accept()")]
    assert [line.get("repeats", 0) for line in accepts] == [0, 999, 999], "once every 10 s, with what was left out"
    assert "Too many open files" in accepts[0]["exception"]
    assert len([line for line in lines if line["message"] == "request"]) == 30, "info lines all pass"
    assert [line.get("repeats", 0) for line in lines if line["message"] == "connection refused"] == [0, 9, 9]
