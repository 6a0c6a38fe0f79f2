"""Runs the server: starts the engine process (which loads and warms the model) in the background, serves HTTP,
drains on SIGTERM. Exits 0 once drained (requests still running at the drain's deadline are answered 503), 1 when
the model failed to load or the engine died, and 128 + the signal's number (143 for SIGTERM, 130 for SIGINT) when a
second signal gave up on requests in flight (each answered 503)."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time

import uvicorn

from .app import ServerState, create_app, drain_expired, engine_unavailable, server_stopping
from .audio import map_large_buffers
from .connections import ACCEPT_BURST, ConnectionGuard, GuardedH11Protocol, connection_limit, guarded_websocket_protocol, raise_open_files_limit
from .engine_process import EngineProcess
from .logs import configure_logging
from .probes import ProbeServer
from .realtime import ROUTES as REALTIME_ROUTES
from .settings import Settings

log = logging.getLogger("whisper_server")
# How long requests the server gives up on (drain deadline, second signal, engine gone) have to get their 503 out
# before the server exits.
ANSWER_SECONDS = 2.0


class DrainingServer(uvicorn.Server):
    """On SIGTERM: readiness off and new work refused at once, in-flight requests finish (up to the drain grace),
    then uvicorn's own shutdown. A second signal answers what is left 503 and stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, probes: ProbeServer):
        super().__init__(config)
        self.state, self.probes = state, probes
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_signal: int | None = None
        self.forced = False  # a second signal gave up on the requests in flight

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        heartbeat = self.loop.create_task(self.probes.heartbeat())
        try:
            await super().serve(sockets)
        finally:
            heartbeat.cancel()

    def handle_exit(self, sig: int, frame) -> None:
        if self.loop is None:
            self.should_exit = True
            return
        if self.state.draining:
            log.info("stopping at once", extra={"fields": {"signal": signal.Signals(sig).name,
                                                           "abandoned": self.state.in_flight}})
            self.stop_signal = sig
            self.abandon(server_stopping(), forced=True)
            return
        self.stop_signal = sig
        self.state.draining = True
        log.info("draining", extra={"fields": {"signal": signal.Signals(sig).name, "in_flight": self.state.in_flight,
                                               "drain_seconds": self.state.settings.drain_seconds}})
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain()))

    async def drain(self) -> None:
        deadline = time.monotonic() + self.state.settings.drain_seconds
        for session in list(self.state.sessions):  # each is told, finishes its committed turns and closes (1012)
            session.drain()
        while (self.state.in_flight > 0 or self.state.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = self.state.in_flight
        # Past the deadline the unfinished requests are answered 503 with Retry-After, not dropped with the process.
        await self.answer_and_exit(drain_expired())
        log.info("drained", extra={"fields": {"unfinished": unfinished, "unanswered": self.state.in_flight}})

    def abandon(self, error, forced: bool = False) -> None:
        """From any thread: gives up on the requests in flight (answered `error`), then stops serving."""
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.answer_and_exit(error, forced)))

    async def answer_and_exit(self, error, forced: bool = False) -> None:
        self.forced = self.forced or forced
        self.state.abandon(error)
        answered_by = time.monotonic() + ANSWER_SECONDS
        while (self.state.in_flight > 0 or self.state.sessions) and time.monotonic() < answered_by:
            await asyncio.sleep(0.05)
        self.should_exit, self.force_exit = True, self.force_exit or forced

    def exit_code(self) -> int:
        if self.state.load_failed:
            return 1
        if self.forced and self.state.abandoned_requests:
            return 128 + self.stop_signal
        return 0


def start_engine(state: ServerState, server: DrainingServer) -> None:
    settings = state.settings

    def lost() -> None:  # the engine process died: fail fast (503 to what it held) so that the pod is restarted
        state.ready, state.load_failed = False, True
        if server.loop is None:
            server.should_exit = True
        else:
            server.abandon(engine_unavailable())

    engine = EngineProcess(settings, state.metrics, on_lost=lost)
    state.engine = engine
    try:
        info = engine.start()
    except Exception:
        if state.draining or engine.stopping:  # a SIGTERM while the model loaded: nothing failed
            log.info("stopped while loading the model")
            return
        log.exception("model failed to load")
        state.load_failed = True
        server.should_exit = True
        return
    state.metrics.model_load.set(info.load_seconds)
    state.ready = True
    log.info("ready", extra={"fields": {"model": settings.model, "device": info.device, "dtype": info.dtype,
                                        "slots": info.slots, "load_seconds": round(info.load_seconds, 3),
                                        **info.capabilities.describe()}})


def run(settings: Settings) -> int:
    configure_logging()
    map_large_buffers()
    state = ServerState(settings)
    soft_before, open_files, hard = raise_open_files_limit()
    guard = ConnectionGuard(settings, state.metrics, connection_limit(settings.max_connections, open_files))
    log.info("connection limits", extra={"fields": {
        "open_files_soft_limit_at_start": soft_before, "open_files_soft_limit": open_files,
        "open_files_hard_limit": hard, "max_connections": guard.max_connections,
        "max_connections_per_client": guard.max_per_client, "head_timeout_seconds": settings.head_timeout_seconds,
        "keep_alive_seconds": settings.keep_alive_seconds}})
    config = uvicorn.Config(create_app(state, REALTIME_ROUTES), host=settings.host, port=settings.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=5, timeout_keep_alive=settings.keep_alive_seconds,
                            # A live session's event past --realtime-max-message-mb (by up to 1 MiB) gets an error
                            # event and the session goes on; a larger frame is refused by the WebSocket layer (1009).
                            ws_max_size=int((settings.realtime_max_message_mb + 1) * 2**20),
                            # One message waits beside the one a session handles: a faster client is held back by TCP
                            # rather than queue uvicorn's default of 32 messages (up to 512 MiB a session) in memory.
                            ws_max_queue=1,
                            proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips,
                            http=functools.partial(GuardedH11Protocol, guard=guard), backlog=ACCEPT_BURST)
    config.load()
    if config.ws_protocol_class is not None:  # the connection after a WebSocket upgrade is the guard's to release
        config.ws_protocol_class = guarded_websocket_protocol(config.ws_protocol_class, guard)
    # Prometheus scrapes its own port (the load balancer forwards only the API port), and the kubelet probes it, from
    # a thread of its own: scrapes and probes carry on through the model load, the drain and a saturated API port.
    probes = ProbeServer(state, settings.host, settings.metrics_port)
    server = DrainingServer(config, state, probes)
    # The engine loads while the server already answers /healthz, so liveness holds during a long first download.
    threading.Thread(target=start_engine, args=(state, server), name="engine-starter", daemon=True).start()
    server.run()
    if state.engine:
        state.engine.stop()
    probes.shutdown()
    return server.exit_code()
