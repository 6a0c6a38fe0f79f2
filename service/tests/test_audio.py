"""Cutting long audio into 30 s windows: real speech (espeak-ng, through an MP3 and back) and synthetic signals."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

from conftest import SPEECH, ffmpeg
from whisper_server.audio import SILENCE_DBFS, decode_audio, split_windows
from whisper_server.engine import SAMPLE_RATE

TOLERANCE_DB = 1.0  # what "equally quiet" means: within 1 dB, or both below the silence floor


def level_db(samples: np.ndarray, centre: int) -> float:
    """RMS level of the 100 ms centred on a sample, computed directly (an oracle for the cutter's running sums)."""
    frame = samples[centre - SAMPLE_RATE // 20:centre + SAMPLE_RATE // 20].astype(np.float64)
    return 10 * math.log10(max(float(np.mean(frame**2)), 1e-20))


def assert_windows_partition(samples: np.ndarray, windows) -> None:
    """Concatenated windows are the input, offsets are where each starts, and the count and lengths keep the bound."""
    assert np.array_equal(np.concatenate([w.samples for w in windows]), samples)
    starts = np.cumsum([0] + [len(w.samples) for w in windows[:-1]])
    assert [w.offset for w in windows] == [start / SAMPLE_RATE for start in starts]
    assert all(len(w.samples) <= 30 * SAMPLE_RATE for w in windows)
    assert all(len(w.samples) >= 28 * SAMPLE_RATE for w in windows[:-1])
    assert len(windows) <= math.ceil(len(samples) / SAMPLE_RATE / 28)


def assert_cut_at_latest_quietest(samples: np.ndarray, windows) -> None:
    """Each cut is as quiet as any 100 ms in its window's last 2 s, and no later point there is as quiet."""
    for window, following in zip(windows, windows[1:]):
        start, cut = round(window.offset * SAMPLE_RATE), round(following.offset * SAMPLE_RATE)
        candidates = range(start + 28 * SAMPLE_RATE, min(start + 30 * SAMPLE_RATE, len(samples) - 800) + 1, 160)
        levels = {centre: level_db(samples, centre) for centre in candidates}
        quiet_enough = max(min(levels.values()) + TOLERANCE_DB, SILENCE_DBFS)
        assert level_db(samples, cut) <= quiet_enough + 0.01, f"cut at {cut / SAMPLE_RATE:.2f} s is not among the quietest"
        later_quiet = [c / SAMPLE_RATE for c, level in levels.items() if c > cut + 160 and level <= quiet_enough - 0.01]
        assert not later_quiet, f"cut at {cut / SAMPLE_RATE:.2f} s, but {later_quiet[:3]} s are as quiet and later"


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory) -> np.ndarray:
    """About 150 s of espeak-ng speech, looped and encoded to MP3 as a user's file would be, decoded as the server does."""
    folder = tmp_path_factory.mktemp("long-speech")
    subprocess.run(["espeak-ng", "-w", str(folder / "speech.wav"), SPEECH], check=True)
    ffmpeg("-stream_loop", "16", "-i", str(folder / "speech.wav"), "-t", "150", "-c:a", "libmp3lame",
           str(folder / "long.mp3"))
    return decode_audio(str(folder / "long.mp3"), max_seconds=200)


def test_speech_is_cut_in_its_quietest_pause_and_windows_stay_near_30_s(long_speech):
    windows = split_windows(long_speech)
    assert_windows_partition(long_speech, windows)
    assert_cut_at_latest_quietest(long_speech, windows)
    assert len(windows) == 6  # 150 s: five windows of 28 to 30 s and the rest
    for window, following in zip(windows, windows[1:]):
        # Not mid-word: the sentence pauses and word gaps of this speech are quieter than -30 dBFS, its words louder.
        assert level_db(long_speech, round(following.offset * SAMPLE_RATE)) < -30


def test_speech_over_room_noise_is_cut_at_the_latest_of_the_equally_quiet_pauses(long_speech):
    """With a noise floor (-38 dBFS, above the silence floor) every pause is about equally quiet: the latest wins."""
    noisy = long_speech + np.random.default_rng(3).normal(0, 10 ** (-38 / 20), len(long_speech)).astype(np.float32)
    windows = split_windows(noisy)
    assert_windows_partition(noisy, windows)
    assert_cut_at_latest_quietest(noisy, windows)
    assert np.mean([w.duration for w in windows[:-1]]) > 29


def loud_noise(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise at -20 dBFS: no quiet point anywhere, until the tests carve pauses into it."""
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32)


def carve(samples: np.ndarray, start: float, end: float, level: float = 0.0) -> None:
    samples[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)] *= level


def test_the_later_of_two_silent_pauses_wins_and_an_early_pause_is_not_taken():
    audio = loud_noise(70)
    carve(audio, 25.5, 25.8)  # where the first-quiet-point cutter used to cut: outside the last 2 s
    carve(audio, 28.4, 28.7)
    carve(audio, 29.2, 29.5)
    windows = split_windows(audio)
    assert 29.2 < windows[1].offset < 29.5
    assert_windows_partition(audio, windows)


def test_a_silent_pause_beats_a_later_pause_that_is_only_quieter():
    audio = loud_noise(70)
    carve(audio, 28.4, 28.7)  # silence
    carve(audio, 29.4, 29.8, level=0.1)  # -40 dBFS: quieter than the speech-level noise, louder than the silence floor
    windows = split_windows(audio)
    assert 28.4 < windows[1].offset < 28.7
    assert_windows_partition(audio, windows)


def test_a_pause_is_cut_in_its_middle_region_not_at_its_edges():
    audio = loud_noise(45)
    carve(audio, 28.9, 29.05)  # 150 ms: the only place a whole 100 ms is silent is its middle 50 ms
    cut = split_windows(audio)[1].offset
    assert 28.95 <= cut <= 29.0


@pytest.mark.parametrize("seconds, durations", [
    (30, [30]), (60, [30, 30]), (90, [30, 30, 30]), (95, [30, 30, 30, 5]), (30 + 1 / SAMPLE_RATE, [29.95, 0.05 + 1 / SAMPLE_RATE]),
])
@pytest.mark.parametrize("signal", ["silence", "tone"])
def test_audio_without_a_quiet_point_or_all_quiet_is_cut_at_the_30_s_boundaries(signal, seconds, durations):
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = np.zeros_like(t, np.float32) if signal == "silence" else (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    windows = split_windows(audio)
    assert [w.duration for w in windows] == pytest.approx(durations, abs=1e-6)
    assert_windows_partition(audio, windows)


@pytest.mark.parametrize("seed", range(8))
def test_any_audio_takes_at_most_ceil_n_over_28_windows(seed, long_speech):
    """Random lengths of random mixtures (speech, tones, noise bursts, silences): the bound and the partition hold."""
    rng = np.random.default_rng(seed)
    seconds = rng.uniform(30, 149)
    audio = long_speech[:int(seconds * SAMPLE_RATE)].copy() * rng.uniform(0, 2)
    t = np.arange(len(audio)) / SAMPLE_RATE
    audio += rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.uniform(50, 4000) * t).astype(np.float32)
    for _ in range(rng.integers(0, 40)):
        start = rng.uniform(0, seconds)
        carve(audio, start, start + rng.uniform(0.01, 3), level=rng.choice([0.0, 0.01, 1.0, 3.0]))
    windows = split_windows(audio)
    assert_windows_partition(audio, windows)
    assert_cut_at_latest_quietest(audio, windows)


def test_short_audio_is_one_window():
    audio = loud_noise(12.5)
    windows = split_windows(audio)
    assert len(windows) == 1 and windows[0].offset == 0 and np.array_equal(windows[0].samples, audio)
