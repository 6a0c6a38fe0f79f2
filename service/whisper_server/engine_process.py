"""The engine runs in its own process, so nothing the HTTP layer does (uploads, audio decoding, the event loop) holds
up the decode loop, and the HTTP process never loads torch.

Two one-way pipes connect them. HTTP process -> engine: ("submit", key, options, window offsets, live) followed by each
window's float32 samples as raw bytes (no pickling of audio), ("cancel", key), ("stop",). Engine -> HTTP process:
("ready", EngineInfo) or ("load_failed", message) once, then per request ("window", key, index, result) as each
window's result is final, in the order they finish, and ("done", key) after the last, or ("failed", key, kind,
message); and ("stats", EngineStats) every 100 ms or so while busy, which the HTTP process turns into its Prometheus
metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import resource_tracker

import numpy as np

from .settings import Settings
from .decoding import Capabilities, DecodeOptions, EngineFailure, OutOfMemory, Window, WindowResult
from .metrics import Metrics
from .scheduler import SchedulerEvents, SlotScheduler

log = logging.getLogger("whisper_server.engine")
REPORT_SECONDS = 0.1
# Partial text goes to the HTTP process at most this often (the first at once): one message for every window then,
# a caption's pace, rather than one per step.
PARTIALS_SECONDS = 0.05
# What systemd, Ctrl-C in a shell or `kill -- -PGID` send the engine process along with the HTTP process.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class QueueFull(Exception):
    def __init__(self, retry_after_seconds: int):
        super().__init__(f"the queue is full; retry in {retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


class EngineUnavailable(Exception):
    """The engine process is gone (it crashed or was killed); the server exits so that it is restarted."""


class EngineError(Exception):
    """The engine failed on this request for a reason other than memory (a bug): a 500, the server keeps serving."""


@dataclass(frozen=True)
class EngineInfo:
    device: str
    dtype: str
    slots: int
    load_seconds: float
    capabilities: Capabilities
    token_bytes: Sequence[bytes]  # each text token's bytes: the HTTP process groups tokens into words with them


@dataclass
class EngineStats:
    waiting_windows: int = 0
    waiting_seconds: float = 0.0
    expected_wait_seconds: float = 0.0
    steps: list[tuple[int, float]] = field(default_factory=list)  # (busy slots, seconds) per step since the last


# The engine process ------------------------------------------------------------------------------------------------

def engine_main(settings: Settings, requests, events) -> None:
    """Entry point of the engine process: loads and warms the model, then runs the step loop until told to stop or
    until the HTTP process goes away."""
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd, `kill -- -PGID`, a shell), reach this process
    # too: the HTTP process drains the requests in flight, then stops the engine. Held since the spawn (see start()),
    # ignored from here on, which also drops one that came in between; both before the slow imports.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # torch's OpenMP workers otherwise spin between ops and take every core from the HTTP process beside them (on CPU
    # a burst's p50 went from 0.4 s to 4 s); read when torch loads, so set before the import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import transformers

    from .engine import WhisperEngine
    from .logs import configure_logging

    configure_logging()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    engine = WhisperEngine(settings.model, settings.device, settings.dtype, settings.offline, settings.max_new_tokens,
                           settings.fixed_new_tokens, settings.cpu_threads, slots=settings.max_batch_size,
                           cuda_graphs=settings.cuda_graphs, feature_padding=settings.feature_padding,
                           beam_size=settings.beam_size)
    try:
        engine.load()
        engine.warm_up()
    except Exception as error:  # noqa: BLE001 - reported to the HTTP process, which exits non-zero
        log.exception("model failed to load")
        events.send(("load_failed", f"{type(error).__name__}: {error}"))
        return
    events.send(("ready", EngineInfo(engine.device, str(engine.dtype), engine.capacity, engine.load_seconds,
                                     engine.capabilities, engine.token_bytes())))
    log.info("engine ready", extra={"fields": {"slots": engine.capacity, "device": engine.device,
                                               "cuda_graphs": len(engine.decoder.graphs),
                                               "attention_backends": engine.attention_backends,
                                               **engine.capabilities.describe()}})
    try:
        EngineLoop(engine, requests, events, fixed_length=settings.fixed_new_tokens,
                   admission_wait=settings.batch_wait_ms / 1000,
                   condition_on_previous_text=settings.condition_on_previous_text).run()
    except EngineFailure:
        log.exception("the engine cannot go on; exiting so that the server exits and the pod is restarted")
        sys.exit(1)


class EngineLoop:
    """The engine process's main thread: takes the messages a receiver thread queued, admits and steps."""

    def __init__(self, engine, requests, events, fixed_length: bool, admission_wait: float,
                 condition_on_previous_text: bool = False):
        self.requests, self.events = requests, events
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.scheduler = SlotScheduler(engine, SchedulerEvents(on_window=self._window, on_done=self._done,
                                                               on_failed=self._failed, on_step=self._stepped,
                                                               on_partials=self._partials),
                                       fixed_length=fixed_length, admission_wait=admission_wait,
                                       condition_on_previous_text=condition_on_previous_text)
        self.steps: list[tuple[int, float]] = []
        self.reported: tuple | None = None
        self.reported_at = 0.0
        # (request, window) -> the text tokens not yet sent, each with its log-probability
        self.partials: dict[tuple[int, int], list[tuple[int, float]]] = {}
        self.partials_sent_at = 0.0
        threading.Thread(target=self._receive, name="engine-receiver", daemon=True).start()

    def _receive(self) -> None:
        """Reads the pipe (blocking, outside the GIL) so the step loop only ever takes ready messages."""
        try:
            while True:
                message = self.requests.recv()
                if message[0] == "submit":
                    _, key, options, offsets, live = message
                    windows = [Window(offset, np.frombuffer(self.requests.recv_bytes(), dtype=np.float32))
                               for offset in offsets]
                    message = ("submit", key, options, windows, live)
                self.inbox.put(message)
                if message[0] == "stop":
                    return
        except (EOFError, OSError):  # the HTTP process is gone
            self.inbox.put(("stop",))

    def run(self) -> None:
        while True:
            try:  # wait for work only when there is none
                message = self.inbox.get(timeout=REPORT_SECONDS) if self.scheduler.idle else self.inbox.get_nowait()
                while True:
                    if message[0] == "stop":
                        return
                    if message[0] == "submit":
                        self.scheduler.submit(*message[1:])
                    elif message[0] == "cancel":
                        self.scheduler.cancel(message[1])
                    message = self.inbox.get_nowait()
            except queue.Empty:
                pass
            self.scheduler.run_once()
            self._send_partials()
            self._report()

    def _partials(self, partials: list[tuple[int, int, list[tuple[int, float]]]]) -> None:
        for key, index, tokens in partials:
            self.partials.setdefault((key, index), []).extend(tokens)

    def _send_partials(self) -> None:
        now = time.monotonic()
        if self.partials and now - self.partials_sent_at >= PARTIALS_SECONDS:
            self.events.send(("partials", [(key, index, tokens) for (key, index), tokens in self.partials.items()]))
            self.partials, self.partials_sent_at = {}, now

    def _window(self, key: int, index: int, result: WindowResult) -> None:
        self.partials.pop((key, index), None)  # its result holds them
        self.events.send(("window", key, index, result))

    def _done(self, key: int) -> None:
        self.events.send(("done", key))

    def _failed(self, key: int, error: Exception) -> None:
        self.partials = {window: tokens for window, tokens in self.partials.items() if window[0] != key}
        kind = "out_of_memory" if isinstance(error, OutOfMemory) else "engine_error"
        self.events.send(("failed", key, kind, f"{type(error).__name__}: {error}"))

    def _stepped(self, busy: int, seconds: float) -> None:
        self.steps.append((busy, seconds))

    def _report(self) -> None:
        scheduler, now = self.scheduler, time.monotonic()
        if now - self.reported_at < REPORT_SECONDS and not scheduler.idle:
            return  # the queue is summed at most every 100 ms, not on every step
        queue_state = (scheduler.waiting_windows(), round(scheduler.waiting_seconds(), 3))
        if self.steps or queue_state != self.reported:
            self.events.send(("stats", EngineStats(*queue_state, scheduler.expected_wait_seconds(), self.steps)))
            self.steps, self.reported, self.reported_at = [], queue_state, now


# The HTTP process's side -------------------------------------------------------------------------------------------

class EngineProcess:
    """The HTTP process's handle on the engine process: submits requests, hands back their window results as they
    come, relays the metrics. A thread sends (large audio never blocks the event loop), a thread receives and queues
    each message for the request it belongs to."""

    def __init__(self, settings: Settings, metrics: Metrics, on_lost: Callable[[], None] = lambda: None):
        self.settings, self.metrics, self.on_lost = settings, metrics, on_lost
        self.info: EngineInfo | None = None
        self.stats = EngineStats()
        self.keys = itertools.count()
        self.pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.lock = threading.Lock()
        self.outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = False
        self.lost = False  # the engine process exited unasked: every request from then on fails at once
        self.process = None

    def start(self) -> EngineInfo:
        """Starts the engine process and blocks until its model is loaded and warm; raises RuntimeError if not."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads, CUDA initialises cleanly
        requests_reader, self.requests = context.Pipe(duplex=False)
        self.events, events_writer = context.Pipe(duplex=False)
        self.process = context.Process(target=engine_main, args=(self.settings, requests_reader, events_writer),
                                       name="whisper-engine", daemon=True)
        # The spawned interpreter inherits this thread's signal mask: a stop signal to the process group during the
        # second it takes to reach engine_main waits there, instead of killing the engine as if its load had failed.
        # multiprocessing's resource tracker unblocks both signals once it has spawned its own process (as it does on a
        # first start): started beforehand, it cannot undo this mask.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        requests_reader.close()
        events_writer.close()
        try:
            message = self.events.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self.process.exitcode})") from None
        if message[0] == "load_failed":
            self.process.join(5)
            raise RuntimeError(message[1])
        self.info = message[1]
        threading.Thread(target=self._send, name="engine-sender", daemon=True).start()
        threading.Thread(target=self._receive, name="engine-receiver", daemon=True).start()
        return self.info

    def stop(self) -> None:
        if self.process is None:
            return
        self.stopping = True
        if self.info is None:  # still loading: nothing to finish (the engine ignores SIGTERM)
            self.process.kill()
        self.outgoing.put((("stop",), []))
        self.outgoing.put(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    @property
    def capabilities(self) -> Capabilities | None:
        """The checkpoint's, once the engine is ready."""
        return self.info.capabilities if self.info else None

    @property
    def token_bytes(self) -> Sequence[bytes]:
        return self.info.token_bytes if self.info else ()

    def is_full(self) -> bool:
        with self.lock:
            return len(self.pending) >= self.settings.queue_size

    def retry_after_seconds(self) -> int:
        return max(1, min(60, math.ceil(self.stats.expected_wait_seconds)))

    async def transcribe(self, windows: list[Window], options: DecodeOptions,
                         live: bool = False) -> AsyncIterator[tuple[int, WindowResult | list[tuple[int, float]]]]:
        """Decodes a request's windows, yielding (window index, result) as each is final, in the order they finish,
        and where the options ask for partials, (window index, [(text token, its log-probability)]) as its decode
        makes them final before; a window whose decode stopped short names the window that decodes its rest
        (`result.continuation`, an index past the request's own windows). Leaving early (client gone, deadline
        passed, an error) cancels the request in the engine: its slots are freed before the next step. A live
        session's turn (`live`) goes ahead of files in the engine, and is not counted against --queue-size
        (--max-realtime-sessions bounds live turns)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        key = next(self.keys)
        with self.lock:
            if self.lost:
                raise EngineUnavailable("the engine process exited")
            if not live and len(self.pending) >= self.settings.queue_size:
                raise QueueFull(self.retry_after_seconds())
            self.pending[key] = (loop, inbox)
        samples = [np.ascontiguousarray(window.samples, dtype=np.float32) for window in windows]
        self.outgoing.put((("submit", key, options, [window.offset for window in windows], live), samples))
        finished = False
        try:
            while (item := await inbox.get()) is not None:
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
            finished = True
        finally:
            if not finished:
                self.outgoing.put((("cancel", key), []))
            with self.lock:
                self.pending.pop(key, None)

    def _send(self) -> None:
        while (item := self.outgoing.get()) is not None:
            header, payloads = item
            try:
                self.requests.send(header)
                for payload in payloads:
                    self.requests.send_bytes(payload)
            except OSError:  # the engine is gone; the receiver reports it
                return

    def _receive(self) -> None:
        try:
            while True:
                message = self.events.recv()
                if message[0] == "window":
                    self._deliver(message[1], (message[2], message[3]))
                elif message[0] == "partials":
                    for key, index, tokens in message[1]:
                        self._deliver(key, (index, tokens))
                elif message[0] == "done":
                    self._deliver(message[1], None)
                elif message[0] == "failed":
                    _, key, kind, text = message
                    self._deliver(key, OutOfMemory(text) if kind == "out_of_memory" else EngineError(text))
                elif message[0] == "stats":
                    self._record(message[1])
        except (EOFError, OSError):
            pass
        if not self.stopping:
            self.process.join(1)
            log.error("engine process exited", extra={"fields": {"exit_code": self.process.exitcode}})
            with self.lock:
                self.lost = True
                keys = list(self.pending)
            for key in keys:
                self._deliver(key, EngineUnavailable("the engine process exited"))
            self.on_lost()

    def _deliver(self, key: int, item) -> None:
        """Queues a window result, an error or the end (None) for the request's transcribe(), on its event loop."""
        with self.lock:
            entry = self.pending.get(key)
        if entry is not None:
            loop, inbox = entry
            loop.call_soon_threadsafe(inbox.put_nowait, item)

    def _record(self, stats: EngineStats) -> None:
        self.stats = stats
        self.metrics.on_queue_change(stats.waiting_windows, stats.waiting_seconds)
        for busy, seconds in stats.steps:
            self.metrics.batch_size.observe(busy)
            self.metrics.decode_step.observe(seconds)

