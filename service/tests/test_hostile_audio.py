"""Audio whose cost is out of proportion to its upload, over real HTTP against real server processes: sample rates no
recording uses are refused, a small file that decodes to hours is stopped early, large files cost the HTTP process
what the docs state, and a long prompt costs what its last tokens cost."""

from __future__ import annotations

import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ffmpeg, write_wav
from test_hostile_clients import assert_error, transcribe
from whisper_server.audio import DECODED_BYTES_PER_SECOND, DECODING_BYTES_PER_FILE


@pytest.fixture(scope="module")
def roomy(start_server):
    """Room for three 10-minute files at once: 20 minutes a file, an hour of audio held."""
    return start_server("--max-batch-size", "2", "--max-audio-seconds", "1200", "--max-queued-audio-seconds", "3600")


def header_rate_wav(path: Path, rate: int, data_bytes: int = 14_000) -> Path:
    """A 16-bit mono WAV whose header declares `rate`: 14 KB of samples at 1 Hz is 7,000 s of audio."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.random.default_rng(rate).integers(-3000, 3000, data_bytes // 2).astype("<i2").tobytes())
    return path


@pytest.mark.parametrize("rate", [1, 4000, 7999])
def test_a_sample_rate_no_recording_uses_is_refused_naming_it(roomy, tmp_path, rate, assert_still_ready):
    error = assert_error(transcribe(roomy, header_rate_wav(tmp_path / "low.wav", rate)), 400, "unsupported_sample_rate")
    assert f"{rate} Hz" in error["message"] and "8000 Hz" in error["message"] and error["param"] == "file"
    assert_still_ready(roomy)


def test_telephone_audio_is_served(roomy, audio, tmp_path):
    phone = tmp_path / "phone.wav"
    ffmpeg("-i", str(audio["speech.wav"]), "-ar", "8000", str(phone))
    assert transcribe(roomy, phone).status_code == 200


def test_a_small_file_that_decodes_to_hours_is_stopped_at_its_upload_s_bound(roomy, tmp_path, assert_still_ready):
    """Two hours of silence in 29 KB of FLAC (large constant frames) is within --max-audio-seconds' 20 minutes
    here, but the upload allows 4000 s a MB: about 110 s. Decoding stops there, not after two hours of audio."""
    packed = tmp_path / "silence.flac"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "7200", "-c:a", "flac", "-frame_size", "32768",
           str(packed))
    assert packed.stat().st_size < 64_000
    error = assert_error(transcribe(roomy, packed), 400, "audio_too_long_for_upload")
    assert f"from {packed.stat().st_size} bytes" in error["message"] and "4000 s per MB" in error["message"]
    assert_still_ready(roomy)


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def test_three_large_files_at_once_keep_the_http_process_within_its_stated_memory(roomy, audio, tmp_path):
    """Three 10-minute files (16 kHz WAV, no speech: nothing reaches the engine) at once. The HTTP process's peak
    resident memory grows by at most what the docs state: DECODED_BYTES_PER_SECOND per second of audio and
    DECODING_BYTES_PER_FILE per file (165 MB here). Before block-wise decoding and detection: about 400 MB."""
    seconds, files = 600, 3
    large = write_wav(tmp_path / "large.wav", np.zeros(seconds * 16_000))
    assert transcribe(roomy, audio["speech.wav"]).status_code == 200  # the detector loaded, the threads started
    pid = roomy.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = memory_kib(pid, "VmRSS")
    with ThreadPoolExecutor(files) as pool:
        responses = list(pool.map(lambda n: transcribe(roomy, large, f"10.3.0.{n}"), range(files)))
    assert [response.status_code for response in responses] == [200] * files, [r.text for r in responses]
    added = (memory_kib(pid, "VmHWM") - before) * 1024
    stated = files * (seconds * DECODED_BYTES_PER_SECOND + DECODING_BYTES_PER_FILE)
    assert added <= stated, f"{added / 2**20:.0f} MiB added, {stated / 2**20:.0f} MiB stated"


def test_a_long_prompt_costs_what_its_last_tokens_cost(tiny_en):
    """OpenAI keeps a prompt's last 223 tokens; the engine tokenizes only the end of the text they come from, with
    the same tokens as the whole text's, whatever the cut falls on."""
    from tokenizers import Tokenizer

    from whisper_server.engine import last_tokens

    backend = Tokenizer.from_file(str(tiny_en / "tokenizer.json"))

    def whole(text: str) -> list[int]:
        return [token.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)
                for token in backend.model.tokenize(piece)]

    rng = np.random.default_rng(5)
    words = ["Kubernetes", "on", "EKS", "  ", "GPUs.", "'s", "don't", "123", "日本語", "—", "\n", "!!!", "      x", "é"]
    for _ in range(100):
        text = " " + "".join(rng.choice(words) + rng.choice(["", " ", "  "]) for _ in range(rng.integers(1, 2000)))
        assert last_tokens(backend, text, 223) == whole(text)[-223:]
    repetitive = " " + "the the the " * 5000  # 60 KB
    read: list[int] = []

    class Recording:  # the backend, noting how much text it pre-tokenizes
        model = backend.model

        class pre_tokenizer:  # noqa: N801 - the attribute's name
            @staticmethod
            def pre_tokenize_str(text: str):
                read.append(len(text))
                return backend.pre_tokenizer.pre_tokenize_str(text)

    assert last_tokens(Recording, repetitive, 223) == whole(repetitive)[-223:]
    assert sum(read) < 4_000, f"{sum(read)} characters of a {len(repetitive)}-character prompt tokenized"


def test_a_client_looping_costly_requests_leaves_others_their_share(start_server, tiny_en, audio):
    """One decode slot, OpenAI's tiny.en. A client sends speech with a 60 KB repetitive prompt in a loop (the model
    repeats the prompt's words and falls back at every temperature: about 950 decode steps a request, against 47
    for the same speech alone); another client's clip, sent while a costly window decodes, waits for at most that one
    decode (224 tokens), not for every retry of the costly request. Counted in decode steps, the engine's unit of
    cost, and shown in seconds. Bounded: 10 costly requests, 90 s."""
    server = start_server("--max-batch-size", "1", "--drain-seconds", "0", model=tiny_en)
    prompt = "the same words again " * 3000

    def steps() -> float:
        return server.metric("whisper_decode_step_seconds_count")

    def timed_clip() -> tuple[float, float]:
        first_step, started = steps(), time.monotonic()
        response = transcribe(server, audio["speech.wav"], "10.4.0.1")
        assert response.status_code == 200 and response.json()["text"], response.text
        return steps() - first_step, time.monotonic() - started

    transcribe(server, audio["one_second.wav"])  # the detector loaded
    idle_steps, idle_seconds = timed_clip()
    stop = threading.Event()

    def loop() -> None:
        for _ in range(10):
            if stop.is_set():
                return
            try:
                transcribe(server, audio["speech.wav"], "10.4.0.2", prompt=prompt)
            except httpx.TransportError:
                return  # the server stopped under it

    looping = threading.Thread(target=loop, daemon=True)
    looping.start()
    deadline = time.monotonic() + 90
    while steps() < 2 * idle_steps + 100 and time.monotonic() < deadline:
        time.sleep(0.05)  # a costly window is decoding
    busy_steps, busy_seconds = timed_clip()
    stop.set()
    server.stop()  # no drain: the costly request in flight is answered 503 at once
    looping.join(30)
    print(f"clip alone: {idle_steps:.0f} steps, {idle_seconds:.2f} s; beside the costly loop: {busy_steps:.0f} steps, "
          f"{busy_seconds:.2f} s")
    assert busy_steps > idle_steps + 10, "the costly requests were decoding while the clip was"
    assert busy_steps <= idle_steps + 224 + 20, "the clip waited for more than the decode it arrived during"
