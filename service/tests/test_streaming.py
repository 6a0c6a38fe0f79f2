"""Word timestamps and streamed transcripts on a real server, through the official OpenAI SDK and raw HTTP, with the
tiny random-weight model (the real-weights tests check what the words and deltas say)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from conftest import FIXED_LENGTH, post_audio
from whisper_server.formats import clock


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def spelled(text: str) -> str:
    """Text without its spacing: random weights start segments inside words, so only the letters must agree."""
    return "".join(text.split())


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]


def test_words_come_back_in_verbose_json_through_the_sdk(server, audio):
    with open(audio["long.mp3"], "rb") as handle:
        both = sdk(server).audio.transcriptions.create(model="whisper-1", file=handle, response_format="verbose_json",
                                                       timestamp_granularities=["word", "segment"])
    assert both.words and both.segments
    assert spelled("".join(word.word for word in both.words)) == spelled(both.text)
    starts = [word.start for word in both.words]
    assert starts == sorted(starts) and all(w.start <= w.end <= both.duration for w in both.words)
    assert max(w.end for w in both.words) > 60, "words of the third window are offset past 60 s"
    assert both.segments[0].start <= both.words[0].start and both.words[-1].end <= both.segments[-1].end
    plain = post_audio(server.client, audio["long.mp3"], response_format="verbose_json").json()
    assert "words" not in plain and plain["text"] == both.text, "words change no text"


def test_sdk_stream_yields_deltas_then_done_with_the_plain_text(server, audio):
    with open(audio["long.mp3"], "rb") as handle:
        events = list(sdk(server).audio.transcriptions.create(model="whisper-1", file=handle, stream=True))
    assert [type(event).__name__ for event in events] == (
        ["TranscriptionTextDeltaEvent"] * (len(events) - 1) + ["TranscriptionTextDoneEvent"])
    assert len(events) >= 4, "one delta per 30 s window of the 75 s file"
    done = events[-1]
    assert "".join(event.delta for event in events[:-1]) == done.text
    assert done.text == post_audio(server.client, audio["long.mp3"]).json()["text"]
    assert done.usage.output_tokens > 0 and done.usage.input_tokens == 75 * 50


def test_stream_as_raw_server_sent_events_with_words(server, audio):
    response = post_audio(server.client, audio["two_windows.mp3"], stream="true", response_format="text",
                          **{"timestamp_granularities[]": "word"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [e["type"] for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    deltas = events[:-1]
    assert all(spelled("".join(w["word"] for w in e["words"])) == spelled(e["delta"]) for e in deltas)
    assert deltas[-1]["words"][-1]["end"] > 30
    assert "segments" not in deltas[0], "segments only when asked for"
    with_segments = sse_events(post_audio(server.client, audio["two_windows.mp3"], stream="true",
                                          **{"timestamp_granularities[]": "segment"}))
    segments = [segment for event in with_segments[:-1] for segment in event["segments"]]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    assert "".join(s["text"] for s in segments).strip() == with_segments[-1]["text"]
    assert "words" not in with_segments[0] and with_segments[-1]["languages"]


def test_first_delta_is_timed(server, audio):
    before = server.metric("whisper_stream_first_delta_seconds_count")
    post_audio(server.client, audio["speech.wav"], stream="true")
    assert server.metric("whisper_stream_first_delta_seconds_count") == before + 1


def test_an_error_after_the_stream_started_ends_it_with_an_error_event(start_server, slow_model_dir, audio):
    """A deadline that passes mid-stream: the status line (200) is sent, so the error is the stream's last event."""
    server = start_server("--request-timeout-seconds", "1", "--max-batch-size", "1", *FIXED_LENGTH,
                          model=slow_model_dir)
    slow = post_audio(server.client, audio["long.mp3"], stream="true")
    events = sse_events(slow)
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "request_timeout"
    with pytest.raises(openai.APIError) as error:
        with open(audio["long.mp3"], "rb") as handle:
            list(sdk(server).audio.transcriptions.create(model="whisper-1", file=handle, stream=True))
    assert "did not finish" in str(error.value)


def test_subtitles_with_word_timestamps_take_the_word_aligned_segment_times(server, audio):
    """docs/server.md's choice for subtitles: cues stay segments; asked for words, their times are the segments' word-
    aligned times (verbose_json with words), not the decoder's timestamps."""
    words = {"timestamp_granularities[]": "word"}
    aligned = post_audio(server.client, audio["speech.wav"], response_format="verbose_json", **words).json()["segments"]
    srt = post_audio(server.client, audio["speech.wav"], response_format="srt", **words).text
    cues = [block.split("\n")[1] for block in srt.strip("\n").split("\n\n")]
    assert cues == [f"{clock(s['start'], ',')} --> {clock(s['end'], ',')}" for s in aligned]
