"""Connection guards beneath the HTTP layer, in uvicorn's h11 protocol: a deadline for each request head (uvicorn has
none, and the upload deadlines start only once a head is complete), a deadline for idle keep-alive connections, and
caps on the connections open at once, in all and per client address, below the process's open-files limit. Stalled
or piled-up connections so cannot hold the file descriptors and memory that requests and probes need. Every refusal
is counted in whisper_refused_requests_total{reason}; the logs hear of them at most once an interval (logs.py)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import resource
from collections import Counter
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from .errors import ApiError, error_body
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("whisper_server.connections")
# How many connections asyncio accepts in one go before any of them is handled (uvicorn's backlog, which is also the
# kernel's queue of connections not yet accepted): a refused connection holds its descriptor for about three turns
# of the event loop, so a flood holds about three bursts' worth of descriptors on top of the connections admitted.
ACCEPT_BURST = 128
# A refused connection is answered at once; what the client sends meanwhile is read and dropped for this long, so
# that closing with unread data does not reset the connection and lose the answer.
REFUSAL_LINGER_SECONDS = 1.0
# Past this many refusals lingering at once (a flood), the oldest is cut short for the newest: stalled attackers
# linger longest, and a client that connects in the middle of a flood still hears why it is refused.
MAX_LINGERING_REFUSALS = 64
# Descriptors kept free of admitted API connections: the process's own (libraries, the engine's pipes, spool files,
# probes and scrapes on the metrics port), the refusals lingering, and the refusals of a flood in progress.
DESCRIPTOR_RESERVE = 128 + MAX_LINGERING_REFUSALS + 3 * ACCEPT_BURST
RETRY_AFTER_SECONDS = 5


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit (containers and shells often start at 1,024):
    (soft before, soft now, hard)."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # an unlimited hard limit some systems refuse as a soft one: keep what we have
        return before, before, hard
    return before, hard, hard


def connection_limit(wanted: int, open_files: int) -> int:
    """The most API connections at once: the setting, or fewer where the open-files limit leaves less after the
    reserve."""
    if open_files == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, open_files - DESCRIPTOR_RESERVE))


def raw_error(error: ApiError) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, written before or instead of h11's own."""
    body = json.dumps(error_body(error)).encode()
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{name}: {value}" for name, value in (error.headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class ConnectionGuard:
    """The connections open on the API port, in all and per client address, and the refusals past the caps. Peers
    that are trusted proxies (--forwarded-allow-ips) carry many clients, so the per-client cap passes them by."""

    def __init__(self, settings: Settings, metrics: Metrics, max_connections: int):
        self.metrics = metrics
        self.head_timeout_seconds = settings.head_timeout_seconds
        self.max_connections = max_connections
        self.max_per_client = settings.max_connections_per_client
        trusted = [item.strip() for item in settings.forwarded_allow_ips.split(",") if item.strip()]
        self.trusts_all = "*" in trusted
        self.proxies = [ipaddress.ip_network(item, strict=False) for item in trusted if item != "*" and is_network(item)]
        self.open = 0
        self.per_client: Counter[str] = Counter()
        self.admitted: dict[asyncio.BaseTransport, str | None] = {}
        self.lingering: dict[Refusal, None] = {}  # in the order they began

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one guard per process, addresses bounded by the cache
    def is_proxy(self, host: str) -> bool:
        if self.trusts_all:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.proxies)

    def admit(self, transport: asyncio.BaseTransport) -> ApiError | None:
        """Counts the connection in, or says why it is refused."""
        peer = get_remote_addr(transport)
        host = peer[0] if peer else None
        if self.open >= self.max_connections:
            return ApiError(503, f"The server holds its most connections ({self.max_connections}); retry shortly.",
                            code="connections_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        if host is not None and self.per_client[host] >= self.max_per_client and not self.is_proxy(host):
            return ApiError(503, f"This client holds its most connections ({self.max_per_client}); reuse them or "
                            "retry shortly.", code="client_connections_full",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.open += 1
        self.admitted[transport] = host
        if host is not None:
            self.per_client[host] += 1
        return None

    def release(self, transport: asyncio.BaseTransport) -> None:
        """Counts the connection out (once, whichever protocol held it last)."""
        if transport not in self.admitted:
            return
        host = self.admitted.pop(transport)
        self.open -= 1
        if host is not None:
            self.per_client[host] -= 1
            if not self.per_client[host]:
                del self.per_client[host]

    def refused(self, reason: str, client: str | None, message: str | None = "connection refused") -> None:
        """Counts a refused or timed-out connection; logs it unless there is no message (repeats are folded into
        one line an interval by logs.RepeatFilter)."""
        self.metrics.refusals.labels(reason).inc()
        if message:
            log.warning(message, extra={"fields": {"reason": reason, "client": client or "unknown",
                                                   "open_connections": self.open}})


def is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


class Refusal(asyncio.Protocol):
    """A connection past a cap: answered 503 at once (before its request, which HTTP/1.1 allows) and closed. What
    the client sends meanwhile is read and dropped for REFUSAL_LINGER_SECONDS at most."""

    def __init__(self, guard: ConnectionGuard, error: ApiError):
        self.guard, self.error = guard, error
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        lingering = self.guard.lingering
        if len(lingering) >= MAX_LINGERING_REFUSALS:
            oldest = next(iter(lingering))
            del lingering[oldest]
            oldest.transport.abort()
        lingering[self] = None
        transport.write(raw_error(self.error))
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.guard.lingering.pop(self, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guard: a connection past a cap is handed to a Refusal; a request head not
    complete within --head-timeout-seconds of the connection's start, or of its first byte after a keep-alive wait,
    is answered 408 (a connection that sent nothing is closed); an idle keep-alive connection is closed after
    --keep-alive-seconds (uvicorn's own timer, counted here)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.head_timer: asyncio.TimerHandle | None = None
        self.head_bytes = False  # some of the awaited head has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        refusal = self.guard.admit(transport)
        if refusal is not None:
            peer = get_remote_addr(transport)
            self.guard.refused(refusal.code, peer[0] if peer else None)
            protocol = Refusal(self.guard, refusal)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return
        super().connection_made(transport)
        self.await_head()

    def await_head(self) -> None:
        self.head_bytes = False
        self.head_timer = self.loop.call_later(self.guard.head_timeout_seconds, self.head_deadline_passed)

    def head_arrived(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            if self.head_timer is None:  # the next request's first bytes after a keep-alive wait
                self.await_head()
            self.head_bytes = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head (or a malformed one, answered 400)
            self.head_arrived()

    def head_deadline_passed(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        self.guard.refused("head_timeout", self.client[0] if self.client else None, "request head timed out")
        if self.head_bytes:
            self.transport.write(raw_error(ApiError(
                408, f"The request head did not arrive within {self.guard.head_timeout_seconds:g} s.",
                code="head_timeout")))
        self.transport.close()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self.head_arrived()
        super().handle_websocket_upgrade(event)

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():  # a normal end for a client's idle connection: counted, not logged
            self.guard.refused("keep_alive_timeout", None, message=None)
        super().timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_arrived()
        self.guard.release(self.transport)
        super().connection_lost(exc)


def guarded_websocket_protocol(base: type[asyncio.Protocol], guard: ConnectionGuard) -> type[asyncio.Protocol]:
    """uvicorn's WebSocket protocol (the connection after the upgrade) giving the connection back to the guard when
    it ends."""

    class GuardedWebSocketProtocol(base):  # type: ignore[valid-type, misc]
        def connection_lost(self, exc: Exception | None) -> None:
            guard.release(self.transport)
            super().connection_lost(exc)

    return GuardedWebSocketProtocol
