"""Live transcription over OpenAI's Realtime protocol, transcription sessions: `GET /v1/realtime?intent=transcription`
(a WebSocket) and `POST /v1/realtime/client_secrets` (short-lived secrets for browsers). Events are named and shaped
as openai-python's `types/realtime`.

A thin protocol layer over the same engine as files: a session converts its audio to 16 kHz, finds turns with the
Silero model the file path uses (server_vad) or takes the client's commits, and gives each turn's audio to the engine
as a live request, whose windows go ahead of file windows. A turn longer than a window is cut in a pause and its
windows start decoding while the speaker goes on. A turn's text goes out as its windows decode (partials: the tokens
each decode step makes final, in audio order), and the deltas add up to the turn's completed transcript. Nothing
here holds the model: sessions share the decode steps."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace

import av
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .app import ServerState, as_api_error, authorize, checked_number, server_vad, token_usage, unless
from .decoding import SAMPLE_RATE, WINDOW_SECONDS, DecodeOptions
from .errors import ApiError, error_body, error_response
from .languages import parse_language
from .segmentation import FRAME, PAUSE_MARGIN, ServerVad, SpeechStream, VoiceActivity, plan_windows
from .transcript import TranscriptBuilder, transcribe_pieces

log = logging.getLogger("whisper_server.realtime")

INPUT_RATES = {"audio/pcm": 24_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}
BYTES_PER_SAMPLE = {"audio/pcm": 2, "audio/pcmu": 1, "audio/pcma": 1}
NOISE_REDUCTION_TYPES = ("near_field", "far_field")
INCLUDE = ("item.input_audio_transcription.logprobs",)
MIN_COMMIT_MS = 100  # OpenAI's smallest committable buffer
SECRET_PREFIX = "ek_"
SECRET_SUBPROTOCOL = "openai-insecure-api-key."
SECRET_SECONDS = (10, 7200, 600)  # OpenAI's range and default for expires_after.seconds
MAX_SECRET_REQUEST_BYTES = 64 * 1024
FLUSH_SECONDS = 5.0  # how long a closing session's last events may take to reach its client
BASE64_PIECE = 1 << 20  # base64 characters decoded between turns of the event loop (a multiple of 4)
FRAME_MS = FRAME * 1000 // SAMPLE_RATE
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)


class ClientError(Exception):
    """An OpenAI-shaped `error` event for the client; the session goes on."""

    def __init__(self, message: str, code: str, param: str | None = None, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, error_type
        self.event_id: str | None = None

    def event(self) -> dict:
        return {"type": "error", "error": {"type": self.type, "code": self.code, "message": self.message,
                                           "param": self.param, "event_id": self.event_id}}


@dataclass(frozen=True)
class SessionConfig:
    format: str = "audio/pcm"
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    turn_detection: ServerVad | None = ServerVad()
    noise_reduction: dict | None = None  # accepted and echoed; the audio is not filtered
    include: tuple[str, ...] | None = None

    @property
    def logprobs(self) -> bool:
        return bool(self.include)  # INCLUDE's one value: checked when it is set

    def describe(self, model_id: str) -> dict:
        """The session object of session.created / session.updated (RealtimeTranscriptionSessionCreateRequest)."""
        audio_format = {"type": self.format}
        if self.format == "audio/pcm":
            audio_format["rate"] = INPUT_RATES[self.format]
        return {"type": "transcription",
                "audio": {"input": {
                    "format": audio_format,
                    "transcription": {"model": self.model or model_id, "language": self.language,
                                      "prompt": self.prompt or ""},
                    "turn_detection": self.turn_detection.describe() if self.turn_detection else None,
                    "noise_reduction": self.noise_reduction}},
                "include": list(self.include) if self.include is not None else None}


def number(value, name: str, low: float, high: float, integer: bool = False) -> float:
    try:
        return checked_number(value, name, low, high, integer)
    except ApiError as error:
        raise ClientError(error.message, error.code, error.param) from None


def section(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise ClientError(f"{name} must be an object; got {json.dumps(value)}.", "invalid_type", name)
    return value


def updated_config(config: SessionConfig, session, state: ServerState) -> SessionConfig:
    """`config` with a session.update's `session` applied (fields left out stay as they are); all or nothing."""
    session = section(session, "session")
    if session.get("type") != "transcription":
        raise ClientError("This server serves transcription sessions only: session.type must be 'transcription'; got "
                          f"{json.dumps(session.get('type'))}.", "invalid_value", "session.type")
    changes: dict = {}
    if "include" in session:
        include = session["include"]
        if include is not None and (not isinstance(include, list) or not set(include) <= set(INCLUDE)):
            raise ClientError(f"session.include may hold {', '.join(INCLUDE)}; got {json.dumps(include)}.",
                              "invalid_value", "session.include")
        changes["include"] = tuple(include) if include is not None else None
    audio = section(session.get("audio") or {}, "session.audio")
    given = section(audio.get("input") or {}, "session.audio.input")
    if "format" in given:
        name = "session.audio.input.format"
        audio_format = section(given["format"], name)
        kind = audio_format.get("type", "audio/pcm")
        if kind not in INPUT_RATES:
            raise ClientError(f"Unsupported audio format {json.dumps(kind)}: {name}.type must be one of "
                              f"{', '.join(INPUT_RATES)}.", "unsupported_format", f"{name}.type")
        if kind == "audio/pcm" and audio_format.get("rate", 24_000) != 24_000:
            raise ClientError(f"audio/pcm is taken at 24000 Hz only, as OpenAI's API takes it; got rate "
                              f"{json.dumps(audio_format.get('rate'))}.", "unsupported_format", f"{name}.rate")
        changes["format"] = kind
    if given.get("transcription") is not None:
        transcription = section(given["transcription"], "session.audio.input.transcription")
        changes.update(transcription_options(transcription, state))
    if "turn_detection" in given:
        changes["turn_detection"] = turn_detection(given["turn_detection"])
    if "noise_reduction" in given:
        name = "session.audio.input.noise_reduction"
        reduction = given["noise_reduction"]
        if reduction is not None and (section(reduction, name).get("type") not in (None, *NOISE_REDUCTION_TYPES)):
            raise ClientError(f"{name}.type must be one of {', '.join(NOISE_REDUCTION_TYPES)}.", "invalid_value",
                              f"{name}.type")
        changes["noise_reduction"] = reduction
    return replace(config, **changes)


def transcription_options(transcription: dict, state: ServerState) -> dict:
    name = "session.audio.input.transcription"
    changes = {}
    if transcription.get("model") is not None:
        model = transcription["model"]
        if model not in state.model_aliases():
            raise ClientError(f"The model {json.dumps(model)} does not exist; this server serves "
                              f"'{state.model_id}'.", "model_not_found", f"{name}.model")
        changes["model"] = model
    if "language" in transcription:
        language = transcription["language"]
        if language is not None and not isinstance(language, str):
            raise ClientError(f"{name}.language must be an ISO-639-1 code or a language's English name.",
                              "invalid_type", f"{name}.language")
        try:  # codes or names, checked as the file endpoints check them
            changes["language"] = (parse_language(language, state.engine.capabilities, f"{name}.language")
                                   if (language or "").strip() else None)
        except ApiError as error:
            raise ClientError(error.message, error.code, error.param) from None
    if "prompt" in transcription:
        prompt = transcription["prompt"]
        if prompt is not None and not isinstance(prompt, str):
            raise ClientError(f"{name}.prompt must be a string.", "invalid_type", f"{name}.prompt")
        changes["prompt"] = (prompt or "").strip() or None
    return changes


def turn_detection(given) -> ServerVad | None:
    name = "session.audio.input.turn_detection"
    if given is None:
        return None
    given = section(given, name)
    if given.get("type") != "server_vad":
        raise ClientError(f"{name}.type must be 'server_vad' (or turn_detection null, for the client's commits); "
                          f"got {json.dumps(given.get('type'))}.", "unsupported_value", f"{name}.type")
    try:  # the parameters and ranges a file's chunking_strategy takes too
        return server_vad(given, name)
    except ApiError as error:
        raise ClientError(error.message, error.code, error.param) from None


# G.711 expanded to 16-bit PCM, as ffmpeg's pcm_mulaw and pcm_alaw decoders do.
def mulaw_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)
    return np.where(code & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def alaw_table() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (code >> 4) & 0x07, (code & 0x0F) << 4
    magnitude = np.where(exponent == 0, mantissa + 8, (mantissa + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


EXPAND = {"audio/pcmu": mulaw_table(), "audio/pcma": alaw_table()}


class AudioInput:
    """Appended audio in the session's format to 16 kHz float32 (ffmpeg's resampler, its state kept across appends;
    an odd byte of PCM16 waits for the next append)."""

    def __init__(self, audio_format: str):
        self.format, self.rate = audio_format, INPUT_RATES[audio_format]
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self.carry = b""

    def convert(self, data: bytes) -> np.ndarray:
        if self.format == "audio/pcm":
            data, self.carry = self.carry + data, b""
            if len(data) % 2:
                data, self.carry = data[:-1], data[-1:]
            pcm = np.frombuffer(data, "<i2")
        else:
            pcm = EXPAND[self.format][np.frombuffer(data, np.uint8)]
        if not len(pcm):
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = self.rate
        out = [resampled.to_ndarray().reshape(-1) for resampled in self.resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


async def decode_base64(text: str) -> bytes:
    """Strict base64 (RFC 4648's alphabet and padding, nothing else), decoded a piece at a time: one 15 MiB append
    decoded at once holds the event loop (and every other session) for 40-80 ms; a piece takes about 3 ms."""
    pieces = []
    for start in range(0, len(text), BASE64_PIECE):
        if start:
            await asyncio.sleep(0)
        piece = text[start:start + BASE64_PIECE]
        if piece.endswith("=") and start + BASE64_PIECE < len(text):  # padding only ends the whole string
            raise binascii.Error("Excess data after padding")
        pieces.append(binascii.a2b_base64(piece.encode("ascii"), strict_mode=True))
    return b"".join(pieces)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Ending:
    """Why a session ends: the close code (None: the client is gone), the error event its client is told first, and
    whether the turns it committed still finish before the socket closes."""

    code: int | None
    reason: str = ""
    error: ClientError | None = None
    finish_turns: bool = False


class Turn:
    """One committed (or still spoken) turn: an item whose parts (windows of at most 30 s, cut in pauses) decode as
    live requests as soon as they are cut, and whose text goes out in order as it decodes."""

    def __init__(self, session: RealtimeSession, item_id: str):
        self.session, self.item_id = session, item_id
        self.parts: asyncio.Queue = asyncio.Queue()  # each part's queue of deltas, then None once the turn ends
        self.tasks: list[asyncio.Task] = []
        self.seconds = 0.0
        self.ended_at: float | None = None
        self.logprobs = session.config.logprobs  # as the session asked when the turn began, for all its parts
        self.task = asyncio.create_task(self.run())

    def add(self, samples: np.ndarray) -> None:
        deltas: asyncio.Queue = asyncio.Queue()
        self.session.decoding += len(samples)
        self.seconds += len(samples) / SAMPLE_RATE
        self.tasks.append(asyncio.create_task(self.decode(samples, deltas)))
        self.parts.put_nowait(deltas)

    def end(self) -> None:
        self.ended_at = time.monotonic()
        self.parts.put_nowait(None)

    def cancel(self) -> None:
        for task in (*self.tasks, self.task):
            task.cancel()

    async def decode(self, samples: np.ndarray, deltas: asyncio.Queue) -> None:
        session = self.session
        builder = TranscriptBuilder(len(samples) / SAMPLE_RATE, None, session.config.language,
                                    session.settings.min_segment_speech_seconds)
        engine = session.state.engine
        try:
            async with aclosing(transcribe_pieces(engine, samples, session.options(self.logprobs), session.vad_work,
                                                  builder, live=True)) as pieces:
                async for piece in pieces:  # (text, its tokens' log-probabilities where the turn asks for them)
                    if piece.delta or piece.logprobs:
                        deltas.put_nowait((piece.delta, piece.logprobs))
            deltas.put_nowait(builder.output_tokens)
        except Exception as error:  # noqa: BLE001 - reported as the turn's failed event
            deltas.put_nowait(error)
        finally:
            session.decoding -= len(samples)

    async def run(self) -> None:
        session = self.session
        transcript, output_tokens, logprobs = "", 0, []
        try:
            while (deltas := await self.parts.get()) is not None:
                first = True
                while isinstance(item := await deltas.get(), tuple):
                    text, token_logprobs = item
                    logprobs += token_logprobs or []
                    if not text:  # blank text: its tokens are in the completed event's logprobs alone
                        continue
                    delta = (" " if first and transcript else "") + text
                    first = False
                    transcript += delta
                    event = {"type": "conversation.item.input_audio_transcription.delta", "item_id": self.item_id,
                             "content_index": 0, "delta": delta}
                    if token_logprobs is not None:
                        event["logprobs"] = token_logprobs
                    session.emit(event)
                if isinstance(item, Exception):
                    raise item
                output_tokens += item
        except Exception as error:  # noqa: BLE001 - the turn failed; the session goes on
            for task in self.tasks:
                task.cancel()
            answer = as_api_error(error, session.state)
            if answer is None:
                log.error("live turn failed", exc_info=error)
                answer = ApiError(500, "Internal server error.", code="internal_error")
            session.emit({"type": "conversation.item.input_audio_transcription.failed", "item_id": self.item_id,
                          "content_index": 0, "error": error_body(answer)["error"]})
            return
        completed = {"type": "conversation.item.input_audio_transcription.completed", "item_id": self.item_id,
                     "content_index": 0, "transcript": transcript, "usage": token_usage(self.seconds, output_tokens)}
        if self.logprobs:
            completed["logprobs"] = logprobs
        session.emit(completed)
        session.state.metrics.realtime_turn_latency.observe(time.monotonic() - self.ended_at)


class RealtimeSession:
    """One WebSocket: client events in, server events out through a bounded queue, turns to the engine."""

    def __init__(self, websocket: WebSocket, state: ServerState, config: SessionConfig):
        self.websocket, self.state, self.settings = websocket, state, state.settings
        self.config = config
        self.id = new_id("sess")
        self.started, self.started_wall = time.monotonic(), int(time.time())
        self.outbox: asyncio.Queue = asyncio.Queue(self.settings.realtime_max_pending_events)
        self.ending: asyncio.Future = asyncio.get_running_loop().create_future()
        self.vad_work = asyncio.Semaphore(1)  # a turn's windows are cut beside, never behind, the uploads' audio work
        self.audio = AudioInput(config.format)
        self.speech = SpeechStream(VoiceActivity.shared()) if config.turn_detection else None
        # The input buffer since the last commit: whole 32 ms frames at 16 kHz (with their speech probabilities under
        # server_vad), then the start of the next frame. `buffer_start` is where it starts in the session's audio.
        self.frames: list[np.ndarray] = []
        self.probabilities: list[float] = []
        self.partial = np.zeros(0, np.float32)
        self.buffer_start = 0
        self.speaking: str | None = None  # the item id of the turn being spoken (server_vad)
        self.pause_since: int | None = None  # the frame (buffer index) where the current pause began
        self.open_turn: Turn | None = None  # a spoken turn with windows already cut from it
        self.turns: set[Turn] = set()
        self.previous_item_id: str | None = None
        self.decoding = 0  # samples handed to the engine and not yet transcribed
        self.stalled = False  # the send queue overflowed: nothing more is queued
        self.received_seconds = 0.0
        self.committed_turns = 0

    # Server events -------------------------------------------------------------------------------------------------

    def emit(self, event: dict) -> None:
        if self.stalled:
            return
        try:
            self.outbox.put_nowait(json.dumps({"event_id": new_id("event"), **event}, ensure_ascii=False))
        except asyncio.QueueFull:  # the client stopped reading: the session ends rather than memory grows
            self.stalled = True
            log.warning("live session closed: its client stopped reading", extra={"fields": {"session": self.id}})
            self.end(Ending(1008, "the client stopped reading events"))

    def end(self, ending: Ending) -> None:
        if not self.ending.done():
            self.ending.set_result(ending)

    def describe(self) -> dict:
        return {**self.config.describe(self.state.model_id), "id": self.id, "object": "realtime.transcription_session",
                "expires_at": self.started_wall + int(self.settings.realtime_max_session_seconds)}

    # The session's life --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        state = self.state
        state.sessions.add(self)
        state.metrics.realtime_sessions.inc()
        sender = asyncio.create_task(self.send_events())
        receiver = asyncio.create_task(self.receive_events())
        abandoned = asyncio.create_task(self.end_when_abandoned())
        try:
            self.emit({"type": "session.created", "session": self.describe()})
            ending = await self.ending
            receiver.cancel()
            if self.open_turn is not None:  # a turn still being spoken was never committed: it is dropped
                self.open_turn.cancel()
                self.turns.discard(self.open_turn)
            if ending.error:
                self.emit(ending.error.event())
            if ending.finish_turns and self.turns:
                await unless(asyncio.gather(*(turn.task for turn in self.turns), return_exceptions=True),
                             state.abandoned.wait())
            if ending.code is not None:
                if not self.stalled:  # what is queued goes out first, for a while
                    self.emit_end()
                    await asyncio.wait({sender}, timeout=FLUSH_SECONDS)
                await asyncio.wait_for(self.websocket.close(ending.code, ending.reason), FLUSH_SECONDS)
        except Exception:  # noqa: BLE001 - the client went away while the session closed
            pass
        finally:
            for task in (sender, receiver, abandoned):
                task.cancel()
            for turn in self.turns:
                turn.cancel()
            state.sessions.discard(self)
            state.metrics.realtime_sessions.dec()
            log.info("live session", extra={"fields": {
                "session": self.id, "client": (self.websocket.client or ("unknown",))[0],
                "duration_seconds": round(time.monotonic() - self.started, 3),
                "audio_seconds": round(self.received_seconds, 3), "turns": self.committed_turns,
                "close_code": self.ending.result().code if self.ending.done() else None}})

    def emit_end(self) -> None:
        try:
            self.outbox.put_nowait(None)
        except asyncio.QueueFull:
            self.stalled = True

    async def end_when_abandoned(self) -> None:
        """The server gave up on what it holds (the drain's deadline, a second signal, the engine gone)."""
        await self.state.abandoned.wait()
        error = self.state.abandon_error
        self.end(Ending(1012, "server stopping", ClientError(error.message, error.code or "server_stopping",
                                                            error_type="server_error")))

    def drain(self) -> None:
        """The server is draining: the client is told, committed turns finish, then the socket closes with 1012."""
        self.end(Ending(1012, "server draining", ClientError(
            "The server is going away (draining for a restart or scale-down): turns already committed finish, then "
            "the connection closes with 1012; reconnect to continue.", "server_shutting_down",
            error_type="server_error"), finish_turns=True))

    async def send_events(self) -> None:
        try:
            while (text := await self.outbox.get()) is not None:
                await self.websocket.send_text(text)
        except Exception:  # noqa: BLE001 - the client is gone
            self.end(Ending(None))

    async def receive_events(self) -> None:
        settings = self.settings
        last = time.monotonic()
        while True:
            now = time.monotonic()
            idle_left = last + settings.realtime_idle_seconds - now
            session_left = self.started + settings.realtime_max_session_seconds - now
            try:
                message = await asyncio.wait_for(self.websocket.receive(), max(0.0, min(idle_left, session_left)))
            except (asyncio.TimeoutError, TimeoutError):
                if self.turns and idle_left < session_left:  # a session waiting for its transcripts is not idle
                    last = time.monotonic()
                    continue
                if session_left <= idle_left:
                    self.end(Ending(1000, "session expired", ClientError(
                        f"The session reached its maximum duration of {settings.realtime_max_session_seconds:g} s "
                        "(--realtime-max-session-seconds); start a new session to continue.", "session_expired"),
                        finish_turns=True))
                else:
                    self.end(Ending(1000, "idle timeout", ClientError(
                        f"The session sent nothing for {settings.realtime_idle_seconds:g} s "
                        "(--realtime-idle-seconds) and is closed.", "idle_timeout"), finish_turns=True))
                return
            except Exception:  # noqa: BLE001 - the connection broke
                self.end(Ending(None))
                return
            if message["type"] == "websocket.disconnect":
                self.end(Ending(None))
                return
            last = time.monotonic()
            try:
                await self.handle(message)
            except ClientError as error:
                self.emit(error.event())

    # Client events -------------------------------------------------------------------------------------------------

    async def handle(self, message: dict) -> None:
        text = message.get("text")
        if text is None:
            raise ClientError("Binary frames are not part of the Realtime protocol: send each event as a JSON text "
                              "frame (audio base64-encoded in input_audio_buffer.append).", "invalid_frame")
        limit = self.settings.realtime_max_message_mb
        if len(text) > limit * 2**20:
            raise ClientError(f"The event is {len(text) / 2**20:.1f} MiB; the largest a session takes is {limit:g} MiB "
                              "(--realtime-max-message-mb). Send audio in smaller appends.", "message_too_large")
        try:
            event = json.loads(text)
        except ValueError as error:
            raise ClientError(f"The event is not valid JSON: {error}.", "invalid_json") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ClientError("An event must be a JSON object with a 'type'.", "invalid_event", "type")
        handler = {"session.update": self.update, "input_audio_buffer.append": self.append,
                   "input_audio_buffer.commit": self.commit, "input_audio_buffer.clear": self.clear}.get(event["type"])
        try:
            if handler is None:
                raise ClientError(f"Unknown event type '{event['type']}': a transcription session takes "
                                  "session.update, input_audio_buffer.append, input_audio_buffer.commit and "
                                  "input_audio_buffer.clear.", "unknown_event_type", "type")
            await handler(event)
        except ClientError as error:
            error.event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            raise

    async def update(self, event: dict) -> None:
        config = updated_config(self.config, event.get("session"), self.state)
        if config.format != self.config.format:
            self.audio = AudioInput(config.format)
        if (config.turn_detection is None) != (self.config.turn_detection is None):
            self.speech = SpeechStream(VoiceActivity.shared()) if config.turn_detection else None
            self.probabilities = [0.0] * len(self.frames)
            self.speaking, self.pause_since = None, None
        self.config = config
        self.emit({"type": "session.updated", "session": self.describe()})

    def buffered_samples(self) -> int:
        return len(self.frames) * FRAME + len(self.partial) + self.decoding

    async def append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientError("input_audio_buffer.append needs 'audio': the audio bytes, base64-encoded.",
                              "missing_audio", "audio")
        # The buffer is checked against the size the base64 decodes to, before it is decoded.
        seconds = (len(audio) // 4 * 3 - audio[-2:].count("=")) / BYTES_PER_SAMPLE[self.config.format] / \
            INPUT_RATES[self.config.format]
        limit = self.settings.realtime_max_buffered_seconds
        if self.buffered_samples() / SAMPLE_RATE + seconds > limit:
            raise ClientError(
                f"This append would hold more than {limit:g} s of audio ahead of the decoder "
                "(--realtime-max-buffered-seconds): it is dropped. Commit the buffer (or let server_vad end the turn) "
                "and send audio no faster than it is spoken.", "buffer_full", "audio")
        try:
            data = await decode_base64(audio)
        except (binascii.Error, ValueError):
            raise ClientError("'audio' is not valid base64.", "invalid_base64", "audio") from None
        self.state.metrics.realtime_audio_seconds.inc(seconds)
        self.received_seconds += seconds
        frames, probabilities = await asyncio.to_thread(self.take, data)
        if self.config.turn_detection is None:
            self.frames.extend(frames)
            return
        for frame, probability in zip(frames, probabilities.tolist()):
            self.frames.append(frame)
            self.probabilities.append(probability)
            self.detect(probability)

    def take(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """The whole frames the appended audio completes, with their speech probabilities (in a worker thread)."""
        samples = np.concatenate([self.partial, self.audio.convert(data)])
        whole = len(samples) // FRAME * FRAME
        frames, self.partial = samples[:whole].reshape(-1, FRAME), samples[whole:]
        speech = self.speech
        return frames, (speech.probabilities(frames) if speech is not None and len(frames) else np.zeros(len(frames)))

    def detect(self, probability: float) -> None:
        """server_vad on the newest frame: a turn starts at the threshold and ends after silence_duration_ms below
        it (by Silero's margin); a turn reaching a window's length is cut in its longest recent pause."""
        detection = self.config.turn_detection
        index = len(self.frames) - 1
        if self.speaking is None:
            if probability >= detection.threshold:
                self.speaking, self.pause_since = new_id("item"), None
                keep = min(len(self.frames), 1 + math.ceil(detection.prefix_padding_ms / FRAME_MS))
                self.drop_frames(len(self.frames) - keep)
                self.emit({"type": "input_audio_buffer.speech_started", "item_id": self.speaking,
                           "audio_start_ms": self.buffer_start * 1000 // SAMPLE_RATE})
            else:  # only the prefix padding is kept before speech
                self.drop_frames(len(self.frames) - math.ceil(detection.prefix_padding_ms / FRAME_MS))
            return
        if probability >= detection.threshold:
            self.pause_since = None
        elif probability < detection.threshold - PAUSE_MARGIN and self.pause_since is None:
            self.pause_since = index
        if self.pause_since is not None and (index + 1 - self.pause_since) * FRAME_MS >= detection.silence_duration_ms:
            self.emit({"type": "input_audio_buffer.speech_stopped", "item_id": self.speaking,
                       "audio_end_ms": (self.buffer_start + len(self.frames) * FRAME) * 1000 // SAMPLE_RATE})
            self.commit_buffer()
        elif len(self.frames) * FRAME > WINDOW_SAMPLES:
            self.cut_window()

    def drop_frames(self, count: int) -> None:
        if count > 0:
            del self.frames[:count], self.probabilities[:count]
            self.buffer_start += count * FRAME
            if self.pause_since is not None:
                self.pause_since = max(0, self.pause_since - count)

    def cut_window(self) -> None:
        """A turn longer than a window: its first window (cut in a pause, as files are) starts decoding now."""
        samples = np.concatenate(self.frames)
        spans = plan_windows(np.asarray(self.probabilities, np.float32), len(samples))
        if len(spans) < 2:
            return
        if self.open_turn is None:
            self.open_turn = self.start_turn(self.speaking)
        self.open_turn.add(samples[spans[0][0]:spans[0][1]])
        self.drop_frames(spans[1][0] // FRAME)

    def start_turn(self, item_id: str) -> Turn:
        turn = Turn(self, item_id)
        self.turns.add(turn)
        turn.task.add_done_callback(lambda _: self.turns.discard(turn))
        return turn

    def options(self, logprobs: bool) -> DecodeOptions:
        # Live transcripts show no segment times: decoded as json answers are (--decode-timestamps). Text shows as it
        # decodes (partials), with its tokens' log-probabilities where asked, so a window is decoded once, at
        # temperature 0: a delta sent cannot be taken back.
        return DecodeOptions(task="transcribe", language=self.config.language, prompt=self.config.prompt,
                             timestamps=self.settings.decode_timestamps == "always", partials=True, logprobs=logprobs)

    async def commit(self, event: dict) -> None:
        held = len(self.frames) * FRAME + len(self.partial)
        if self.open_turn is None and held * 1000 < MIN_COMMIT_MS * SAMPLE_RATE:
            raise ClientError(f"Error committing input audio buffer: buffer too small. Expected at least "
                              f"{MIN_COMMIT_MS}ms of audio, but buffer only has {held * 1000 / SAMPLE_RATE:.2f}ms of "
                              "audio.", "input_audio_buffer_commit_empty")
        self.commit_buffer()

    def commit_buffer(self) -> None:
        """The buffer becomes a committed turn (the item being spoken, or a new one), which decodes ahead of files."""
        item_id = self.speaking or new_id("item")
        self.emit({"type": "input_audio_buffer.committed", "item_id": item_id,
                   "previous_item_id": self.previous_item_id})
        # The committed audio is a user message item of the conversation, added and final at once, as OpenAI's GA
        # API says (its transcript comes in the transcription events).
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        for kind in ("conversation.item.added", "conversation.item.done"):
            self.emit({"type": kind, "previous_item_id": self.previous_item_id, "item": item})
        self.previous_item_id = item_id
        self.committed_turns += 1
        turn = self.open_turn or self.start_turn(item_id)
        samples = np.concatenate([*self.frames, self.partial])
        if len(samples):
            turn.add(samples)
        turn.end()
        self.buffer_start += len(samples)
        self.reset_buffer()

    def reset_buffer(self) -> None:
        self.frames, self.probabilities, self.partial = [], [], np.zeros(0, np.float32)
        self.speaking, self.pause_since, self.open_turn = None, None, None

    async def clear(self, event: dict) -> None:
        if self.open_turn is not None:  # a long turn's windows already decoding: never committed, so dropped
            self.open_turn.cancel()
        self.buffer_start += len(self.frames) * FRAME + len(self.partial)
        self.reset_buffer()
        self.emit({"type": "input_audio_buffer.cleared"})


# Connection and secrets ----------------------------------------------------------------------------------------------

def signing_key(state: ServerState) -> bytes:
    """Secrets are signed with the API key, so every replica behind the load balancer accepts the secrets any of
    them minted; without a key, with one drawn for this process (auth is off then, and secrets only carry a session
    configuration)."""
    if state.settings.api_key:
        return hashlib.sha256(b"whisper-server realtime client secret\0" + state.settings.api_key.encode()).digest()
    if state.secret_key is None:
        state.secret_key = secrets.token_bytes(32)
    return state.secret_key


def mint_secret(state: ServerState, expires_at: int, session: dict | None) -> str:
    claims = {"exp": expires_at, "session": session, "nonce": secrets.token_hex(8)}
    payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.digest(signing_key(state), payload, "sha256")).rstrip(b"=")
    return SECRET_PREFIX + payload.decode() + "." + signature.decode()


def read_secret(state: ServerState, value: str) -> dict | None:
    """The secret's claims if it is one this server (or a replica) minted and it has not expired, else None."""
    payload, _, signature = value.removeprefix(SECRET_PREFIX).partition(".")
    expected = base64.urlsafe_b64encode(hmac.digest(signing_key(state), payload.encode(), "sha256")).rstrip(b"=")
    if not value.startswith(SECRET_PREFIX) or not hmac.compare_digest(signature.encode(), expected):
        return None
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims if claims["exp"] > time.time() else None


async def client_secrets(request: Request) -> Response:
    """POST /v1/realtime/client_secrets: a short-lived secret a browser passes as the `openai-insecure-api-key.<secret>`
    subprotocol (it cannot set headers), so the long-lived key never reaches page code."""
    state: ServerState = request.app.state.server
    authorize(request, state)
    if not state.ready:
        raise ApiError(503, "The model is still loading; retry shortly.", code="model_loading",
                       headers={"Retry-After": "5"})
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SECRET_REQUEST_BYTES:
            raise ApiError(413, f"The request body is larger than {MAX_SECRET_REQUEST_BYTES} bytes.",
                           code="request_too_large")
    try:
        given = json.loads(body) if body.strip() else {}
        if not isinstance(given, dict):
            raise ValueError("not an object")
    except ValueError:
        raise ApiError(400, "The body must be a JSON object (or empty).", code="invalid_json") from None
    low, high, default = SECRET_SECONDS
    try:
        expires = section(given.get("expires_after") or {}, "expires_after")
        seconds = number(expires.get("seconds", default), "expires_after.seconds", low, high, integer=True)
        session = given.get("session")
        config = updated_config(SessionConfig(), session, state) if session is not None else SessionConfig()
    except ClientError as error:
        raise ApiError(400, error.message, param=error.param, code=error.code) from None
    expires_at = int(time.time()) + seconds
    return JSONResponse({"value": mint_secret(state, expires_at, session), "expires_at": expires_at,
                         "session": {**config.describe(state.model_id), "id": new_id("sess"),
                                     "object": "realtime.transcription_session", "expires_at": expires_at}})


def credential(websocket: WebSocket) -> str | None:
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    offered = [protocol for protocol in websocket.scope.get("subprotocols", [])
               if protocol.startswith(SECRET_SUBPROTOCOL)]
    return offered[0].removeprefix(SECRET_SUBPROTOCOL) if offered else None


def admit(websocket: WebSocket, state: ServerState) -> SessionConfig:
    """The session's starting configuration, once the connection is allowed (an ApiError, answered before the
    handshake, if not)."""
    key, token = state.settings.api_key, credential(websocket)
    claims = read_secret(state, token) if token and token.startswith(SECRET_PREFIX) else None
    if key and claims is None and not (token and hmac.compare_digest(token.encode(), key.encode())):
        raise ApiError(401, "Missing, incorrect or expired key: send 'Authorization: Bearer <key>', or a client secret "
                            f"as the '{SECRET_SUBPROTOCOL}<secret>' subprotocol.", code="invalid_api_key")
    if websocket.query_params.get("intent") != "transcription":
        raise ApiError(400, "This server serves transcription sessions: connect to /v1/realtime?intent=transcription.",
                       param="intent", code="invalid_value")
    if state.abandon_error is not None:
        raise state.abandon_error
    if state.draining:
        raise ApiError(503, "The server is shutting down; retry on another replica.", code="draining",
                       headers={"Retry-After": "1"})
    if not state.ready:
        raise ApiError(503, "The model is still loading; retry shortly.", code="model_loading",
                       headers={"Retry-After": "5"})
    session = (claims or {}).get("session")
    try:
        return updated_config(SessionConfig(), session, state) if session else SessionConfig()
    except ClientError as error:  # the model changed since the secret was minted
        raise ApiError(400, error.message, param=error.param, code=error.code) from None


async def realtime_endpoint(websocket: WebSocket) -> None:
    """GET /v1/realtime?intent=transcription, upgraded to a WebSocket."""
    state: ServerState = websocket.app.state.server
    try:
        config = admit(websocket, state)
    except ApiError as error:
        await websocket.send_denial_response(error_response(error))
        return
    offered = websocket.scope.get("subprotocols", [])
    # A browser that offers subprotocols needs one back; the secret's own is never echoed when another is offered.
    plain = [protocol for protocol in offered if not protocol.startswith(SECRET_SUBPROTOCOL)]
    await websocket.accept(subprotocol=(plain or offered or [None])[0])
    limit = state.settings.max_realtime_sessions
    if len(state.sessions) >= limit:
        full = ClientError(f"This server holds its maximum of {limit} live sessions (--max-realtime-sessions); "
                           "retry shortly or on another replica.", "session_limit", error_type="server_error")
        state.metrics.refusals.labels("session_limit").inc()
        await websocket.send_text(json.dumps({"event_id": new_id("event"), **full.event()}))
        await websocket.close(1013, "session limit")
        return
    await RealtimeSession(websocket, state, config).run()


ROUTES = [WebSocketRoute("/v1/realtime", realtime_endpoint),
          Route("/v1/realtime/client_secrets", client_secrets, methods=["POST"])]
