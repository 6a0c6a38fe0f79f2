"""Live transcription over OpenAI's Realtime protocol (/v1/realtime?intent=transcription), with the official OpenAI
SDK's realtime client against a real server on OpenAI's real tiny.en: espeak-ng sentences with pauses, streamed as
24 kHz PCM16 in 100 ms chunks (at real-time pace where pacing matters), every server event parsed with openai's own
types."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from pydantic import TypeAdapter

from speech import SAMPLE_RATE, corpus_word_error_rate

API_KEY = "live-test-key"
SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
CHUNK_SECONDS = 0.1
PAUSE_SECONDS = 1.0  # between sentences: longer than server_vad's default 500 ms of silence
MAX_WER = 0.3  # over a test's turns: tiny.en on espeak-ng's voices (as test_english_only); a lost or leaked
# sentence breaks it


@pytest.fixture(scope="module")
def live_server(start_server, tiny_en):
    return start_server("--max-batch-size", "8", "--api-key", API_KEY, "--max-realtime-sessions", "4",
                        "--realtime-idle-seconds", "4", "--realtime-max-message-mb", "1",
                        "--realtime-max-buffered-seconds", "45", "--realtime-max-pending-events", "64",
                        "--drain-seconds", "30", model=tiny_en)


@pytest.fixture(scope="module")
def sentences(speech):
    return speech.short(count=6)


def pcm24k(samples: np.ndarray, codec: str = "s16le") -> bytes:
    """16 kHz float samples as ffmpeg writes them at 24 kHz PCM16 (or 8 kHz G.711 for mulaw/alaw)."""
    rate = "24000" if codec == "s16le" else "8000"
    source = (np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1",
                           "-i", "pipe:0", "-ar", rate, "-f", codec, "pipe:1"],
                          input=source, capture_output=True, check=True).stdout


def spoken(clips, pause: float = PAUSE_SECONDS) -> np.ndarray:
    gap = np.zeros(int(pause * SAMPLE_RATE), np.float32)
    return np.concatenate([part for clip in clips for part in (clip.samples(), gap)])


def connect(server, **options):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    return client.realtime.connect(extra_query={"intent": "transcription"}, **options)


async def receive(connection, timeout: float = 60) -> dict:
    """The next server event, checked against openai-python's types (every field name and shape), as a dict."""
    raw = await asyncio.wait_for(connection.recv_bytes(), timeout)
    SERVER_EVENT.validate_json(raw)
    return json.loads(raw)


async def events_until(connection, done, timeout: float = 120) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout
    while not events or not done(events[-1], events):
        events.append(await receive(connection, max(0.1, deadline - time.monotonic())))
    return events


def completed_count(count: int):
    return lambda event, events: sum(e["type"].endswith("transcription.completed") for e in events) == count


async def stream(connection, audio: bytes, pace: float | None, chunk_bytes: int = int(24_000 * 2 * CHUNK_SECONDS)):
    """Appends in 100 ms chunks, at `pace` x real time (None: as fast as the socket takes them)."""
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(audio), chunk_bytes)):
        await connection.input_audio_buffer.append(audio=base64.b64encode(audio[offset:offset + chunk_bytes]).decode())
        if pace:
            await asyncio.sleep(max(0.0, started + (index + 1) * CHUNK_SECONDS / pace - time.monotonic()))


def turns(events: list[dict]) -> dict[str, dict]:
    """Per item: its deltas joined, its completed transcript, and the order of its events."""
    items: dict[str, dict] = {}
    for event in events:
        if "item_id" in event:
            item = items.setdefault(event["item_id"], {"deltas": "", "types": []})
            item["types"].append(event["type"])
            if event["type"].endswith("transcription.delta"):
                item["deltas"] += event["delta"]
            elif event["type"].endswith("transcription.completed"):
                item["transcript"] = event["transcript"]
    return items


def test_server_vad_finds_each_turn_of_live_speech_and_transcribes_it(live_server, sentences):
    clips = sentences[:3]
    audio = pcm24k(spoken(clips))
    latency_before = live_server.metric("whisper_realtime_turn_latency_seconds_count")

    async def run():
        async with connect(live_server) as connection:
            created = await receive(connection)
            assert created["type"] == "session.created"
            assert created["session"]["audio"]["input"]["turn_detection"] == {
                "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
            sender = asyncio.create_task(stream(connection, audio, pace=1.0))  # real time: the test of pacing
            events = await events_until(connection, completed_count(3))
            await sender
            return events

    events = asyncio.run(run())
    items = turns(events)
    assert len(items) == 3, [e["type"] for e in events]
    for item, clip in zip(items.values(), clips):
        assert item["types"][:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                     "input_audio_buffer.committed"]
        assert item["types"][-1].endswith("transcription.completed")
        assert item["deltas"] == item["transcript"], "the deltas add up to the completed transcript"
    assert_words(clips, items)
    starts = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    onsets, at = [], 0.0
    for clip in clips:  # each clip's speech starts after its 0.3 s of edge silence
        onsets.append(at + clip.sentences[0].start)
        at += clip.duration + PAUSE_SECONDS
    assert all(abs(start / 1000 - (onset - 0.3)) < 0.3 for start, onset in zip(starts, onsets)), (starts, onsets)
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert [e["previous_item_id"] for e in committed] == [None, *[e["item_id"] for e in committed[:-1]]]
    assert live_server.metric("whisper_realtime_turn_latency_seconds_count") == latency_before + 3
    assert live_server.metric("whisper_realtime_audio_seconds_total") >= len(audio) / 48_000 - 0.01


def assert_words(clips, items: dict[str, dict]) -> None:
    texts = [item["transcript"] for item in items.values()]
    assert corpus_word_error_rate([clip.text for clip in clips], texts) < MAX_WER, texts


def file_answer(server, audio: bytes, codec: str) -> str:
    """The HTTP API's transcript of the same G.711 audio, as a WAV file."""
    wav = subprocess.run(["ffmpeg", "-loglevel", "error", "-f", codec, "-ar", "8000", "-ac", "1", "-i", "pipe:0",
                          "-c:a", f"pcm_{codec}", "-f", "wav", "pipe:1"], input=audio, capture_output=True,
                         check=True).stdout
    answer = httpx.post(server.url + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {API_KEY}"},
                        files={"file": ("call.wav", wav)}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["text"]


def test_manual_commits_in_each_audio_format(live_server, sentences):
    formats = (("mulaw", {"type": "audio/pcmu"}), ("alaw", {"type": "audio/pcma"}),
               ("s16le", {"type": "audio/pcm", "rate": 24000}))
    sent = [pcm24k(clip.samples(), codec) for clip, (codec, _) in zip(sentences[3:], formats)]

    async def run():
        async with connect(live_server) as connection:
            await receive(connection)
            results = []
            for audio, (codec, audio_format) in zip(sent, formats):
                await connection.session.update(session={"type": "transcription", "audio": {"input": {
                    "format": audio_format, "turn_detection": None, "transcription": {"model": "whisper-1"}}}})
                updated = await receive(connection)
                assert updated["type"] == "session.updated"
                assert updated["session"]["audio"]["input"]["format"] == audio_format
                assert updated["session"]["audio"]["input"]["turn_detection"] is None
                await stream(connection, audio, pace=None, chunk_bytes=len(audio) // 7 + 1)  # odd sizes too
                await connection.input_audio_buffer.commit()
                results.append(await events_until(connection, completed_count(1)))
            return results

    items = []
    for events in asyncio.run(run()):
        assert [e["type"] for e in events][0] == "input_audio_buffer.committed"
        assert not any(e["type"].startswith("input_audio_buffer.speech") for e in events), "no VAD: no speech events"
        (item,) = turns(events).values()
        assert item["deltas"] == item["transcript"]
        items.append(item["transcript"])
    # Telephone audio (8 kHz) is hard for tiny.en: a G.711 session must hear what the same G.711 file says.
    for audio, (codec, _), text in zip(sent[:2], formats, items):
        assert corpus_word_error_rate([file_answer(live_server, audio, codec)], [text]) < 0.15, text
    assert corpus_word_error_rate([sentences[5].text], [items[2]]) < MAX_WER, items[2]


def error_of(event: dict) -> dict:
    assert event["type"] == "error", event
    return event["error"]


def test_every_bad_input_gets_an_error_event_and_the_session_goes_on(live_server, sentences):
    clip = sentences[0]
    big_append = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (1 << 20)})

    async def keep_talking(bystander):  # silence every 100 ms, as a quiet microphone sends
        while True:
            await bystander.input_audio_buffer.append(audio=base64.b64encode(bytes(4800)).decode())
            await asyncio.sleep(0.1)

    async def run():
        async with connect(live_server) as bystander, connect(live_server) as connection:
            await receive(bystander)
            talking = asyncio.create_task(keep_talking(bystander))
            await receive(connection)
            await connection.session.update(session={"type": "transcription",
                                                     "audio": {"input": {"turn_detection": None}}})
            await receive(connection)
            errors = {}
            for name, raw in (("json", "{not json"), ("type", json.dumps({"type": "response.create"})),
                              ("base64", json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"})),
                              ("format", json.dumps({"type": "session.update", "session": {
                                  "type": "transcription", "audio": {"input": {"format": {"type": "audio/g729"}}}}})),
                              ("rate", json.dumps({"type": "session.update", "session": {
                                  "type": "transcription", "audio": {"input": {"format": {
                                      "type": "audio/pcm", "rate": 16000}}}}})),
                              ("empty commit", json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"})),
                              ("binary", b"\x00\x01"), ("too large", big_append)):
                await connection.send_raw(raw)
                errors[name] = error_of(await receive(connection))
            # More audio than --realtime-max-buffered-seconds (45 s) ahead of the decoder: the excess append is refused.
            second = base64.b64encode(bytes(48_000)).decode()
            for _ in range(45):
                await connection.input_audio_buffer.append(audio=second)
            await connection.input_audio_buffer.append(audio=second)
            errors["buffer"] = error_of(await receive(connection))
            await connection.input_audio_buffer.clear()
            assert (await receive(connection))["type"] == "input_audio_buffer.cleared"
            # The session still transcribes, with the format it had.
            await stream(connection, pcm24k(clip.samples()), pace=None)
            await connection.input_audio_buffer.commit()
            events = await events_until(connection, completed_count(1))
            with pytest.raises(asyncio.TimeoutError):  # the bystander heard nothing of the other's errors
                await receive(bystander, timeout=0.5)
            talking.cancel()
            return errors, events

    errors, events = asyncio.run(run())
    assert {name: error["code"] for name, error in errors.items()} == {
        "json": "invalid_json", "type": "unknown_event_type", "base64": "invalid_base64",
        "format": "unsupported_format", "rate": "unsupported_format", "empty commit": "input_audio_buffer_commit_empty",
        "binary": "invalid_frame", "too large": "message_too_large", "buffer": "buffer_full"}
    assert errors["empty commit"]["event_id"] == "c1", "the error names the client event that caused it"
    assert "--realtime-max-message-mb" in errors["too large"]["message"]
    assert "--realtime-max-buffered-seconds" in errors["buffer"]["message"]
    assert all(error["type"] == "invalid_request_error" for error in errors.values())
    assert_words([clip], turns(events))
