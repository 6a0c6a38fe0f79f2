"""What the HTTP process and the engine process exchange about a window: its decode options and its result.
Free of torch, so the HTTP process never loads it."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30.0
TIME_PRECISION = 0.02  # seconds per timestamp token


@dataclass(eq=False)  # compared by identity: field equality would compare sample arrays
class Window:
    offset: float  # seconds from the start of the audio
    samples: np.ndarray

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class DecodeOptions:
    """What a request asks of the decoder, per window; windows with different options share decode steps."""

    task: str = "transcribe"  # or "translate"
    language: str | None = None  # ISO-639-1 code; None detects it once per request, on its first window
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False  # the engine aligns the window's final tokens to its audio (alignment.py)
    # Decode timestamp tokens (segments within the window, and OpenAI's seek from the last one). Without them the
    # prefix ends in <|notimestamps|>, a window is one segment spanning its audio, and there is no seek.
    timestamps: bool = True
    languages: tuple[str, ...] = ()  # with no language: the candidates detection chooses among (empty: any)
    # Report the text tokens each decode step makes final (live captions), with greedy decoding. Text shown cannot be
    # taken back, so a window whose tokens were reported is decoded once: no temperature fallback.
    partials: bool = False
    logprobs: bool = False  # each segment keeps its text tokens' log-probabilities (include[]=logprobs)
    keywords: tuple[str, ...] = ()  # vocabulary biasing (keywords[]): in every window's prompt, before the prompt
    # Conditioning on the previous text: the tokens the request's earlier windows decoded, in the prompt after it.
    previous_tokens: tuple[int, ...] = ()


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
    text: str  # as its tokens spell it: a leading space where the language puts one between words
    tokens: list[int]  # the text tokens
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    start_token: int | None = None  # the timestamp tokens around the text, as decoded (None: none there)
    end_token: int | None = None
    seek: int = 0  # where its window starts, in 10 ms frames (OpenAI's seek)
    logprobs: list[float] | None = None  # each text token's log-probability, where the request asked for them

    @property
    def all_tokens(self) -> list[int]:
        """The text tokens with the timestamp tokens around them, as OpenAI's segments list them."""
        return ([self.start_token] if self.start_token is not None else []) + self.tokens + (
            [self.end_token] if self.end_token is not None else [])


@dataclass
class WindowResult:
    """One decode of one window. The decode-level figures are OpenAI's: avg_logprob is the sum of every sampled
    token's log-probability (end of text included) over their count plus one, the compression ratio is the whole
    text's; no_speech_prob is the probability of <|nospeech|> at <|startoftranscript|>, after the prompt if any."""

    language: str | None
    segments: list[Segment] = field(default_factory=list)  # the finished ones, times within the window
    tokens: list[int] = field(default_factory=list)  # every generated token, timestamps included, end of text not
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    duration: float = 0.0  # seconds of audio in the window
    resume_at: float | None = None  # seconds into the window where decoding goes on (OpenAI's seek); None: done
    offset: float = 0.0  # where the window starts in the audio (seconds); set by the scheduler
    continuation: int | None = None  # the index of the window that decodes the rest (after resume_at)
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
