"""Turns a request's audio into windows for the scheduler and its window results back into one transcript."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from .audio import Window, is_silence, split_windows
from .engine import SAMPLE_RATE, DecodeOptions, Segment, WindowResult
from .scheduler import BatchScheduler


# OpenAI's reference thresholds: text that gzip shrinks more than 2.4x is a repetition loop.
COMPRESSION_RATIO_THRESHOLD = 2.4
TEMPERATURE_STEP = 0.2


@dataclass
class Transcript:
    text: str
    language: str | None
    duration: float
    segments: list[Segment]


def assemble(windows: list[Window], results: list[WindowResult], duration: float) -> Transcript:
    """Shifts each window's segments by the window's offset and keeps times non-decreasing across windows."""
    segments: list[Segment] = []
    for window, result in zip(windows, results):
        for segment in result.segments:
            floor = segments[-1].end if segments else 0.0
            start = max(round(window.offset + segment.start, 2), floor)
            end = max(round(window.offset + segment.end, 2), start)
            segments.append(replace(segment, start=start, end=end))
    languages = Counter(result.language for result in results if result.language)
    return Transcript(
        text=" ".join(segment.text for segment in segments),
        language=languages.most_common(1)[0][0] if languages else None,
        duration=round(duration, 3),
        segments=segments,
    )


def is_repetition_loop(result: WindowResult) -> bool:
    return any(segment.compression_ratio > COMPRESSION_RATIO_THRESHOLD for segment in result.segments)


async def decode_with_fallback(scheduler: BatchScheduler, windows: list[Window], options: DecodeOptions) -> list[WindowResult]:
    """Windows whose text compresses too well (Whisper stuck repeating itself) are decoded again at a higher
    temperature, 0.2 at a time up to 1.0, as OpenAI's reference decoder does."""
    results = await scheduler.transcribe(windows, options)
    temperature = options.temperature
    while (looping := [i for i, result in enumerate(results) if is_repetition_loop(result)]) and temperature < 1.0:
        temperature = round(min(1.0, temperature + TEMPERATURE_STEP), 2)
        retried = await scheduler.transcribe([windows[i] for i in looping], replace(options, temperature=temperature),
                                             admitted=True)
        for index, result in zip(looping, retried):
            results[index] = result
    return results


async def transcribe(scheduler: BatchScheduler, samples: np.ndarray, options: DecodeOptions) -> Transcript:
    """Silent windows never reach the model: Whisper tends to invent text for them."""
    windows = split_windows(samples)
    silent = [is_silence(window.samples) for window in windows]
    spoken = [window for window, quiet in zip(windows, silent) if not quiet]
    decoded = iter(await decode_with_fallback(scheduler, spoken, options) if spoken else [])
    results = [WindowResult(language=options.language) if quiet else next(decoded) for quiet in silent]
    return assemble(windows, results, len(samples) / SAMPLE_RATE)
