"""Turns a request's audio into windows for the engine and its window results back into one transcript."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from .audio import Window, is_silence, split_windows
from .decoding import SAMPLE_RATE, DecodeOptions, Segment, WindowResult
from .engine_process import EngineProcess


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


def cut(samples: np.ndarray) -> tuple[list[Window], list[bool]]:
    windows = split_windows(samples)
    return windows, [is_silence(window.samples) for window in windows]


async def transcribe(engine: EngineProcess, samples: np.ndarray, options: DecodeOptions,
                     audio_work: asyncio.Semaphore) -> Transcript:
    """Silent windows never reach the model: Whisper tends to invent text for them. Cutting and the silence check
    run off the event loop (a 2-hour file is 115 M samples), within the server's limit on audio work at once."""
    async with audio_work:
        windows, silent = await asyncio.to_thread(cut, samples)
    spoken = [window for window, quiet in zip(windows, silent) if not quiet]
    decoded = iter(await engine.transcribe(spoken, options) if spoken else [])
    results = [WindowResult(language=options.language) if quiet else next(decoded) for quiet in silent]
    return assemble(windows, results, len(samples) / SAMPLE_RATE)
