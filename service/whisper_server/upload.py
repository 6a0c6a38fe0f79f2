"""Streams a multipart/form-data body to a spool file in the temp dir, enforcing the size limit and the receive
deadlines while receiving."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .errors import ApiError

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32  # parts other than the audio, whatever their names
MAX_FIELDS_TOTAL_BYTES = 256 * 1024  # what the fields may hold in memory together
SPOOL_PREFIX = "whisper-upload-"
# A full temp dir; a file past the process's size limit (RLIMIT_FSIZE) is the same refusal.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class ReceiveDeadlines:
    """How long a body may take: in all, without a byte arriving, and at what average rate once it has been arriving
    for idle_seconds (so a trickle that keeps the idle timer alive is cut long before the whole-body deadline)."""

    total_seconds: float
    idle_seconds: float
    min_bytes_per_second: float

    def next_cut(self, started: float, last_received: float) -> tuple[float, str, str]:
        """When the body is cut if nothing more arrives: (monotonic time, error code, message)."""
        return min(
            (started + self.total_seconds, "upload_timeout",
             f"The request body did not arrive within {self.total_seconds:g} s."),
            (last_received + self.idle_seconds, "upload_idle",
             f"No part of the request body arrived for {self.idle_seconds:g} s."),
        )

    def check_rate(self, started: float, now: float, received: int) -> None:
        """Judged as each chunk arrives (a stall is the idle timeout's)."""
        if now - started >= self.idle_seconds and received < self.min_bytes_per_second * (now - started):
            raise ApiError(408, f"The request body arrived slower than the minimum of {self.min_bytes_per_second:g} "
                           "bytes a second.", code="upload_too_slow", headers={"Connection": "close"})


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    file_path: str | None = None
    filename: str | None = None
    file_bytes: int = 0

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def discard(self) -> None:
        if self.file_path:
            os.unlink(self.file_path)
            self.file_path = None


def disk_full() -> ApiError:
    return ApiError(503, "The server's disk has no room for this upload; retry later.", code="disk_full",
                    headers={"Retry-After": "10"})


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, f"The request body is larger than the maximum of {limit_bytes / 2**20:g} MB.",
                    code="request_too_large", param="file")


async def receive_form(request: Request, limit_bytes: int, deadlines: ReceiveDeadlines,
                       on_received: Callable[[int], None] = lambda total: None, file_field: str = "file") -> Form:
    """Never holds more than one network chunk of the file in memory; removes the spool file on any failure; a body
    past its deadlines is cut with 408. `on_received` hears the body's size so far before each chunk is written, and
    may refuse it by raising."""
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/form-data":
        raise ApiError(415, "The request must be multipart/form-data with the audio in a 'file' field.",
                       code="unsupported_media_type")
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "The multipart/form-data content type has no boundary.", code="invalid_multipart")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise too_large(limit_bytes)  # refused before reading a byte of the body

    form = Form()
    part: dict = {}
    finished = False
    field_parts, field_bytes = 0, 0

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, header_field=b"", header_value=b"", value=bytearray(), spool=None, kind="field")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["header_value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["header_field"].lower()] = part["header_value"]
        part["header_field"], part["header_value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        if part["name"] == file_field and filename is not None:
            if form.file_path:
                raise ApiError(400, "Send exactly one 'file' field.", param=file_field)
            form.filename = filename.decode("utf-8", "replace")
            descriptor, form.file_path = tempfile.mkstemp(prefix=SPOOL_PREFIX)
            part["spool"], part["kind"] = os.fdopen(descriptor, "wb"), "file"
        else:
            nonlocal field_parts
            field_parts += 1
            if field_parts > MAX_FIELDS:
                raise ApiError(400, f"Too many form fields (at most {MAX_FIELDS} besides the file).",
                               code="too_many_fields")
            if filename is not None:
                part["kind"] = "ignored"  # other uploaded files are not ours to keep

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal field_bytes
        if part["kind"] == "file":
            part["spool"].write(data[start:end])
            form.file_bytes += end - start
        elif part["kind"] == "field":
            part["value"] += data[start:end]
            field_bytes += end - start
            if len(part["value"]) > MAX_FIELD_BYTES:
                raise ApiError(400, f"Form field '{part['name']}' is longer than {MAX_FIELD_BYTES} bytes.",
                               param=part["name"], code="field_too_large")
            if field_bytes > MAX_FIELDS_TOTAL_BYTES:
                raise ApiError(400, f"The form fields besides the file hold more than {MAX_FIELDS_TOTAL_BYTES} bytes "
                               "together.", code="fields_too_large")

    def on_part_end() -> None:
        if part["kind"] == "file":
            part["spool"].close()
            part["spool"] = None
        elif part["kind"] == "field" and part["name"]:
            form.fields.setdefault(part["name"], []).append(part["value"].decode("utf-8", "replace"))

    def on_end() -> None:
        nonlocal finished
        finished = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end,
    })
    received = 0
    started = last_received = time.monotonic()
    chunks = request.stream()
    try:
        while True:
            cut_at, code, message = deadlines.next_cut(started, last_received)
            try:
                chunk = await asyncio.wait_for(anext(chunks), max(0.0, cut_at - time.monotonic()))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ApiError(408, message, code=code, headers={"Connection": "close"}) from None
            last_received = time.monotonic()
            received += len(chunk)
            deadlines.check_rate(started, last_received, received)
            if received > limit_bytes:
                raise too_large(limit_bytes)
            on_received(received)
            parser.write(chunk)
        parser.finalize()
        if not finished:
            raise ApiError(400, "The multipart body ended before its closing boundary.", code="invalid_multipart")
    except MultipartParseError as error:
        form_cleanup(form, part)
        raise ApiError(400, f"The multipart body is malformed: {error}.", code="invalid_multipart") from error
    except OSError as error:
        form_cleanup(form, part)
        if error.errno in DISK_FULL_ERRNOS:
            raise disk_full() from error
        raise
    except BaseException:
        form_cleanup(form, part)
        raise
    return form


def form_cleanup(form: Form, part: dict) -> None:
    if part.get("spool") is not None:
        with contextlib.suppress(OSError):  # on a full disk the flush fails; the file is closed all the same
            part["spool"].close()
    form.discard()
