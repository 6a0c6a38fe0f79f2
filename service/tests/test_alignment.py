"""Word alignment: its pure parts against plain reference implementations, and the engine's batched pass over the
alignment heads against transformers' own cross-attention weights on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whisper_server.alignment import (
    Word, align_words, alignment_sequence, dtw, median_filter, merge_punctuations, place_words, split_words)
from whisper_server.decoding import SAMPLE_RATE, DecodeOptions, Segment


def plain_dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's DTW, cell by cell."""
    rows, columns = cost.shape
    total = np.full((rows + 1, columns + 1), np.inf)
    total[0, 0] = 0
    trace = -np.ones((rows + 1, columns + 1))
    for j in range(1, columns + 1):
        for i in range(1, rows + 1):
            c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            total[i, j] = cost[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = rows, columns, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        i, j = {0: (i - 1, j - 1), 1: (i - 1, j), 2: (i, j - 1)}[trace[i, j]]
    return tuple(np.array(path[::-1]).T)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (5, 40), (40, 5), (30, 300), (12, 12)])
def test_dtw_finds_the_reference_path(shape):
    cost = np.random.default_rng(sum(shape)).normal(size=shape)
    rows, columns = dtw(cost)
    expected_rows, expected_columns = plain_dtw(cost)
    assert rows.tolist() == expected_rows.tolist() and columns.tolist() == expected_columns.tolist()


def test_dtw_follows_the_cheap_cells():
    """Three tokens, each cheap over its own block of frames: the path enters each token's row at its block."""
    cost = np.ones((3, 12))
    for token, (begin, end) in enumerate([(0, 3), (3, 9), (9, 12)]):
        cost[token, begin:end] = -5
    rows, columns = dtw(cost)
    entries = [int(columns[np.argmax(rows == token)]) for token in range(3)]
    assert entries == [0, 3, 9]
    assert (np.diff(rows) >= 0).all() and (np.diff(columns) >= 0).all()


def test_median_filter_is_a_reflected_sliding_median():
    values = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 4, 30)))
    filtered = median_filter(values, 7).numpy()
    padded = np.pad(values.numpy(), ((0, 0), (0, 0), (3, 3)), mode="reflect")
    expected = np.median(np.lib.stride_tricks.sliding_window_view(padded, 7, axis=-1), axis=-1)
    np.testing.assert_allclose(filtered, expected)
    assert median_filter(values[..., :3], 7) is not None and median_filter(values[..., :3], 7).shape[-1] == 3


def words(*texts: str) -> list[Word]:
    return [Word(text, float(index), float(index) + 0.5, [index]) for index, text in enumerate(texts)]


def test_punctuation_joins_its_neighbours():
    merged = merge_punctuations(words(" \"", "Hello", ",", " world", ".", "\""))
    assert [(w.word, w.tokens) for w in merged if w.word] == [(" \"Hello,", [0, 1, 2]), (" world.\"", [3, 4, 5])]
    assert merge_punctuations(words(" (", "a", ")")) == [Word("", 0.0, 0.5, []), Word(" (a)", 1.0, 1.5, [0, 1, 2]),
                                                           Word("", 2.0, 2.5, [])]


def test_words_split_at_spaces_and_whole_characters():
    token_bytes = [b" Hel", b"lo", b",", b" w", b"orld", "é".encode()[:1], "é".encode()[1:] + b"t", b" \xe6\x97", b"\xa5",
                   "本".encode()]
    assert split_words([0, 1, 2, 3, 4], token_bytes, "en") == [(" Hello", [0, 1]), (",", [2]), (" world", [3, 4])]
    assert split_words([3, 5, 6], token_bytes, "en") == [(" wét", [3, 5, 6])], "a character split across tokens"
    assert split_words([7, 8, 9], token_bytes, "ja") == [(" 日", [7, 8]), ("本", [9])], "each character is a word"


def test_words_take_their_times_from_the_path():
    """Text tokens cheap over frames [0, 10), [10, 25) and [25, 40); end of text from 40: 0.2 s per 10 frames."""
    token_bytes = [b" one", b" two", b"s", b" three"]
    matrix = np.full((5, 50), -1.0)
    for row, (begin, end) in enumerate([(0, 10), (10, 18), (18, 25), (25, 40), (40, 50)]):
        matrix[row, begin:end] = 5.0
    aligned = align_words(matrix, [0, 1, 2, 3], token_bytes, "en")
    assert [(w.word, w.start, w.end, w.tokens) for w in aligned] == [
        (" one", 0.0, 0.2, [0]), (" twos", 0.2, 0.5, [1, 2]), (" three", 0.5, 0.8, [3])]


def segment(start: float, end: float, text: str, tokens: list[int]) -> Segment:
    return Segment(start, end, text, tokens, -0.2, 1.0, 0.01, 0.0)


def test_segments_and_words_agree():
    """A segment takes its first and last word's times; a first word far longer than its segment allows after a
    pause is cut to twice the median word."""
    aligned = [Word(" a", 10.0, 10.3, [0]), Word(" b", 10.3, 10.6, [1]), Word(" c", 11.0, 11.3, [2]),
               Word(" d", 11.3, 11.5, [3])]
    placed = place_words([segment(9.8, 10.8, "a b", [0, 1]), segment(10.8, 11.6, "c d", [2, 3])], aligned, 0.0)
    assert [(s.start, s.end) for s, _ in placed] == [(10.0, 10.6), (11.0, 11.5)]
    assert [[w.word for w in ws] for _, ws in placed] == [[" a", " b"], [" c", " d"]]
    stretched = [Word(" long", 20.0, 24.0, [0]), Word(" b", 24.0, 24.3, [1]), Word(" c", 24.3, 24.6, [2])]
    (first, *_), = [ws for _, ws in place_words([segment(20.0, 24.6, "long b c", [0, 1, 2])], stretched, 0.0)]
    assert first.end == 24.0 and first.start == pytest.approx(24.0 - 2 * 0.3)


def test_engine_alignment_pass_matches_transformers_cross_attention(tmp_path):
    """The engine's one batched pass (its own decoder loop over the slots' cached cross-attention K/V) gives the
    matrix the reference method computes from transformers' eager cross-attention weights of the same heads."""
    from transformers import WhisperForConditionalGeneration

    from whisper_server.engine import WhisperEngine
    from whisper_server.test_model import make_test_model

    model_dir = make_test_model(tmp_path / "model", max_length=40, init_std=0.2)
    engine = WhisperEngine(str(model_dir), device="cpu", slots=4)
    engine.load()
    rng = np.random.default_rng(5)
    clips = [rng.normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32) for seconds in (5.0, 2.5, 7.0)]
    engine.admit([(clip, DecodeOptions(language="en", word_timestamps=asked)) for clip, asked in
                  zip(clips, (True, False, True))])
    finished = {}
    while engine.decoder.busy:
        finished.update(engine.step())
    results = [finished[slot] for slot in range(3)]
    assert results[1].alignment is None, "a window that did not ask for words costs nothing"
    reference = WhisperForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    heads = engine.alignment_heads
    assert heads == [(1, 0), (1, 1)], "make-test-model writes the reference's default heads"
    for clip, result in ((clips[0], results[0]), (clips[2], results[2])):
        text = [token for s in result.segments for token in s.tokens]
        assert text and result.alignment.shape == (len(text) + 1, int(len(clip) / SAMPLE_RATE * 50))
        start = [engine.special.start_of_transcript, engine.language_ids["en"], engine.task_ids["transcribe"]]
        sequence = alignment_sequence(start, engine.special.no_timestamps, text, engine.special.end_of_text)
        with torch.no_grad():
            output = reference(input_features=engine.log_mel([clip]), decoder_input_ids=torch.tensor([sequence]),
                               output_attentions=True)
        frames = result.alignment.shape[1]
        weights = torch.stack([output.cross_attentions[layer][0, head] for layer, head in heads])[:, :, :frames]
        weights = weights / weights.sum(-1, keepdim=True)  # a softmax over the audio's frames only
        weights = (weights - weights.mean(-2, keepdim=True)) / weights.std(-2, keepdim=True, correction=0)
        padded = np.pad(weights.numpy(), ((0, 0), (0, 0), (3, 3)), mode="reflect")
        filtered = np.median(np.lib.stride_tricks.sliding_window_view(padded, 7, axis=-1), axis=-1)
        expected = filtered.mean(0)[len(start):len(sequence) - 1]
        np.testing.assert_allclose(result.alignment.astype(np.float32), expected, atol=0.02)


def timed(pieces: list[tuple[str, list[int]]]) -> list[Word]:
    """Words from split_words, a quarter second each."""
    return [Word(text, index / 4, (index + 1) / 4, tokens) for index, (text, tokens) in enumerate(pieces)]


def test_a_word_split_across_segments_leaves_the_later_words_in_their_own_segments():
    """" hel" ends the first segment and "lo" begins the second: the word belongs to the first, and the words after
    it stay with their own segments and inside their times."""
    token_bytes = [b" a", b" b", b" hel", b"lo", b" c", b" d", b" e", b" f"]
    aligned = timed(split_words(list(range(8)), token_bytes, "en"))
    assert [w.word for w in aligned] == [" a", " b", " hello", " c", " d", " e", " f"]
    segments = [segment(0.0, 0.75, "a b hel", [0, 1, 2]), segment(0.75, 1.25, "lo c d", [3, 4, 5]),
                segment(1.25, 1.75, "e f", [6, 7])]
    placed = place_words(segments, aligned, 0.0)
    assert [[w.word for w in ws] for _, ws in placed] == [[" a", " b", " hello"], [" c", " d"], [" e", " f"]]
    for placed_segment, placed_words in placed:
        assert all(placed_segment.start <= w.start <= w.end <= placed_segment.end for w in placed_words)


def test_a_lone_space_token_is_no_word():
    token_bytes = [b" a", b" b", b" ", b" c", b" "]
    aligned = timed(split_words(list(range(5)), token_bytes, "en"))
    placed = place_words([segment(0.0, 1.25, "a b c", list(range(5)))], aligned, 0.0)
    assert [w.word.strip() for w in placed[0][1]] == ["a", "b", "c"]
