"""The response formats of OpenAI's audio API: json, text, srt, vtt and verbose_json."""

from __future__ import annotations

import math

from .alignment import Word
from .decoding import Segment
from .languages import language_name
from .transcript import Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMING_FORMATS = ("json", "text")  # stream=true sends the text as events; the others are whole documents
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
               "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}


def clock(seconds: float, decimal: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal}{milliseconds:03d}"


def segment_json(s: Segment) -> dict:
    """A segment as verbose_json shows it (its id is its place in the whole transcript)."""
    return {"seek": s.seek, "start": s.start, "end": s.end, "text": s.text, "tokens": s.all_tokens,
            "temperature": s.temperature, "avg_logprob": round(s.avg_logprob, 4),
            "compression_ratio": round(s.compression_ratio, 4), "no_speech_prob": round(s.no_speech_prob, 4)}


def word_json(word: Word) -> dict:
    return {"word": word.word.strip(), "start": word.start, "end": word.end}


def render(transcript: Transcript, response_format: str, task: str) -> dict | str:
    usage = {"type": "duration", "seconds": math.ceil(transcript.duration)}  # billed seconds round up
    if response_format == "json":
        return {"text": transcript.text, "usage": usage}
    if response_format == "text":
        return transcript.text + "\n"
    if response_format == "srt":
        return "".join(
            f"{index}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text.strip()}\n\n"
            for index, s in enumerate(transcript.segments, start=1)
        )
    if response_format == "vtt":
        return "WEBVTT\n\n" + "".join(f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text.strip()}\n\n" for s in transcript.segments)
    words = {"words": [word_json(word) for word in transcript.words]} if transcript.words is not None else {}
    return {
        "task": task,
        # A translation is English whatever was spoken, as OpenAI's translations say.
        "language": "english" if task == "translate" else language_name(transcript.language),
        "duration": transcript.duration,
        "text": transcript.text,
        "segments": [{"id": index, **segment_json(segment)} for index, segment in enumerate(transcript.segments)],
        **words,
        "usage": usage,
    }
