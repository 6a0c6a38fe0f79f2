"""Admission by cost, over HTTP: uploads at once, upload bytes spooled, and decoded audio held are each bounded; work
past a bound gets 503 with Retry-After (before its body is read where it declares its size) and the server keeps
serving the requests it holds."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from conftest import FIXED_LENGTH, post_audio, read_response, send_upload_head

FILE_PART_HEAD = b'--b\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n\r\n'


@pytest.fixture(scope="module")
def small_spool(start_server):
    """1 MB uploads, 1 MB of spool, two uploads at once."""
    return start_server("--max-upload-mb", "1", "--max-spool-mb", "1", "--max-concurrent-uploads", "2")


def hold_upload(stack: ExitStack, server, framing: bytes) -> socket.socket:
    """An upload whose head (and the file part's head) is sent and whose body never comes: it holds its budget."""
    connection = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=10))
    send_upload_head(connection, framing)
    connection.sendall(b"%x\r\n%s\r\n" % (len(FILE_PART_HEAD), FILE_PART_HEAD) if b"chunked" in framing else FILE_PART_HEAD)
    time.sleep(0.5)  # the server has read the head and reserved the upload's budget
    return connection


def assert_refused_before_body(server, framing: bytes, code: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        send_upload_head(connection, framing)  # the head alone: the answer cannot wait for the body
        status, answer = read_response(connection)
    assert status == 503, answer
    assert b"retry-after: " in answer.lower() and f'"code":"{code}"'.encode() in answer.replace(b" ", b"")


def test_a_declared_body_that_does_not_fit_the_spool_is_refused_before_it_is_read(small_spool, audio, assert_still_ready):
    with ExitStack() as held:
        hold_upload(held, small_spool, b"Content-Length: 700000")
        assert_refused_before_body(small_spool, b"Content-Length: 500000", "uploads_full")
    # The held upload's client went away: its bytes are free again, and a real upload fits.
    time.sleep(0.5)
    assert post_audio(small_spool.client, audio["speech.wav"]).status_code == 200
    assert_still_ready(small_spool)


def test_an_undeclared_body_is_refused_when_it_outgrows_the_spool(small_spool, assert_still_ready):
    with ExitStack() as held:
        hold_upload(held, small_spool, b"Content-Length: 700000")
        with socket.create_connection(("127.0.0.1", small_spool.port), timeout=10) as connection:
            send_upload_head(connection, b"Transfer-Encoding: chunked")
            chunk = FILE_PART_HEAD + b"\0" * 65536
            status, answer, sent = None, b"", 0
            connection.settimeout(0.05)
            while status is None and sent < 2 * 2**20:
                try:
                    connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    chunk = b"\0" * 65536
                    status, answer = read_response(connection)
                except socket.timeout:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    connection.settimeout(5)
                    status, answer = read_response(connection)
    assert status == 503, answer  # not 413: the body is within the upload limit, the spool is what ran out
    assert b'"uploads_full"' in answer
    assert sent < 700_000, f"{sent} bytes were taken in past the spool's free 300 KB"
    time.sleep(0.5)  # the held upload's client went away: the server removes its spool file
    assert_still_ready(small_spool)


def test_uploads_past_the_concurrency_bound_are_refused(small_spool, audio, assert_still_ready):
    with ExitStack() as held:
        hold_upload(held, small_spool, b"Transfer-Encoding: chunked")
        hold_upload(held, small_spool, b"Transfer-Encoding: chunked")
        assert_refused_before_body(small_spool, b"Content-Length: 1000", "uploads_full")
    time.sleep(0.5)
    assert post_audio(small_spool.client, audio["speech.wav"]).status_code == 200
    assert_still_ready(small_spool)


def test_audio_past_the_held_audio_bound_is_refused_and_the_rest_served(start_server, slow_model_dir, audio,
                                                                          assert_still_ready):
    """75 s of audio decoding slowly holds 75 of the 80 s the server may hold: the speech clip (about 8 s) is
    refused with Retry-After, a 1 s clip still fits, and the long file is answered in full."""
    server = start_server("--max-queued-audio-seconds", "80", "--max-audio-seconds", "80", "--max-batch-size", "2",
                          *FIXED_LENGTH, model=slow_model_dir)
    with ThreadPoolExecutor(1) as pool:
        long_request = pool.submit(post_audio, httpx.Client(base_url=server.url, timeout=300), audio["long.mp3"])
        deadline = time.monotonic() + 60
        while server.metric("whisper_decode_step_seconds_count") == 0:
            assert time.monotonic() < deadline, "the long file never started decoding"
            time.sleep(0.05)
        refused = post_audio(server.client, audio["speech.wav"])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
        assert not long_request.done(), "the long file still held its audio when the others were judged"
        assert post_audio(server.client, audio["one_second.wav"]).status_code == 200
        assert long_request.result().status_code == 200
    assert post_audio(server.client, audio["speech.wav"]).status_code == 200, "its audio was released"
    assert_still_ready(server)
