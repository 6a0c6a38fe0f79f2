"""Turns a request's audio into windows for the engine and its window results back into one transcript."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import numpy as np

from .decoding import SAMPLE_RATE, DecodeOptions, Segment, WindowResult
from .engine_process import EngineProcess
from .segmentation import split_windows


@dataclass
class Transcript:
    text: str
    language: str | None
    duration: float
    segments: list[Segment]


def assemble(results: list[WindowResult], duration: float, language: str | None = None) -> Transcript:
    """Shifts each decode's segments by its window's offset (the results come in audio order, continuations
    included) and keeps times non-decreasing and inside the audio."""
    segments: list[Segment] = []
    for result in results:
        for segment in result.segments:
            floor = segments[-1].end if segments else 0.0
            start = min(max(round(result.offset + segment.start, 2), floor), duration)
            end = min(max(round(result.offset + segment.end, 2), start), duration)
            segments.append(replace(segment, start=start, end=end))
    detected = next((result.language for result in results if result.language), None)
    return Transcript(
        text=" ".join(segment.text for segment in segments),
        language=language or detected,
        duration=round(duration, 3),
        segments=segments,
    )


async def transcribe(engine: EngineProcess, samples: np.ndarray, options: DecodeOptions,
                     audio_work: asyncio.Semaphore, detect_speech: bool = True) -> Transcript:
    """Only speech reaches the model: the voice-activity detector's silence is never decoded (Whisper tends to
    invent text for it). Cutting runs off the event loop (a 2-hour file is 115 M samples), within the server's
    limit on audio work at once."""
    async with audio_work:
        windows = await asyncio.to_thread(split_windows, samples, detect_speech)
    results = await engine.transcribe(windows, options) if windows else []
    return assemble(results, len(samples) / SAMPLE_RATE, options.language)
