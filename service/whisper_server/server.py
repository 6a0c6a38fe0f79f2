"""Runs the server: loads and warms the model in the background, serves HTTP, drains on SIGTERM, exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time

import transformers
import uvicorn

from .app import JsonLogFormatter, ServerState, create_app
from .cli import Settings
from .engine import WhisperEngine
from .scheduler import BatchScheduler, SchedulerStats

log = logging.getLogger("whisper_server")


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


class DrainingServer(uvicorn.Server):
    """On SIGTERM: readiness off and new work refused at once, in-flight requests finish (up to the drain grace),
    then uvicorn's own shutdown. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining or self.loop is None:
            self.should_exit = True
            self.force_exit = self.state.draining
            return
        self.state.draining = True
        log.info("draining", extra={"fields": {"signal": signal.Signals(sig).name, "in_flight": self.state.in_flight,
                                               "drain_seconds": self.state.settings.drain_seconds}})
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain()))

    async def drain(self) -> None:
        deadline = time.monotonic() + self.state.settings.drain_seconds
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained", extra={"fields": {"unfinished": self.state.in_flight}})
        self.should_exit = True


def load_model(state: ServerState, server: DrainingServer) -> None:
    settings = state.settings
    try:
        engine = WhisperEngine(settings.model, settings.device, settings.dtype, settings.offline,
                               settings.max_new_tokens, settings.fixed_new_tokens, settings.cpu_threads)
        engine.load()
        state.metrics.model_load.set(engine.load_seconds)
        engine.warm_up(settings.max_batch_size)
        scheduler = BatchScheduler(
            engine.transcribe, settings.max_batch_size, settings.batch_wait_ms / 1000, settings.queue_size,
            SchedulerStats(on_queue_change=state.metrics.on_queue_change, on_batch=state.metrics.batch_size.observe,
                           arriving=lambda queued_requests: state.in_flight - queued_requests),
        )
        scheduler.start()
        state.engine, state.scheduler = engine, scheduler
        state.ready = True
        log.info("ready", extra={"fields": {"model": settings.model, "device": engine.device, "dtype": str(engine.dtype),
                                            "load_seconds": round(engine.load_seconds, 3)}})
    except Exception:
        log.exception("model failed to load")
        state.load_failed = True
        server.should_exit = True


def run(settings: Settings) -> int:
    configure_logging()
    state = ServerState(settings)
    config = uvicorn.Config(create_app(state), host=settings.host, port=settings.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=5, timeout_keep_alive=75)
    server = DrainingServer(config, state)
    # The model loads while the server already answers /healthz, so liveness holds during a long first download.
    threading.Thread(target=load_model, args=(state, server), name="model-loader", daemon=True).start()
    server.run()
    if state.scheduler:
        state.scheduler.stop()
    return 1 if state.load_failed else 0
