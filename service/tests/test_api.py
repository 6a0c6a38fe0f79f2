"""The OpenAI-compatible API and the operations endpoints, over HTTP, on a real server with the tiny model."""

from __future__ import annotations

import json
import re

import openai
import pytest

from conftest import post_audio

SEGMENT_KEYS = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
                "no_speech_prob"}


def test_health_ready_and_models(server):
    assert server.client.get("/healthz").json() == {"status": "ok"}
    ready = server.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["whisper-tiny-random"]
    capabilities = models["data"][0]["capabilities"]
    assert capabilities["multilingual"] is True and capabilities["tasks"] == ["transcribe", "translate"]
    assert {"en", "de", "ja"} <= set(capabilities["languages"])


def test_metrics_lists_every_contract_metric(server):
    text = server.metrics_text()
    for name in ("http_requests_total", "http_request_duration_seconds_bucket", "whisper_requests_in_flight",
                 "whisper_queue_depth", "whisper_queued_audio_seconds", "whisper_audio_seconds_total",
                 "whisper_batch_size_bucket", "whisper_decode_step_seconds_bucket", "whisper_model_load_seconds"):
        assert re.search(rf"^{name}[ {{]", text, re.M), f"{name} missing from /metrics"
    assert server.metric("whisper_model_load_seconds") > 0


def test_metrics_only_on_their_own_port(server):
    """The load balancer forwards the API port only: /metrics is not served there."""
    response = server.client.get("/metrics")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert "http_requests_total" not in response.text
    assert "http_requests_total" in server.metrics_text()


@pytest.mark.parametrize("name", ["speech.wav", "speech.mp3", "speech.ogg", "speech.flac", "speech.m4a", "speech_44k.wav"])
def test_transcribes_each_audio_format(server, audio, name):
    response = post_audio(server.client, audio[name], model="whisper-1", response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "transcribe"
    assert body["text"] and body["segments"]
    assert body["duration"] == pytest.approx(expected_duration(audio[name]), abs=0.1)
    for segment in body["segments"]:
        assert set(segment) == SEGMENT_KEYS
        assert 0 <= segment["start"] <= segment["end"] <= body["duration"] + 0.01
        assert 0 <= segment["no_speech_prob"] <= 1 and segment["compression_ratio"] > 0 and segment["avg_logprob"] <= 0


def expected_duration(path) -> float:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return float(stream.duration * stream.time_base) if stream.duration else float(container.duration / 1e6)


def test_response_formats(server, audio):
    verbose = post_audio(server.client, audio["speech.wav"], response_format="verbose_json").json()
    segments = verbose["segments"]

    as_json = post_audio(server.client, audio["speech.wav"], response_format="json")
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["text"] == verbose["text"]
    assert post_audio(server.client, audio["speech.wav"]).json()["text"] == verbose["text"]  # json is the default

    as_text = post_audio(server.client, audio["speech.wav"], response_format="text")
    assert as_text.headers["content-type"].startswith("text/plain")
    assert as_text.text == verbose["text"] + "\n"

    srt = post_audio(server.client, audio["speech.wav"], response_format="srt").text
    blocks = [block.split("\n") for block in srt.strip("\n").split("\n\n")]
    assert [int(block[0]) for block in blocks] == list(range(1, len(segments) + 1))
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", block[1]) for block in blocks)
    assert [block[2] for block in blocks] == [s["text"].strip() for s in segments]  # a cue without the leading space

    vtt = post_audio(server.client, audio["speech.wav"], response_format="vtt").text
    assert vtt.startswith("WEBVTT\n\n")
    cues = re.findall(r"^(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})$", vtt, re.M)
    assert len(cues) == len(segments)


def test_translation_endpoint(server, audio):
    response = post_audio(server.client, audio["speech.mp3"], route="/v1/audio/translations", response_format="verbose_json")
    assert response.status_code == 200, response.text
    assert response.json()["task"] == "translate"


def test_language_prompt_and_temperature_are_accepted(server, audio):
    body = post_audio(server.client, audio["speech.wav"], language="de", prompt="Kubernetes, Karpenter",
                      temperature="0.4", response_format="verbose_json", **{"timestamp_granularities[]": "segment"}).json()
    assert body["language"] == "german"
    assert {s["temperature"] for s in body["segments"]} == {0.4}
    long_prompt = post_audio(server.client, audio["speech.wav"], prompt="Kubernetes on EKS with GPUs. " * 300)
    assert long_prompt.status_code == 200, "a prompt longer than the decoder's context keeps its last tokens"


def test_long_audio_has_ordered_timestamps_across_windows(server, audio):
    body = post_audio(server.client, audio["long.mp3"], response_format="verbose_json").json()
    assert body["duration"] == pytest.approx(75, abs=0.2)
    starts = [s["start"] for s in body["segments"]]
    ends = [s["end"] for s in body["segments"]]
    assert all(a <= b for a, b in zip(ends, starts[1:])), "segments must not overlap or go back in time"
    assert all(s <= e for s, e in zip(starts, ends))
    assert max(ends) > 60, "the third window's segments are offset past 60 s"
    assert [s["id"] for s in body["segments"]] == list(range(len(starts)))


def test_silence_is_not_transcribed(server, audio):
    silent = post_audio(server.client, audio["silence.wav"], response_format="verbose_json").json()
    assert silent["text"] == "" and silent["segments"] == []
    assert silent["duration"] == pytest.approx(10, abs=0.05)
    tone = post_audio(server.client, audio["tone_44k.wav"], response_format="verbose_json").json()
    assert tone["text"] == "" and tone["segments"] == [], "a tone is not speech: it never reaches the model"
    mixed = post_audio(server.client, audio["silence_then_speech.wav"], response_format="verbose_json").json()
    assert mixed["segments"], "the speech after the silence is transcribed"
    assert min(s["start"] for s in mixed["segments"]) >= 25, "nothing is made up for the silent first window"


def test_request_id_is_echoed(server, audio):
    response = server.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert len(server.client.get("/healthz").headers["x-request-id"]) == 32


def test_requests_are_counted_by_route_template(server, audio):
    before = server.metric("http_requests_total", route="/v1/audio/transcriptions", status="200")
    post_audio(server.client, audio["speech.wav"])
    server.client.get("/no/such/path/12345")
    assert server.metric("http_requests_total", route="/v1/audio/transcriptions", status="200") == before + 1
    assert server.metric("http_requests_total", route="unmatched", status="404") >= 1
    assert "/no/such/path" not in server.metrics_text()
    assert server.metric("whisper_audio_seconds_total") > 0


def test_web_page_is_served(server):
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert server.client.get("/static/does-not-exist.js").status_code == 404


def test_official_openai_sdk_works_unchanged(server, audio):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    with open(audio["speech.mp3"], "rb") as handle:
        verbose = client.audio.transcriptions.create(model="whisper-1", file=handle, response_format="verbose_json",
                                                     timestamp_granularities=["segment"])
    assert verbose.text and verbose.segments and verbose.segments[0].end >= verbose.segments[0].start
    with open(audio["speech.wav"], "rb") as handle:
        assert client.audio.translations.create(model="whisper-1", file=handle).text
    with open(audio["speech.wav"], "rb") as handle:
        assert isinstance(client.audio.transcriptions.create(model="whisper-1", file=handle, response_format="srt"), str)
    assert [m.id for m in client.models.list()] == ["whisper-tiny-random"]
    with pytest.raises(openai.BadRequestError) as error:
        with open(audio["text.txt"], "rb") as handle:
            client.audio.transcriptions.create(model="whisper-1", file=handle)
    assert error.value.body["code"] == "invalid_audio"


def test_each_request_logs_one_json_line(server, audio):
    with open(audio["speech.wav"], "rb") as handle:
        server.client.post("/v1/audio/transcriptions", files={"file": handle}, headers={"X-Request-ID": "log-check-1"})
    server.client.get("/readyz")
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "log-check-1"]
    assert len(mine) == 1
    assert mine[0]["route"] == "/v1/audio/transcriptions" and mine[0]["status"] == 200
    assert mine[0]["audio_seconds"] > 1 and mine[0]["duration_seconds"] > 0
    assert not any(line.get("route") == "/readyz" and line.get("status") == 200 for line in lines)
