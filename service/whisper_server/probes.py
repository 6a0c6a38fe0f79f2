"""The metrics port (--metrics-port): /metrics for Prometheus, and /healthz and /readyz for the kubelet, served from
a thread of its own, so that the probes answer while the API port is saturated (its connections at their cap, its
event loop busy refusing more). They still tell the truth about the server: liveness fails once the event loop has
not run for LOOP_STALL_SECONDS, and readiness is the API port's own /readyz answer."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .app import ServerState, readiness

LOOP_STALL_SECONDS = 10.0
BEAT_SECONDS = 1.0


class QuietHandler(WSGIRequestHandler):
    timeout = 10  # a connection that stalls holds its thread this long at most (the port is not public)

    def log_message(self, format, *args) -> None:  # scrapes and probes every few seconds: no access log
        pass


class ProbeServer:
    def __init__(self, state: ServerState, host: str, port: int):
        self.state = state
        self.last_beat: float | None = None  # when the event loop last ran its heartbeat
        metrics = make_wsgi_app(state.metrics.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                status, body = self.liveness()
            elif path == "/readyz":
                status, body = readiness(state) if self.loop_alive() else (503, {"status": "event_loop_stalled"})
            else:
                return metrics(environ, start_response)
            payload = json.dumps(body).encode()
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
            return [payload]

        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6

        self.httpd = make_server(host, port, app, Server, handler_class=QuietHandler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-port", daemon=True)
        self.thread.start()

    def loop_alive(self) -> bool:
        return self.last_beat is not None and time.monotonic() - self.last_beat < LOOP_STALL_SECONDS

    def liveness(self) -> tuple[int, dict]:
        if self.last_beat is None:
            return 503, {"status": "starting"}
        if not self.loop_alive():
            return 503, {"status": "event_loop_stalled", "seconds": round(time.monotonic() - self.last_beat, 1)}
        return 200, {"status": "ok"}

    async def heartbeat(self) -> None:
        """Runs on the event loop for as long as it serves."""
        while True:
            self.last_beat = time.monotonic()
            await asyncio.sleep(BEAT_SECONDS)

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
