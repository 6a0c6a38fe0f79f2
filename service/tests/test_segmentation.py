"""Cutting audio into windows with the voice-activity detector, on real speech (espeak-ng) and synthetic signals, and
OpenAI's seek rule on token sequences."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import SPEECH, read_wav
from whisper_server.decoding import SAMPLE_RATE
from whisper_server.segmentation import FRAME, decoded_until, plan_windows, split_windows

SENTENCES = (
    "The kitchen needs a new fridge.", "We will buy one on Monday if the shop is open.",
    "Yesterday the weather was cold and grey.", "Today the sun is shining over the hills.",
    "Please send the report before the meeting starts.", "The train to the city leaves at half past nine.",
    "My brother plays the piano every evening.", "A small dog was sleeping under the table.",
)
VOICED = 1e-3  # espeak-ng's pauses are digital silence; anything louder is speech


def spoken(text: str, tmp_path) -> np.ndarray:
    path = tmp_path / "sentence.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    samples = read_wav(path).astype(np.float32)
    voiced = np.flatnonzero(np.abs(samples) > VOICED)
    return samples[voiced[0]:voiced[-1] + 1]


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory) -> tuple[np.ndarray, list[tuple[float, float]], list[float]]:
    """About 85 s of sentences: 0.7 s between every third pair, 0.25 s (fluent speech) between the others. Returns
    the samples, each sentence's (start, end) and each pause's length."""
    folder = tmp_path_factory.mktemp("long-speech")
    parts, sentences, pauses, at = [np.zeros(SAMPLE_RATE // 2, np.float32)], [], [], SAMPLE_RATE // 2
    index = 0
    while at < 85 * SAMPLE_RATE:
        if sentences:
            pause = 0.7 if index % 3 == 0 else 0.25
            parts.append(np.zeros(int(pause * SAMPLE_RATE), np.float32))
            pauses.append(pause)
            at += len(parts[-1])
        speech = spoken(SENTENCES[index % len(SENTENCES)], folder)
        sentences.append((at / SAMPLE_RATE, (at + len(speech)) / SAMPLE_RATE))
        parts.append(speech)
        at += len(speech)
        index += 1
    parts.append(np.zeros(SAMPLE_RATE // 2, np.float32))
    return np.concatenate(parts), sentences, pauses


def assert_windows_hold_all_speech(samples: np.ndarray, windows) -> None:
    """Windows in order, apart, at most 30 s, and every voiced sample inside one of them."""
    spans = [(round(w.offset * SAMPLE_RATE), round(w.offset * SAMPLE_RATE) + len(w.samples)) for w in windows]
    assert all(0 < end - start <= 30 * SAMPLE_RATE for start, end in spans)
    assert all(end <= following for (_, end), (following, _) in zip(spans, spans[1:]))
    for window, (start, end) in zip(windows, spans):
        assert np.array_equal(window.samples, samples[start:end])
    covered = np.zeros(len(samples), bool)
    for start, end in spans:
        covered[start:end] = True
    voiced = np.abs(samples) > VOICED * np.abs(samples).max()  # the same speech at any level
    lost = np.flatnonzero(voiced & ~covered)
    assert len(lost) == 0, f"speech outside every window at {lost[:5] / SAMPLE_RATE} s"


@pytest.mark.parametrize("gain_db", [0, -40])
def test_long_speech_is_cut_in_its_longest_pauses(long_speech, gain_db):
    """Loud or 40 dB down, fluent speech is cut between sentences, and in a 0.7 s pause where one is near the end."""
    samples, sentences, pauses = long_speech
    samples = samples * np.float32(10 ** (gain_db / 20))
    windows = split_windows(samples)
    assert_windows_hold_all_speech(samples, windows)
    assert len(windows) in (3, 4), [round(w.duration, 2) for w in windows]
    gaps = [(end, start, pause) for (_, end), (start, _), pause in zip(sentences, sentences[1:], pauses)]
    for window, following in zip(windows, windows[1:]):
        cut_end, cut_start = window.offset + window.duration, following.offset
        inside = [(end, start, pause) for end, start, pause in gaps if end - 0.05 <= cut_end and cut_start <= start + 0.05]
        assert inside, f"the cut {cut_end:.2f}-{cut_start:.2f} s is not in a pause between sentences"
        longest_late = max(pause for end, start, pause in gaps if window.offset + 20 <= end and start <= window.offset + 30)
        assert inside[0][2] == longest_late, "a longer pause was close by"


def test_speech_is_found_whatever_its_level_and_silence_around_it_is_left_out(tmp_path):
    speech = spoken(SPEECH, tmp_path)
    silence = np.zeros(3 * SAMPLE_RATE, np.float32)
    for gain in (1.0, 0.01):
        samples = np.concatenate([silence, speech * np.float32(gain), silence])
        windows = split_windows(samples)
        assert_windows_hold_all_speech(samples, windows)
        assert len(windows) == 1 and 2.4 <= windows[0].offset <= 3.0
        assert windows[0].offset + windows[0].duration <= 3.6 + len(speech) / SAMPLE_RATE


@pytest.mark.parametrize("signal", ["silence", "white noise", "quiet noise", "tone"])
def test_audio_without_speech_has_no_windows(signal):
    rng, t = np.random.default_rng(0), np.arange(20 * SAMPLE_RATE) / SAMPLE_RATE
    samples = {"silence": np.zeros_like(t), "white noise": rng.normal(0, 0.1, len(t)),
               "quiet noise": rng.normal(0, 0.003, len(t)), "tone": 0.3 * np.sin(2 * np.pi * 440 * t)}[signal]
    assert split_windows(samples.astype(np.float32)) == []


def frames(*spans: tuple[float, float, float]) -> np.ndarray:
    """Speech probabilities per 32 ms frame from (seconds, probability, ...) spans, for the planner alone."""
    return np.concatenate([np.full(round(seconds * SAMPLE_RATE / FRAME), probability, np.float32)
                           for seconds, probability in spans])


def test_speech_without_a_pause_is_cut_at_its_least_speech_like_frame():
    """75 s of speech that never pauses; a dip to 0.4 (not a pause) at 27 s and one to 0.45 at 25 s."""
    before_dip = frames((25, 0.9), (0.064, 0.45), (1.936, 0.9))
    probabilities = np.concatenate([before_dip, frames((0.032, 0.4), (48, 0.9))])
    total = len(probabilities) * FRAME
    windows = plan_windows(probabilities, total)
    assert windows[0] == (0, len(before_dip) * FRAME)
    assert all(end - start <= 30 * SAMPLE_RATE for start, end in windows)
    assert [end for _, end in windows[:-1]] == [start for start, _ in windows[1:]], "nothing left out"
    assert windows[-1][1] == total


def test_a_pause_in_a_window_s_last_10_s_wins_over_an_earlier_longer_one():
    probabilities = frames((10, 0.9), (2.0, 0.0), (12, 0.9), (0.3, 0.1), (12, 0.9))
    windows = plan_windows(probabilities, len(probabilities) * FRAME)
    assert len(windows) == 2
    end, start = windows[0][1] / SAMPLE_RATE, windows[1][0] / SAMPLE_RATE
    assert 24.0 <= end <= start <= 24.3, "cut in the 0.3 s pause, split between the windows"


BEGIN = 1000  # a timestamp token: <|0.00|>; BEGIN + 50 is <|1.00|>


@pytest.mark.parametrize("tokens, expected", [
    ([BEGIN, 1, 2, BEGIN + 50, BEGIN + 50, 3, BEGIN + 100], (7, None)),  # ends in a single timestamp: done
    ([BEGIN, 1, 2, BEGIN + 50, BEGIN + 50, 3, 4], (4, 1.0)),  # unfinished text: again from <|1.00|>
    ([BEGIN, 1, BEGIN + 50, BEGIN + 50, 3, BEGIN + 100, BEGIN + 100], (6, 2.0)),  # ends in a pair: from its first
    ([1, 2, 3], (3, None)),  # no timestamps
    ([BEGIN, 1, 2, 3], (4, None)),  # no pair
    ([BEGIN, 1, BEGIN + 1495, BEGIN + 1495, 2], (5, None)),  # less than 0.2 s left: the text is kept
])
def test_openai_s_seek_rule(tokens, expected):
    assert decoded_until(tokens, BEGIN, 30.0) == expected
