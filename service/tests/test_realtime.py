"""Live transcription over OpenAI's Realtime protocol (/v1/realtime?intent=transcription), with the official OpenAI
SDK's realtime client against a real server on OpenAI's real tiny.en: espeak-ng sentences with pauses, streamed as
24 kHz PCM16 in 100 ms chunks (at real-time pace where pacing matters), every server event parsed with openai's own
types. The last test drains the module's server."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import signal
import socket
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest
import websockets
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from pydantic import TypeAdapter

from speech import SAMPLE_RATE, corpus_word_error_rate
from whisper_server.realtime import decode_base64

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
                        "--realtime-max-buffered-seconds", "90", "--realtime-max-pending-events", "64",
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


async def without_turn_detection(connection) -> None:
    """Reads session.created, turns server VAD off (a turn ends when the client commits) and reads session.updated."""
    await receive(connection)
    await connection.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
    await receive(connection)


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
        committed, added, done = events[:3]
        assert [event["type"] for event in events[:3]] == [
            "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
        for event in (added, done):  # the committed audio as a user message item, as OpenAI's GA API adds it
            assert event["item"]["id"] == committed["item_id"] and event["item"]["role"] == "user"
            assert event["item"]["content"] == [{"type": "input_audio", "transcript": None}]
            assert event["previous_item_id"] == committed["previous_item_id"]
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
            await without_turn_detection(connection)
            errors = {}
            for name, raw in (("json", "{not json"), ("type", json.dumps({"type": "response.create"})),
                              ("base64", json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"})),
                              ("format", json.dumps({"type": "session.update", "session": {
                                  "type": "transcription", "audio": {"input": {"format": {"type": "audio/g729"}}}}})),
                              ("rate", json.dumps({"type": "session.update", "session": {
                                  "type": "transcription", "audio": {"input": {"format": {
                                      "type": "audio/pcm", "rate": 16000}}}}})),
                              ("language", json.dumps({"type": "session.update", "session": {
                                  "type": "transcription", "audio": {"input": {"transcription": {
                                      "language": "german"}}}}})),
                              ("include", json.dumps({"type": "session.update", "session": {
                                  "type": "transcription", "include": ["item.input_audio_transcription.words"]}})),
                              ("empty commit", json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"})),
                              ("binary", b"\x00\x01"), ("too large", big_append)):
                await connection.send_raw(raw)
                errors[name] = error_of(await receive(connection))
            # A language's English name is taken as the file endpoints take it.
            await connection.session.update(session={"type": "transcription",
                                                     "audio": {"input": {"transcription": {"language": "english"}}}})
            updated = await receive(connection)
            assert updated["type"] == "session.updated", updated
            assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"
            # More audio than --realtime-max-buffered-seconds (90 s) ahead of the decoder: the excess append is refused.
            second = base64.b64encode(bytes(48_000)).decode()
            for _ in range(90):
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
        "format": "unsupported_format", "rate": "unsupported_format", "language": "unsupported_language",
        "include": "invalid_value",
        "empty commit": "input_audio_buffer_commit_empty",
        "binary": "invalid_frame", "too large": "message_too_large", "buffer": "buffer_full"}
    assert errors["empty commit"]["event_id"] == "c1", "the error names the client event that caused it"
    assert errors["include"]["param"] == "session.include"
    assert "--realtime-max-message-mb" in errors["too large"]["message"]
    assert "--realtime-max-buffered-seconds" in errors["buffer"]["message"]
    assert all(error["type"] == "invalid_request_error" for error in errors.values())
    assert_words([clip], turns(events))


def test_logprobs_ride_on_each_delta_and_the_completed_event_when_the_session_includes_them(live_server, sentences):
    """include: ["item.input_audio_transcription.logprobs"] gives each delta its tokens' log-probabilities and the
    completed event all of them (openai-python's LogProbProperties, checked by `receive`), the text still going out as
    it decodes (the one window's text in several deltas); the same audio without it gets the same transcript and no
    logprobs."""
    clip = sentences[2]  # a sentence tiny.en hears right
    audio = pcm24k(clip.samples())

    async def turn(connection, include: list[str]) -> list[dict]:
        await connection.session.update(session={"type": "transcription", "include": include})
        assert (await receive(connection))["session"]["include"] == include
        await stream(connection, audio, pace=None)
        await connection.input_audio_buffer.commit()
        return await events_until(connection, completed_count(1))

    async def run():
        async with connect(live_server) as connection:
            await without_turn_detection(connection)
            return (await turn(connection, ["item.input_audio_transcription.logprobs"]), await turn(connection, []))

    asked, plain = asyncio.run(run())
    deltas = [event for event in asked if event["type"].endswith("transcription.delta")]
    completed = asked[-1]
    logprobs = completed["logprobs"]
    assert len(deltas) > 1 and all(event["logprobs"] for event in deltas), "as it decodes, not once final"
    assert [item for event in deltas for item in event["logprobs"]] == logprobs, "the deltas' tokens are all of them"
    for event in deltas:
        assert "".join(item["token"] for item in event["logprobs"]).strip() == event["delta"].strip()
    assert "".join(item["token"] for item in logprobs).strip() == completed["transcript"]
    assert bytes(byte for item in logprobs for byte in item["bytes"]).decode().strip() == completed["transcript"]
    assert all(-math.inf < item["logprob"] <= 0 for item in logprobs)
    assert sum(item["logprob"] > -0.7 for item in logprobs) >= 0.8 * len(logprobs), "a clear clip: most near 0"
    assert corpus_word_error_rate([clip.text], [completed["transcript"]]) < MAX_WER
    assert plain[-1]["transcript"] == completed["transcript"]
    assert all(event.get("logprobs") is None for event in plain if "transcription" in event["type"]), "not asked"


def test_a_large_append_is_decoded_in_pieces_exactly_as_whole_and_refused_as_whole_would_be():
    data = np.random.default_rng(0).bytes(3 * 2**20 + 2)  # four pieces, padded
    text = base64.b64encode(data).decode()
    assert asyncio.run(decode_base64(text)) == data
    piece = 2**20
    padded_early = base64.b64encode(data[:piece // 4 * 3 - 1]).decode() + text[piece:]  # "=" ends the first piece
    for bad in (text[:piece + 5] + "%" + text[piece + 6:], text[:-1], text + "\n", padded_early, "é" + text[1:]):
        with pytest.raises(ValueError):  # binascii.Error, or UnicodeEncodeError
            base64.b64decode(bad, validate=True)
        with pytest.raises(ValueError):
            asyncio.run(decode_base64(bad))


def test_a_long_monologue_is_cut_into_windows_that_decode_while_it_goes_on(live_server, speech):
    """75 s of fluent speech (0.25 s between sentences, under server_vad's 500 ms) is one turn: its 30 s windows,
    cut in pauses, are transcribed while the speaker goes on, not after."""
    clip = speech.long(pause=0.25, seed=1)

    async def run():
        async with connect(live_server) as connection:
            await receive(connection)
            sender = asyncio.create_task(stream(connection, pcm24k(spoken([clip])), pace=4.0))
            events = await events_until(connection, completed_count(1))
            await sender
            return events

    events = asyncio.run(run())
    types = [event["type"] for event in events]
    (item,) = turns(events).values()
    assert types.count("input_audio_buffer.speech_started") == 1 and types.count("input_audio_buffer.committed") == 1
    assert types.count("conversation.item.input_audio_transcription.delta") >= 3, "a delta per window at least"
    assert types.index("conversation.item.input_audio_transcription.delta") < types.index(
        "input_audio_buffer.speech_stopped"), "the first window's text comes while the speaker goes on"
    assert item["deltas"] == item["transcript"]
    assert corpus_word_error_rate([clip.text], [item["transcript"]]) < MAX_WER


def test_a_turn_shows_its_text_while_its_window_decodes(live_server, sentences):
    """Two sentences said fluently (about 6 s, one window) and committed: the text comes in several deltas as the
    window decodes, the first well before the completed transcript, and they add up to it exactly."""
    clips = sentences[1:3]
    audio = pcm24k(spoken(clips, pause=0.25))

    async def run():
        async with connect(live_server) as connection:
            await without_turn_detection(connection)
            await stream(connection, audio, pace=None)
            await connection.input_audio_buffer.commit()
            timed = []
            while not timed or not timed[-1][1]["type"].endswith("transcription.completed"):
                event = await receive(connection)
                timed.append((time.monotonic(), event))
            return timed

    timed = asyncio.run(run())
    deltas = [(at, event["delta"]) for at, event in timed if event["type"].endswith("transcription.delta")]
    completed_at, completed = timed[-1]
    assert len(deltas) >= 3, f"one window, so one delta if text came only once it is decoded: {deltas}"
    assert completed_at - deltas[0][0] > 0.1, "the first text comes while the window decodes, not with its end"
    assert "".join(delta for _, delta in deltas) == completed["transcript"]
    assert corpus_word_error_rate([" ".join(clip.text for clip in clips)], [completed["transcript"]]) < MAX_WER


def test_sessions_beside_a_file_request_each_get_their_own_words(live_server, sentences, speech):
    pairs = [sentences[0:2], sentences[2:4], sentences[4:6]]
    file_clip = speech.short(count=8)[6]

    async def session(clips):
        async with connect(live_server) as connection:
            await receive(connection)
            sender = asyncio.create_task(stream(connection, pcm24k(spoken(clips)), pace=4.0))
            events = await events_until(connection, completed_count(len(clips)))
            await sender
            return events

    async def run():
        file_request = asyncio.to_thread(httpx.post, live_server.url + "/v1/audio/transcriptions", timeout=120,
                                         headers={"Authorization": f"Bearer {API_KEY}"},
                                         files={"file": ("clip.wav", file_clip.path.read_bytes())})
        return await asyncio.gather(file_request, *(session(clips) for clips in pairs))

    answer, *sessions = asyncio.run(run())
    assert answer.status_code == 200
    assert corpus_word_error_rate([file_clip.text], [answer.json()["text"]]) < 0.5  # one sentence (as test_real_words)
    for index, (clips, events) in enumerate(zip(pairs, sessions)):  # each session's own words, nothing of another's
        texts = [item["transcript"] for item in turns(events).values()]
        assert len(texts) == len(clips)
        own = corpus_word_error_rate([clip.text for clip in clips], texts)
        others = [corpus_word_error_rate([clip.text for clip in other], texts)
                  for other_index, other in enumerate(pairs) if other_index != index]
        # Two sentences each: a sentence leaked from another session would add half again as many words.
        assert own < 0.45 and own < min(others), texts


def wait_for_no_sessions(server) -> None:
    """Until the sessions of earlier tests, closed by their clients, have left the server."""
    deadline = time.monotonic() + 10
    while server.metric("whisper_realtime_sessions") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("whisper_realtime_sessions") == 0


def raw_websocket(port: int) -> socket.socket:
    """A WebSocket handshake on a socket with a 4 KB receive buffer, whose frames the test never reads."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.connect(("127.0.0.1", port))
    connection.sendall(b"GET /v1/realtime?intent=transcription HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += connection.recv(1)  # the head only: the frames after it stay unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return connection


def text_frame(payload: bytes) -> bytes:
    """A client's masked text frame (RFC 6455), for payloads under 64 KiB."""
    mask = b"\x01\x02\x03\x04"
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    return b"\x81" + length + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


def test_limits_sessions_idle_and_a_client_that_stops_reading(live_server):
    wait_for_no_sessions(live_server)

    async def run():
        async with connect(live_server) as first, connect(live_server) as second, connect(live_server) as third, \
                connect(live_server) as fourth:
            for connection in (first, second, third, fourth):
                await receive(connection)
            async with connect(live_server) as fifth:
                refused = error_of(await receive(fifth))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await fifth.recv_bytes()
            assert closed.value.rcvd.code == 1013
        # An idle session is told, then closed.
        async with connect(live_server) as idle:
            await receive(idle)
            idle_error = error_of(await receive(idle, timeout=10))
            with pytest.raises(websockets.ConnectionClosed):
                await idle.recv_bytes()
        return refused, idle_error

    refused, idle_error = asyncio.run(run())
    assert refused["code"] == "session_limit" and "--max-realtime-sessions" in refused["message"]
    assert idle_error["code"] == "idle_timeout" and "--realtime-idle-seconds" in idle_error["message"]

    # A client that sends events but never reads the answers: past 64 queued events its session is closed.
    wait_for_no_sessions(live_server)
    with raw_websocket(live_server.port) as stalled:
        stalled.settimeout(2)
        assert live_server.metric("whisper_realtime_sessions") == 1
        unknown = text_frame(json.dumps({"type": "x" * 4000}).encode())  # each answered by a 4 KB error event
        deadline = time.monotonic() + 60
        while live_server.metric("whisper_realtime_sessions") and time.monotonic() < deadline:
            try:
                for _ in range(50):
                    stalled.sendall(unknown)
            except (TimeoutError, OSError):  # the server no longer reads this connection
                time.sleep(0.1)
        assert live_server.metric("whisper_realtime_sessions") == 0
    assert "its client stopped reading" in live_server.log_path.read_text()


def test_a_session_that_reaches_its_longest_duration_is_told_and_closed(start_server):
    """--realtime-max-session-seconds, on a server of its own (random weights, one slot): a session that keeps
    sending is told, in an error event naming the setting, and closed when it has lasted that long."""
    server = start_server("--max-batch-size", "1", "--realtime-max-session-seconds", "3")

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
            created = await receive(connection)
            opened, opened_wall = time.monotonic(), time.time()
            talking = asyncio.create_task(stream(connection, bytes(4800 * 100), pace=1.0))  # silence, as spoken
            expired = error_of(await receive(connection, timeout=10))
            lasted = time.monotonic() - opened
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await receive(connection)
            talking.cancel()
            return created["session"]["expires_at"] - opened_wall, expired, lasted, closed.value.rcvd.code

    expires_in, expired, lasted, code = asyncio.run(run())
    assert 1 <= expires_in <= 3, "session.created says when it ends"
    assert expired["code"] == "session_expired" and "--realtime-max-session-seconds" in expired["message"]
    assert 2.5 <= lasted <= 5, f"closed after {lasted:.1f} s"
    assert code == 1000
    wait_for_no_sessions(server)


def test_client_secret_opens_a_browser_session_and_bad_keys_are_refused(live_server):
    minted = httpx.post(live_server.url + "/v1/realtime/client_secrets", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"expires_after": {"anchor": "created_at", "seconds": 60},
                              "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}})
    assert minted.status_code == 200, minted.text
    secret = minted.json()
    assert secret["value"].startswith("ek_") and API_KEY not in secret["value"]
    assert 55 <= secret["expires_at"] - time.time() <= 61
    assert httpx.post(live_server.url + "/v1/realtime/client_secrets").status_code == 401

    url = f"ws://127.0.0.1:{live_server.port}/v1/realtime?intent=transcription"

    async def run():
        browser = ["realtime", "openai-insecure-api-key." + secret["value"]]
        async with websockets.connect(url, subprotocols=browser) as ws:
            assert ws.subprotocol == "realtime"
            created = json.loads(await ws.recv())
        statuses = []
        for protocols, query in ((["realtime", "openai-insecure-api-key.ek_forged.sig"], "intent=transcription"),
                                 (["realtime"], "intent=transcription"),
                                 (["realtime", "openai-insecure-api-key." + secret["value"]], "model=gpt-realtime")):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url.split("?")[0] + "?" + query, subprotocols=protocols):
                    pass
            statuses.append(refused.value.response.status_code)
        return created, statuses

    created, statuses = asyncio.run(run())
    SERVER_EVENT.validate_python(created)
    assert created["session"]["audio"]["input"]["turn_detection"] is None, "the secret's session applies"
    assert statuses == [401, 401, 400]


def test_drain_tells_each_session_finishes_committed_turns_and_closes_1012(live_server, sentences):
    """Last: SIGTERM stops the module's server."""
    audio = pcm24k(spoken(sentences[:4], pause=0.3))

    async def run():
        async with connect(live_server) as connection:
            await without_turn_detection(connection)
            await stream(connection, audio, pace=None)
            await connection.input_audio_buffer.commit()
            events = [await receive(connection)]
            assert events[0]["type"] == "input_audio_buffer.committed"
            live_server.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    events.append(await receive(connection))
            return events, closed.value.rcvd.code

    events, code = asyncio.run(run())
    types = [event["type"] for event in events]
    assert code == 1012
    assert types.index("error") < types.index("conversation.item.input_audio_transcription.completed"), types
    assert error_of(events[types.index("error")])["code"] == "server_shutting_down"
    (item,) = turns(events).values()
    assert corpus_word_error_rate([" ".join(clip.text for clip in sentences[:4])], [item["transcript"]]) < MAX_WER
    assert live_server.process.wait(timeout=60) == 0
