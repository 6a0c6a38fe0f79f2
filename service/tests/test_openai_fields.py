"""OpenAI's newer fields on /v1/audio/transcriptions, on OpenAI's real tiny.en through the official OpenAI SDK:
include[]=logprobs (per-token log-probabilities in json answers and in the stream's events), keywords[] (names
spelled as the keywords spell them) and chunking_strategy (server_vad's parameters say where windows are cut), with
the errors OpenAI gives for what it refuses."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

from conftest import write_wav
from speech import normalize_words, word_error_rate
from whisper_server.decoding import SAMPLE_RATE, DecodeOptions
from whisper_server.segmentation import AUTO_VAD, FRAME, ServerVad, plan_windows


NEAR_ZERO = -0.7  # a confident token's log-probability: above it, the probability is above 0.5


def clear_clip(speech):
    """A held-out sentence tiny.en hears right ("The garden looks beautiful after a warm spring rain.")."""
    return speech.short(count=3)[2]


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def decode(engine, samples, options: DecodeOptions):
    """One window through the slot engine: its result."""
    engine.admit([(samples, options)])
    results = {}
    while engine.busy_slots():
        results.update(engine.step())
    (result,) = results.values()
    return result


def test_each_text_token_keeps_the_log_probability_the_decoder_summed(tiny_en_engine, speech):
    """The per-token log-probabilities are the chosen tokens' own: with end of text's, they add up to the decode's
    sum (avg_logprob x (tokens + 1), accumulated separately in the step); on a clear clip most are near 0."""
    samples = clear_clip(speech).samples()
    for timestamps in (False, True):
        result = decode(tiny_en_engine, samples, DecodeOptions(logprobs=True, timestamps=timestamps))
        logprobs = [value for segment in result.segments for value in segment.logprobs]
        assert len(logprobs) == sum(len(segment.tokens) for segment in result.segments) > 3
        assert all(value <= 0 for value in logprobs)
        decode_sum = result.avg_logprob * (len(result.tokens) + 1)
        if not timestamps:  # every generated token is a text token: the rest of the sum is end of text's
            assert -0.5 < decode_sum - sum(logprobs) <= 1e-4
        else:  # the timestamp tokens' log-probabilities are in the decode's sum too
            assert decode_sum - sum(logprobs) <= 1e-4
        assert sum(value > NEAR_ZERO for value in logprobs) >= 0.8 * len(logprobs)
    plain = decode(tiny_en_engine, samples, DecodeOptions(timestamps=False))
    assert all(segment.logprobs is None for segment in plain.segments), "kept only when asked"


def test_logprobs_in_json_and_in_the_stream_through_the_sdk(tiny_en_server, speech):
    clip = clear_clip(speech)
    client = sdk(tiny_en_server)
    with open(clip.path, "rb") as handle:
        answer = client.audio.transcriptions.create(model="whisper-1", file=handle, include=["logprobs"])
    logprobs = answer.logprobs
    assert word_error_rate(clip.text, answer.text) < 0.2
    assert "".join(item.token for item in logprobs).strip() == answer.text
    assert bytes(int(byte) for item in logprobs for byte in item.bytes).decode().strip() == answer.text
    assert all(item.logprob <= 0 for item in logprobs)
    assert sum(item.logprob > NEAR_ZERO for item in logprobs) >= 0.8 * len(logprobs), "a clear clip: most near 0"
    with open(clip.path, "rb") as handle:
        plain = client.audio.transcriptions.create(model="whisper-1", file=handle)
    assert plain.text == answer.text and plain.logprobs is None

    with open(clip.path, "rb") as handle:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=handle, stream=True,
                                                          include=["logprobs"]))
    deltas, done = events[:-1], events[-1]
    assert done.type == "transcript.text.done" and done.text == answer.text
    assert [item.token for item in done.logprobs] == [item.token for item in logprobs]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(done.logprobs, logprobs))
    assert [item.token for delta in deltas for item in delta.logprobs] == [item.token for item in logprobs]


def test_windows_are_cut_only_in_pauses_as_long_as_the_silence_duration():
    """Speech with one 2 s pause at 10 s and 0.3 s pauses every 3 s: the window is cut in the last 10 s before 30 s
    where those pauses count as silence, in the long pause where only it does; windows start the prefix padding
    before speech."""
    speech = np.ones(40 * SAMPLE_RATE // FRAME, np.float32)
    for start in range(int(3 * SAMPLE_RATE / FRAME), len(speech), int(3 * SAMPLE_RATE / FRAME)):
        speech[start:start + 10] = 0.0  # 0.32 s pauses
    speech[:16] = 0.0  # 0.5 s of silence first
    long_pause = slice(int(10 * SAMPLE_RATE / FRAME), int(12 * SAMPLE_RATE / FRAME))
    speech[long_pause] = 0.0
    total = len(speech) * FRAME

    def first_cut(**vad) -> float:
        return plan_windows(speech, total, ServerVad(**vad))[0][1] / SAMPLE_RATE

    assert 20 < first_cut(silence_duration_ms=200, prefix_padding_ms=0) <= 16 * FRAME / SAMPLE_RATE + 30
    assert 10 < first_cut(silence_duration_ms=1000) < 12
    assert plan_windows(speech, total) == plan_windows(speech, total, AUTO_VAD)
    starts = [plan_windows(speech, total, ServerVad(prefix_padding_ms=padding))[0][0] for padding in (0, 300)]
    assert starts == [16 * FRAME, 16 * FRAME - 300 * SAMPLE_RATE // 1000]


@pytest.fixture(scope="module")
def long_pause_clip(speech, tmp_path_factory):
    """36 s of held-out sentences 0.6 s apart, with one pause of 2 s after the fourth (at about 13 s); and the text
    before that pause."""
    clips = speech.short(count=10)
    pause = np.zeros(int(1.4 * SAMPLE_RATE), np.float32)
    samples = np.concatenate([clip.samples() for clip in clips[:4]] + [pause]
                             + [clip.samples() for clip in clips[4:]])
    path = write_wav(tmp_path_factory.mktemp("chunking") / "long_pause.wav", samples)
    return path, " ".join(clip.text for clip in clips[:4])


def first_window_text(server, path, chunking_strategy) -> str:
    """The stream's first delta (one per window, decoded without timestamps: no seek within a window)."""
    with open(path, "rb") as handle:
        stream = sdk(server).audio.transcriptions.create(model="whisper-1", file=handle, stream=True,
                                                         chunking_strategy=chunking_strategy)
        events = list(stream)
    assert len(events) == 3, "two windows, then the done event"
    return events[0].delta


def test_chunking_strategy_s_silence_duration_moves_the_cut_through_the_sdk(tiny_en_server, long_pause_clip):
    path, before_pause = long_pause_clip
    short_silence = first_window_text(tiny_en_server, path, {"type": "server_vad", "silence_duration_ms": 300})
    long_silence = first_window_text(tiny_en_server, path, {"type": "server_vad", "silence_duration_ms": 1000})
    assert word_error_rate(before_pause, long_silence) < 0.2, "cut in the one pause of 1 s or more"
    assert len(normalize_words(short_silence)) > len(normalize_words(before_pause)) + 10, "cut in the last 10 s"


def test_chunking_strategy_s_prefix_padding_moves_the_window_s_start(tiny_en_server, speech):
    """The clip's speech starts at 0.3 s: its window (seek, in 10 ms) starts there without padding, and at 0 with
    "auto" (0.4 s)."""
    clip = clear_clip(speech)
    seeks = []
    for strategy in ({"type": "server_vad", "prefix_padding_ms": 0}, "auto"):
        with open(clip.path, "rb") as handle:
            answer = sdk(tiny_en_server).audio.transcriptions.create(
                model="whisper-1", file=handle, response_format="verbose_json", chunking_strategy=strategy)
        seeks.append(answer.segments[0].seek)
    assert 20 <= seeks[0] <= 35 and seeks[1] == 0


# A held-out sentence with a name tiny.en misspells unless told (service/bench/keywords_bench.py measures the set).
NAMED_SENTENCE, NAMES = "Please forward the invoice to Siobhan Okonkwo before noon.", ("Siobhan", "Okonkwo")


def test_keywords_spell_the_names_through_the_sdk(tiny_en_server, speech):
    clip = speech._clip("names-01", lambda: speech._join([NAMED_SENTENCE], 1, 0.0))
    texts = {}
    for keywords in ((), NAMES):
        with open(clip.path, "rb") as handle:
            texts[keywords] = sdk(tiny_en_server).audio.transcriptions.create(model="whisper-1", file=handle,
                                                                               keywords=list(keywords)).text
    spelled = [name for name in NAMES if name.lower() in normalize_words(texts[()])]
    assert spelled != list(NAMES), f"tiny.en spells the names without help: {texts[()]!r}"
    assert all(name.lower() in normalize_words(texts[NAMES]) for name in NAMES), texts[NAMES]
    assert word_error_rate(clip.text, texts[NAMES]) < word_error_rate(clip.text, texts[()])
    assert len(normalize_words(texts[NAMES])) <= len(normalize_words(clip.text)) + 1, "the keywords are not text"


@pytest.mark.parametrize("fields, param", [
    (dict(include=["logprobs"], response_format="verbose_json"), "include[]"),
    (dict(include=["logprobs"], response_format="text"), "include[]"),
    (dict(include=["everything"]), "include[]"),
    (dict(keywords=["Siobhan", " "]), "keywords[]"),
    (dict(keywords=["Okonkwo"] + [f"{index} " + "Przybylski" * 6 for index in range(5)]), "keywords[]"),
    (dict(chunking_strategy="manual"), "chunking_strategy"),
    (dict(chunking_strategy={"type": "server_vad", "threshold": 1.5}), "chunking_strategy.threshold"),
    (dict(chunking_strategy={"type": "server_vad", "silence_duration_ms": -1}), "chunking_strategy.silence_duration_ms"),
    (dict(chunking_strategy={"type": "server_vad", "prefix_padding_ms": 0.5}), "chunking_strategy.prefix_padding_ms"),
])
def test_what_openai_refuses_is_a_400_naming_the_field(tiny_en_server, audio, fields, param):
    with open(audio["one_second.wav"], "rb") as handle, pytest.raises(openai.BadRequestError) as refused:
        sdk(tiny_en_server).audio.transcriptions.create(model="whisper-1", file=handle, **fields)
    error = refused.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
