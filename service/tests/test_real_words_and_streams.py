"""Word timestamps and streamed transcripts on OpenAI's real tiny.en, through the official OpenAI SDK, on held-out
espeak-ng clips with known sentence onsets (75 s, 0.7 s and 0.25 s pauses between sentences): the words spell the
text and start where the sentences start; the streamed deltas add up to the plain answer and come window by window;
a client that hangs up mid-stream leaves the server serving the others."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from conftest import LONG_CLIPS
from speech import Clip, word_error_rate

ONSET_TOLERANCE = 0.4  # seconds between a sentence's onset and the nearest word start


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def letters(text: str) -> str:
    return "".join(text.split())


@pytest.fixture(scope="module")
def one_slot_server(start_server, tiny_en):
    """One decode slot: a long clip's windows decode one after another, as on a busy server."""
    return start_server("--max-batch-size", "1", model=tiny_en)


@pytest.mark.parametrize("kind", LONG_CLIPS)
def test_words_spell_the_text_and_start_at_every_sentence(tiny_en_server, long_clip_answers, speech, kind):
    clip = speech.long(**LONG_CLIPS[kind])
    with open(clip.path, "rb") as handle:
        result = sdk(tiny_en_server).audio.transcriptions.create(
            model="whisper-1", file=handle, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    words = result.words
    assert letters("".join(word.word for word in words)) == letters(result.text)
    assert all(0 <= word.start <= word.end <= clip.duration for word in words)
    starts = [word.start for word in words]
    assert starts == sorted(starts) and all(a.end <= b.start for a, b in zip(words, words[1:]))
    assert all(any(s.start <= word.start and word.end <= s.end for s in result.segments) for word in words)
    missed = [(sentence.start, sentence.text) for sentence in clip.sentences
              if min(abs(start - sentence.start) for start in starts) > ONSET_TOLERANCE]
    assert missed == [], f"no word starts within {ONSET_TOLERANCE} s of these sentences"
    assert long_clip_answers[kind].text == result.text, "asking for words changes no text"


def stream_events(server, clip: Clip) -> list[tuple[float, object]]:
    """The SDK's stream iterator over one clip: (seconds since the request was sent, event) each."""
    started = time.monotonic()
    with open(clip.path, "rb") as handle:
        stream = sdk(server).audio.transcriptions.create(model="whisper-1", file=handle, stream=True)
        return [(time.monotonic() - started, event) for event in stream]


def test_stream_deltas_add_up_to_the_plain_answer_and_come_window_by_window(one_slot_server, speech):
    clip = speech.long(**LONG_CLIPS["0.7 s pauses"])
    timed = stream_events(one_slot_server, clip)
    events = [event for _, event in timed]
    assert [event.type for event in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 3, "one delta per window of the 75 s clip"
    assert "".join(delta.delta for delta in deltas) == done.text
    with open(clip.path, "rb") as handle:
        assert done.text == sdk(one_slot_server).audio.transcriptions.create(model="whisper-1", file=handle).text
    assert word_error_rate(clip.text, done.text) < 0.15
    first_delta, finished = timed[0][0], timed[-1][0]
    assert first_delta < 0.6 * finished, f"first delta at {first_delta:.1f} s of {finished:.1f} s"


def test_a_client_that_hangs_up_mid_stream_leaves_the_server_serving_others(one_slot_server, speech):
    """Hung up after the first delta: the clip's other windows leave the engine within a few steps (decoding them
    takes hundreds), and the one slot serves the next client."""
    long_clip, short_clip = speech.long(**LONG_CLIPS["0.25 s pauses"]), speech.short(count=1)[0]
    steps = lambda: one_slot_server.metric("whisper_decode_step_seconds_count")  # noqa: E731
    before = steps()
    stream_events(one_slot_server, long_clip)
    whole_clip = steps() - before
    with httpx.Client(base_url=one_slot_server.url, timeout=120) as client:
        with client.stream("POST", "/v1/audio/transcriptions", data={"model": "whisper-1", "stream": "true"},
                           files={"file": (long_clip.path.name, long_clip.path.read_bytes())}) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert "transcript.text.delta" in first
            at_hang_up = steps()
    deadline = time.monotonic() + 30
    while one_slot_server.metric("whisper_requests_in_flight") or one_slot_server.metric("whisper_queue_depth"):
        assert time.monotonic() < deadline, "the hung-up stream still holds the engine"
        time.sleep(0.1)
    still_to_decode = whole_clip - (at_hang_up - before - whole_clip)  # the steps of the windows after the first
    assert steps() - at_hang_up < still_to_decode / 10, "the hung-up stream's windows kept decoding"
    with open(short_clip.path, "rb") as handle:
        answer = sdk(one_slot_server).audio.transcriptions.create(model="whisper-1", file=handle)
    assert word_error_rate(short_clip.text, answer.text) < 0.5, answer.text
    assert one_slot_server.client.get("/readyz").status_code == 200
