"""One window can never change another's result, at the engine level: a non-finite window leaves nothing behind in
its slots, and a prompt is text whatever characters it holds. Over HTTP: test_hostile_clients.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whisper_server.decoding import SAMPLE_RATE, DecodeOptions, Window
from whisper_server.engine import WhisperEngine
from whisper_server.scheduler import SchedulerEvents, SlotScheduler
from whisper_server.test_model import make_test_model

SLOTS = 4
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> WhisperEngine:
    torch.set_num_threads(1)
    engine = WhisperEngine(str(make_test_model(tmp_path_factory.mktemp("isolation") / "model")), device="cpu",
                           slots=SLOTS, max_new_tokens=NEW_TOKENS)
    engine.load()
    engine.warm_up()
    return engine


def clean(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, 2 * SAMPLE_RATE).astype(np.float32)


def poisoned(seed: int, value: float) -> np.ndarray:
    samples = clean(seed)
    samples[SAMPLE_RATE // 2] = value
    return samples


def decode(engine: WhisperEngine, windows: list[np.ndarray]) -> list[list[int]]:
    """Decodes the windows together, in the lowest slots, to the end; their tokens in window order."""
    slots = engine.admit([(samples, DecodeOptions(language="en")) for samples in windows])
    assert slots == list(range(len(windows))), "every window must land on the slots the others used"
    tokens: dict[int, list[int]] = {}
    while engine.busy_slots():
        tokens.update((slot, result.tokens) for slot, result in engine.step())
    return [tokens[slot] for slot in slots]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_windows_after_a_non_finite_window_on_the_same_slots_get_their_normal_tokens(engine, value):
    windows = [clean(seed) for seed in range(SLOTS)]
    normal = decode(engine, windows)
    assert all(len(tokens) > 1 for tokens in normal)
    decode(engine, [poisoned(seed, value) for seed in range(SLOTS)])
    assert decode(engine, windows) == normal, "a slot kept what the non-finite window left in its cache"


def test_a_non_finite_window_in_an_admission_leaves_the_windows_beside_it_alone(engine):
    windows = [clean(seed) for seed in range(SLOTS)]
    normal = decode(engine, windows)
    mixed = decode(engine, [poisoned(1, np.nan) if index == 1 else samples for index, samples in enumerate(windows)])
    assert [tokens for index, tokens in enumerate(mixed) if index != 1] == [normal[0], normal[2], normal[3]]
    assert decode(engine, windows) == normal


def test_special_token_text_in_a_prompt_is_text(engine):
    tokenizer = engine.processor.tokenizer
    for prompt in ("<|endoftext|>", "hello <|startoftranscript|><|en|><|notimestamps|> world", "<|0.00|> <|0.02|>"):
        ids = engine._prompt_ids(prompt)
        assert ids[0] == engine.start_of_previous, prompt
        assert all(token < engine.special.end_of_text for token in ids[1:]), f"{prompt!r} became control tokens: {ids}"
        assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids[1:])) == " " + prompt
    assert engine._prompt_ids("plain words") == engine.processor.get_prompt_ids("plain words").tolist()


def test_the_previous_windows_tokens_follow_the_prompt_within_half_the_context(engine):
    """Conditioning: the earlier windows' tokens, timestamps included, follow the prompt's in the prompt, which keeps
    its last positions // 2 - 1 tokens (OpenAI's prompt_tokens[-223:]): the newest text is never cut."""
    begin, previous = engine.special.timestamp_begin, engine.start_of_previous
    said = (begin, *engine._prompt_ids("plain words")[1:], begin + 50)
    prompt = engine._prompt_ids("the meeting notes")[1:]
    assert engine._prompt_ids(None, (), said) == [previous, *said]
    assert engine._prompt_ids("the meeting notes", (), said) == [previous, *prompt, *said]
    assert engine._prompt_ids("the meeting notes", (), said * 100) == [
        previous, *(said * 100)[-(engine.positions // 2 - 1):]]


def test_one_bad_request_in_an_admission_fails_alone(engine, monkeypatch):
    """A request the engine cannot admit (here: a prompt whose tokenizing fails) shares an admission with good ones:
    it fails, they decode to exactly what they decode alone."""
    prompts = {0: "first caller", 1: "the bad one", 2: None, 3: "last caller"}
    options = {key: DecodeOptions(language="en", prompt=prompt) for key, prompt in prompts.items()}

    def run(bad: set[int]) -> tuple[dict, dict]:
        windows, done, failed = {}, set(), {}
        scheduler = SlotScheduler(engine, SchedulerEvents(
            on_window=lambda key, index, result: windows.setdefault(key, {}).__setitem__(index, result),
            on_done=done.add, on_failed=failed.__setitem__))
        for key in prompts:
            scheduler.submit(key, options[key], [Window(0.0, clean(key))])
        prompt_ids = engine._prompt_ids

        def failing(prompt, *rest):
            if prompt in {prompts[key] for key in bad}:
                raise ValueError("the tokenizer failed on this prompt")
            return prompt_ids(prompt, *rest)

        with monkeypatch.context() as patched:
            patched.setattr(engine, "_prompt_ids", failing)
            while not scheduler.idle:
                scheduler.run_once()
        return ({key: [windows[key][index].tokens for index in sorted(windows[key])] for key in done}, failed)

    normal, none_failed = run(bad=set())
    assert none_failed == {} and set(normal) == set(prompts)
    done, failed = run(bad={1})
    assert set(failed) == {1} and isinstance(failed[1], ValueError)
    assert done == {key: tokens for key, tokens in normal.items() if key != 1}
    assert engine.busy_slots() == [] and engine.free_slots() == SLOTS
