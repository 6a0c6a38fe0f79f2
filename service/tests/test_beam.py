"""Beam search in the slot decoder, on OpenAI's real tiny.en: five beams per window in the self-attention caches,
sharing the window's cross-attention K/V, must give exactly the tokens of OpenAI's BeamSearchDecoder (patience 1,
its MaximumLikelihoodRanker) run over transformers' model (verify.reference_beam_tokens), with and without
timestamps, for windows that join while others are part-way through their search; the kept beam's per-token
log-probabilities must equal a teacher-forced pass of the same model over its tokens (verify.reference_token_logprobs)."""

from __future__ import annotations

import pytest
import torch

from whisper_server.decoding import DecodeOptions
from whisper_server.verify import (decode_windows, reference_beam_tokens, reference_token_logprobs,
                                   reference_tokens)


@pytest.fixture(scope="module")
def beam_engine(tiny_en):
    from whisper_server.engine import WhisperEngine

    torch.set_num_threads(1)
    engine = WhisperEngine(str(tiny_en), device="cpu", dtype="float32", offline=True, slots=2, beam_size=5)
    engine.load()
    engine.warm_up()
    return engine


def test_beam_search_equals_openai_s_beam_search_decoder(beam_engine, speech):
    clips = speech.short(count=4)
    windows = [(clip.samples(), DecodeOptions(timestamps=index % 2 == 0)) for index, clip in enumerate(clips)]
    expected = [reference_beam_tokens(beam_engine, samples, options) for samples, options in windows]
    greedy = [reference_tokens(beam_engine, samples, options) for samples, options in windows]
    assert expected != greedy, "beam search finds another sequence than greedy on some window"
    # Two slots, four windows: the last two join as the first ones finish.
    assert decode_windows(beam_engine, windows, joins=[0, 0, 3, 4]) == expected


def test_the_beam_step_never_waits_for_the_device(beam_engine, speech):
    """The step with beams (its reorder and finished candidates) and with samples at a fallback temperature has no
    host read or host-built tensor: it can be captured as a CUDA graph like the greedy step."""
    from test_decoder import HostReads

    samples = speech.short(count=1)[0].samples()
    beam_engine.admit([(samples, DecodeOptions()), (samples, DecodeOptions(temperature=0.6))])
    mode = HostReads()
    with torch.inference_mode(), mode:
        for _ in range(4):
            beam_engine.decoder._step(2)
    assert mode.found == []
    beam_engine.release(beam_engine.busy_slots())


def test_samples_at_a_fallback_temperature_finish_as_one_result(beam_engine, speech):
    """Five samples of a window at temperature 0.8 beside a beam search: the window finishes once all five have, with
    one sequence whose figures are its own, and the same one as when the window is sampled alone (each sample draws
    from its window's seed and its place in the group)."""
    clips = speech.short(count=2)
    windows = [(clips[0].samples(), DecodeOptions(temperature=0.8)), (clips[1].samples(), DecodeOptions())]
    slots = beam_engine.admit(windows)
    results = {}
    while beam_engine.busy_slots():
        results.update(beam_engine.step())
    sampled = results[slots[0]]
    assert sampled.temperature == 0.8 and sampled.tokens and sampled.segments
    assert sampled.avg_logprob < 0
    assert decode_windows(beam_engine, windows[:1], joins=[0]) == [sampled.tokens]


def test_the_chosen_beam_s_token_log_probabilities(beam_engine, speech):
    """include[]=logprobs with beams: the log-probabilities of the beam the ranker kept, token by token, are what a
    teacher-forced pass of the model gives each of its tokens after its own tokens before it (verify's
    reference_token_logprobs), so they followed their beam through every reorder of the search; with end of text's
    they add up to its sum."""
    # Two of the first test's clips (a slot each), whose kept beams were reordered on their way.
    windows = [(clip.samples(), DecodeOptions(timestamps=False, logprobs=True)) for clip in speech.short(count=4)[:2]]
    slots = beam_engine.admit(windows)
    results = {}
    while beam_engine.busy_slots():
        results.update(beam_engine.step())
    for slot, (samples, options) in zip(slots, windows):
        result = results[slot]
        logprobs = [value for segment in result.segments for value in segment.logprobs]
        assert len(logprobs) == len(result.tokens) > 3
        assert logprobs == pytest.approx(reference_token_logprobs(beam_engine, samples, options, result.tokens),
                                         abs=1e-3)  # float32 on CPU: within 4e-6
        assert -0.5 < result.avg_logprob * (len(result.tokens) + 1) - sum(logprobs) <= 1e-4
