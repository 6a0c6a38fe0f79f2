"""What the server transcribes, on OpenAI's real tiny.en, through the official OpenAI SDK: held-out espeak-ng clips
with known text (speech.py). Short sentences; 75 s clips with 0.7 s pauses between sentences and with 0.25 s ones
(fluent speech), which the server cuts into windows at pauses and whose windows it decodes again from the last
timestamp where a decode stops short; a clip 40 dB down; silence and noise, which must give no words.

The WER bounds sit a little above what the server and transformers' own long-form `generate` give on these clips
(`service/bench/bench.py --real` prints both), so a change that loses or invents words fails here."""

from __future__ import annotations

from collections import Counter

import numpy as np
import openai
import pytest

from conftest import LONG_CLIPS
from speech import Clip, Sentence, aligned_words, corpus_word_error_rate, normalize_words, word_error_rate, write_wav
from whisper_server.decoding import SAMPLE_RATE, DecodeOptions
from whisper_server.segmentation import decoded_until, split_windows
from whisper_server.verify import reference_tokens


@pytest.fixture(scope="module")
def sdk(tiny_en_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_en_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def transcribe(sdk: openai.OpenAI, clip: Clip):
    with open(clip.path, "rb") as handle:
        return sdk.audio.transcriptions.create(model="whisper-1", file=handle, response_format="verbose_json")


def assert_segments_in_order_inside_the_audio(result, clip: Clip) -> None:
    times = [time for segment in result.segments for time in (segment.start, segment.end)]
    assert times == sorted(times), f"{clip.name}: segment times out of order: {times}"
    assert 0 <= times[0] and times[-1] <= clip.duration, f"{clip.name}: segments outside 0-{clip.duration} s"
    assert "".join(segment.text for segment in result.segments).strip() == result.text, "text from the tokens"
    assert all(segment.text.startswith(" ") for segment in result.segments), "leading spaces, as OpenAI's segments"


def lost_sentences(clip: Clip, hypothesis: str) -> list[str]:
    """The reference sentences that lost more than half their words in the hypothesis (aligned word by word: a
    sentence dropped at a window boundary shows as a run of deleted words)."""
    reference = [(index, word) for index, sentence in enumerate(clip.sentences)
                 for word in normalize_words(sentence.text)]
    pairs = aligned_words([word for _, word in reference], normalize_words(hypothesis))
    deleted = Counter(reference[r][0] for r, h in pairs if h is None)
    return [sentence.text for index, sentence in enumerate(clip.sentences)
            if deleted[index] > len(normalize_words(sentence.text)) / 2]


def repeated_phrases(clip: Clip, hypothesis: str, length: int = 4) -> list[str]:
    """Runs of `length` words the transcript says more often than the reference does (a stretch decoded twice, as
    at a window boundary, repeats every run in it)."""
    def runs(words: list[str]) -> Counter[str]:
        return Counter(" ".join(words[i:i + length]) for i in range(len(words) - length + 1))
    said, meant = runs(normalize_words(hypothesis)), runs(normalize_words(clip.text))
    return [phrase for phrase, count in said.items() if count > 1 and count > meant[phrase]]


def test_short_sentences(sdk, speech):
    clips = speech.short(count=12)
    results = [transcribe(sdk, clip) for clip in clips]
    for clip, result in zip(clips, results):
        assert normalize_words(result.text), f"{clip.name}: empty transcript"
        assert result.language == "english"
        assert_segments_in_order_inside_the_audio(result, clip)
    assert corpus_word_error_rate([c.text for c in clips], [r.text for r in results]) < 0.2


@pytest.mark.parametrize("kind", LONG_CLIPS)
def test_long_clip_loses_and_repeats_no_words(long_clip_answers, speech, kind):
    clip = speech.long(**LONG_CLIPS[kind])
    result = long_clip_answers[kind]
    assert_segments_in_order_inside_the_audio(result, clip)
    assert result.segments[-1].end > clip.sentences[-1].start, "the last sentence is transcribed"
    assert lost_sentences(clip, result.text) == [], result.text
    assert repeated_phrases(clip, result.text) == [], result.text
    assert word_error_rate(clip.text, result.text) < 0.15, result.text


def test_quiet_clip_40_db_down(sdk, speech):
    clip = speech.quiet()
    result = transcribe(sdk, clip)
    assert_segments_in_order_inside_the_audio(result, clip)
    assert lost_sentences(clip, result.text) == [], result.text
    assert word_error_rate(clip.text, result.text) < 0.15, result.text


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_silence_and_noise_give_no_words(sdk, speech, kind):
    clip = getattr(speech, kind)()
    result = transcribe(sdk, clip)
    assert result.text == "" and result.segments == [], f"invented text on {kind}: {result.text!r}"
    assert result.duration == pytest.approx(clip.duration)


def test_no_text_for_silences_and_clicks_between_sentences(sdk, speech, tmp_path):
    """Three held-out sentences in one window: 6 s of silence, a single click and 6 s more between the first two, 3 s,
    a louder click and 3 s between the last two. Segments lie only where the sentences are (none over a silence or a
    click, which the detector hears as no speech), and the sentences' words are all there."""
    def click(amplitude: float) -> np.ndarray:
        return (amplitude * np.exp(-np.arange(48) / 12.0) * np.resize([1.0, -1.0], 48)).astype(np.float32)

    def quiet(seconds: float) -> np.ndarray:
        return np.zeros(round(seconds * SAMPLE_RATE), np.float32)

    texts = speech.sentences()[-3:]
    gaps = [np.concatenate([quiet(6), click(0.6), quiet(6)]), np.concatenate([quiet(3), click(0.9), quiet(3)])]
    parts, sentences, at = [quiet(0.3)], [], 0.3
    for index, text in enumerate(texts):
        spoken = speech.speak(text, index)
        sentences.append(Sentence(text, at, at + len(spoken) / SAMPLE_RATE))
        parts += [spoken] + ([gaps[index]] if index < len(gaps) else [quiet(0.3)])
        at = sentences[-1].end + (len(gaps[index]) / SAMPLE_RATE if index < len(gaps) else 0.0)
    samples = np.concatenate(parts)
    write_wav(tmp_path / "pauses.wav", samples)
    clip = Clip("pauses", tmp_path / "pauses.wav", tuple(sentences), len(samples) / SAMPLE_RATE)
    result = transcribe(sdk, clip)
    assert_segments_in_order_inside_the_audio(result, clip)
    for segment in result.segments:
        assert any(segment.start < sentence.end + 0.5 and segment.end > sentence.start - 0.5 for sentence in sentences), \
            f"text over a silence or a click: {segment.start}-{segment.end} {segment.text!r}"
    assert word_error_rate(clip.text, result.text) < 0.2, result.text


def test_tokens_equal_generate_on_the_servers_own_windows(long_clip_answers, speech, tiny_en_engine):
    """The long clip's text tokens over HTTP are exactly what transformers' generate gives on the windows the server
    cuts, each decoded again from its last complete timestamp where generate stops short: the real checkpoint's
    suppress lists and timestamp rules, the seek and the joins of the windows' segments, all through the server."""
    clip = speech.long(**LONG_CLIPS["0.25 s pauses"])
    result = long_clip_answers["0.25 s pauses"]
    assert {segment.temperature for segment in result.segments} == {0.0}, "no fallback decode on this clip"
    timestamp_begin, end_of_text = tiny_en_engine.special.timestamp_begin, tiny_en_engine.special.end_of_text
    expected, continuations = [], 0
    for window in split_windows(clip.samples()):
        samples = window.samples
        while True:
            tokens = reference_tokens(tiny_en_engine, samples, DecodeOptions())
            kept, resume_at = decoded_until(tokens, timestamp_begin, len(samples) / SAMPLE_RATE)
            expected += [token for token in tokens[:kept] if token < end_of_text]
            if resume_at is None:
                break
            continuations += 1
            samples = samples[round(resume_at * SAMPLE_RATE):]
    assert [token for segment in result.segments for token in segment.tokens if token < end_of_text] == expected
    assert all(segment.tokens[0] >= timestamp_begin for segment in result.segments), "timestamp tokens included"
    assert continuations, "a window of this clip is decoded again from its last timestamp"


def test_json_decodes_the_servers_windows_without_timestamps_as_generate_does(sdk, speech, tiny_en_engine):
    """A json answer needs no segment times: each window the server cuts is decoded once after <|notimestamps|>
    (no seek), its text exactly transformers' generate(..., return_timestamps=False) on that window, and no sentence
    is lost or said twice."""
    clip = speech.long(**LONG_CLIPS["0.7 s pauses"])
    with open(clip.path, "rb") as handle:
        text = sdk.audio.transcriptions.create(model="whisper-1", file=handle).text
    decode = tiny_en_engine.processor.tokenizer.decode
    windows = [decode(reference_tokens(tiny_en_engine, window.samples, DecodeOptions(timestamps=False))).strip()
               for window in split_windows(clip.samples())]
    assert text == " ".join(window for window in windows if window)
    assert lost_sentences(clip, text) == [] and repeated_phrases(clip, text) == [], text
    assert word_error_rate(clip.text, text) < 0.15, text
