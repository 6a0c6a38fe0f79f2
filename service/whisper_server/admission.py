"""Admission by cost: a request is admitted while the server has room for what it will hold, and refused with 503 and
Retry-After when it has not, instead of the pod running out of memory or disk. Uploads at once and spooled upload
bytes are bounded for the server and for each client: once half of the server's budget is in use, a client past its
share gets 429, so a few slow connections cannot take it all, while one busy client (a backend sending a burst) may
use what nobody else is using. Decoded audio is bounded for the server. The HTTP handlers hold reservations while they work;
reservations grow as a request is found to need more (an upload without a declared size, audio as it decodes)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


class Overloaded(Exception):
    """A budget is spent: retry when the work ahead has drained."""

    def __init__(self, message: str, code: str, status: int = 503):
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


# A client's share binds once the server's budget is this full.
SHARES_BIND_FROM = 0.5


@dataclass
class Budget:
    limit: float
    refusal: str
    code: str
    status: int = 503
    used: float = 0.0
    server: Budget | None = None  # a client's share of this budget: enforced only while it is SHARES_BIND_FROM full

    def refuses(self, more: float) -> bool:
        if self.used + more <= self.limit:
            return False
        return self.server is None or self.server.used + more > self.server.limit * SHARES_BIND_FROM


class Reservation:
    """Some of one or more budgets (the server's, a client's), held by one request; grows on demand, all budgets or
    none, and is returned whole by release(). A released reservation refuses to grow: work that outlived its request
    (a decode thread whose request was abandoned) stops at its next step instead of holding budget nobody returns."""

    def __init__(self, lock: threading.Lock, budgets: tuple[Budget, ...], on_release=lambda: None):
        self.lock, self.budgets, self.on_release = lock, budgets, on_release
        self.amount, self.released = 0.0, False

    def grow_to(self, amount: float) -> None:
        with self.lock:
            if self.released:
                raise Overloaded("The request was abandoned.", "abandoned")
            more = amount - self.amount
            if more <= 0:
                return
            for budget in self.budgets:
                if budget.refuses(more):
                    raise Overloaded(budget.refusal, budget.code, budget.status)
            for budget in self.budgets:
                budget.used += more
            self.amount = amount

    def release(self) -> None:
        with self.lock:
            if self.released:
                return
            for budget in self.budgets:
                budget.used -= self.amount
            self.amount, self.released = 0.0, True
        self.on_release()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class ClientShare:
    uploads: Budget
    spool: Budget
    holders: int = 0  # reservations open on it; the share is forgotten at zero


class Admission:
    def __init__(self, max_uploads: int, max_spool_bytes: int, max_audio_seconds: float,
                 max_client_uploads: int | None = None, max_client_spool_bytes: int | None = None):
        self.lock = threading.Lock()
        self.uploads = Budget(max_uploads, "Too many uploads are being received; retry later.", "uploads_full")
        self.spool = Budget(max_spool_bytes, "The server's upload space is full; retry later.", "uploads_full")
        self.audio = Budget(max_audio_seconds, "The server holds as much audio as it may; retry later.", "queue_full")
        self.max_client_uploads = min(max_client_uploads or max_uploads, max_uploads)
        self.max_client_spool_bytes = min(max_client_spool_bytes or max_spool_bytes, max_spool_bytes)
        self.clients: dict[str, ClientShare] = {}

    def reserve_audio(self, seconds: float = 0.0) -> Reservation:
        return self._reserve((self.audio,), seconds)

    def reserve_upload(self, client: str) -> Reservation:
        """One of the uploads received at once, of the server's and of the client's."""
        return self._reserve_for(client, lambda share: (self.uploads, share.uploads), 1)

    def reserve_spool(self, client: str, size: int = 0) -> Reservation:
        """Spool bytes, of the server's and of the client's (the server's refusal first); grows as the body arrives."""
        return self._reserve_for(client, lambda share: (self.spool, share.spool), size)

    def client_count(self) -> int:
        with self.lock:
            return len(self.clients)

    def _reserve_for(self, client: str, budgets, amount: float) -> Reservation:
        with self.lock:
            share = self.clients.get(client)
            if share is None:
                share = self.clients[client] = ClientShare(
                    Budget(self.max_client_uploads, f"This client already has {self.max_client_uploads} uploads in "
                           "progress, its share while the server is busy; retry when one finishes.",
                           "client_uploads_full", 429, server=self.uploads),
                    Budget(self.max_client_spool_bytes, "This client's uploads in progress hold its share of the upload "
                           "space while the server is busy; retry when one finishes.", "client_spool_full", 429,
                           server=self.spool))
            share.holders += 1

        def leave() -> None:
            with self.lock:
                share.holders -= 1
                if share.holders == 0:
                    self.clients.pop(client, None)

        try:
            return self._reserve(budgets(share), amount, on_release=leave)
        except Overloaded:
            leave()
            raise

    def _reserve(self, budgets: tuple[Budget, ...], amount: float, on_release=lambda: None) -> Reservation:
        reservation = Reservation(self.lock, budgets, on_release)
        reservation.grow_to(amount)
        return reservation
