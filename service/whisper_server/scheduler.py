"""Iteration-level batching: windows from every request share the engine's decode slots, joining free slots between
steps and leaving the moment they finish. OpenAI's long-form rules act here, per window: the temperature fallback,
the no-speech skip, the seek (a window whose decode stops short goes back into the queue from its last complete
timestamp) and one language per request. A window whose text is shown as it decodes (partials, for live captions)
is decoded once, its first decode final: shown text cannot be taken back. Runs in the engine process, on the thread
that owns the model."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .decoding import SAMPLE_RATE, DecodeOptions, EngineFailure, OutOfMemory, Window, WindowResult

log = logging.getLogger("whisper_server.scheduler")

# OpenAI's reference thresholds: a decode whose text gzip shrinks more than 2.4x (a repetition loop) or whose average
# log-probability is below -1 is decoded again at a temperature 0.2 higher, up to 1.0; a window whose no-speech
# probability is above 0.6 and whose decode is that unsure is silence.
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
TEMPERATURE_STEP = 0.2
# With conditioning, a window decoded above this temperature (a guess) is not carried into the next one's prompt,
# and the prompt starts again from there (OpenAI's and faster-whisper's prompt_reset_on_temperature).
PROMPT_RESET_TEMPERATURE = 0.5
# The previous tokens a request keeps: a prompt holds at most half of Whisper's 448 positions, the newest tokens.
PREVIOUS_TOKENS_KEPT = 224
# The language is detected over up to 30 s of speech (the first windows' together), padded as faster-whisper pads it
# (engine.DETECTION_PADDING), unless the first window alone is 30 s long: then it needs no padding and detects the
# language at its admission, at no extra cost.
DETECTION_SECONDS = 30.0


class Engine(Protocol):
    """What the scheduler needs of the engine (WhisperEngine; a stand-in in the tests)."""

    capacity: int

    def free_slots(self) -> int: ...
    def healthy(self) -> bool: ...
    def encode(self, windows: list[tuple[np.ndarray, DecodeOptions]]) -> object: ...
    def encoded(self, admission: object) -> bool: ...
    def attach(self, admission: object) -> list[int]: ...
    def window_language(self, slot: int) -> str | None: ...
    def window_no_speech_prob(self, slot: int) -> float: ...
    def partial_tokens(self) -> dict[int, list[tuple[int, float]]]: ...
    def detect_language(self, samples: np.ndarray, candidates: tuple[str, ...]) -> str: ...
    def step(self) -> list[tuple[int, WindowResult]]: ...
    def release(self, slots: list[int]) -> None: ...


@dataclass(eq=False)  # identity: requests are found by key and compared by who they are, never by their audio
class Request:
    key: int
    options: DecodeOptions  # its language is set once the first window admitted has detected it
    windows: list[Window]  # the request's windows, then the continuations its decodes asked for
    sequence: int  # arrival order: older requests go first among equals
    waiting: deque[tuple[int, float]] = field(default_factory=deque)  # (window, temperature) not yet in a slot
    busy: int = 0  # windows in slots now
    finished: int = 0
    last_served: int = -1  # when a window of it last got a slot (-1: not since it arrived)
    # Decode work: slot-steps its windows took, retries at a higher temperature included. A request starts at the
    # least work of those in the scheduler, so it competes from now on, owed nothing for the past.
    work: int = 0
    detecting: bool = False  # a window is being admitted to detect the request's language; the others wait for it
    tries: dict[int, list[WindowResult]] = field(default_factory=dict)  # window -> its decodes that fell back
    live: bool = False  # a live session's turn: its windows take free slots ahead of files'
    # With conditioning: the tokens of its windows decoded so far (timestamps included), since the last reset.
    previous_tokens: tuple[int, ...] = ()


def is_silence(result: WindowResult) -> bool:
    """OpenAI's no-speech rule: the model expects no speech and its decode is unsure."""
    return result.no_speech_prob > NO_SPEECH_THRESHOLD and not result.avg_logprob > LOGPROB_THRESHOLD


def needs_fallback(result: WindowResult) -> bool:
    """OpenAI's fallback rule: a repetition loop or an unsure decode, unless the window is silence."""
    failed = result.compression_ratio > COMPRESSION_RATIO_THRESHOLD or result.avg_logprob < LOGPROB_THRESHOLD
    return failed and not is_silence(result)


def decoded_tokens(result: WindowResult) -> list[int]:
    """A final decode's tokens as the next window's prompt carries them: its segments' text, with the timestamp tokens
    around it (as OpenAI's all_tokens keeps them)."""
    return [token for segment in result.segments for token in segment.all_tokens]


def best_try(tries: list[WindowResult]) -> WindowResult:
    """When every temperature fails the fallback rules, the decode kept (faster-whisper's choice; OpenAI keeps the
    last, at temperature 1.0, the likeliest to be noise): the highest average log-probability among the tries that
    are no repetition loop, or among all of them when every one loops."""
    candidates = [result for result in tries if result.compression_ratio <= COMPRESSION_RATIO_THRESHOLD] or tries
    return max(candidates, key=lambda result: result.avg_logprob)


@dataclass
class SchedulerEvents:
    """Where the scheduler reports to (the engine process forwards these to the HTTP process): each window's result
    as soon as it is final (after any fallback decision), in the order windows finish, then the request's end."""

    on_window: Callable[[int, int, WindowResult], None]
    on_done: Callable[[int], None]
    on_failed: Callable[[int, Exception], None]
    on_step: Callable[[int, float], None] = lambda busy, seconds: None
    # Per step, for the windows whose text is shown as it decodes: (request, window, [(text token made final, its
    # log-probability)]).
    on_partials: Callable[[list[tuple[int, int, list[tuple[int, float]]]]], None] = lambda partials: None


class SlotScheduler:
    def __init__(self, engine: Engine, events: SchedulerEvents, fixed_length: bool = False,
                 admission_wait: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 condition_on_previous_text: bool = False):
        self.engine = engine
        self.events = events
        # OpenAI's condition_on_previous_text: a file's windows decode one after another, each prompted with the text
        # decoded before it (live turns are not conditioned). Off, a file's windows decode side by side.
        self.condition_on_previous_text = condition_on_previous_text and not fixed_length
        # Fixed-length benchmark decoding: each window decoded once and kept as it is (no fallback, skip or seek).
        self.fixed_length = fixed_length
        # While windows decode, each admission (an encoder pass) holds up their next step: windows that arrive then
        # wait up to this long for others to join them in one pass. An idle engine admits at once.
        self.admission_wait = admission_wait
        self.clock = clock
        self.waiting_since: float | None = None  # when the oldest window now waiting for a slot started waiting
        self.requests: dict[int, Request] = {}
        self.owners: dict[int, tuple[Request, int, float]] = {}  # slot -> (request, window, temperature)
        self.sequence = itertools.count()
        self.picks = itertools.count()
        self.window_seconds = 1.0  # moving average of how long a window holds a slot, for Retry-After
        self.admitted_at: dict[int, float] = {}
        self.streaming: set[int] = set()  # slots whose window's text is shown as it decodes
        # The admission whose windows are being encoded (on the engine's admission stream, while the busy slots step
        # on), with its picks; they join their slots once the encoder is done. One at a time.
        self.joining: tuple[object, list[tuple[Request, int, float]]] | None = None

    def submit(self, key: int, options: DecodeOptions, windows: list[Window], live: bool = False) -> None:
        if options.language is None and not self.fixed_length:
            options = self._detected(options, windows)
        request = Request(key, options, windows, next(self.sequence),
                          waiting=deque((index, options.temperature) for index in range(len(windows))), live=live,
                          work=min((other.work for other in self.requests.values()), default=0))
        self.requests[key] = request
        if not windows:
            self._finish(request)
        elif self.waiting_since is None:
            self.waiting_since = self.clock()

    def _detected(self, options: DecodeOptions, windows: list[Window]) -> DecodeOptions:
        """The language detected over the first 30 s of speech (a short first phrase alone decides badly), unless the
        first window holds all 30 s: one encoder pass before the request's windows queue. Otherwise the first window
        detects it at its admission, at no extra cost."""
        wanted, parts = int(DETECTION_SECONDS * SAMPLE_RATE), []
        for window in windows:  # never more than the first 30 s (a 2-hour file has thousands of windows)
            if sum(map(len, parts)) >= wanted:
                break
            parts.append(window.samples)
        if not parts or len(parts[0]) >= wanted:
            return options
        speech = np.concatenate(parts)[:wanted]
        try:
            return replace(options, language=self.engine.detect_language(speech, options.languages))
        except Exception:  # noqa: BLE001 - the first window detects it instead, as it would anyway
            log.warning("language detection over the first %.0f s of speech failed", DETECTION_SECONDS, exc_info=True)
            return options

    def cancel(self, key: int) -> None:
        """A request whose client went away or timed out: its waiting windows are dropped and its slots freed before
        the next step."""
        request = self.requests.pop(key, None)
        if request is not None:
            self._release(request)

    @property
    def idle(self) -> bool:
        return not self.owners and self.joining is None and not self.waiting_windows()

    def waiting_windows(self) -> int:
        return sum(len(request.waiting) for request in self.requests.values())

    def waiting_seconds(self) -> float:
        return sum(len(request.windows[index].samples) for request in self.requests.values()
                   for index, _ in request.waiting) / SAMPLE_RATE

    def expected_wait_seconds(self) -> float:
        """How long the waiting windows will likely take to get through the slots, at the engine's recent rate."""
        return self.waiting_windows() / self.engine.capacity * self.window_seconds

    def run_once(self) -> None:
        """Lets encoded windows join their slots, starts encoding the next waiting ones, then runs one decode step
        over every busy slot."""
        if self.joining is not None and (not self.owners or self.engine.encoded(self.joining[0])):
            self._attach()
        if self.joining is None:
            self._admit()
        if self.owners:
            self._step()

    def _admit(self) -> None:
        free = self.engine.free_slots()
        waiting = self.waiting_windows()
        if not waiting:
            self.waiting_since = None
            return
        if self.owners and waiting < free and self.clock() - (self.waiting_since or 0.0) < self.admission_wait:
            return  # the running windows step on meanwhile
        picks = self._pick(free)
        if not picks:
            return
        self.waiting_since = self.clock() if waiting > len(picks) else None
        try:
            self.joining = (self.engine.encode(self._inputs(picks)), picks)
        except Exception as error:  # noqa: BLE001 - a failed admission fails its requests; the engine goes on if it can
            self._admission_failed(picks, error)
            return
        if not self.owners:  # nothing decoding to overlap the encoder with: join at once
            self._attach()

    def _attach(self) -> None:
        admission, picks = self.joining
        self.joining = None
        try:
            slots = self.engine.attach(admission)
        except Exception as error:  # noqa: BLE001 - as a failed encoder pass
            self._admission_failed(picks, error)
            return
        self._joined(slots, picks)

    def _joined(self, slots: list[int], picks: list[tuple[Request, int, float]]) -> None:
        now = time.monotonic()
        for slot, pick in zip(slots, picks):
            if self.requests.get(pick[0].key) is not pick[0]:  # cancelled or failed while its window was encoding
                self.engine.release([slot])
                continue
            self.owners[slot] = pick
            self.admitted_at[slot] = now
            request = pick[0]
            # Partials, unless the no-speech rule may yet call the window silence and drop its text.
            if request.options.partials and self.engine.window_no_speech_prob(slot) <= NO_SPEECH_THRESHOLD:
                self.streaming.add(slot)
            if request.detecting:  # OpenAI detects the language once, on the first window; the rest decode in it
                request.options = replace(request.options, language=self.engine.window_language(slot))
                request.detecting = False

    def _admission_failed(self, picks: list[tuple[Request, int, float]], error: Exception) -> None:
        """A failed admission with windows of several requests in it is retried one request at a time, at once: a
        failure fails the request that causes it, never the requests that happened to share its admission."""
        requests = list({request.key: request for request, _, _ in picks}.values())
        healthy = isinstance(error, OutOfMemory) or self.engine.healthy()
        if len(requests) > 1 and healthy:
            log.warning("admitting %d windows of %d requests together failed (%s: %s); admitting each request alone",
                        len(picks), len(requests), type(error).__name__, error)
            for request in requests:
                if self.requests.get(request.key) is request:  # not cancelled meanwhile
                    self._admit_alone([pick for pick in picks if pick[0] is request])
            return
        log.log(logging.WARNING if isinstance(error, OutOfMemory) else logging.ERROR,
                "admitting %d windows failed", len(picks), exc_info=not isinstance(error, OutOfMemory))
        for request in requests:
            self._fail(request, error)
        if not healthy:
            raise EngineFailure("the device stopped working after a failed admission") from error

    @staticmethod
    def _inputs(picks: list[tuple[Request, int, float]]) -> list[tuple[np.ndarray, DecodeOptions]]:
        return [(request.windows[index].samples,
                 replace(request.options, temperature=temperature, previous_tokens=request.previous_tokens))
                for request, index, temperature in picks]

    def _conditioned(self, request: Request) -> bool:
        return self.condition_on_previous_text and not request.live

    def _admit_alone(self, picks: list[tuple[Request, int, float]]) -> None:
        try:
            slots = self.engine.attach(self.engine.encode(self._inputs(picks)))
        except Exception as error:  # noqa: BLE001 - fails this request alone
            self._admission_failed(picks, error)
            return
        self._joined(slots, picks)

    def _pick(self, free: int) -> list[tuple[Request, int, float]]:
        """Fair shares: each free slot goes to the waiting request with the fewest windows in slots, and among
        those to the one that has had the least decode work (then round-robin: the one served longest ago, the
        oldest among the unserved), so a 2-hour file holds no more slots than the clips that arrive after it, and a
        request whose windows keep falling back (a repetition loop at every temperature: six decodes a window) pays
        for its retries from its own share, not from others'. A window retried at a higher temperature goes back to
        the head of its request. A request whose language is still to be detected gives one window to this
        admission, and so does a conditioned request (its next window's prompt is this one's text).
        Live turns go first (a caption never waits behind a long file), but while file windows wait, live windows
        hold at most all slots but one: files still progress."""
        picks = []
        waiting = [request for request in self.requests.values() if request.waiting and not request.detecting
                   and not (request.busy and self._conditioned(request))]
        live_room = max(1, self.engine.capacity - 1)
        live_busy = sum(request.live for request, _, _ in self.owners.values())
        while len(picks) < free and waiting:
            files = [request for request in waiting if not request.live]
            eligible = files if files and live_busy >= live_room else waiting
            request = min(eligible, key=lambda r: (not r.live, r.busy, r.work, r.last_served, r.sequence))
            index, temperature = request.waiting.popleft()
            live_busy += request.live
            request.busy += 1
            request.last_served = next(self.picks)
            picks.append((request, index, temperature))
            request.detecting = request.options.language is None
            if not request.waiting or request.detecting or self._conditioned(request):
                waiting.remove(request)
        return picks

    def _step(self) -> None:
        busy = len(self.owners)
        started = time.monotonic()
        try:
            finished = self.engine.step()
        except Exception as error:  # noqa: BLE001 - a failed step fails the requests in it
            log.exception("decode step over %d slots failed", busy)
            for request in {request.key: request for request, _, _ in self.owners.values()}.values():
                self._fail(request, error)
            if not isinstance(error, OutOfMemory):
                raise EngineFailure(f"a decode step failed: {type(error).__name__}: {error}") from error
            return
        now = time.monotonic()
        self.events.on_step(busy, now - started)
        for request, _, _ in self.owners.values():
            request.work += 1
        if self.streaming:
            partials = [(self.owners[slot][0].key, self.owners[slot][1], tokens)
                        for slot, tokens in self.engine.partial_tokens().items() if slot in self.streaming]
            if partials:
                self.events.on_partials(partials)
        for slot, result in finished:
            request, index, temperature = self.owners.pop(slot)
            streamed = slot in self.streaming
            self.streaming.discard(slot)
            self.window_seconds = 0.9 * self.window_seconds + 0.1 * (now - self.admitted_at.pop(slot))
            request.busy -= 1
            window = request.windows[index]
            result.offset = window.offset
            if not self.fixed_length:
                if needs_fallback(result) and not streamed:  # text already shown is final
                    tries = request.tries.setdefault(index, [])
                    tries.append(result)
                    if temperature < 1.0:
                        request.waiting.appendleft((index, round(min(1.0, temperature + TEMPERATURE_STEP), 2)))
                        self.waiting_since = self.waiting_since or now
                        continue
                    result = best_try(tries)
                request.tries.pop(index, None)
                if is_silence(result):
                    result.segments, result.resume_at = [], None
                elif result.resume_at is not None:
                    result.continuation = self._continue(request, window, result.resume_at)
                    self.waiting_since = self.waiting_since or now
                if self._conditioned(request):
                    request.previous_tokens = (() if result.temperature > PROMPT_RESET_TEMPERATURE else (
                        request.previous_tokens + tuple(decoded_tokens(result)))[-PREVIOUS_TOKENS_KEPT:])
            self.events.on_window(request.key, index, result)
            request.finished += 1
            if request.finished == len(request.windows):
                self._finish(request)

    @staticmethod
    def _continue(request: Request, window: Window, resume_at: float) -> int:
        """The rest of a window, from its decode's last complete timestamp to its end, goes back into the queue at
        the head of its request, as a window of its own (OpenAI's seek, with the window's end kept); its index."""
        cut = round(resume_at * SAMPLE_RATE)
        request.windows.append(Window(window.offset + cut / SAMPLE_RATE, window.samples[cut:]))
        request.waiting.appendleft((len(request.windows) - 1, request.options.temperature))
        return len(request.windows) - 1

    def _finish(self, request: Request) -> None:
        self.requests.pop(request.key, None)
        self.events.on_done(request.key)

    def _fail(self, request: Request, error: Exception) -> None:
        if self.requests.pop(request.key, None) is not None:
            self._release(request)
            self.events.on_failed(request.key, error)

    def _release(self, request: Request) -> None:
        slots = [slot for slot, (owner, _, _) in self.owners.items() if owner is request]
        for slot in slots:
            del self.owners[slot]
            self.admitted_at.pop(slot, None)
            self.streaming.discard(slot)
        self.engine.release(slots)
        request.waiting.clear()
        request.busy = 0
