"""Sampling at the fallback temperatures is deterministic per window: each sequence's Gumbel noise comes from Philox
keyed by its window's seed (its audio and temperature), counting its step and its place in the window's group, mixed
with each vocabulary entry's own word, inside the step. The same window gives the same tokens on every run and
whatever windows share its decode steps."""

from __future__ import annotations

import math

import torch

from whisper_server.decoder import SlotDecoder, gumbel_noise, lowbias32, philox2x32
from whisper_server.decoding import DecodeOptions
from whisper_server.verify import decode_windows


def test_philox_gives_random123s_known_answers():
    """Random123's known-answer vectors for Philox2x32-10 (kat_vectors: counter, key, result)."""
    vectors = [((0, 0), 0, (0xFF1DAE59, 0x6CD10DF2)),
               ((0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF, (0x2C3F628B, 0xAB4FD7AD)),
               ((0x243F6A88, 0x85A308D3), 0x13198A2E, (0xDD7CE038, 0xF62A4C12))]
    counters = tuple(torch.tensor([counter[lane] for counter, _, _ in vectors]) for lane in (0, 1))
    words = philox2x32(counters, torch.tensor([key for _, key, _ in vectors]))
    assert list(zip(*(lane.tolist() for lane in words))) == [result for _, _, result in vectors]


def test_lowbias32_and_the_noise():
    """lowbias32 as its C gives it (uint32 arithmetic, here in Python's integers); the noise is Gumbel(0, 1) (mean
    Euler's constant, variance pi^2 / 6), and every (seed, step, stream) row has its own."""
    def reference(word: int) -> int:
        word ^= word >> 16
        word = (word * 0x7FEB352D) & 0xFFFFFFFF
        word ^= word >> 15
        word = (word * 0x846CA68B) & 0xFFFFFFFF
        return word ^ (word >> 16)

    words = [0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 0x80000000, 12345678]
    assert lowbias32(torch.tensor(words)).tolist() == [reference(word) for word in words]
    vocabulary = torch.arange(50_000)
    entries, _ = philox2x32((vocabulary, torch.zeros_like(vocabulary)), torch.zeros_like(vocabulary))
    noise = gumbel_noise(torch.tensor([7, 7, 7, 8]), torch.tensor([3, 4, 3, 3]), torch.tensor([0, 0, 1, 0]), entries)
    assert noise.isfinite().all()
    assert (noise.mean(-1) - 0.5772).abs().max() < 0.03 and (noise.var(-1) - math.pi ** 2 / 6).abs().max() < 0.06
    assert torch.corrcoef(noise).fill_diagonal_(0).abs().max() < 0.03, "rows are independent"


def test_samples_follow_the_distribution_at_the_temperature():
    """20,000 rows, each its own seed: tokens are drawn in proportion to softmax(scores / T) within 4 standard
    deviations, never a banned one; temperature 0 is greedy."""
    rows = 20_000
    probabilities = torch.tensor([0.1, 0.2, 0.0, 0.7, 0.0])
    scores = probabilities.log().expand(rows, -1)
    entries = torch.tensor([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822])
    noise = gumbel_noise(torch.arange(rows), torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long),
                         entries)
    for temperature in (1.0, 2.0):
        expected = probabilities ** (1 / temperature) / (probabilities ** (1 / temperature)).sum()
        chosen = SlotDecoder._choose(scores, torch.full((rows,), temperature), noise)
        counts = torch.bincount(chosen, minlength=5).double()
        assert ((counts - rows * expected).abs() <= 4 * (rows * expected * (1 - expected)).sqrt()).all(), counts
        assert counts[2] == counts[4] == 0
    assert (SlotDecoder._choose(scores, torch.zeros(rows), noise) == 3).all()


def test_a_sampled_window_gives_the_same_tokens_on_every_run_and_beside_any_neighbours(tiny_en_engine, speech):
    """OpenAI's tiny.en sampling a window at temperature 1.0: alone twice, then in the third of four slots beside
    other windows (sampled and greedy) and joining while they are part-way through, so it runs in other rows, in other
    step sizes and at other steps of theirs. Its tokens are the same each time, and they are a sample, not greedy."""
    clips = speech.short(count=4)
    window = (clips[0].samples(), DecodeOptions(temperature=1.0))
    alone = decode_windows(tiny_en_engine, [window], joins=[0])[0]
    assert decode_windows(tiny_en_engine, [window], joins=[0])[0] == alone
    neighbours = [(clips[1].samples(), DecodeOptions(temperature=1.0)), (clips[2].samples(), DecodeOptions()),
                  (clips[3].samples(), DecodeOptions(temperature=0.6))]
    crowded = decode_windows(tiny_en_engine, [*neighbours[:2], window, neighbours[2]], joins=[0, 0, 3, 5])
    assert crowded[2] == alone
    greedy = decode_windows(tiny_en_engine, [(window[0], DecodeOptions())], joins=[0])[0]
    assert alone != greedy, "the window is sampled at temperature 1.0"
