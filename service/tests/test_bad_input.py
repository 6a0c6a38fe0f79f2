"""Bad input gets a clear 4xx in OpenAI's error shape, loses no spool file and leaves the server ready."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from conftest import post_audio, read_status, send_upload_head

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def limited(start_server):
    """Small limits and an API key: 1 MB uploads, 20 s of audio."""
    return start_server("--max-upload-mb", "1", "--max-audio-seconds", "20", env={"WHISPER_API_KEY": API_KEY})


def authed(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("name, status, code", [
    ("text.txt", 400, "invalid_audio"),
    ("empty.wav", 400, "empty_file"),
    ("truncated.wav", 400, "invalid_audio"),
    ("image.png", 415, "unsupported_media"),
])
def test_bad_files(server, audio, assert_still_ready, name, status, code):
    assert_error(post_audio(server.client, audio[name]), status, code, param="file")
    assert_still_ready(server)


@pytest.mark.parametrize("fields, status, param", [
    ({"response_format": "xml"}, 400, "response_format"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": "1.5"}, 400, "temperature"),
    ({"language": "klingon"}, 400, "language"),
    ({"model": "gpt-4o"}, 404, "model"),
    ({"timestamp_granularities[]": "character"}, 400, "timestamp_granularities[]"),
    ({"stream": "yes"}, 400, "stream"),
    ({"stream": "true", "response_format": "verbose_json"}, 400, "response_format"),
    ({"stream": "true", "response_format": "srt"}, 400, "response_format"),
])
def test_bad_parameters(server, audio, assert_still_ready, fields, status, param):
    assert_error(post_audio(server.client, audio["speech.wav"], **fields), status, param=param)
    assert_still_ready(server)


@pytest.mark.parametrize("fields, param", [
    ({"include[]": "logprobs"}, "include[]"),
    ({"keywords[]": "Siobhan"}, "keywords[]"),
    ({"chunking_strategy": "auto"}, "chunking_strategy"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "0.5"}, "chunking_strategy"),
    ({"stream": "true"}, "stream"),
    ({"timestamp_granularities[]": "word", "response_format": "verbose_json"}, "timestamp_granularities[]"),
])
def test_translations_refuse_the_transcription_only_fields(server, audio, assert_still_ready, fields, param):
    """OpenAI's TranslationCreateParams has none of these (openai-python's types/audio); transcriptions take them."""
    answer = post_audio(server.client, audio["speech.wav"], route="/v1/audio/translations", prompt="Hello.", **fields)
    error = assert_error(answer, 400, "unknown_parameter", param)
    assert f"'{next(iter(fields))}'" in error["message"] and "/v1/audio/transcriptions" in error["message"]
    assert_still_ready(server)


def test_missing_file_and_wrong_content_type(server, assert_still_ready):
    assert_error(server.client.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                                    files={"other": ("x.txt", b"x")}), 400, "missing_file")
    assert_error(server.client.post("/v1/audio/transcriptions", json={"file": "x"}), 415, "unsupported_media_type")
    assert_error(server.client.post("/v1/audio/transcriptions", content=b"--nope\r\n",
                                    headers={"content-type": "multipart/form-data; boundary=nope"}), 400, "invalid_multipart")
    assert_error(server.client.get("/v1/audio/transcriptions"), 405)
    assert_still_ready(server)


def test_too_long_audio(limited, audio, assert_still_ready):
    with authed(limited) as client:
        error = assert_error(post_audio(client, audio["long.mp3"]), 400, "audio_too_long", param="file")
    assert "20 seconds" in error["message"]
    assert_still_ready(limited)


def test_declared_too_large_body_is_refused_before_reading(limited, assert_still_ready):
    # Only the headers are sent: the answer must come without the server waiting for 5 MB of body.
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as connection:
        send_upload_head(connection, b"Content-Length: 5000000", API_KEY)
        assert read_status(connection) == 413
    assert_still_ready(limited)


def test_streamed_too_large_body_is_cut_off_while_receiving(limited, assert_still_ready):
    """A chunked upload with no declared length: the server answers 413 once 1 MB has arrived and stops reading."""
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as connection:
        send_upload_head(connection, b"Transfer-Encoding: chunked", API_KEY)
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
        connection.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"\0" * 65536
        sent, status = 0, None
        connection.settimeout(0.05)
        while sent < 20 * 2**20 and status is None:
            try:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                status = read_status(connection)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                connection.settimeout(5)
                status = read_status(connection)
        assert status == 413
        assert sent < 4 * 2**20, f"the server kept reading: {sent} bytes sent before it answered"
    time.sleep(0.2)
    assert limited.metric("http_requests_total", route="/v1/audio/transcriptions", status="413") >= 1
    assert_still_ready(limited)


def test_api_key(limited, audio):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        with open(audio["speech.wav"], "rb") as handle:
            response = limited.client.post("/v1/audio/transcriptions", files={"file": handle}, headers=headers)
        assert_error(response, 401, "invalid_api_key")
        assert_error(limited.client.get("/v1/models", headers=headers), 401, "invalid_api_key")
    with authed(limited) as client:
        assert post_audio(client, audio["speech.wav"]).status_code == 200
        assert client.get("/v1/models").status_code == 200
    for open_path in ("/healthz", "/readyz"):
        assert limited.client.get(open_path).status_code == 200
    # Prometheus sends no key: the metrics port is closed to all but the monitoring namespace by the NetworkPolicy.
    assert "http_requests_total" in limited.metrics_text()
