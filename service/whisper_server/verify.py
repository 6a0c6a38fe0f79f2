"""Token-for-token comparison of the slot engine with transformers' own Whisper generation, for the exactness tests
and for measuring the share of equal windows on a GPU (service/bench/exactness.py)."""

from __future__ import annotations

import numpy as np
import torch
from transformers.generation.logits_process import (SuppressTokensAtBeginLogitsProcessor,
                                                    SuppressTokensLogitsProcessor, WhisperTimeStampLogitsProcessor)

from .decoding import SAMPLE_RATE, DecodeOptions
from .engine import WhisperEngine


def synthetic_clip(seed: int, seconds: float) -> np.ndarray:
    """A voiced, noisy harmonic signal that differs per seed, so each window has its own encoder output."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = rng.uniform(90, 300) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) * rng.uniform(0.1, 1) / k for k in range(1, 6))
    return (0.2 * voiced / np.abs(voiced).max() + rng.normal(0, 0.02, len(t))).astype(np.float32)


def reference_tokens(engine: WhisperEngine, samples: np.ndarray, options: DecodeOptions) -> list[int]:
    """transformers' greedy tokens for one window alone (generate(..., return_timestamps=options.timestamps,
    force_unique_generate_call=True) under the engine's length rule), forced prefix and end of text dropped."""
    # <|startoftranscript|>(, language, task)(, <|notimestamps|>)
    forced = (3 if engine.capabilities.multilingual else 1) + (not options.timestamps)
    prompt_ids = engine._prompt_ids(options.prompt, options.keywords, options.previous_tokens)
    prefix_length = len(prompt_ids) + forced
    arguments = dict(return_timestamps=options.timestamps, force_unique_generate_call=True,
                     max_new_tokens=engine._limit(prefix_length, engine.max_new_tokens) - prefix_length)
    if engine.capabilities.multilingual:  # generate refuses a task or language for English-only checkpoints
        arguments.update(task=options.task, language=options.language)
    if prompt_ids:
        arguments["prompt_ids"] = torch.tensor(prompt_ids, device=engine.device)
    with torch.inference_mode():
        sequence = engine.model.generate(engine.log_mel([samples]).to(engine.dtype), **arguments)[0].tolist()
    start = sequence.index(engine.special.start_of_transcript) + forced - (not options.timestamps)
    if not options.timestamps:
        assert sequence[start] == engine.special.no_timestamps, "generate forces <|notimestamps|> without timestamps"
        start += 1
    generated = sequence[start:]
    end_of_text = engine.special.end_of_text
    return generated[:generated.index(end_of_text)] if end_of_text in generated else generated


def decode_windows(engine: WhisperEngine, windows: list[tuple[np.ndarray, DecodeOptions]],
                   joins: list[int]) -> list[list[int]]:
    """The engine's tokens per window. Window i is offered at step joins[i] (or as soon after as a slot is free), so
    windows join while others are part-way through decoding."""
    results: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    waiting = sorted(range(len(windows)), key=lambda i: joins[i])
    step = 0
    while len(results) < len(windows):
        ready = [i for i in waiting if joins[i] <= step][:engine.free_slots()]
        if ready:
            owner.update(zip(engine.admit([windows[i] for i in ready]), ready))
            waiting = [i for i in waiting if i not in ready]
        if engine.busy_slots():
            for slot, result in engine.step():
                results[owner.pop(slot)] = result.tokens
        step += 1
    return [results[i] for i in range(len(windows))]


def reference_processors(engine, options: DecodeOptions, begin: int) -> list:
    """transformers' own Whisper logits processors for a window whose generated tokens start at `begin`: the suppress
    lists and the timestamp rules (or <|notimestamps|> suppressed)."""
    generation = engine.model.generation_config
    processors = [SuppressTokensLogitsProcessor(generation.suppress_tokens),
                  SuppressTokensAtBeginLogitsProcessor(generation.begin_suppress_tokens, begin)]
    if options.timestamps:
        processors.append(WhisperTimeStampLogitsProcessor(generation, begin))
    else:
        processors.append(SuppressTokensLogitsProcessor([engine.special.no_timestamps]))
    return processors


@torch.inference_mode()
def reference_token_logprobs(engine, samples: np.ndarray, options: DecodeOptions, tokens: list[int]) -> list[float]:
    """Each generated token's log-probability under Whisper's decoding rules at temperature 1, from one teacher-forced
    pass of transformers' model (no cache) over the window's prefix and `tokens`: what the slot decoder must report
    for them, whichever sequence rows they were decoded in."""
    prefix = engine._prefix(options, None)[0]
    begin = len(prefix)
    ids = torch.tensor([list(prefix) + list(tokens)], device=engine.device)
    encoded = engine.model.model.encoder(engine.log_mel([samples]).to(engine.dtype)).last_hidden_state
    logits = engine.model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits[0].float()
    processors = reference_processors(engine, options, begin)
    logprobs = []
    for index, token in enumerate(tokens):
        scores = logits[begin + index - 1][None].clone()  # the position before the token predicts it
        for processor in processors:
            scores = processor(ids[:, :begin + index], scores)
        logprobs.append(torch.log_softmax(scores, dim=-1)[0, token].item())
    return logprobs


@torch.inference_mode()
def reference_beam_tokens(engine, samples: np.ndarray, options: DecodeOptions, beam_size: int = 5,
                          patience: float = 1.0) -> list[int]:
    """OpenAI's BeamSearchDecoder for one window alone (whisper/decoding.py: update, finalize, and the
    MaximumLikelihoodRanker with length_penalty None), run step by step over transformers' model without a cache and
    with transformers' own Whisper logits processors (suppress lists, timestamp rules): the reference the slot
    decoder's beam search must equal. Generated tokens, end of text dropped."""
    model, eot = engine.model, engine.special.end_of_text
    prefix = engine._prefix(options, None)[0]
    begin = len(prefix)
    processors = reference_processors(engine, options, begin)
    encoded = model.model.encoder(engine.log_mel([samples]).to(engine.dtype)).last_hidden_state
    max_candidates = round(beam_size * patience)
    tokens = [list(prefix)] * beam_size
    sum_logprobs = [0.0] * beam_size
    finished: dict[tuple, float] = {}
    for _ in range(engine._limit(begin, engine.max_new_tokens) - begin):
        ids = torch.tensor(tokens)
        logits = model(encoder_outputs=(encoded.expand(len(tokens), -1, -1),), decoder_input_ids=ids).logits[:, -1]
        logits = logits.float()
        for processor in processors:
            logits = processor(ids, logits)
        logprobs = torch.log_softmax(logits, dim=-1)
        scores, sources = {}, {}
        for j in range(beam_size):
            for logprob, token in zip(*logprobs[j].topk(beam_size + 1)):
                sequence = tuple(tokens[j] + [token.item()])
                scores[sequence] = sum_logprobs[j] + logprob.item()
                sources[sequence] = j
        next_tokens, next_sums, newly = [], [], {}
        for sequence in sorted(scores, key=scores.get, reverse=True):
            if sequence[-1] == eot:
                newly[sequence] = scores[sequence]
            else:
                next_tokens.append(list(sequence))
                next_sums.append(scores[sequence])
                if len(next_tokens) == beam_size:
                    break
        for sequence in sorted(newly, key=newly.get, reverse=True):
            if len(finished) >= max_candidates:
                break
            finished[sequence] = newly[sequence]
        tokens, sum_logprobs = next_tokens, next_sums
        if len(finished) >= max_candidates:
            break
    if len(finished) < beam_size:
        for j in list(np.argsort(sum_logprobs))[::-1]:
            finished[tuple(tokens[j] + [eot])] = sum_logprobs[j]
            if len(finished) >= beam_size:
                break

    def generated(sequence: tuple) -> list[int]:
        text = list(sequence[begin:])
        return text[:text.index(eot)] if eot in text else text

    best = max(finished, key=lambda sequence: finished[sequence] / max(len(generated(sequence)), 1))
    return generated(best)
