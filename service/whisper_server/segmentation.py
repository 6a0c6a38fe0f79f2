"""Segmentation: where a request's audio is cut into windows for the decoder, and where a window's decode says the
decoding goes on.

Speech is found by Silero VAD, the model the silero-vad package ships (its sequence ONNX export: one call per block
of 32 ms frames, bit-exact with the streaming model), run by onnxruntime in the HTTP process. The package's own Python
imports torch, so only its model file is used: the HTTP process stays free of torch, and nothing is downloaded.

Windows hold speech only (the audio between them is what the VAD calls silence and is never decoded), are at most
30 s, and end in pauses: the longest pause of a window's last seconds, so a cut falls between sentences where it can.
A window whose decode stops short of its end goes on from its last complete timestamp (`decoded_until`)."""

from __future__ import annotations

import importlib.util
import math
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoding import SAMPLE_RATE, TIME_PRECISION, WINDOW_SECONDS, Window

MODEL_FILE = "silero_vad_16k_sequence.onnx"
FRAME = 512  # samples per VAD frame (32 ms), the model's own
CONTEXT = 64  # samples of the previous frame that each frame carries, as the streaming model keeps them
BLOCK_FRAMES = 512  # frames per onnxruntime call (16 s of audio)
# The level the audio is brought to for the detector: the 99.9th percentile of its frames' peaks (not the loudest,
# which a click sets) made 0.5; audio quieter than -100 dBFS is not raised further.
LEVEL_PERCENTILE, TARGET_PEAK, LEVEL_FLOOR = 99.9, 0.5, 1e-5
# Silero's convention: once speech has started, a frame is a pause below the speech threshold less this.
PAUSE_MARGIN = 0.15
MIN_SPEECH_FRAMES = 3  # speech shorter than about 0.1 s is a click, not a word
PAD_SECONDS = 0.4  # audio kept after speech (faster-whisper's speech_pad_ms), at most half the pause to the next
# A window that must be cut ends in the longest pause of its last 10 s, the latest of equally long ones.
CUT_SEARCH_SECONDS = 10.0
# A decode that stops less than this short of its window's end keeps its unfinished text instead of decoding the rest.
MIN_REMAINDER_SECONDS = 0.2


@dataclass(frozen=True)
class ServerVad:
    """OpenAI's server_vad parameters, with OpenAI's defaults: speech starts at `threshold` and stops after
    `silence_duration_ms` below it (less PAUSE_MARGIN); `prefix_padding_ms` of audio before it is kept. A live
    session's turn_detection; a file's chunking_strategy, where they say where windows may be cut (plan_windows)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    # Each parameter's range, as OpenAI's API takes it: (lowest, highest, whole numbers only).
    RANGES = {"threshold": (0.0, 1.0, False), "prefix_padding_ms": (0, 10_000, True),
              "silence_duration_ms": (0, 10_000, True)}

    def describe(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms}

    @property
    def pause_frames(self) -> int:
        """The frames of silence that end speech (at least one)."""
        return max(1, math.ceil(self.silence_duration_ms * SAMPLE_RATE / 1000 / FRAME))


# chunking_strategy "auto" (and none given): the segmentation tuned on the development clips, Silero's own threshold
# and minimum silence (3 frames, about 0.1 s, silero's min_silence_duration_ms: shorter dips stay inside the speech)
# and faster-whisper's 0.4 s of padding.
AUTO_VAD = ServerVad(threshold=0.5, prefix_padding_ms=400, silence_duration_ms=3 * FRAME * 1000 // SAMPLE_RATE)


class VoiceActivity:
    """The Silero VAD model in an onnxruntime session, shared by the HTTP process's audio threads (run() is
    thread-safe); one core per call."""

    _shared: VoiceActivity | None = None
    _lock = threading.Lock()

    def __init__(self, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])

    @classmethod
    def shared(cls) -> VoiceActivity:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls(model_path())
            return cls._shared

    def speech_probabilities(self, samples: np.ndarray) -> np.ndarray:
        """The probability of speech in each 32 ms frame (the last one zero-padded), of the audio brought to one
        level first: Silero misses the softer words of speech 40 dB down, and hears the same speech at any level
        once it is normalised. Runs block by block: beyond the audio, it holds one block's inputs (1.2 MB), never a
        full-length copy."""
        count = -(-len(samples) // FRAME)
        scale = np.float32(TARGET_PEAK / level(samples)) if count else np.float32(0)
        hidden = cell = np.zeros((1, 1, 128), np.float32)
        probabilities = []
        for first in range(0, count, BLOCK_FRAMES):
            frames = min(BLOCK_FRAMES, count - first)
            inputs = np.zeros((frames, CONTEXT + FRAME), np.float32)
            block = samples[first * FRAME:(first + frames) * FRAME]
            whole = len(block) // FRAME
            inputs[:whole, CONTEXT:] = block[:whole * FRAME].reshape(whole, FRAME)
            inputs[whole:, CONTEXT:CONTEXT + len(block) - whole * FRAME] = block[whole * FRAME:]
            inputs[1:, :CONTEXT] = inputs[:-1, -CONTEXT:]
            if first:
                inputs[0, :CONTEXT] = samples[first * FRAME - CONTEXT:first * FRAME]
            inputs *= scale
            output, hidden, cell = self.session.run(["speech_probs", "hn", "cn"],
                                                    {"input": inputs, "h": hidden, "c": cell})
            probabilities.append(output.reshape(-1))
        return np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)


class SpeechStream:
    """Silero over audio that arrives in pieces (a live session): the model's state and the previous frame's context
    carry over from one piece to the next, and the level each frame is brought to is set from the frames of the last
    LEVEL_HISTORY_SECONDS, as speech_probabilities sets it from a whole file's."""

    LEVEL_HISTORY_FRAMES = round(30.0 * SAMPLE_RATE / FRAME)

    def __init__(self, activity: VoiceActivity):
        self.session = activity.session
        self.hidden = self.cell = np.zeros((1, 1, 128), np.float32)
        self.context = np.zeros(CONTEXT, np.float32)
        self.peaks: deque[float] = deque(maxlen=self.LEVEL_HISTORY_FRAMES)

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """The probability of speech in each of these [count, FRAME] frames, which follow the frames given before."""
        self.peaks.extend(np.abs(frames).max(axis=1).tolist())
        level = max(float(np.percentile(np.fromiter(self.peaks, np.float32), LEVEL_PERCENTILE)), LEVEL_FLOOR)
        scaled = frames * np.float32(TARGET_PEAK / level)
        context = np.empty((len(frames), CONTEXT), np.float32)
        context[0] = self.context
        context[1:] = scaled[:-1, -CONTEXT:]
        self.context = scaled[-1, -CONTEXT:].copy()
        probabilities, self.hidden, self.cell = self.session.run(
            ["speech_probs", "hn", "cn"],
            {"input": np.concatenate([context, scaled], axis=1), "h": self.hidden, "c": self.cell})
        return probabilities.reshape(-1)


def model_path() -> Path:
    """The ONNX model inside the installed silero-vad package, found without importing the package (which imports
    torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed (it ships the voice-activity model)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"the silero-vad package has no {MODEL_FILE} ({path})")
    return path


def speech_regions(probabilities: np.ndarray, vad: ServerVad = AUTO_VAD) -> list[tuple[int, int]]:
    """[start, end) frame ranges of speech: from a frame at the speech threshold to the first pause of at least
    the VAD's silence below the pause threshold, as silero's own state machine decides (without its padding)."""
    regions, start, pause = [], None, None
    pause_threshold, pause_frames = vad.threshold - PAUSE_MARGIN, vad.pause_frames
    for index, probability in enumerate(probabilities.tolist()):
        if probability >= vad.threshold:
            start = index if start is None else start
            pause = None
        elif start is not None and probability < pause_threshold:
            pause = index if pause is None else pause
            if index + 1 - pause >= pause_frames:
                regions.append((start, pause))
                start = pause = None
    if start is not None:
        regions.append((start, pause if pause is not None else len(probabilities)))
    return [(start, end) for start, end in regions if end - start >= MIN_SPEECH_FRAMES]


def plan_windows(probabilities: np.ndarray, total: int, vad: ServerVad = AUTO_VAD) -> list[tuple[int, int]]:
    """[start, end) sample ranges of the windows for `total` samples of audio with these frame probabilities: windows
    start the VAD's prefix padding before speech and are cut only in pauses of at least its silence."""
    regions = [(start * FRAME, min(end * FRAME, total)) for start, end in speech_regions(probabilities, vad)]
    if not regions:
        return []
    prefix, pad = vad.prefix_padding_ms * SAMPLE_RATE // 1000, int(PAD_SECONDS * SAMPLE_RATE)
    longest = int(WINDOW_SECONDS * SAMPLE_RATE)
    windows, start, first = [], max(0, regions[0][0] - prefix), 0  # the next window's start and first region
    while True:
        limit = start + longest
        if regions[-1][1] <= limit:
            windows.append((start, min(total, regions[-1][1] + pad, limit)))
            return windows
        # Pauses after speech that ends within the window: the longest of the last 10 s, else the last before them.
        pauses = [index for index in range(first, len(regions) - 1) if regions[index][1] <= limit]
        if not pauses:  # speech that never pauses for 30 s: cut at its least speech-like frame
            cut = quietest_frame_cut(probabilities, start, limit)
            windows.append((start, cut))
            start = cut
            continue
        late = [index for index in pauses if regions[index][1] >= limit - int(CUT_SEARCH_SECONDS * SAMPLE_RATE)]
        chosen = max(late, key=lambda i: (regions[i + 1][0] - regions[i][1], i)) if late else pauses[-1]
        speech_end, speech_start = regions[chosen][1], regions[chosen + 1][0]
        middle = (speech_end + speech_start) // 2
        windows.append((start, min(speech_end + pad, middle, limit)))
        start, first = max(speech_start - prefix, middle), chosen + 1


def quietest_frame_cut(probabilities: np.ndarray, start: int, limit: int) -> int:
    """The start of the least speech-like frame in the last 10 s before `limit` (the latest among equals)."""
    first = -(-(limit - int(CUT_SEARCH_SECONDS * SAMPLE_RATE)) // FRAME)
    span = probabilities[first:limit // FRAME]
    return (first + len(span) - 1 - int(np.argmin(span[::-1]))) * FRAME


def split_windows(samples: np.ndarray, detect_speech: bool = True, vad: ServerVad = AUTO_VAD) -> list[Window]:
    """The windows of a request's audio: speech only, each at most 30 s, cut in pauses (as `vad` finds them).
    Without speech detection (fixed-length benchmark decoding, where every window must cost the same) every 30 s of
    the audio is a window."""
    return split_speech(samples, detect_speech, vad)[0]


def split_speech(samples: np.ndarray, detect_speech: bool = True, vad: ServerVad = AUTO_VAD
                 ) -> tuple[list[Window], list[tuple[float, float]] | None]:
    """The windows of a request's audio (split_windows) and the speech the detector heard in it: [start, end) seconds,
    unpadded (None without speech detection)."""
    if not detect_speech:
        longest = int(WINDOW_SECONDS * SAMPLE_RATE)
        spans = [(start, min(start + longest, len(samples))) for start in range(0, len(samples), longest)]
        return [Window(start / SAMPLE_RATE, samples[start:end]) for start, end in spans], None
    probabilities = VoiceActivity.shared().speech_probabilities(samples)
    windows = [Window(start / SAMPLE_RATE, samples[start:end])
               for start, end in plan_windows(probabilities, len(samples), vad)]
    return windows, [(start * FRAME / SAMPLE_RATE, min(end * FRAME, len(samples)) / SAMPLE_RATE)
                     for start, end in speech_regions(probabilities, vad)]


def speech_within(speech: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of the speech regions (sorted, apart) that fall inside [start, end]."""
    return sum(max(0.0, min(end, region_end) - max(start, region_start)) for region_start, region_end in speech
               if region_start < end and region_end > start)


def decoded_until(tokens: list[int], timestamp_begin: int, duration: float) -> tuple[int, float | None]:
    """OpenAI's seek rule on one decode of a window: how many of its tokens make its finished segments, and where in
    the window (seconds) the decoding goes on, None when the window is done. Text after the last complete timestamp
    pair is unfinished, and the window is decoded again from that pair's closing timestamp; a decode that ends in a
    single timestamp, or has no pair, has said all the window holds."""
    is_timestamp = [token >= timestamp_begin for token in tokens]
    pairs = [index for index in range(1, len(tokens)) if is_timestamp[index - 1] and is_timestamp[index]]
    if not pairs or is_timestamp[-2:] == [False, True]:
        return len(tokens), None
    kept = pairs[-1]
    resume_at = (tokens[kept - 1] - timestamp_begin) * TIME_PRECISION
    if resume_at <= 0 or duration - resume_at < MIN_REMAINDER_SECONDS:
        return len(tokens), None
    return kept, round(resume_at, 2)


def level(samples: np.ndarray) -> float:
    """The audio's level for the detector: the LEVEL_PERCENTILE of its frames' peaks, at least LEVEL_FLOOR; computed
    block by block."""
    whole = len(samples) // FRAME
    peaks = [np.abs(samples[first * FRAME:min(first + BLOCK_FRAMES, whole) * FRAME].reshape(-1, FRAME)).max(axis=1)
             for first in range(0, whole, BLOCK_FRAMES)]
    if len(samples) > whole * FRAME:
        peaks.append(np.abs(samples[whole * FRAME:]).max(keepdims=True))
    return max(float(np.percentile(np.concatenate(peaks), LEVEL_PERCENTILE)), LEVEL_FLOOR)
