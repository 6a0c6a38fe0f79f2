"""Audio decoding (PyAV: ffmpeg's libraries inside the wheel, no ffmpeg binary or subprocess) and windowing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np

from .decoding import SAMPLE_RATE, WINDOW_SECONDS

# A window is silence when almost none of its 30 ms frames rise above this level (dB relative to full scale).
SILENCE_DBFS = -45.0
SPEECH_FRAME_FRACTION = 0.02
# Long audio is cut at the quietest 100 ms in the last 2 s before each 30 s boundary, not mid-word: every window but
# the last is at least 28 s, so N seconds of audio take at most ceil(N / 28) windows.
CUT_SEARCH_SECONDS = 2.0
CUT_FRAME_SECONDS, CUT_HOP_SECONDS = 0.1, 0.01
# Levels differing by less than this, or both below the silence floor, are equally quiet: the latest such frame is
# the cut, so windows stay close to 30 s instead of stopping at the first of many near-equal pauses or noise dips.
CUT_TOLERANCE_DB = 1.0


class AudioError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(eq=False)  # compared by identity: field equality would compare sample arrays
class Window:
    offset: float  # seconds from the start of the audio
    samples: np.ndarray

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode_audio(path: str, max_seconds: float, on_samples: Callable[[int], None] = lambda total: None) -> np.ndarray:
    """Decodes any container/codec ffmpeg knows to 16 kHz mono float32, stopping as soon as it passes max_seconds.
    `on_samples` hears the count decoded so far after each chunk, and may stop the decoding by raising."""
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.InvalidDataError as error:
        raise AudioError(400, "The file could not be decoded as audio (unrecognised or corrupt data).", "invalid_audio") from error
    except av.error.FFmpegError as error:
        raise AudioError(400, f"The file could not be read as audio: {error.strerror or error}.", "invalid_audio") from error
    with container:
        if not container.streams.audio:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise AudioError(415, f"Unsupported media: the file has no audio stream ({kinds}).", "unsupported_media")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        max_samples = int(max_seconds * SAMPLE_RATE)
        chunks, total = [], 0
        try:
            for frame in container.decode(stream):
                for resampled in resampler.resample(frame):
                    chunk = resampled.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += len(chunk)
                if total > max_samples:
                    raise AudioError(400, f"The audio is longer than the maximum of {max_seconds:g} seconds.", "audio_too_long")
                on_samples(total)
            for resampled in resampler.resample(None):
                chunks.append(resampled.to_ndarray().reshape(-1))
                total += len(chunks[-1])
            on_samples(total)
        except av.error.FFmpegError as error:
            if not chunks:
                raise AudioError(400, f"The audio could not be decoded: {error.strerror or error}.", "invalid_audio") from error
            # A damaged tail still yields the audio before it, as ffmpeg does.
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if len(samples) > max_samples:
        raise AudioError(400, f"The audio is longer than the maximum of {max_seconds:g} seconds.", "audio_too_long")
    if len(samples) < SAMPLE_RATE // 100:
        raise AudioError(400, "The file contains no audio samples (empty or truncated).", "empty_audio")
    not_finite = len(samples) - np.count_nonzero(np.isfinite(samples))
    if not_finite:
        raise AudioError(400, f"The audio has {not_finite} samples that are not finite numbers (NaN or infinity); "
                              "a float file must hold real sample values.", "non_finite_audio")
    return samples


def frame_rms(samples: np.ndarray, frame: int) -> np.ndarray:
    usable = len(samples) // frame * frame
    if usable == 0:
        return np.sqrt(np.mean(samples**2, keepdims=True)) if len(samples) else np.zeros(1)
    return np.sqrt(np.mean(samples[:usable].reshape(-1, frame) ** 2, axis=1))


def is_silence(samples: np.ndarray) -> bool:
    loud = frame_rms(samples, int(0.03 * SAMPLE_RATE)) > 10 ** (SILENCE_DBFS / 20)
    return loud.mean() < SPEECH_FRAME_FRACTION


def quietest_point(samples: np.ndarray, earliest: int, latest: int) -> int:
    """The sample index in [earliest, latest] at the centre of the quietest 100 ms, the latest of equally quiet ones."""
    frame, hop = int(CUT_FRAME_SECONDS * SAMPLE_RATE), int(CUT_HOP_SECONDS * SAMPLE_RATE)
    half = frame // 2
    span = samples[earliest - half:latest + half].astype(np.float64)
    energy = np.concatenate(([0.0], np.cumsum(span**2)))
    starts = np.arange(0, len(span) - frame + 1, hop)
    level_db = 10 * np.log10(np.maximum((energy[starts + frame] - energy[starts]) / frame, 1e-20))
    quiet = level_db <= max(level_db.min() + CUT_TOLERANCE_DB, SILENCE_DBFS)
    return earliest + int(starts[np.flatnonzero(quiet)[-1]])


def split_windows(samples: np.ndarray) -> list[Window]:
    """Cuts audio into windows of at most 30 s; each but the last ends at the quietest 100 ms of its last 2 s."""
    window, search = int(WINDOW_SECONDS * SAMPLE_RATE), int(CUT_SEARCH_SECONDS * SAMPLE_RATE)
    half_frame = int(CUT_FRAME_SECONDS * SAMPLE_RATE) // 2
    windows, start = [], 0
    while len(samples) - start > window:
        # The frame centred on the cut must lie within the audio; only the last window can be shorter than 28 s.
        cut = quietest_point(samples, start + window - search, min(start + window, len(samples) - half_frame))
        windows.append(Window(start / SAMPLE_RATE, samples[start:cut]))
        start = cut
    windows.append(Window(start / SAMPLE_RATE, samples[start:]))
    return windows
