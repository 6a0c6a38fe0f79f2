"""The slot decoder against transformers' own Whisper generation: greedy decoding with timestamps must give the same
tokens as `WhisperForConditionalGeneration.generate(..., return_timestamps=True, force_unique_generate_call=True)`,
whichever windows share the decode steps and whenever they join. CPU, float32, one torch thread."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from whisper_server.decoding import DecodeOptions
from whisper_server.engine import WhisperEngine
from whisper_server.test_model import make_test_model
from whisper_server.verify import decode_windows as decode
from whisper_server.verify import reference_tokens as reference
from whisper_server.verify import synthetic_clip as clip

# Weights 20x larger than the default initialisation make the random model's tokens depend on its audio, so a window
# decoded against another slot's cross-attention or position would show; 48 tokens per window exercise the
# timestamp rules (pairs, order, the initial limit) over longer sequences than the server tests' 16.
INIT_STD = 0.4
MAX_LENGTH = 48
PROMPTS = ("hello world", "the quick brown fox jumps over the lazy dog", "peter piper picked a peck of pickled peppers")
LANGUAGES = ("en", "de", "fr", "ja", None)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> WhisperEngine:
    torch.set_num_threads(1)  # near-ties in random weights flip with the summation order
    directory = make_test_model(tmp_path_factory.mktemp("exact") / "model", init_std=INIT_STD, max_length=MAX_LENGTH)
    engine = WhisperEngine(str(directory), device="cpu", dtype="float32", slots=4)
    engine.load()
    engine.warm_up()
    return engine


FIXED = [  # (seed, seconds, options): lengths, languages given and detected, both tasks, prompts
    (1, 1.0, DecodeOptions(language="en")),
    (2, 5.0, DecodeOptions()),
    (3, 12.5, DecodeOptions(language="de", task="translate")),
    (4, 30.0, DecodeOptions(task="translate")),
    (5, 17.0, DecodeOptions(prompt=PROMPTS[1])),
    (6, 8.0, DecodeOptions(language="fr", prompt=PROMPTS[2])),
    (7, 29.5, DecodeOptions(language="ja")),
    (8, 3.0, DecodeOptions(prompt=PROMPTS[0], task="translate")),
    # Without timestamps: <|notimestamps|> forced, no timestamp rules (beside windows that have them)
    (9, 6.0, DecodeOptions(language="en", timestamps=False)),
    (10, 21.0, DecodeOptions(task="translate", timestamps=False)),
    (11, 9.0, DecodeOptions(prompt=PROMPTS[2], timestamps=False)),
]


def test_tokens_equal_transformers_alone_and_batched(engine):
    windows = [(clip(seed, seconds), options) for seed, seconds, options in FIXED]
    expected = [reference(engine, samples, options) for samples, options in windows]
    assert all(len(tokens) >= 8 for tokens in expected), "the references exercise the rules over many tokens"
    assert len({tuple(tokens) for tokens in expected}) == len(expected), "each window decodes to its own tokens"
    alone = [decode(engine, [window], [0])[0] for window in windows]
    assert alone == expected
    # Four slots, eleven windows: the first four start together, the rest join as slots free up, mid-decode.
    together = decode(engine, windows, joins=[0, 0, 3, 5, 7, 7, 9, 20, 20, 21, 30])
    assert together == expected


def test_tokens_after_the_previous_windows_tokens_equal_transformers(engine):
    """Conditioning: a prompt of earlier windows' tokens, timestamp tokens among them, alone or after a text prompt,
    with and without timestamps, windows joining mid-decode."""
    begin = engine.special.timestamp_begin
    said = (begin, *engine._prompt_ids(PROMPTS[1])[1:], begin + 150, begin + 150, *engine._prompt_ids(PROMPTS[0])[1:],
            begin + 400)
    windows = [(clip(13, 9.0), DecodeOptions(language="en", previous_tokens=said)),
               (clip(14, 26.0), DecodeOptions(prompt=PROMPTS[2], previous_tokens=said)),
               (clip(15, 4.0), DecodeOptions(language="de", timestamps=False, previous_tokens=said))]
    expected = [reference(engine, samples, options) for samples, options in windows]
    without = [reference(engine, samples, replace(options, previous_tokens=())) for samples, options in windows]
    assert sum(a != b for a, b in zip(expected, without)) >= 2, "the previous tokens change what the windows decode"
    assert decode(engine, windows, joins=[0, 0, 2]) == expected


def test_the_448_position_limit(engine):
    """A long prompt and a real checkpoint's 224-token sample length: decoding stops at the decoder's last
    position."""
    long_prompt = " ".join(PROMPTS * 40)
    window = (clip(11, 20.0), DecodeOptions(language="en", prompt=long_prompt))
    previous = engine.sample_length
    engine.sample_length = 224
    try:
        expected = reference(engine, *window)
        got = decode(engine, [window, (clip(12, 4.0), DecodeOptions())], joins=[0, 0])[0]
    finally:
        engine.sample_length = previous
    prefix = len(engine._prompt_ids(long_prompt)) + 3  # <|startoftranscript|>, language, task
    assert prefix + len(expected) == 448, "the reference ran into the limit"
    assert got == expected


def test_random_windows_mostly_equal_transformers(engine):
    """Random lengths, options and join times. Random weights have near-ties that a different summation order can
    flip, so a few windows may differ; a rule that drifts makes most of them differ."""
    rng = random.Random(7)
    windows = []
    for seed in range(100, 140):
        options = DecodeOptions(task=rng.choice(("transcribe", "translate")), language=rng.choice(LANGUAGES),
                                prompt=rng.choice((None, None) + PROMPTS), timestamps=rng.random() < 0.75)
        if options.task == "translate" and rng.random() < 0.5:
            options = replace(options, language=None)
        windows.append((clip(seed, rng.uniform(0.5, 30.0)), options))
    expected = [reference(engine, samples, options) for samples, options in windows]
    got = decode(engine, windows, joins=sorted(rng.randrange(0, 200) for _ in windows))
    equal = sum(a == b for a, b in zip(got, expected))
    print(f"random windows equal to transformers: {equal}/{len(windows)}")
    assert equal >= 0.95 * len(windows)
