"""Turns a request's audio into windows for the engine and its window results back into one transcript, in audio
order as the results come: each window's stretch of the transcript (a Piece) is final as soon as it and every window
before it are decoded, which is what streaming sends. A window decoding with partials (live captions) gives its text
as it decodes first."""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import numpy as np

from .alignment import Word, align_words, place_words
from .decoding import SAMPLE_RATE, DecodeOptions, Segment, WindowResult
from .engine_process import EngineProcess
from .segmentation import AUTO_VAD, ServerVad, speech_within, split_speech

log = logging.getLogger("whisper_server.transcript")


@dataclass
class Transcript:
    text: str
    language: str | None
    duration: float
    segments: list[Segment]
    words: list[Word] | None = None  # with word timestamps
    output_tokens: int = 0  # tokens the model generated for the final results


@dataclass
class Piece:
    """One window's part of the transcript, absolute times: `delta` is what it adds to the text so far. A window
    decoding with partials first gives pieces of text alone (no segments), then a last piece with the rest. Where the
    options ask for logprobs, `logprobs` holds the tokens the piece adds, in OpenAI's shape (token_logprobs)."""

    delta: str
    segments: list[Segment]
    words: list[Word] = field(default_factory=list)
    logprobs: list[dict] | None = None


def token_logprobs(tokens: Iterable[tuple[int, float]], token_bytes: Sequence[bytes],
                   characters: codecs.IncrementalDecoder | None = None) -> list[dict]:
    """include[]=logprobs, in OpenAI's shape: each text token with its log-probability and its UTF-8 bytes. The
    tokens' strings join to their text: a character whose bytes span several tokens is in the string of the token
    that completes it (`characters`: the incremental UTF-8 decoder a window's earlier tokens went through)."""
    characters = characters or codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [{"token": characters.decode(token_bytes[token]), "logprob": logprob, "bytes": list(token_bytes[token])}
            for token, logprob in tokens]


def segment_logprobs(segments: Sequence[Segment], token_bytes: Sequence[bytes]) -> list[dict]:
    """The segments' text tokens with their log-probabilities (decoded with `logprobs`), as token_logprobs gives."""
    return token_logprobs(((token, logprob) for segment in segments
                           for token, logprob in zip(segment.tokens, segment.logprobs or ())), token_bytes)


class TranscriptBuilder:
    """Takes window results in audio order. Shifts each window's segments (and words) by the window's offset and
    keeps times non-decreasing across windows; with `token_bytes` (word timestamps) it turns each window's alignment
    into words and reconciles them with the segments."""

    def __init__(self, duration: float, token_bytes: Sequence[bytes] | None = None, language: str | None = None,
                 min_segment_speech: float = 0.0):
        self.duration, self.token_bytes, self.language = duration, token_bytes, language
        # A segment that holds less speech than this (seconds, as the voice-activity detector heard it) is text the
        # model made up for silence or noise, and is dropped; `speech` is set once the audio has been through the
        # detector (None: no detection, nothing dropped).
        self.min_segment_speech = min_segment_speech
        self.speech: list[tuple[float, float]] | None = None
        self.segments: list[Segment] = []
        self.words: list[Word] = []
        self.languages: Counter[str] = Counter()
        self.last_speech = 0.0  # where speech last ended: the reference's rule for the first word after a pause
        self.output_tokens = 0

    def add(self, result: WindowResult) -> Piece:
        if result.language:
            self.languages[result.language] += 1
        self.output_tokens += len(result.tokens)
        shifted = [replace(segment, start=result.offset + segment.start, end=result.offset + segment.end,
                           seek=round(result.offset * 100)) for segment in result.segments]
        if self.token_bytes is not None and result.alignment is not None:
            text_tokens = [token for segment in shifted for token in segment.tokens]
            words = [replace(word, start=result.offset + word.start, end=result.offset + word.end)
                     for word in align_words(result.alignment, text_tokens, self.token_bytes, result.language)]
            placed = place_words(shifted, words, self.last_speech)
        else:
            placed = [(segment, []) for segment in shifted]
        if self.speech is not None and self.min_segment_speech > 0:
            placed = [(segment, words) for segment, words in placed
                      if speech_within(self.speech, segment.start, segment.end) >= self.min_segment_speech]
        piece = Piece(delta="", segments=[])
        for segment, words in placed:
            floor = self.segments[-1].end if self.segments else 0.0
            start = min(max(round(segment.start, 2), floor), self.duration)  # in order, inside the audio
            segment = replace(segment, start=start, end=min(max(round(segment.end, 2), start), self.duration))
            for word in words:  # inside its segment, after the word before
                word.start = min(max(word.start, segment.start, self.words[-1].end if self.words else 0.0), segment.end)
                word.end = min(max(word.end, word.start), segment.end)
                self.words.append(word)
                piece.words.append(word)
            self.last_speech = words[-1].end if words else self.last_speech
            # Text from the tokens: no space added between segments or windows (Chinese, Japanese), the leading
            # space of the first one dropped, as OpenAI's text has it.
            piece.delta += segment.text if self.segments else segment.text.lstrip()
            self.segments.append(segment)
            piece.segments.append(segment)
        return piece

    def transcript(self) -> Transcript:
        return Transcript(
            text="".join(segment.text for segment in self.segments).strip(),
            language=self.language or (self.languages.most_common(1)[0][0] if self.languages else None),
            duration=round(self.duration, 3),
            segments=self.segments,
            words=self.words if self.token_bytes is not None else None,
            output_tokens=self.output_tokens,
        )


class PartialText:
    """A window's text as its decode goes, from the text tokens made final so far (with their log-probabilities):
    their bytes through an incremental UTF-8 decoder, so that a character split over tokens shows once whole (errors
    replaced, as the tokenizer's decode replaces them)."""

    def __init__(self, token_bytes: Sequence[bytes]):
        self.token_bytes = token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.logprobs: list[dict] = []  # each token so far, as token_logprobs spells it

    def add(self, tokens: list[tuple[int, float]]) -> None:
        for entry in token_logprobs([(token, logprob) for token, logprob in tokens if token < len(self.token_bytes)],
                                    self.token_bytes, self.decoder):
            self.text += entry["token"]
            self.logprobs.append(entry)


def rest_of(final: str, shown: str) -> str:
    """What a window's final text adds to what its partials showed (which it starts with, by construction)."""
    if final.startswith(shown):
        return final[len(shown):]
    log.warning("a window's final text does not extend its partials", extra={"fields": {
        "shown": shown, "final": final}})
    return final[len(os.path.commonprefix([final, shown])):]


def assemble(results: list[WindowResult], duration: float) -> Transcript:
    builder = TranscriptBuilder(duration)
    for result in results:
        builder.add(result)
    return builder.transcript()


async def transcribe_pieces(engine: EngineProcess, samples: np.ndarray, options: DecodeOptions,
                            audio_work: asyncio.Semaphore, builder: TranscriptBuilder,
                            detect_speech: bool = True, live: bool = False, vad: ServerVad = AUTO_VAD
                            ) -> AsyncIterator[Piece]:
    """The transcript piece by piece in audio order, each as soon as its window and all before it are final (a
    window whose decode stopped short is followed by the decode of its rest). Only speech reaches the model: the
    voice-activity detector's silence is never decoded (Whisper tends to invent text for it). Cutting runs off the
    event loop (a 2-hour file is 115 M samples), within the server's limit on audio work at once; so do the words of
    a window (DTW)."""
    async with audio_work:
        windows, builder.speech = await asyncio.to_thread(split_speech, samples, detect_speech, vad)
    finished: dict[int, WindowResult] = {}
    following = deque(range(len(windows)))  # the windows not yet given out, in audio order
    partials: dict[int, PartialText] = {}  # the text of windows decoding with partials, so far
    shown, given = "", 0  # what pieces have said of the next window in audio order so far, and how many tokens

    def showable(index: int) -> str:
        """A window's partial text as builder.add will spell it: the request's first text without its leading
        space. Trailing whitespace waits for the text after it (a blank window adds nothing)."""
        text = partials[index].text if index in partials else ""
        return (text if builder.segments else text.lstrip()).rstrip()

    async def ready() -> AsyncIterator[Piece]:
        nonlocal shown, given
        while following and following[0] in finished:
            index = following.popleft()
            result = finished.pop(index)
            partials.pop(index, None)
            if result.continuation is not None:
                following.appendleft(result.continuation)
            piece = builder.add(result) if result.alignment is None else await asyncio.to_thread(builder.add, result)
            if options.logprobs:  # the tokens its partials have not given
                piece.logprobs = segment_logprobs(piece.segments, engine.token_bytes)[given:]
            piece.delta, shown, given = rest_of(piece.delta, shown), "", 0
            yield piece
        if following and len(text := showable(following[0])) > len(shown):
            piece, shown = Piece(text[len(shown):], []), text
            if options.logprobs:  # every token so far: the text shown is all of it, but trailing whitespace
                piece.logprobs, given = partials[following[0]].logprobs[given:], len(partials[following[0]].logprobs)
            yield piece

    if windows:
        async with aclosing(engine.transcribe(windows, options, live)) as results:
            async for index, result in results:
                if isinstance(result, WindowResult):
                    finished[index] = result
                else:
                    partials.setdefault(index, PartialText(engine.token_bytes)).add(result)
                async for piece in ready():
                    yield piece


async def transcribe(engine: EngineProcess, samples: np.ndarray, options: DecodeOptions,
                     audio_work: asyncio.Semaphore, token_bytes: Sequence[bytes] | None = None,
                     detect_speech: bool = True, min_segment_speech: float = 0.0,
                     vad: ServerVad = AUTO_VAD) -> Transcript:
    builder = TranscriptBuilder(len(samples) / SAMPLE_RATE, token_bytes if options.word_timestamps else None,
                                options.language, min_segment_speech)
    async with aclosing(transcribe_pieces(engine, samples, options, audio_work, builder, detect_speech,
                                          vad=vad)) as pieces:
        async for _ in pieces:
            pass
    return builder.transcript()
