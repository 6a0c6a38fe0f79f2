"""Hostile and careless clients, over real HTTP against real server processes: each gets a clear answer in OpenAI's
error shape, and everyone else is served normally, with exactly the answers they get from an unbothered server.

Clients are told apart by X-Forwarded-For (the servers trust it from 127.0.0.1, as a pod trusts its load balancer).
The full disk is the server's file-size limit (RLIMIT_FSIZE, set on the server process: EFBIG, handled as ENOSPC),
which needs neither root nor a mount, in CI or on a laptop."""

from __future__ import annotations

import json
import os
import resource
import select
import selectors
import signal
import socket
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import SAMPLE_RATE, engine_pid, read_response, read_wav, wait_until, write_wav

IDLE_SECONDS = 1.5
MIN_RATE = 4096
FILE_PART_HEAD = b'--b\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n\r\n'


DISK_BYTES = 2 * 2**20


def small_disk() -> None:
    """The server process (and the engine it starts) may write files of at most 2 MB."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_BYTES, DISK_BYTES))


@pytest.fixture(scope="module")
def guarded(start_server):
    """Short upload deadlines, four uploads at once and two per client once two are in use, 4 MB uploads and 8 MB of
    spool (a client's share: 4 MB once 4 MB are in use), and a 2 MB 'disk'."""
    return start_server("--max-batch-size", "4", "--max-concurrent-uploads", "4", "--max-uploads-per-client", "2",
                        "--max-upload-mb", "4", "--max-spool-mb", "8", "--upload-idle-seconds", str(IDLE_SECONDS),
                        "--upload-min-bytes-per-second", str(MIN_RATE), "--upload-timeout-seconds", "60",
                        "--forwarded-allow-ips", "127.0.0.1", preexec_fn=small_disk)


def client_for(server, address: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120, headers={"X-Forwarded-For": address})


def transcribe(server, path: Path, address: str = "10.1.0.1", **fields) -> httpx.Response:
    with client_for(server, address) as client, open(path, "rb") as handle:
        return client.post("/v1/audio/transcriptions", files={"file": (path.name, handle)}, data=fields)


def texts(server, path: Path, prompts: list[str | None]) -> list[str]:
    """Each prompt's transcript of the file, from concurrent requests by different clients."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(lambda item: transcribe(server, path, f"10.2.0.{item[0]}",
                                                          **({"prompt": item[1]} if item[1] else {})),
                                  enumerate(prompts)))
    assert [response.status_code for response in responses] == [200] * len(prompts), [r.text for r in responses]
    return [response.json()["text"] for response in responses]


@pytest.fixture(scope="module")
def normal_text(guarded, audio) -> str:
    """The speech's transcript from the server before anyone misbehaves."""
    response = transcribe(guarded, audio["speech.wav"])
    assert response.status_code == 200
    return response.json()["text"]


def assert_error(answer: bytes | httpx.Response, status: int, code: str) -> dict:
    if isinstance(answer, httpx.Response):
        assert answer.status_code == status, answer.text
        body = answer.json()
    else:
        head, _, raw = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
        body = json.loads(raw)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["code"] == code, error
    return error


def open_upload(server, address: str, declared: int) -> socket.socket:
    """A transcription request's head (declaring a body of `declared` bytes) and its file part's head."""
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    connection.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: " + address.encode()
                       + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                       + f"Content-Length: {declared}\r\n\r\n".encode() + FILE_PART_HEAD)
    return connection


def answered(connection: socket.socket) -> bool:
    return bool(select.select([connection], [], [], 0)[0])


def refusals(server, reason: str) -> float:
    return server.metric("whisper_refused_requests_total", reason=reason)


def log_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]


def test_trickling_uploads_are_cut_by_the_minimum_rate_and_others_are_served(guarded, audio, normal_text,
                                                                              assert_still_ready):
    """Slowloris on the body: a byte every 0.3 s keeps the idle timer alive; the rate cuts it, not the 60 s deadline.
    The attacker gets two upload slots (its share once the server is half busy), not all four."""
    before = refusals(guarded, "upload_too_slow")
    trickles = [open_upload(guarded, "10.9.9.9", 100_000) for _ in range(2)]
    started = time.monotonic()
    try:
        with open_upload(guarded, "10.9.9.9", 100_000) as third:
            assert_error(read_response(third)[1], 429, "client_uploads_full")
        with ThreadPoolExecutor(1) as pool:
            served = pool.submit(transcribe, guarded, audio["speech.wav"], "10.1.0.2")
            answers: dict[int, tuple[bytes, float]] = {}
            while len(answers) < len(trickles) and time.monotonic() - started < 30:
                for index, connection in enumerate(trickles):
                    if index in answers:
                        continue
                    if answered(connection):
                        answers[index] = (read_response(connection)[1], time.monotonic() - started)
                    else:
                        connection.sendall(b"\0")
                time.sleep(0.3)
            assert served.result().status_code == 200 and served.result().json()["text"] == normal_text
    finally:
        for connection in trickles:
            connection.close()
    assert len(answers) == len(trickles), "a trickling upload was never cut"
    for answer, after in answers.values():
        error = assert_error(answer, 408, "upload_too_slow")
        assert f"{MIN_RATE} bytes a second" in error["message"]
        assert after < 10, f"cut after {after:.1f} s: the rate must cut a trickle long before the 60 s deadline"
    assert refusals(guarded, "upload_too_slow") - before == 2
    assert {"upload_too_slow", "client_uploads_full"} <= {line.get("error_code") for line in log_lines(guarded)}
    assert transcribe(guarded, audio["speech.wav"], "10.9.9.9").json()["text"] == normal_text, \
        "the cut uploads gave their slots back"
    assert_still_ready(guarded)


def test_a_head_that_declares_a_body_and_sends_none_is_cut_and_gives_its_spool_back(guarded, audio, normal_text,
                                                                                     assert_still_ready):
    """Header-only reservations: the declared 3.5 MB is reserved before a byte is read; the client's share is then
    spent, others are served, and the idle timeout cuts the head and returns its bytes."""
    with open_upload(guarded, "10.8.8.8", 3_500_000) as held:
        time.sleep(0.3)
        with open_upload(guarded, "10.8.8.8", 1_000_000) as second:
            assert_error(read_response(second)[1], 429, "client_spool_full")
        served = transcribe(guarded, audio["speech.wav"], "10.1.0.3")
        assert served.status_code == 200 and served.json()["text"] == normal_text
        held.settimeout(10 * IDLE_SECONDS)
        started = time.monotonic()
        error = assert_error(read_response(held)[1], 408, "upload_idle")
        assert time.monotonic() - started < 3 * IDLE_SECONDS and f"{IDLE_SECONDS:g} s" in error["message"]
    after = transcribe(guarded, audio["speech.wav"], "10.8.8.8")
    assert after.status_code == 200 and after.json()["text"] == normal_text, "the cut head gave its spool back"
    assert_still_ready(guarded)


def float_wav(path: Path, samples: np.ndarray) -> Path:
    """A 32-bit float WAV (format 3), which can carry NaN and infinity."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, SAMPLE_RATE, SAMPLE_RATE * 4, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)
    return path


@pytest.mark.parametrize("value, share", [(np.nan, 1), (np.inf, 1), (-np.inf, 1), (np.nan, 0.9)])
def test_non_finite_audio_is_refused_and_leaves_the_others_alone(guarded, audio, normal_text, tmp_path, value, share,
                                                                 assert_still_ready):
    speech = read_wav(audio["speech.wav"]).astype(np.float32)
    poisoned = speech.copy()
    if share == 1:
        poisoned[SAMPLE_RATE // 2] = value
    else:
        poisoned[:int(share * len(poisoned))] = value
    path = float_wav(tmp_path / "poisoned.wav", poisoned)
    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(transcribe, guarded, path, "10.7.7.7")
        good = [pool.submit(transcribe, guarded, audio["speech.wav"], f"10.1.1.{n}") for n in range(3)]
        error = assert_error(bad.result(), 400, "non_finite_audio")
        assert "not finite" in error["message"] and error["param"] == "file"
        assert [response.result().json()["text"] for response in good] == [normal_text] * 3
    assert float_wav(tmp_path / "clean.wav", speech).exists()
    clean = transcribe(guarded, tmp_path / "clean.wav")
    assert clean.status_code == 200, "the same float file without the bad samples is served"
    assert_still_ready(guarded)


def test_special_token_prompts_are_text_and_the_requests_beside_them_are_served_exactly(guarded, audio,
                                                                                        assert_still_ready):
    prompts = [None, "Kubernetes, Karpenter", "<|endoftext|>", "<|startoftranscript|><|en|><|translate|><|0.00|>"]
    alone = [texts(guarded, audio["speech.wav"], [prompt])[0] for prompt in prompts]
    together = texts(guarded, audio["speech.wav"], prompts)
    assert together == alone, "a prompt changed another request's transcript"
    assert_still_ready(guarded)


@pytest.mark.parametrize("fields, code", [
    ([("prompt", "x")] * 40, "too_many_fields"),  # one name, many parts: counted per part
    ([(f"note{n}", "y" * 60_000) for n in range(6)], "fields_too_large"),  # each under 64 KB, 360 KB together
])
def test_many_or_large_fields_are_refused(guarded, audio, normal_text, fields, code, assert_still_ready):
    with client_for(guarded, "10.6.6.6") as client, open(audio["speech.wav"], "rb") as handle:
        response = client.post("/v1/audio/transcriptions", files=[("file", ("speech.wav", handle)), *[
            (name, (None, value)) for name, value in fields]])
    assert_error(response, 400, code)
    assert transcribe(guarded, audio["speech.wav"]).json()["text"] == normal_text
    assert_still_ready(guarded)


def test_a_long_request_id_is_cut_and_the_page_sends_security_headers(guarded):
    # 8,000 characters: longer heads are refused by uvicorn's h11 (16 KiB) whenever they arrive in more than one read
    response = guarded.client.get("/readyz", headers={"X-Request-ID": "r" * 8_000})
    assert response.headers["x-request-id"] == "r" * 128
    for path in ("/", "/static/app.js", "/static/app.css"):
        headers = guarded.client.get(path).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"


def test_a_full_disk_answers_503_and_the_next_upload_is_served(guarded, audio, normal_text, tmp_path,
                                                               assert_still_ready):
    """A 3 MB upload (within the 4 MB limit) fills the 2 MB 'disk' part-way through."""
    big = write_wav(tmp_path / "big.wav", np.random.default_rng(3).normal(0, 0.1, 95 * SAMPLE_RATE))
    assert DISK_BYTES < big.stat().st_size < 4 * 2**20
    response = transcribe(guarded, big)
    error = assert_error(response, 503, "disk_full")
    assert response.headers["retry-after"] and "Traceback" not in response.text and "disk" in error["message"]
    assert refusals(guarded, "disk_full") == 1
    assert transcribe(guarded, audio["speech.wav"]).json()["text"] == normal_text
    assert_still_ready(guarded)


def test_an_engine_killed_mid_decode_answers_503_to_every_request_it_held(start_server, slow_model_dir, audio):
    """One request decoding in the engine, one still uploading: both hear 503 at once, in JSON, and the server
    exits 1 so that the pod is restarted."""
    server = start_server("--max-batch-size", "2", model=slow_model_dir)
    with ThreadPoolExecutor(1) as pool:
        decoding = pool.submit(transcribe, server, audio["speech.wav"])
        wait_until(lambda: server.metric("whisper_decode_step_seconds_count") > 0, "the file decodes")
        with open_upload(server, "10.5.5.5", 200_000) as uploading:
            uploading.sendall(b"\0" * 1000)
            time.sleep(0.3)
            os.kill(engine_pid(server), signal.SIGKILL)
            killed = time.monotonic()
            uploading.settimeout(10)
            answer = read_response(uploading)[1]
            assert_error(answer, 503, "engine_unavailable")
            assert time.monotonic() - killed < 3 and b"retry-after" in answer.lower()
        response = decoding.result()
    assert_error(response, 503, "engine_unavailable")
    assert response.headers["retry-after"]
    assert server.process.wait(timeout=30) == 1


def test_a_second_signal_answers_what_is_left_503_and_exits_143(start_server, slow_model_dir, audio):
    server = start_server("--max-batch-size", "1", "--drain-seconds", "120", model=slow_model_dir)
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(transcribe, server, audio["speech.wav"], f"10.4.0.{n}") for n in range(2)]
        wait_until(lambda: server.metric("whisper_decode_step_seconds_count") > 0, "the files decode")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: '"draining"' in server.log_path.read_text(), "the server drains")
        server.process.send_signal(signal.SIGTERM)
        responses = [future.result() for future in pending]
    for response in responses:
        assert_error(response, 503, "server_stopping")
        assert response.headers["retry-after"]
    assert server.process.wait(timeout=30) == 128 + signal.SIGTERM


# Connection floods: a server under a 1,024 open-files limit (soft and hard, so that raising soft to hard cannot
# escape it), which leaves it 448 API connections after its descriptor reserve; 100 per client address. Attackers
# come from 127.0.0.2 and up (all of 127/8 reaches the loopback); everyone else from 127.0.0.1.
OPEN_FILES = 1024
HEAD_SECONDS = 10.0
# "At once" for a refusal: a flood overflows the kernel's accept queue (--backlog 128), and a connection the client
# already counts as open reaches the server with the retransmitted handshake, a second or two later.
AT_ONCE_SECONDS = 3.0
KEEP_ALIVE_SECONDS = 3.0
PER_CLIENT = 100
MOST_CONNECTIONS = 448
PAD = b"X-Pad: " + b"p" * 2000 + b"\r\n"  # about 2 KB of headers, and never the blank line that ends them
STALLED_HEADS = {
    "transcription": b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\n" + PAD,
    "websocket handshake": b"GET /v1/realtime?intent=transcription HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" + PAD,
}


def few_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


@pytest.fixture(scope="module")
def crowded(start_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # this process holds every attacking connection
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2000, "the test needs 2,000 open files"
    server = start_server("--max-batch-size", "4", "--head-timeout-seconds", str(HEAD_SECONDS),
                          "--keep-alive-seconds", str(KEEP_ALIVE_SECONDS),
                          "--max-connections-per-client", str(PER_CLIENT), preexec_fn=few_open_files)
    limits = next(line for line in log_lines(server) if line["message"] == "connection limits")
    assert limits["open_files_soft_limit"] == limits["open_files_hard_limit"] == OPEN_FILES
    assert limits["max_connections"] == MOST_CONNECTIONS
    return server


class Crowd:
    """Many raw connections to the API port, each sent a payload, with what the server sends each and when, read as
    it comes (also while the crowd is still connecting, so that a refusal's time is its own)."""

    def __init__(self, server):
        self.server = server
        self.opened: dict[socket.socket, float] = {}
        self.answers: dict[socket.socket, tuple[bytes, float]] = {}  # the first bytes (b"" for a close), and when
        self.closed: dict[socket.socket, float] = {}  # when the server closed it
        self.selector = selectors.DefaultSelector()  # epoll: select() stops at descriptor 1,024

    def open(self, addresses: list[str], each: int, payload: bytes) -> list[socket.socket]:
        connections = []
        for address in addresses:
            for _ in range(each):
                connection = socket.socket()
                connection.bind((address, 0))
                connection.connect(("127.0.0.1", self.server.port))
                self.opened[connection] = time.monotonic()
                try:
                    connection.sendall(payload)
                except OSError:  # refused and reset before the payload went
                    pass
                connection.setblocking(False)
                self.selector.register(connection, selectors.EVENT_READ)
                connections.append(connection)
                if len(connections) % 20 == 0:
                    self.read(0)
        return connections

    def read(self, within: float, awaited: list[socket.socket] | None = None, answered: int | None = None) -> None:
        """Reads what arrives, for `within` seconds or until every awaited connection (or `answered` of them) has
        had its answer."""
        if awaited is not None and answered is None:
            answered = len(awaited)
        deadline = time.monotonic() + within
        while True:
            for key, _ in self.selector.select(timeout=0 if within == 0 else 0.05):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                self.answers.setdefault(key.fileobj, (data, time.monotonic()))
                if not data:
                    self.closed[key.fileobj] = time.monotonic()
                    self.selector.unregister(key.fileobj)
            if time.monotonic() >= deadline or (awaited and sum(c in self.answers for c in awaited) >= answered):
                return

    def delay(self, connection: socket.socket) -> float:
        return self.answers[connection][1] - self.opened[connection]

    def close(self) -> None:
        self.selector.close()
        for connection in self.opened:
            connection.close()


class Bystander:
    """Probes on both ports and transcriptions from 127.0.0.1, in a thread, for as long as an attack lasts."""

    def __init__(self, server, speech: Path):
        self.server, self.speech, self.failures, self.answers = server, speech, [], Counter()
        self.api_port_open = True
        self.on_api_port = threading.Lock()  # held while a transcription is in flight
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        probes = f"http://127.0.0.1:{self.server.metrics_port}"
        with httpx.Client(timeout=5) as client:
            while not self.stopped.is_set():
                for url in (f"{probes}/healthz", f"{probes}/readyz"):
                    self.check(url, lambda: client.get(url).status_code == 200)
                with self.on_api_port:
                    if self.api_port_open:
                        self.check("transcription",
                                   lambda: bool(transcribe(self.server, self.speech, "127.0.0.1").json()["text"]))

    def leave_api_port(self) -> None:
        """Stops transcribing, once the one in flight (which holds one of the API port's connections) has ended."""
        with self.on_api_port:
            self.api_port_open = False

    def check(self, what: str, answered) -> None:
        self.answers[what] += 1
        try:
            if answered():
                return
        except (httpx.HTTPError, ValueError, KeyError) as error:
            what = f"{what}: {error!r}"
        self.failures.append(what)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        assert self.failures == [], self.failures
        assert self.answers["transcription"] >= 1 and len(self.answers) == 3 and min(self.answers.values()) >= 1, \
            self.answers


def status_of(data: bytes) -> int | None:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def open_descriptors(server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


@pytest.mark.parametrize("head", STALLED_HEADS)
def test_stalled_heads_are_capped_and_cut_at_the_deadline_while_everyone_else_is_served(crowded, audio, head):
    """1,160 stalled heads from four addresses: 100 each are held, the rest refused at once; 200 more from two
    addresses fill the server's 448, and a newcomer is refused at once. The probes answer throughout on the metrics
    port, transcriptions are served until the API port is full, and every held head is answered 408 at its deadline;
    the log stays short."""
    before = {reason: refusals(crowded, reason)
              for reason in ("head_timeout", "client_connections_full", "connections_full")}
    log_before = len(crowded.log_path.read_text().splitlines())
    bystander = Bystander(crowded, audio["speech.wav"])
    crowd = Crowd(crowded)
    try:
        first = crowd.open([f"127.0.0.{n}" for n in range(2, 6)], 290, STALLED_HEADS[head])
        crowd.read(AT_ONCE_SECONDS, first, answered=len(first) - 4 * PER_CLIENT)
        refused_first = [c for c in first if c in crowd.answers]
        assert len(first) - len(refused_first) == 4 * PER_CLIENT, "each address holds its cap, no more"
        for connection in refused_first:
            assert crowd.delay(connection) < AT_ONCE_SECONDS, "refused at once"
            if crowd.answers[connection][0]:  # past 64 refusals at once, the oldest are cut short
                assert_error(crowd.answers[connection][0], 503, "client_connections_full")
                assert b"retry-after: 5" in crowd.answers[connection][0].lower()
        assert refusals(crowded, "client_connections_full") - before["client_connections_full"] == len(refused_first)
        bystander.leave_api_port()  # the next attackers fill the API port's connections
        second = crowd.open(["127.0.0.6", "127.0.0.7"], 100, STALLED_HEADS[head])
        crowd.read(AT_ONCE_SECONDS, second, answered=len(second) - (MOST_CONNECTIONS - 4 * PER_CLIENT))
        crowd.read(0.5)  # one refusal more, still on its way, must not be taken for a held head
        refused_second = [c for c in second if c in crowd.answers]
        # At most: a connection the server has not finished closing (a refused one, the bystander's) may hold a slot.
        assert refused_second and len(second) - len(refused_second) <= MOST_CONNECTIONS - 4 * PER_CLIENT
        assert all(crowd.delay(connection) < AT_ONCE_SECONDS for connection in refused_second), "refused at once"
        with socket.create_connection(("127.0.0.1", crowded.port), timeout=2) as newcomer:
            newcomer.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert_error(read_response(newcomer)[1], 503, "connections_full")
        assert time.monotonic() - min(crowd.opened.values()) < HEAD_SECONDS, "the server was full: nothing expired yet"
        assert open_descriptors(crowded) < OPEN_FILES - 100
        held = [c for c in [*first, *second] if c not in crowd.answers]
        crowd.read(HEAD_SECONDS + 3, awaited=held)
    finally:
        bystander.stop()
        crowd.close()
    assert all(c in crowd.answers for c in held), "every held head is answered at its deadline"
    for connection in held:
        assert HEAD_SECONDS - 0.1 < crowd.delay(connection) < HEAD_SECONDS + 3
        error = assert_error(crowd.answers[connection][0], 408, "head_timeout")
        assert f"{HEAD_SECONDS:g} s" in error["message"]
    assert refusals(crowded, "head_timeout") - before["head_timeout"] == len(held)
    assert refusals(crowded, "connections_full") - before["connections_full"] >= len(refused_second) + 1
    transcribed = transcribe(crowded, audio["speech.wav"], "127.0.0.2")
    assert transcribed.status_code == 200, "the attackers' address is served again once its heads are gone"
    lines = crowded.log_path.read_text().splitlines()[log_before:]
    assert len(lines) < 200, f"{len(lines)} log lines"
    assert not any("out of system resource" in line for line in lines)


def test_idle_keep_alive_connections_are_capped_and_closed_after_their_deadline(crowded, audio):
    """1,100 connections from four addresses ask for /healthz once and then idle: 100 each are answered and closed
    after the keep-alive deadline, the rest refused at once; the probes and transcriptions are answered throughout."""
    before = {reason: refusals(crowded, reason) for reason in ("keep_alive_timeout", "client_connections_full")}
    log_before = len(crowded.log_path.read_text().splitlines())
    bystander = Bystander(crowded, audio["speech.wav"])
    crowd = Crowd(crowded)
    try:
        idle = crowd.open([f"127.0.0.{n}" for n in range(2, 6)], 275, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        crowd.read(KEEP_ALIVE_SECONDS / 2, awaited=idle)
        assert all(crowd.delay(connection) < AT_ONCE_SECONDS for connection in idle), "answered or refused at once"
        statuses = Counter(status_of(crowd.answers[connection][0]) for connection in idle)
        assert statuses[200] == 4 * PER_CLIENT and statuses[200] + statuses[503] + statuses[None] == len(idle)
        kept = [connection for connection in idle if status_of(crowd.answers[connection][0]) == 200]
        deadline = time.monotonic() + KEEP_ALIVE_SECONDS + 3
        while not all(c in crowd.closed for c in kept) and time.monotonic() < deadline:
            crowd.read(0.1)
    finally:
        bystander.stop()
        crowd.close()
    assert all(c in crowd.closed for c in kept), "every idle connection is closed"
    for connection in kept:
        # The server's clock starts after the request was sent and before the crowd read the answer (late, under load).
        assert crowd.closed[connection] - crowd.opened[connection] > KEEP_ALIVE_SECONDS - 0.1, "closed before the deadline"
        assert crowd.closed[connection] - crowd.answers[connection][1] < KEEP_ALIVE_SECONDS + 1.5, "closed at the deadline"
    assert refusals(crowded, "keep_alive_timeout") - before["keep_alive_timeout"] >= len(kept)
    assert refusals(crowded, "client_connections_full") - before["client_connections_full"] == len(idle) - len(kept)
    lines = crowded.log_path.read_text().splitlines()[log_before:]
    assert len(lines) < 200, f"{len(lines)} log lines"
