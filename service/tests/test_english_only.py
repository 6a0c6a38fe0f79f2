"""OpenAI's real tiny.en, an English-only checkpoint: the engine forces <|startoftranscript|> alone, gives token for
token what transformers' generate gives on the same windows, and the server answers real speech with the right
words over HTTP (the official OpenAI SDK), refuses what the model cannot do with a clear 400, and says what it can."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from speech import word_errors, normalize_words
from whisper_server.decoding import DecodeOptions
from whisper_server.engine import WhisperEngine
from whisper_server.verify import decode_windows, reference_tokens

ENGLISH_ONLY = {"multilingual": False, "tasks": ["transcribe"], "languages": ["en"]}


@pytest.fixture(scope="module")
def engine(tiny_en) -> WhisperEngine:
    torch.set_num_threads(1)
    engine = WhisperEngine(str(tiny_en), device="cpu", dtype="float32", offline=True, slots=4)
    engine.load()
    engine.warm_up()
    return engine


def test_tokens_equal_transformers_generate_on_real_speech(engine, speech):
    """Eight sentences through four slots, joining while others decode: each window's tokens are exactly
    generate(..., return_timestamps=True)'s, suppress lists and timestamp rules of the real checkpoint included."""
    clips = speech.short(count=8)
    windows = [(clip.samples(), DecodeOptions(language="en" if index % 2 else None))
               for index, clip in enumerate(clips)]
    expected = [reference_tokens(engine, samples, options) for samples, options in windows]
    got = decode_windows(engine, windows, joins=[0, 0, 2, 9, 9, 15, 30, 31])
    assert got == expected
    texts = [engine.processor.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in got]
    assert all(normalize_words(text) for text in texts), texts
    assert corpus_wer([c.text for c in clips], texts) < 0.3


def test_english_only_prefix_is_start_of_transcript_alone(engine):
    assert engine.capabilities.describe() == ENGLISH_ONLY
    start = engine.processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    for options in (DecodeOptions(language="en"), DecodeOptions()):
        assert engine._prefix(options, detected_id=None) == ([start], "en")
    assert engine._known_prefixes([DecodeOptions()]) == [[start]], "no detection pass needed"


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    return (sum(word_errors(r, h) for r, h in zip(references, hypotheses))
            / sum(len(normalize_words(r)) for r in references))


@pytest.fixture(scope="module")
def english_server(start_server, tiny_en):
    return start_server("--max-batch-size", "4", model=tiny_en)


@pytest.fixture(scope="module")
def sdk(english_server):
    return openai.OpenAI(base_url=english_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_transcribes_real_speech_over_http_with_the_openai_sdk(english_server, sdk, speech):
    clips = speech.short(count=6)
    texts = []
    for clip in clips:
        with open(clip.path, "rb") as handle:
            result = sdk.audio.transcriptions.create(model="whisper-1", file=handle, response_format="verbose_json")
        assert normalize_words(result.text), f"{clip.name}: empty transcript"
        assert result.language == "english"
        assert 0 <= result.segments[0].start <= result.segments[-1].end <= clip.duration + 0.01
        texts.append(result.text)
    assert corpus_wer([c.text for c in clips], texts) < 0.25, texts
    with open(clips[0].path, "rb") as handle:
        given = sdk.audio.transcriptions.create(model="whisper-1", file=handle, language="en")
    assert given.text == texts[0]


def test_refuses_other_languages_and_translation_with_openai_errors(english_server, sdk, speech):
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
    assert english_server.client.get("/readyz").status_code == 200, "the server keeps serving"


def test_capabilities_in_models_and_startup_log(english_server):
    (model,) = english_server.client.get("/v1/models").json()["data"]
    assert model["id"] == english_server_model_id(english_server) and model["capabilities"] == ENGLISH_ONLY
    lines = [json.loads(line) for line in english_server.log_path.read_text().splitlines() if line.startswith("{")]
    ready = [line for line in lines if line["message"] == "ready"]
    assert ready and {key: ready[0][key] for key in ENGLISH_ONLY} == ENGLISH_ONLY


def english_server_model_id(server) -> str:
    return server.process.args[server.process.args.index("--model") + 1].rsplit("/", 1)[-1]
