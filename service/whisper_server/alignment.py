"""Word timestamps by OpenAI's reference method (openai/whisper's timing.py): the cross-attention of the checkpoint's
alignment heads over a window's final text tokens, softmax over the window's frames, normalised per frame over the
tokens, median-filtered (width 7) along time and averaged over the heads, then dynamic time warping from tokens to
frames; tokens are grouped into words (at spaces, or at whole characters for languages written without spaces),
punctuation is merged into its neighbours and each segment's first and last word are reconciled with its times.

Two halves, in two processes. `alignment_matrices` runs in the engine process: one batched, teacher-forced pass of
the decoder layers up to the last alignment head over the windows that finished together, reading the cross-attention
K/V their slots still hold. Everything after the matrix (DTW, words, punctuation, segment times) is numpy and plain
Python, run by the HTTP process off the decode loop, window by window in audio order.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .decoding import Segment

if TYPE_CHECKING:
    import torch

MEDIAN_FILTER_WIDTH = 7
FRAMES_PER_SECOND = 50  # encoder frames: 1500 per 30 s
# The reference's defaults: marks that join the following word, and marks that join the preceding one.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
# Written without spaces between words: a word is a whole character (the reference's list).
SPACELESS_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


@dataclass
class Word:
    word: str
    start: float
    end: float
    tokens: list[int]


# The engine's half: attention of the alignment heads --------------------------------------------------------------

def default_alignment_heads(layers: int, heads: int) -> list[tuple[int, int]]:
    """The reference's choice for a checkpoint that names none: every head of the upper half of the decoder."""
    return [(layer, head) for layer in range(layers // 2, layers) for head in range(heads)]


def alignment_sequence(start_of_transcript: list[int], no_timestamps: int, text_tokens: list[int],
                       end_of_text: int) -> list[int]:
    """What the alignment pass feeds the decoder for one window, as the reference does: the start-of-transcript
    tokens (language and task where the checkpoint takes them), <|notimestamps|>, the text, end of text."""
    return [*start_of_transcript, no_timestamps, *text_tokens, end_of_text]


def median_filter(values: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of `width` (odd) along the last dimension, edges reflected, as the reference.
    The window's values are sorted by an odd-even transposition network of elementwise min/max over shifted views:
    on a CPU, about three times faster than sorting every window (the reference's way)."""
    import torch  # here, not at the top: the HTTP process uses this module and never loads torch
    import torch.nn.functional as F

    length = values.shape[-1]
    if length <= width // 2:
        return values
    padded = F.pad(values, (width // 2, width // 2), mode="reflect")
    column = [padded[..., shift:shift + length] for shift in range(width)]
    for round_ in range(width):
        for i in range(round_ % 2, width - 1, 2):
            column[i], column[i + 1] = torch.minimum(column[i], column[i + 1]), torch.maximum(column[i], column[i + 1])
    return column[width // 2]


def alignment_matrices(model, cross_attention_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                       heads: Sequence[tuple[int, int]], sequences: list[list[int]], text_starts: list[int],
                       frames: list[int]) -> list[np.ndarray]:
    """For each window, the [text tokens + 1, frames] matrix DTW aligns: row k is the query that predicts text token k
    (the last predicts end of text). `sequences` are alignment_sequence()s, `text_starts` where <|notimestamps|> sits
    in each, `frames` the window's audio in encoder frames; `cross_attention_kv(layer)` gives that layer's
    cross-attention K and V of the windows, [windows, heads, 1500, head_dim]. float16, to keep the pipe light."""
    import torch
    import torch.nn.functional as F

    decoder = model.model.decoder
    device = decoder.embed_tokens.weight.device
    width = max(len(sequence) for sequence in sequences)
    tokens = torch.tensor([s + [s[-1]] * (width - len(s)) for s in sequences], device=device)  # padding after: causal
    hidden = decoder.embed_tokens(tokens) + decoder.embed_positions.weight[:width]
    last_layer = max(layer for layer, _ in heads)
    scores = []
    for index, layer in enumerate(decoder.layers[:last_layer + 1]):
        attention = layer.self_attn
        normed = layer.self_attn_layer_norm(hidden)
        query, key, value = (_split_heads(projection, attention.num_heads) for projection in (
            attention.q_proj(normed) * attention.scaling, attention.k_proj(normed), attention.v_proj(normed)))
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=1.0)
        hidden = hidden + attention.out_proj(_merge_heads(attended))

        cross = layer.encoder_attn
        query = _split_heads(cross.q_proj(layer.encoder_attn_layer_norm(hidden)) * cross.scaling, cross.num_heads)
        keys, values = cross_attention_kv(index)
        chosen = [head for layer_index, head in heads if layer_index == index]
        if chosen:
            picked = torch.tensor(chosen, device=device)
            scores.append((query[:, picked] @ keys[:, picked].transpose(-1, -2)).float())
        if index == last_layer:
            break  # later layers cannot change these heads' attention
        attended = F.scaled_dot_product_attention(query, keys, values, scale=1.0)
        hidden = hidden + cross.out_proj(_merge_heads(attended))
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
    scores = torch.cat(scores, dim=1)  # [windows, alignment heads, tokens, 1500]
    matrices = []
    for row, (sequence, text_start, frame_count) in enumerate(zip(sequences, text_starts, frames)):
        weights = scores[row, :, :len(sequence), :max(frame_count, 1)].softmax(-1)
        std, mean = torch.std_mean(weights, dim=-2, keepdim=True, correction=0)
        weights = median_filter((weights - mean) / std.clamp(min=1e-10), MEDIAN_FILTER_WIDTH)
        matrices.append(weights.mean(0)[text_start:len(sequence) - 1].half().cpu().numpy())
    return matrices


def _split_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    rows, length, width = states.shape
    return states.view(rows, length, heads, width // heads).transpose(1, 2)


def _merge_heads(states: torch.Tensor) -> torch.Tensor:
    rows, heads, length, head_dim = states.shape
    return states.transpose(1, 2).reshape(rows, length, heads * head_dim)


# The HTTP process's half: DTW, words, times ----------------------------------------------------------------------

def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `cost` [N, M] from its first cell to its last, moving down, right or
    diagonally: (row indices, column indices) along it. The reference's recurrence and tie-breaking (diagonal only
    when strictly cheapest, then down, else right), computed a row at a time: along a row the total is a running
    minimum of (best from above - cost so far) plus the cost so far, one vectorised scan instead of a loop per cell."""
    rows, columns = cost.shape
    total = np.full((rows + 1, columns + 1), np.inf)
    total[0, 0] = 0.0
    for row in range(1, rows + 1):
        from_above = np.minimum(total[row - 1, :-1], total[row - 1, 1:])  # diagonal or straight down into column j
        running = np.cumsum(cost[row - 1])
        before = np.concatenate(([0.0], running[:-1]))
        total[row, 1:] = running + np.minimum.accumulate(from_above - before)
    diagonal, above, left = total[:-1, :-1], total[:-1, 1:], total[1:, :-1]
    moves = np.where((diagonal < above) & (diagonal < left), 0, np.where((above < diagonal) & (above < left), 1, 2))
    row, column, path = rows, columns, []
    while row > 0 or column > 0:
        path.append((row - 1, column - 1))
        move = 2 if row == 0 else 1 if column == 0 else moves[row - 1, column - 1]
        if move == 0:
            row, column = row - 1, column - 1
        elif move == 1:
            row -= 1
        else:
            column -= 1
    path.reverse()
    indices = np.array(path).T
    return indices[0], indices[1]


def split_on_characters(tokens: list[int], token_bytes: Sequence[bytes]) -> list[tuple[str, list[int]]]:
    """Groups tokens into pieces of whole characters: a character's UTF-8 bytes may span tokens."""
    pieces, current, pending = [], [], b""
    for token in tokens:
        current.append(token)
        pending += token_bytes[token]
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.reason == "unexpected end of data":
                continue  # the character goes on in the next token
            text = pending.decode("utf-8", "replace")
        pieces.append((text, current))
        current, pending = [], b""
    if current:
        pieces.append((pending.decode("utf-8", "replace"), current))
    return pieces


def split_words(tokens: list[int], token_bytes: Sequence[bytes], language: str | None) -> list[tuple[str, list[int]]]:
    """Tokens grouped into words as the reference's tokenizer does: a word begins at a space or a punctuation mark
    (each mark its own word, merged later), or at every character for languages written without spaces."""
    pieces = split_on_characters(tokens, token_bytes)
    if language in SPACELESS_LANGUAGES:
        return pieces
    words: list[tuple[str, list[int]]] = []
    for text, piece_tokens in pieces:
        if not words or text.startswith(" ") or text.strip() in string.punctuation:
            words.append((text, list(piece_tokens)))
        else:
            words[-1] = (words[-1][0] + text, words[-1][1] + piece_tokens)
    return words


def merge_punctuations(words: list[Word], prepended: str = PREPEND_PUNCTUATIONS,
                       appended: str = APPEND_PUNCTUATIONS) -> list[Word]:
    """Opening marks join the word after them, closing marks the word before, as the reference merges them; the
    marks' own entries are dropped."""
    words = [replace(word, tokens=list(word.tokens)) for word in words]
    following = len(words) - 1
    for index in range(len(words) - 2, -1, -1):
        previous = words[index]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            words[following].word = previous.word + words[following].word
            words[following].tokens = previous.tokens + words[following].tokens
            previous.word, previous.tokens = "", []
        else:
            following = index
    previous = 0
    for index in range(1, len(words)):
        if not words[previous].word.endswith(" ") and words[index].word in appended:
            words[previous].word += words[index].word
            words[previous].tokens += words[index].tokens
            words[index].word, words[index].tokens = "", []
        else:
            previous = index
    return words


def align_words(matrix: np.ndarray, text_tokens: list[int], token_bytes: Sequence[bytes],
                language: str | None) -> list[Word]:
    """Words of one window with window-relative times from its alignment matrix ([len(text_tokens) + 1, frames])."""
    if not text_tokens:
        return []
    token_indices, frame_indices = dtw(-matrix.astype(np.float64))
    # The frame at which the path first reaches each token row (the last row: end of text).
    jumps = np.diff(token_indices, prepend=-1).astype(bool)
    jump_times = frame_indices[jumps] / FRAMES_PER_SECOND
    grouped = split_words(text_tokens, token_bytes, language)
    boundaries = np.concatenate(([0], np.cumsum([len(tokens) for _, tokens in grouped])))
    return [Word(text, float(jump_times[begin]), float(jump_times[end]), tokens)
            for (text, tokens), begin, end in zip(grouped, boundaries[:-1], boundaries[1:])]


def place_words(segments: list[Segment], words: list[Word], last_speech: float) -> list[tuple[Segment, list[Word]]]:
    """A window's absolute segments, each with its words, made consistent, as the reference's add_word_timestamps does: words
    at sentence ends and after pauses no longer than twice the median word, punctuation merged, then each segment's
    first and last word reconciled with its start and end (a word far longer than its segment's edge is cut to it,
    otherwise the segment takes the word's time). `last_speech` is where speech last ended before this window."""
    durations = np.array([word.end - word.start for word in words])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    words = [replace(word) for word in words]
    if len(durations):
        for index in range(1, len(words)):
            if words[index].end - words[index].start > longest:
                if words[index].word in SENTENCE_END_MARKS:
                    words[index].end = words[index].start + longest
                elif words[index - 1].word in SENTENCE_END_MARKS:
                    words[index].start = words[index].end - longest
    merged = merge_punctuations(words)
    placed, taken, word_token, segment_end = [], 0, 0, 0
    for segment in segments:
        segment = replace(segment)
        mine = []
        # A segment's words are those whose first token is among its tokens: a word split across two segments
        # belongs to the first, and the next segment's words are counted from its own first token, not from the end
        # of the split word (counting per segment shifted every later word into the segment after its own).
        segment_end += len(segment.tokens)
        while taken < len(merged) and word_token < segment_end:
            word = merged[taken]
            if word.word.strip():  # merged marks leave empty entries; a lone space token is no word
                mine.append(replace(word, start=round(word.start, 2), end=round(word.end, 2)))
            taken += 1
            word_token += len(word.tokens)
        if mine:
            first, last = mine[0], mine[-1]
            if first.end - last_speech > median * 4 and (first.end - first.start > longest or (
                    len(mine) > 1 and mine[1].end - first.start > longest * 2)):
                if len(mine) > 1 and mine[1].end - mine[1].start > longest:
                    boundary = max(mine[1].end / 2, mine[1].end - longest)
                    first.end = mine[1].start = boundary
                first.start = max(0.0, first.end - longest)
            if segment.start < first.end and segment.start - 0.5 > first.start:
                first.start = max(0.0, min(first.end - median, segment.start))
            else:
                segment.start = first.start
            if segment.end > last.start and segment.end + 0.5 < last.end:
                last.end = max(last.start + median, segment.end)
            else:
                segment.end = last.end
            last_speech = segment.end
        placed.append((segment, mine))
    return placed
