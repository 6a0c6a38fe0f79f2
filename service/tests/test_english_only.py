"""OpenAI's real tiny.en, an English-only checkpoint: the engine forces <|startoftranscript|> alone, gives token for
token what transformers' generate gives on the same windows, and the server answers real speech with the right
words over HTTP (the official OpenAI SDK), refuses what the model cannot do with a clear 400, and says what it can."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

from speech import corpus_word_error_rate, normalize_words
from whisper_server.decoding import DecodeOptions
from whisper_server.verify import decode_windows, reference_tokens

ENGLISH_ONLY = {"multilingual": False, "tasks": ["transcribe"], "languages": ["en"]}


def test_tokens_equal_transformers_generate_on_real_speech(tiny_en_engine, speech):
    """Eight sentences through four slots, joining while others decode, some after a prompt, two without
    timestamps: each window's tokens are exactly generate(..., return_timestamps=...)'s, suppress lists and timestamp
    rules of the real checkpoint included."""
    clips = speech.short(count=8)
    windows = [(clip.samples(), DecodeOptions(language="en" if index % 2 else None,
                                              prompt="A test of the weather." if index % 3 == 0 else None,
                                              timestamps=index % 4 != 1))
               for index, clip in enumerate(clips)]
    expected = [reference_tokens(tiny_en_engine, samples, options) for samples, options in windows]
    got = decode_windows(tiny_en_engine, windows, joins=[0, 0, 2, 9, 9, 15, 30, 31])
    assert got == expected
    texts = [tiny_en_engine.processor.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in got]
    assert all(normalize_words(text) for text in texts), texts
    assert corpus_word_error_rate([c.text for c in clips], texts) < 0.3


def test_partials_spell_each_window_s_final_text_as_it_decodes(tiny_en_engine, speech):
    """Four sentences decoding with partials in one batch, two with timestamps: the text tokens the engine reports
    after each step spell the start of the window's final text, all of it without timestamps (a token a step), whole
    segments with them (each once a timestamp pair closes it; the rest comes with the result). Each token comes with
    the log-probability the final result gives it."""
    engine = tiny_en_engine
    windows = [(clip.samples(), DecodeOptions(language="en", timestamps=index % 2 == 0, partials=True, logprobs=True))
               for index, clip in enumerate(speech.short(count=4))]
    slots = engine.admit(windows)
    reported, reports, results = {slot: [] for slot in slots}, {slot: 0 for slot in slots}, {}
    while engine.busy_slots():
        results.update(engine.step())
        for slot, tokens in engine.partial_tokens().items():
            reported[slot] += tokens
            reports[slot] += 1
    for slot, (_, options) in zip(slots, windows):
        segments = results[slot].segments
        final = [pair for segment in segments for pair in zip(segment.tokens, segment.logprobs)]
        shown = engine.processor.tokenizer.decode([token for token, _ in reported[slot]])
        assert reported[slot] == final[:len(reported[slot])], "the final result's tokens and log-probabilities"
        if options.timestamps:
            assert "".join(segment.text for segment in segments).startswith(shown), shown
        else:
            assert reported[slot] == final and reports[slot] == len(results[slot].tokens) > 5, shown


def test_english_only_prefix_is_start_of_transcript_alone(tiny_en_engine):
    assert tiny_en_engine.capabilities.describe() == ENGLISH_ONLY
    start = tiny_en_engine.processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    for options in (DecodeOptions(language="en"), DecodeOptions()):
        assert tiny_en_engine._prefix(options, detected_id=None) == ([start], "en")
    assert tiny_en_engine._known_prefixes([DecodeOptions()]) == [[start]], "no detection pass needed"


@pytest.fixture(scope="module")
def sdk(tiny_en_server):
    return openai.OpenAI(base_url=tiny_en_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_transcribes_real_speech_over_http_with_the_openai_sdk(tiny_en_server, sdk, speech):
    clips = speech.short(count=6)
    texts = []
    for clip in clips:
        with open(clip.path, "rb") as handle:
            result = sdk.audio.transcriptions.create(model="whisper-1", file=handle, response_format="verbose_json")
        assert normalize_words(result.text), f"{clip.name}: empty transcript"
        assert result.language == "english"
        assert 0 <= result.segments[0].start <= result.segments[-1].end <= clip.duration + 0.01
        texts.append(result.text)
    # OpenAI's fallback samples an unsure decode again (average log-probability below -1): 0.26 on these clips.
    assert corpus_word_error_rate([c.text for c in clips], texts) < 0.3, texts
    with open(clips[0].path, "rb") as handle:
        given = sdk.audio.transcriptions.create(model="whisper-1", file=handle, language="english",
                                                response_format="verbose_json")
    assert given.text == texts[0]
    with open(speech.silence().path, "rb") as handle:  # no window at all: still English, never "unknown"
        silent = sdk.audio.transcriptions.create(model="whisper-1", file=handle, response_format="verbose_json")
    assert silent.text == "" and silent.language == "english"


def test_refuses_other_languages_and_translation_with_openai_errors(tiny_en_server, sdk, speech):
    clip = speech.short(count=1)[0]
    with open(clip.path, "rb") as handle, pytest.raises(openai.BadRequestError) as refused:
        sdk.audio.transcriptions.create(model="whisper-1", file=handle, language="de")
    error = refused.value.body
    assert error["code"] == "unsupported_language" and error["param"] == "language" and "English-only" in error["message"]
    with open(clip.path, "rb") as handle, pytest.raises(openai.BadRequestError) as refused:
        sdk.audio.translations.create(model="whisper-1", file=handle)
    error = refused.value.body
    assert error["code"] == "unsupported_task" and error["type"] == "invalid_request_error"
    assert "cannot translate" in error["message"]
    assert tiny_en_server.client.get("/readyz").status_code == 200, "the server keeps serving"


def test_capabilities_in_models_and_startup_log(tiny_en_server):
    (model,) = tiny_en_server.client.get("/v1/models").json()["data"]
    assert model["id"] == served_model_id(tiny_en_server) and model["capabilities"] == ENGLISH_ONLY
    lines = [json.loads(line) for line in tiny_en_server.log_path.read_text().splitlines() if line.startswith("{")]
    ready = [line for line in lines if line["message"] == "ready"]
    assert ready and {key: ready[0][key] for key in ENGLISH_ONLY} == ENGLISH_ONLY


def served_model_id(server) -> str:
    return server.process.args[server.process.args.index("--model") + 1].rsplit("/", 1)[-1]


def test_no_speech_prob_is_read_after_the_prompt_as_openai_reads_it(tiny_en_engine, speech):
    """OpenAI's decoder reads no_speech_prob at <|startoftranscript|>, after the prompt when there is one: the
    checkpoint's own forward pass over <|startofprev|>, the prompt and <|startoftranscript|> says what it must be.
    Windows with and without a prompt join in one admission."""
    import torch

    engine = tiny_en_engine
    clip = speech.short(count=1)[0].samples()
    silence = np.zeros(3 * 16_000, np.float32)
    windows = [(clip, DecodeOptions(prompt="The weather report for the coast.")), (clip, DecodeOptions()),
               (silence, DecodeOptions(prompt="Quiet please."))]
    slots = engine.admit(windows)
    results = {}
    while engine.busy_slots():
        results.update(engine.step())
    got = [results[slot].no_speech_prob for slot in slots]
    with torch.inference_mode():
        expected = []
        for samples, options in windows:
            tokens = engine._prompt_ids(options.prompt) + [engine.special.start_of_transcript]
            logits = engine.model(input_features=engine.log_mel([samples]), decoder_input_ids=torch.tensor([tokens])).logits
            expected.append(logits[0, -1].softmax(-1)[engine.special.no_speech].item())
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(got[0] - got[1]) > 1e-4, "the prompt changes the probability, so the test tells the two apart"


def test_feature_padding_reference_and_zeros(tiny_en_engine, speech):
    """A short window's features: the speech frames are the same either way; after them, "reference" holds the
    log-mel floor (the audio padded with silence, as transformers' feature extractor gives) and "zeros" holds 0.0
    exactly as faster-whisper's features padded by its pad_or_trim. Detection reads one frame more, as
    faster-whisper's detect_language does (the frame centred on the audio's end)."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    samples = speech.short(count=1)[0].samples()
    frames = len(samples) // 160
    reference = tiny_en_engine.log_mel([samples], padding="reference")[0].numpy()
    zeros = tiny_en_engine.log_mel([samples], padding="zeros")[0].numpy()
    transformers_features = tiny_en_engine.processor.feature_extractor(samples, sampling_rate=16_000).input_features[0]
    faster_whisper_features = pad_or_trim(FeatureExtractor()(samples)[..., :-1])
    assert np.abs(reference - transformers_features).max() < 1e-4
    assert np.abs(zeros - faster_whisper_features).max() < 1e-4
    detection = tiny_en_engine.detection_features(samples)[0].numpy()
    assert np.abs(detection - pad_or_trim(FeatureExtractor()(samples))).max() < 1e-4
    assert np.array_equal(detection[:, :frames], zeros[:, :frames]) and (detection[:, frames] != 0).all()
    assert np.array_equal(reference[:, :frames - 1], zeros[:, :frames - 1])
    assert (zeros[:, frames:] == 0).all() and np.allclose(reference[:, frames + 2:], reference.max() - 2.0)
