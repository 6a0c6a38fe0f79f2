"""The HTTP layer: OpenAI-compatible speech endpoints and operations endpoints over the engine process."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.staticfiles import StaticFiles

from .admission import Admission, Overloaded, Reservation
from .audio import AudioError, decode_audio
from .decoding import SAMPLE_RATE, DecodeOptions, OutOfMemory
from .engine_process import EngineProcess, EngineUnavailable, QueueFull
from .errors import ApiError, error_body, error_response
from .languages import parse_language
from .formats import MEDIA_TYPES, RESPONSE_FORMATS, STREAMING_FORMATS, render, segment_json, word_json
from .metrics import Metrics
from .segmentation import AUTO_VAD, ServerVad
from .settings import Settings
from .transcript import Transcript, TranscriptBuilder, segment_logprobs, transcribe, transcribe_pieces
from .upload import ReceiveDeadlines, receive_form

log = logging.getLogger("whisper_server.http")
STATIC_DIR = Path(__file__).parent / "static"
AUDIO_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations")
QUIET_ROUTES = ("/healthz", "/readyz")
MAX_REQUEST_ID_CHARS = 128  # a longer X-Request-ID is cut to this before it is logged and echoed
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
# The page and its assets: its own script, style and API only; never framed (clickjacking); blob: media for
# recordings it plays back.
PAGE_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
                                 b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
]


# keywords[] together, joined by ", ": about 100 tokens of names, within the 112 of a window's prompt the engine
# gives them (engine.KEYWORD_TOKENS).
MAX_KEYWORD_CHARACTERS = 300
# Fields of OpenAI's TranscriptionCreateParams that its TranslationCreateParams lacks, each with the `param` the
# transcription endpoint's errors name it by.
TRANSCRIPTION_ONLY_FIELDS = {"include": "include[]", "keywords": "keywords[]", "chunking_strategy": "chunking_strategy",
                             "stream": "stream", "timestamp_granularities": "timestamp_granularities[]"}


@dataclass
class ServerState:
    """What the handlers share: settings, the engine process once it is ready, metrics and lifecycle flags."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: EngineProcess | None = None
    ready: bool = False
    draining: bool = False
    load_failed: bool = False
    in_flight: int = 0  # audio requests being handled; drain waits for zero
    # Set once the server gives up on the requests it holds (the drain's deadline passed, a stop was forced, the
    # engine died): each is answered abandon_error at once (retry elsewhere), not cut off or a plain-text 500.
    abandoned: asyncio.Event = field(default_factory=asyncio.Event)
    abandon_error: ApiError | None = None
    abandoned_requests: int = 0
    admission: Admission = field(init=False)  # from the settings
    deadlines: ReceiveDeadlines = field(init=False)
    # Audio decoding and cutting hold the GIL for much of their time: as many at once as there are cores, so a burst
    # of uploads queues for them instead of starving the event loop (64 threads at once stalled it for 400 ms).
    audio_work: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(os.cpu_count() or 1))
    started_at: int = field(default_factory=lambda: int(time.time()))
    sessions: set = field(default_factory=set)  # live sessions open (realtime.RealtimeSession); drain waits for none
    secret_key: bytes | None = None  # signs realtime client secrets when no API key is set (realtime.signing_key)

    def __post_init__(self) -> None:
        settings = self.settings
        spool_bytes = int(settings.max_spool_mb * 2**20)
        # A client's share of the spool: its share of the upload slots, at least room for one upload at its largest.
        client_spool_bytes = max(spool_bytes * settings.max_uploads_per_client // settings.max_concurrent_uploads,
                                 int(settings.max_upload_mb * 2**20))
        self.admission = Admission(settings.max_concurrent_uploads, spool_bytes, settings.max_queued_audio_seconds,
                                   settings.max_uploads_per_client, client_spool_bytes)
        self.deadlines = ReceiveDeadlines(settings.upload_timeout_seconds, settings.upload_idle_seconds,
                                          settings.upload_min_bytes_per_second)

    @property
    def model_id(self) -> str:
        model = self.settings.model
        return Path(model).name if os.path.isdir(model) else model

    def model_aliases(self) -> set[str]:
        return {self.model_id, self.settings.model, "whisper-1"}

    def abandon(self, error: ApiError) -> None:
        """Answers every request in flight, and every later one, with `error` (on the event loop's thread)."""
        if self.abandon_error is None:
            self.abandon_error = error
            self.abandoned.set()


def engine_unavailable() -> ApiError:
    return ApiError(503, "The speech engine stopped; retry on another replica.", code="engine_unavailable",
                    headers={"Retry-After": "5"})


def drain_expired() -> ApiError:
    return ApiError(503, "The server shut down before this request could finish; retry it on another replica.",
                    code="draining", headers={"Retry-After": "1", "Connection": "close"})


def server_stopping() -> ApiError:
    return ApiError(503, "The server is stopping; retry on another replica.", code="server_stopping",
                    headers={"Retry-After": "1", "Connection": "close"})


def authorize(request: Request, state: ServerState) -> None:
    key = state.settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def refuse_unless_serving(state: ServerState) -> None:
    if state.abandon_error is not None:
        raise state.abandon_error
    if state.draining:
        raise ApiError(503, "The server is shutting down; retry on another replica.", code="draining",
                       headers={"Retry-After": "1", "Connection": "close"})
    if not state.ready:
        raise ApiError(503, "The model is still loading; retry shortly.", code="model_loading", headers={"Retry-After": "5"})
    if state.engine.is_full():
        raise queue_full(state.engine.retry_after_seconds())


def queue_full(retry_after: int) -> ApiError:
    return ApiError(503, "The server is at capacity; retry later.", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def checked_number(value, name: str, low: float, high: float, integer: bool = False) -> float:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'} from {low:g} to {high:g}; "
                       f"got {json.dumps(value)}.", param=name, code="invalid_value")
    return value


def server_vad(given: dict, name: str) -> ServerVad:
    """OpenAI's server_vad parameters from an object whose type is server_vad (a file's chunking_strategy, a live
    session's turn_detection): each in its range, OpenAI's defaults for those left out."""
    defaults = ServerVad()
    return ServerVad(**{field: checked_number(given.get(field, getattr(defaults, field)), f"{name}.{field}", low, high,
                                              integer) for field, (low, high, integer) in ServerVad.RANGES.items()})


def parse_keywords(values: list[str]) -> tuple[str, ...]:
    """keywords[]: words or phrases the windows' prompt carries (vocabulary biasing), each once, in the order given;
    at most MAX_KEYWORD_CHARACTERS together (about 100 tokens: the engine keeps up to 112 of a window's prompt for
    them)."""
    keywords = tuple(dict.fromkeys(" ".join(value.split()) for value in values))
    if any(not keyword for keyword in keywords):
        raise ApiError(400, "keywords[] holds an empty keyword; send words or phrases.", param="keywords[]",
                       code="invalid_value")
    if len(", ".join(keywords)) > MAX_KEYWORD_CHARACTERS:
        raise ApiError(400, f"keywords[] may hold at most {MAX_KEYWORD_CHARACTERS} characters together (joined by "
                       f"', '); got {len(', '.join(keywords))}.", param="keywords[]", code="invalid_value")
    return keywords


def form_number(text: str) -> object:
    """A form field's number (int or float, as JSON spells it), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def chunking_strategy(form) -> ServerVad:
    """How a file is cut into windows: "auto" (or nothing) is our tuned segmentation; a server_vad object, sent as
    the SDK sends it (chunking_strategy[type]=server_vad, chunking_strategy[threshold]=...) or as one JSON field,
    sets the VAD's parameters."""
    name = "chunking_strategy"
    given = {key[len(name) + 1:-1]: values[-1] for key, values in form.fields.items()
             if key.startswith(f"{name}[") and key.endswith("]")}
    whole = form.get(name)
    if whole is not None and given:
        raise ApiError(400, f"Send {name} either as one field or as {name}[...] fields, not both.", param=name,
                       code="invalid_value")
    if not given and (whole or "auto").strip() == "auto":
        return AUTO_VAD
    if whole is not None:
        try:
            given = json.loads(whole)
        except ValueError:
            given = None
    else:  # form fields are text: the numbers are read as JSON numbers, anything else stays text (and is refused)
        given = {key: value if key == "type" else form_number(value) for key, value in given.items()}
    if not isinstance(given, dict) or given.get("type") != "server_vad":
        raise ApiError(400, f"{name} must be \"auto\" or an object with type \"server_vad\" and any of threshold, "
                       "prefix_padding_ms and silence_duration_ms.", param=name, code="invalid_value")
    unknown = sorted(set(given) - {"type", *ServerVad.RANGES})
    if unknown:
        raise ApiError(400, f"{name} has no field {', '.join(unknown)}: it takes type, "
                       f"{', '.join(ServerVad.RANGES)}.", param=f"{name}.{unknown[0]}", code="unknown_parameter")
    return server_vad(given, name)


@dataclass(frozen=True)
class Asked:
    """What a request asks for beyond the audio."""

    options: DecodeOptions
    response_format: str
    stream: bool
    segments_in_stream: bool  # stream=true with timestamp_granularities[]=segment: each delta carries its segments
    vad: ServerVad = AUTO_VAD  # chunking_strategy: where the audio is cut into windows


def refuse_transcription_fields(form) -> None:
    """OpenAI's translations take file, model, prompt, response_format and temperature only: the transcription
    fields the server acts on are refused there, by their name as sent ("include[]", "chunking_strategy[type]")."""
    for name in form.fields:
        base = name.split("[", 1)[0]
        if base in TRANSCRIPTION_ONLY_FIELDS:
            raise ApiError(400, f"Unknown parameter '{name}': /v1/audio/translations takes file, model, prompt, "
                           f"response_format and temperature; {base} is a parameter of /v1/audio/transcriptions.",
                           param=TRANSCRIPTION_ONLY_FIELDS[base], code="unknown_parameter")


def decode_options(form, task: str, state: ServerState) -> Asked:
    if task == "translate":
        refuse_transcription_fields(form)
    model = form.get("model")
    if model is not None and model not in state.model_aliases():
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{state.model_id}'.",
                       param="model", code="model_not_found")
    response_format = form.get("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got '{response_format}'.",
                       param="response_format", code="invalid_value")
    temperature_text = form.get("temperature") or "0"
    try:
        temperature = float(temperature_text)
    except ValueError:
        temperature = -1.0
    if not 0.0 <= temperature <= 1.0:
        raise ApiError(400, f"temperature must be a number from 0 to 1; got '{temperature_text}'.",
                       param="temperature", code="invalid_value")
    granularities = form.fields.get("timestamp_granularities[]", []) + form.fields.get("timestamp_granularities", [])
    unsupported = sorted(set(granularities) - {"segment", "word"})
    if unsupported:
        raise ApiError(400, f"timestamp_granularities supports 'segment' and 'word'; got {', '.join(unsupported)}.",
                       param="timestamp_granularities[]", code="invalid_value")
    stream_text = (form.get("stream") or "false").strip().lower()
    if stream_text not in ("true", "false"):
        raise ApiError(400, f"stream must be true or false; got '{form.get('stream')}'.", param="stream",
                       code="invalid_value")
    stream = stream_text == "true"
    if stream and response_format not in STREAMING_FORMATS:
        raise ApiError(400, f"response_format '{response_format}' cannot be streamed: stream=true sends the text as "
                       f"server-sent events, with response_format {' or '.join(STREAMING_FORMATS)}.",
                       param="response_format", code="unsupported_value")
    capabilities = state.engine.capabilities
    if task not in capabilities.tasks:
        raise ApiError(400, f"The model '{state.model_id}' is English-only: it transcribes English speech and cannot "
                       "translate; serve a multilingual checkpoint for /v1/audio/translations.",
                       param="model", code="unsupported_task")
    # Codes or English names. For a translation it is the spoken language, as openai-whisper's --language takes it
    # with --task translate (OpenAI's translations have no such field, and detect it).
    language = (form.get("language") or "").strip() or None
    language = parse_language(language, capabilities) if language else None
    # languages[]: the candidates detection chooses among (with one, it is the language).
    candidates = tuple(dict.fromkeys(parse_language(value, capabilities, "languages[]")
                                     for value in form.fields.get("languages[]", []) + form.fields.get("languages", [])
                                     if value.strip()))
    if not capabilities.multilingual:
        language = "en"  # English-only checkpoints transcribe English, whatever was asked
    elif language is None and len(candidates) == 1:
        language = candidates[0]
    prompt = (form.get("prompt") or "").strip() or None
    keywords = parse_keywords(form.fields.get("keywords[]", []) + form.fields.get("keywords", []))
    include = form.fields.get("include[]", []) + form.fields.get("include", [])
    if set(include) - {"logprobs"}:
        raise ApiError(400, f"include supports 'logprobs'; got {', '.join(sorted(set(include) - {'logprobs'}))}.",
                       param="include[]", code="invalid_value")
    if include and response_format != "json":  # OpenAI's rule: the log-probabilities ride on json answers only
        raise ApiError(400, f"include[]=logprobs works with response_format 'json' only; got '{response_format}'.",
                       param="include[]", code="unsupported_value")
    segments_in_stream = stream and "segment" in granularities
    # Timestamp tokens are decoded only where the answer shows segment times: elsewhere decoding without them makes
    # fewer word errors and fewer tokens (docs/server.md, "Decoding").
    timestamps = (state.settings.decode_timestamps == "always" or response_format in ("verbose_json", "srt", "vtt")
                  or segments_in_stream or "word" in granularities)
    options = DecodeOptions(task=task, language=language, prompt=prompt, temperature=temperature,
                            word_timestamps="word" in granularities, timestamps=timestamps,
                            languages=candidates if language is None else (), logprobs=bool(include),
                            keywords=keywords)
    return Asked(options, response_format, stream, segments_in_stream=segments_in_stream, vad=chunking_strategy(form))


async def receive_audio(request: Request, state: ServerState, task: str,
                        audio: Reservation) -> tuple[np.ndarray, Asked]:
    """Receives the upload into the spool, holding an upload slot while it arrives and its spool bytes until it is
    decoded (a declared body is reserved before a byte of it is read); the decoded seconds go on the request's audio
    reservation."""
    settings = state.settings
    limit_bytes = int(settings.max_upload_mb * 2**20)
    declared = request.headers.get("content-length", "")
    client = request.client.host if request.client else "unknown"
    with state.admission.reserve_spool(client, min(int(declared), limit_bytes) if declared.isdigit() else 0) as spool:
        with state.admission.reserve_upload(client):
            form = await receive_form(request, limit_bytes, state.deadlines, on_received=spool.grow_to)
        try:
            if form.file_path is None:
                raise ApiError(400, "The 'file' field with the audio is missing.", param="file", code="missing_file")
            if form.file_bytes == 0:
                raise ApiError(400, "The uploaded file is empty.", param="file", code="empty_file")
            asked = decode_options(form, task, state)
            async with state.audio_work:
                samples = await run_in_threadpool(decode_audio, form.file_path, settings.max_audio_seconds,
                                                  settings.max_audio_seconds_per_mb,
                                                  lambda total: audio.grow_to(total / SAMPLE_RATE))
        except AudioError as error:
            raise ApiError(error.status, error.message, param="file", code=error.code) from error
        finally:
            form.discard()
    return samples, asked


def as_api_error(error: Exception, state: ServerState) -> ApiError | None:
    """The answer to a failure of the work on a request, as an HTTP error or a stream's error event."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Overloaded):
        return ApiError(error.status, error.message, code=error.code,
                        headers={"Retry-After": str(state.engine.retry_after_seconds())})
    if isinstance(error, QueueFull):
        return queue_full(error.retry_after_seconds)
    if isinstance(error, TimeoutError):
        return ApiError(504, f"The request did not finish within {state.settings.request_timeout_seconds:g} s.",
                        code="request_timeout")
    if isinstance(error, OutOfMemory):
        return ApiError(503, "The GPU ran out of memory on this audio; retry later.", code="out_of_memory",
                        headers={"Retry-After": "5"})
    if isinstance(error, EngineUnavailable):
        return engine_unavailable()
    return None


async def handle_audio(request: Request, task: str) -> Response:
    state: ServerState = request.app.state.server
    authorize(request, state)
    refuse_unless_serving(state)
    finished, answer = await unless(answer_audio(request, state, task), state.abandoned.wait())
    if not finished:
        state.abandoned_requests += 1
        raise state.abandon_error
    return answer


async def answer_audio(request: Request, state: ServerState, task: str) -> Response:
    settings, arrived = state.settings, time.monotonic()
    with ExitStack() as held:
        audio = held.enter_context(state.admission.reserve_audio())
        try:
            samples, asked = await receive_audio(request, state, task, audio)
            audio_seconds = len(samples) / SAMPLE_RATE
            request.scope.setdefault("state", {})["audio_seconds"] = audio_seconds
            if asked.stream:  # the stream holds the audio's reservation until it ends
                stream = held.pop_all()
                # Also released after the response: a client gone before the first event never starts the stream.
                return StreamingResponse(stream_events(state, samples, asked, stream, arrived),
                                         media_type="text/event-stream", background=BackgroundTask(stream.close),
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            transcript = await until_disconnected(request, asyncio.wait_for(
                transcribe(state.engine, samples, asked.options, state.audio_work, state.engine.token_bytes,
                           detect_speech=not settings.fixed_new_tokens,
                           min_segment_speech=settings.min_segment_speech_seconds, vad=asked.vad),
                settings.request_timeout_seconds))
        except Exception as error:
            answer = as_api_error(error, state)
            if answer is None or answer is error:
                raise
            raise answer from error
    state.metrics.audio_seconds.inc(audio_seconds)
    body = render(transcript, asked.response_format, task)
    if asked.options.logprobs:
        body["logprobs"] = segment_logprobs(transcript.segments, state.engine.token_bytes)
    if isinstance(body, dict):
        return JSONResponse(body)
    return PlainTextResponse(body, media_type=MEDIA_TYPES[asked.response_format])


def server_sent_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def token_usage(seconds: float, output_tokens: int) -> dict:
    """A transcript's usage, in the SDK's token shape: the audio counted as the encoder's frames (50 a second), the
    output as the tokens the model generated."""
    audio_tokens = math.ceil(seconds * 50)
    return {"type": "tokens", "input_tokens": audio_tokens, "output_tokens": output_tokens,
            "total_tokens": audio_tokens + output_tokens, "input_token_details": {"audio_tokens": audio_tokens}}


async def stream_events(state: ServerState, samples: np.ndarray, asked: Asked, held: ExitStack,
                        arrived: float) -> AsyncIterator[str]:
    """OpenAI's transcription stream: a transcript.text.delta per window as soon as it and every window before it
    are final, then transcript.text.done with the whole text (and the language, in the SDK's `languages`). The
    granularities asked for ride on each delta as extra fields, `segments` and `words`, for the text it adds.
    A failure after the stream has started ends it with an error event. A client that hangs up cancels this
    generator, which leaves the engine at its next step."""
    options = asked.options
    builder = TranscriptBuilder(len(samples) / SAMPLE_RATE, state.engine.token_bytes if options.word_timestamps else None,
                                options.language, state.settings.min_segment_speech_seconds)
    first = True
    with held:
        try:
            async with asyncio.timeout(state.settings.request_timeout_seconds):
                async with aclosing(transcribe_pieces(state.engine, samples, options, state.audio_work, builder,
                                                      not state.settings.fixed_new_tokens, vad=asked.vad)) as pieces:
                    while (piece := await until_abandoned(anext(pieces, None), state)) is not None:
                        if not piece.delta:
                            continue
                        if first:
                            state.metrics.first_delta.observe(time.monotonic() - arrived)
                            first = False
                        event = {"type": "transcript.text.delta", "delta": piece.delta}
                        if asked.segments_in_stream:
                            first_id = len(builder.segments) - len(piece.segments)
                            event["segments"] = [{"id": first_id + offset, **segment_json(segment)}
                                                 for offset, segment in enumerate(piece.segments)]
                        if options.word_timestamps:
                            event["words"] = [word_json(word) for word in piece.words]
                        if options.logprobs:
                            event["logprobs"] = piece.logprobs
                        yield server_sent_event(event)
            transcript = builder.transcript()
            state.metrics.audio_seconds.inc(transcript.duration)
            done = {"type": "transcript.text.done", "text": transcript.text,
                    "usage": token_usage(transcript.duration, transcript.output_tokens)}
            if transcript.language:
                done["languages"] = [{"code": transcript.language}]
            if options.logprobs:
                done["logprobs"] = segment_logprobs(transcript.segments, state.engine.token_bytes)
            yield server_sent_event(done)
        except Exception as error:  # noqa: BLE001 - the status line is sent: the stream ends with the error instead
            answer = as_api_error(error, state)
            if answer is None:
                log.exception("stream failed")
                answer = ApiError(500, "Internal server error.", code="internal_error")
            yield server_sent_event({"type": "error", **error_body(answer)})


async def until_abandoned(work, state: ServerState):
    """The work's result, unless the server gives up on its requests first (the drain's deadline, a second signal,
    the engine gone): then the work is cancelled (a stream's next piece: its windows leave the engine) and the stream
    ends with the server's error."""
    finished, result = await unless(work, state.abandoned.wait(), settle=True)
    if not finished:
        raise state.abandon_error
    return result


async def unless(work, interruption, settle: bool = False) -> tuple[bool, object]:
    """Runs the work unless the interruption (an awaitable) comes first, which cancels it: (finished, result).
    `settle` waits for the cancelled work to end (a stream's piece, before the stream is closed)."""
    work_task, interruption_task = asyncio.ensure_future(work), asyncio.ensure_future(interruption)
    try:
        await asyncio.wait({work_task, interruption_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interruption_task.cancel()
        if not work_task.done():
            work_task.cancel()
            if settle:
                await asyncio.gather(work_task, return_exceptions=True)
    return (True, work_task.result()) if work_task.done() and not work_task.cancelled() else (False, None)


async def until_disconnected(request: Request, work):
    """Runs the work unless the client hangs up first; then the work is cancelled and its windows leave the engine."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    finished, result = await unless(work, disconnected())
    if not finished:
        raise ClientDisconnect()
    return result


async def transcriptions(request: Request) -> Response:
    return await handle_audio(request, "transcribe")


async def translations(request: Request) -> Response:
    return await handle_audio(request, "translate")


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    authorize(request, state)
    model = {"id": state.model_id, "object": "model", "created": state.started_at, "owned_by": "whisper-server"}
    if state.engine and state.engine.capabilities:  # known once the engine has loaded the checkpoint
        model["capabilities"] = state.engine.capabilities.describe()
    return JSONResponse({"object": "list", "data": [model]})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def readiness(state: ServerState) -> tuple[int, dict]:
    """/readyz's answer, on the API port and the metrics port alike: (status, body)."""
    if state.draining:
        return 503, {"status": "draining"}
    if not state.ready:
        return 503, {"status": "loading"}
    return 200, {"status": "ready", "model": state.model_id}


async def readyz(request: Request) -> Response:
    status, body = readiness(request.app.state.server)
    return JSONResponse(body, status_code=status)


async def index(request: Request) -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise ApiError(404, "The web page is not installed.", code="not_found")
    return FileResponse(page, media_type="text/html; charset=utf-8")


async def on_api_error(request: Request, error: ApiError) -> Response:
    request.scope.setdefault("state", {})["error_code"] = error.code  # for the request log and the refusals metric
    return error_response(error)


async def on_http_exception(request: Request, error: HTTPException) -> Response:
    return await on_api_error(request, ApiError(
        error.status_code, error.detail, code="not_found" if error.status_code == 404 else None, headers=error.headers))


async def on_client_disconnect(request: Request, error: ClientDisconnect) -> Response:
    request.scope.setdefault("state", {})["error_code"] = "client_disconnected"
    return Response(status_code=499)  # the client went away mid-upload: nobody reads this answer


async def on_unexpected(request: Request, error: Exception) -> Response:
    log.exception("unhandled error")
    return await on_api_error(request, ApiError(500, "Internal server error.", code="internal_error"))


class ObservedApp:
    """ASGI wrapper: request id, route-template metrics, in-flight accounting and one JSON log line per request."""

    def __init__(self, app: Starlette, state: ServerState):
        self.app, self.state = app, state

    def route_template(self, scope) -> str:
        for route in self.app.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
        return "unmatched"  # never the raw path: label values stay bounded

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.route_template(scope)
        given_id = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = given_id[:MAX_REQUEST_ID_CHARS].decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})
        status, responded = 500, False
        counted = route in AUDIO_ROUTES
        extra_headers = SECURITY_HEADERS + (PAGE_HEADERS if route == "/" or route.startswith("/static") else [])
        started = time.monotonic()

        async def send_with_id(message):
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message.setdefault("headers", []).extend([(b"x-request-id", request_id.encode("latin-1")), *extra_headers])
            await send(message)

        if counted:
            self.state.in_flight += 1
            self.state.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - already answered 500 and logged by on_unexpected
            status = 500
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when it stops: the client hears why, not a plain-text 500.
            if not responded:
                scope["state"]["error_code"] = server_stopping().code
                await error_response(server_stopping())(scope, receive, send_with_id)
            raise
        finally:
            if counted:
                self.state.in_flight -= 1
                self.state.metrics.in_flight.dec()
            duration = time.monotonic() - started
            metrics = self.state.metrics
            metrics.requests.labels(scope["method"], route, str(status)).inc()
            metrics.request_duration.labels(scope["method"], route).observe(duration)
            error_code = scope["state"].get("error_code")
            if status >= 400 and route not in QUIET_ROUTES:  # a probe's 503 while loading refuses nobody
                metrics.refusals.labels(error_code or str(status)).inc()
            # Probes and scrapes every few seconds would drown the request log.
            if route not in QUIET_ROUTES or status >= 400:
                log.info("request", extra={"fields": {
                    "request_id": request_id, "method": scope["method"], "route": route, "status": status,
                    "client": (scope.get("client") or ("unknown",))[0],
                    **({"error_code": error_code} if error_code else {}),
                    "audio_seconds": round(scope["state"].get("audio_seconds", 0.0), 3),
                    "duration_seconds": round(duration, 4),
                }})


def create_app(state: ServerState, live_routes: Sequence[BaseRoute] = ()) -> ObservedApp:
    """The API; `live_routes` are the live transcription endpoints (realtime.ROUTES, which build on this module)."""
    routes = [
        *live_routes,
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", translations, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: on_api_error, HTTPException: on_http_exception, ClientDisconnect: on_client_disconnect,
        Exception: on_unexpected})
    app.state.server = state
    return ObservedApp(app, state)

