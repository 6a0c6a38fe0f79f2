"""Concurrency: batching across requests, a bounded queue, and a graceful drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import FIXED_LENGTH, engine_pid, post_audio, wait_until


def post_many(server, path, count: int, **fields) -> list[httpx.Response]:
    def one(_):
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return post_audio(client, path, **fields)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_requests_share_decode_steps(server, audio):
    steps_before = server.metric("whisper_decode_step_seconds_count")
    slots_before = server.metric("whisper_batch_size_sum")
    responses = post_many(server, audio["speech.wav"], 16, response_format="verbose_json", language="en")
    assert [r.status_code for r in responses] == [200] * 16
    texts = {r.json()["text"] for r in responses}
    assert len(texts) == 1, "the same audio gives the same text whichever windows it shared steps with"
    steps = wait_for_steps(server, steps_before)
    slots = server.metric("whisper_batch_size_sum") - slots_before
    assert slots == 16 * 16, "16 one-window requests took 16 tokens each"
    assert slots / steps > 2, "on average more than two windows shared each decode step"


def test_requests_with_different_options_share_decode_steps(server, audio):
    requests = [dict(language="en"), dict(language="de", prompt="Kubernetes"), dict(temperature="0.6"),
                dict(route="/v1/audio/translations")] * 3
    steps_before = server.metric("whisper_decode_step_seconds_count")
    slots_before = server.metric("whisper_batch_size_sum")

    def one(fields):
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return post_audio(client, audio["speech.wav"], response_format="verbose_json", **fields)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(one, requests))
    assert [r.status_code for r in responses] == [200] * len(requests)
    assert [r.json()["language"] for r in responses[:2]] == ["english", "german"]
    assert {s["temperature"] for s in responses[2].json()["segments"]} == {0.6}
    assert responses[3].json()["task"] == "translate"
    steps = wait_for_steps(server, steps_before)
    assert (server.metric("whisper_batch_size_sum") - slots_before) / steps > 2


def wait_for_steps(server, before: float) -> float:
    """Decode steps since `before`, once the engine's last report has arrived (it reports every 100 ms)."""
    steps, deadline = -1.0, time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = server.metric("whisper_decode_step_seconds_count") - before
        if now == steps:
            return steps
        steps = now
    return steps


def test_a_clip_is_answered_while_a_long_file_decodes(start_server, slow_model_dir, audio):
    """Iteration-level batching: the clip's window joins the steps the file's windows are running, and is answered
    while they go on; it does not wait for them to finish."""
    server = start_server("--max-batch-size", "4", *FIXED_LENGTH, model=slow_model_dir)
    with ThreadPoolExecutor(1) as pool:
        long_file = pool.submit(post_audio, httpx.Client(base_url=server.url, timeout=300), audio["two_windows.mp3"])
        wait_until(lambda: server.metric("whisper_decode_step_seconds_count") > 0, "the file decodes")
        # A prompt of half the context leaves the clip about 222 tokens to decode; each of the file's windows 445.
        clip = post_audio(server.client, audio["one_second.wav"], prompt="Kubernetes on EKS with GPUs. " * 40)
        assert clip.status_code == 200
        assert not long_file.done(), "the clip was answered while the file was still decoding"
        assert long_file.result().status_code == 200
    wait_for_steps(server, 0)
    # The file's two windows alone never fill more than two slots: steps with three busy had the clip beside them.
    assert server.metric("whisper_batch_size_bucket", le="4.0") > server.metric("whisper_batch_size_bucket", le="2.0")


@pytest.fixture(scope="module")
def two_slow_slots(start_server, slow_model_dir):
    """Two decode slots, every window decoding 445 tokens: the server of both cancellation tests."""
    return start_server("--max-batch-size", "2", *FIXED_LENGTH, model=slow_model_dir)


@pytest.mark.parametrize("stream", [False, True])
def test_a_cancelled_request_frees_its_slots_at_once(two_slow_slots, audio, assert_still_ready, stream):
    """A client that hangs up, whether waiting for its answer or reading its stream (the 200 already sent)."""
    server = two_slow_slots
    steps_before = wait_for_steps(server, 0)  # the earlier test's last steps reported: the count is settled
    body = audio["long.mp3"].read_bytes()
    multipart = ((b'--b\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n' if stream else b"")
                 + b'--b\r\nContent-Disposition: form-data; name="file"; filename="long.mp3"\r\n\r\n' + body
                 + b"\r\n--b--\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: multipart/form-data; boundary=b\r\n"
                           + f"Content-Length: {len(multipart)}\r\n\r\n".encode() + multipart)
        if stream:
            head = connection.recv(65536)
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head
        wait_until(lambda: server.metric("whisper_decode_step_seconds_count") > steps_before, "the long file decodes")
        steps_at_hangup = server.metric("whisper_decode_step_seconds_count")
    steps = wait_for_steps(server, 0)
    # Each of its windows needs 445 steps; cancelled, they stop at the next step and the third never starts.
    assert steps - steps_at_hangup < 150, f"{steps - steps_at_hangup} steps ran after the client went away"
    assert server.metric("whisper_queue_depth") == 0
    assert post_audio(server.client, audio["one_second.wav"]).status_code == 200
    assert_still_ready(server)


def test_full_queue_answers_503_with_retry_after(start_server, audio, assert_still_ready):
    server = start_server("--queue-size", "2", "--max-batch-size", "1")
    responses = post_many(server, audio["long.mp3"], 10)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
    assert statuses.count(200) >= 2
    assert_still_ready(server)


def test_sigterm_drains_in_flight_requests_and_exits_zero(start_server, audio):
    server = start_server("--max-batch-size", "1", "--drain-seconds", "60")
    count = 4
    with ThreadPoolExecutor(count) as pool:
        pending = [pool.submit(lambda: post_audio(httpx.Client(base_url=server.url, timeout=120), audio["long.mp3"]))
                   for _ in range(count)]
        deadline = time.monotonic() + 30
        while server.metric("whisper_requests_in_flight") < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metric("whisper_requests_in_flight") == count
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert server.client.get("/readyz").status_code == 503, "readiness turns off at once"
        refused = post_audio(server.client, audio["speech.wav"])
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert server.client.get("/healthz").status_code == 200, "liveness holds while draining"
        responses = [future.result() for future in pending]
    assert [r.status_code for r in responses] == [200] * count, "no in-flight request is lost"
    assert all(r.json()["text"] for r in responses)
    assert server.process.wait(timeout=30) == 0
    log = server.log_path.read_text()
    lines = [json.loads(line) for line in log.splitlines()]
    events = {line["message"]: line for line in lines if line.get("logger") == "whisper_server"}
    assert events["draining"]["in_flight"] == count, "the requests were still in flight when SIGTERM came"
    assert events["drained"]["unfinished"] == 0
    loud = [line for line in lines[lines.index(events["draining"]):] if line["level"] not in ("info", "debug")]
    assert loud == [] and "Traceback" not in log, "a clean SIGTERM ends quietly: info-level lines, no traceback"


@pytest.mark.parametrize("stream", [False, True])
def test_requests_unfinished_at_the_drain_deadline_get_503_with_retry_after_not_a_cut_connection(start_server, audio,
                                                                                                 stream):
    """A spot warning or a pod's grace period running out: the drain ends before these long requests do. A stream
    (its 200 already sent) ends with the same error as an event."""
    server = start_server("--max-batch-size", "1", "--drain-seconds", "0.5")
    count = 3
    fields = {"stream": "true"} if stream else {}
    with ThreadPoolExecutor(count) as pool:
        pending = [pool.submit(lambda: post_audio(httpx.Client(base_url=server.url, timeout=120), audio["long.mp3"],
                                                  **fields)) for _ in range(count)]
        deadline = time.monotonic() + 30
        while server.metric("whisper_requests_in_flight") < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metric("whisper_requests_in_flight") == count
        server.process.send_signal(signal.SIGTERM)
        responses = [future.result() for future in pending]
    # A request whose stream had not started yet (its audio still arriving or decoding) is answered 503 outright.
    refused = [r for r in responses if r.status_code != 200]
    for response in refused:
        assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
        assert int(response.headers["retry-after"]) >= 1
    unfinished = list(refused)
    if stream:
        last_events = [json.loads(r.text.strip().splitlines()[-1][len("data: "):]) for r in responses
                       if r.status_code == 200]
        cut = [event for event in last_events if event["type"] == "error"]
        assert all(event["error"]["code"] == "draining" for event in cut)
        unfinished += cut
    assert unfinished, "with one slot and a half-second drain, long requests are still running at the deadline"
    assert server.process.wait(timeout=30) == 0
    events = {line["message"]: line for line in map(json.loads, server.log_path.read_text().splitlines())
              if line.get("logger") == "whisper_server"}
    assert events["drained"]["unfinished"] == len(unfinished) and events["drained"]["unanswered"] == 0


def test_request_deadline_answers_504_and_frees_the_queue(start_server, audio, assert_still_ready):
    server = start_server("--max-batch-size", "1", "--request-timeout-seconds", "0.05")
    response = post_audio(server.client, audio["long.mp3"])
    assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
    time.sleep(0.5)
    assert server.metric("whisper_queue_depth") == 0, "the timed-out request's windows left the queue"
    assert_still_ready(server)


def test_a_client_that_hangs_up_leaves_the_queue(start_server, audio, assert_still_ready):
    server = start_server("--max-batch-size", "1")
    body = audio["long.mp3"].read_bytes()
    boundary = b"hangup"
    multipart = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="long.mp3"\r\n\r\n'
                 + body + b"\r\n--" + boundary + b"--\r\n")
    with ThreadPoolExecutor(6) as pool:
        ahead = [pool.submit(lambda: post_audio(httpx.Client(base_url=server.url, timeout=120), audio["long.mp3"]))
                 for _ in range(6)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nX-Request-ID: hangs-up\r\n"
                               b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
                               + f"Content-Length: {len(multipart)}\r\n\r\n".encode() + multipart)
            deadline = time.monotonic() + 10
            while server.metric("whisper_requests_in_flight") < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.15)  # decoded and queued behind 18 windows decoded one at a time; then the client goes away
        assert [future.result().status_code for future in ahead] == [200] * 6
    time.sleep(0.3)
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    assert [line["status"] for line in lines if line.get("request_id") == "hangs-up"] == [499]
    assert server.metric("whisper_queue_depth") == 0
    assert_still_ready(server)


def test_an_engine_that_dies_fails_its_requests_and_stops_the_server(start_server, slow_model_dir, audio):
    """The pod must be restarted, not left answering /healthz with no engine behind it."""
    server = start_server("--max-batch-size", "2", *FIXED_LENGTH, model=slow_model_dir)
    engine = engine_pid(server)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_audio, httpx.Client(base_url=server.url, timeout=120), audio["long.mp3"])
        wait_until(lambda: server.metric("whisper_decode_step_seconds_count") > 0, "the file decodes")
        os.kill(engine, signal.SIGKILL)
        response = pending.result()
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
    assert server.process.wait(timeout=30) == 1
    assert "engine process exited" in server.log_path.read_text()


def quiet_log_problems(server) -> list[str]:
    """Log lines above info level, and any traceback, in a server's log."""
    text = server.log_path.read_text()
    problems = [line for line in text.splitlines() if line.startswith("{") and json.loads(line)["level"] not in ("info", "debug")]
    return problems + (["a traceback"] if "Traceback" in text or "CancelledError" in text else [])


def test_sigterm_to_the_whole_process_group_drains_and_ends_quietly(start_server, audio):
    """systemd, a shell or `kill -- -PGID` signal the engine process too: it must not die under the request in
    flight, and a clean stop logs nothing above info (no "engine process exited", no traceback)."""
    server = start_server("--max-batch-size", "1", "--drain-seconds", "60")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_audio, httpx.Client(base_url=server.url, timeout=120), audio["long.mp3"])
        wait_until(lambda: server.metric("whisper_requests_in_flight") == 1, "the request is in flight")
        os.killpg(server.process.pid, signal.SIGTERM)
        response = pending.result()
    assert response.status_code == 200 and response.json()["text"]
    assert server.process.wait(timeout=60) == 0
    assert quiet_log_problems(server) == []


def held_signals(pid: int) -> int:
    """The signals a process blocks or ignores, as a bit mask (bit n - 1 for signal n)."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":\t", 1) for line in status.read().splitlines() if ":\t" in line)
    return int(fields["SigBlk"], 16) | int(fields["SigIgn"], 16)


def test_sigterm_while_the_model_loads_ends_quietly(start_server):
    """Stopped as it starts (systemd, `kill -- -PGID`): the SIGTERM to the process group reaches the engine process,
    which must not die of it, not even while its interpreter starts and before its own code can ignore it (that would
    look like a model that failed to load: exit 1, an error logged)."""
    server = start_server(wait=False)
    engine = wait_until(lambda: engine_pid(server), "the engine process is spawned")
    stop_signals = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    assert held_signals(engine) & stop_signals == stop_signals
    wait_until(lambda: "Uvicorn running" in server.log_path.read_text(), "the HTTP side is up")
    os.killpg(server.process.pid, signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert quiet_log_problems(server) == []
