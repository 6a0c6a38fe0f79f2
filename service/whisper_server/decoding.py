"""What the HTTP process and the engine process exchange about a window: its decode options and its result.
Free of torch, so the HTTP process never loads it."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class DecodeOptions:
    """What a request asks of the decoder, per window; windows with different options share decode steps."""

    task: str = "transcribe"  # or "translate"
    language: str | None = None  # ISO-639-1 code; None detects it per window
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False  # the engine aligns the window's final tokens to its audio (alignment.py)


@dataclass(frozen=True)
class Capabilities:
    """What the loaded checkpoint can do, from its generation config. English-only checkpoints (*.en) transcribe
    English alone: they are trained on <|startoftranscript|> with no language or task token after it. Multilingual
    ones know their languages and translate into English too."""

    multilingual: bool
    languages: tuple[str, ...]  # ISO-639-1 codes
    tasks: tuple[str, ...]  # "transcribe", and "translate" for multilingual checkpoints

    def describe(self) -> dict:
        return {"multilingual": self.multilingual, "tasks": list(self.tasks), "languages": list(self.languages)}


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float


@dataclass
class WindowResult:
    language: str | None
    segments: list[Segment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # every generated token, timestamps included, end of text not
    # With word_timestamps: [text tokens + 1, frames] float16, what alignment.align_words turns into words.
    alignment: np.ndarray | None = None


class OutOfMemory(Exception):
    """The accelerator ran out of memory on this work; the server keeps serving others."""


class EngineFailure(Exception):
    """The engine cannot go on: a decode step failed (it serves every busy slot, so no one request is to blame) or
    the device stopped working (CUDA errors such as an illegal address are sticky). The engine process exits, the
    server answers 503 and exits too, and the pod is restarted, instead of failing every request from then on."""


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0
