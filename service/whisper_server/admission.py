"""Admission by cost: what a request holds while the server works on it, bounded so that the worst case fits the pod.

Three budgets, each refusing work past it (the HTTP layer answers 503 with Retry-After) instead of letting memory or
the /tmp volume run out:
- uploads being received at once (a slot from the first byte of the body to the last);
- bytes of uploads spooled to the temp dir, reserved from the declared Content-Length before the body is read and
  grown while an undeclared body arrives;
- seconds of decoded audio held (16 kHz float32: 64 KB a second, in the HTTP process and again in the engine
  process), grown while a file decodes and held until its request is answered.
Reservations are taken and grown from the event loop and from audio-decoding threads, so the books are kept under a lock.
"""

from __future__ import annotations

import threading


class Overloaded(Exception):
    """A budget is spent: retry when the work ahead has drained."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code


class Reservation:
    """Some of one budget, held by one request; grows on demand and is returned whole by release()."""

    def __init__(self, budget: Budget, amount: float = 0.0):
        self.budget, self.amount = budget, amount

    def grow_to(self, amount: float) -> None:
        if amount > self.amount:
            self.budget.take(amount - self.amount)
            self.amount = amount

    def release(self) -> None:
        self.budget.give_back(self.amount)
        self.amount = 0.0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Budget:
    def __init__(self, limit: float, refusal: str, code: str, lock: threading.Lock):
        self.limit, self.refusal, self.code, self.lock = limit, refusal, code, lock
        self.used = 0.0

    def take(self, amount: float) -> None:
        with self.lock:
            if self.used + amount > self.limit:
                raise Overloaded(self.refusal, self.code)
            self.used += amount

    def give_back(self, amount: float) -> None:
        with self.lock:
            self.used -= amount

    def reserve(self, amount: float = 0.0) -> Reservation:
        self.take(amount)
        return Reservation(self, amount)


class Admission:
    def __init__(self, max_uploads: int, max_spool_bytes: int, max_audio_seconds: float):
        lock = threading.Lock()
        self.uploads = Budget(max_uploads, "Too many uploads are being received; retry later.", "uploads_full", lock)
        self.spool = Budget(max_spool_bytes, "The server's upload space is full; retry later.", "uploads_full", lock)
        self.audio = Budget(max_audio_seconds, "The server holds as much audio as it may; retry later.", "queue_full", lock)
