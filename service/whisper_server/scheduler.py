"""Batches 30 s windows from concurrent requests onto one model worker and hands each request its results in order."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .audio import Window
from .engine import DecodeOptions, OutOfMemory, WindowResult

log = logging.getLogger("whisper_server.scheduler")

RunBatch = Callable[[list[np.ndarray], DecodeOptions], list[WindowResult]]


class QueueFull(Exception):
    def __init__(self, retry_after_seconds: int):
        super().__init__(f"the queue is full; retry in {retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


@dataclass(eq=False)  # identity: jobs are found and removed in lists by who they are, not by their audio
class Job:
    """One request: its windows, the results filled in as batches finish, and the future its handler awaits."""

    options: DecodeOptions
    windows: list[Window]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    sequence: int
    results: list[WindowResult | None] = field(default_factory=list)
    next_window: int = 0  # the next window not yet handed to a batch
    done_windows: int = 0

    def pending_seconds(self) -> float:
        return sum(w.duration for w in self.windows[self.next_window:])


@dataclass
class SchedulerStats:
    """Callbacks the server turns into metrics; the scheduler itself knows nothing of Prometheus."""

    on_queue_change: Callable[[int, float], None] = lambda windows, seconds: None
    on_batch: Callable[[int], None] = lambda size: None
    # Requests on their way to the queue (uploading, decoding): only for them is a batch worth waiting for.
    arriving: Callable[[int], int] = lambda queued_requests: 1


def run_splitting_on_oom(run_batch: RunBatch, samples: list[np.ndarray], options: DecodeOptions) -> list[WindowResult]:
    """Runs a batch; if it does not fit in memory, runs its halves, down to single windows."""
    try:
        return run_batch(samples, options)
    except OutOfMemory:
        if len(samples) == 1:
            raise
        half = len(samples) // 2
        log.warning("out of memory on a batch of %d windows; retrying as %d + %d", len(samples), half, len(samples) - half)
        return run_splitting_on_oom(run_batch, samples[:half], options) + run_splitting_on_oom(run_batch, samples[half:], options)


class BatchScheduler:
    def __init__(self, run_batch: RunBatch, max_batch_size: int, batch_wait_seconds: float, queue_size: int,
                 stats: SchedulerStats | None = None):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait_seconds = batch_wait_seconds
        self.queue_size = queue_size
        self.stats = stats or SchedulerStats()
        self.jobs: list[Job] = []  # admitted and unfinished, oldest first
        self.condition = threading.Condition()
        self.sequence = itertools.count()
        self.seconds_per_batch = 1.0  # moving average, for Retry-After
        self.stopped = False
        self.worker = threading.Thread(target=self._work, name="batch-worker", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify_all()
        self.worker.join(timeout=10)

    def is_full(self) -> bool:
        with self.condition:
            return len(self.jobs) >= self.queue_size

    def retry_after_seconds(self) -> int:
        with self.condition:
            return self._retry_after_locked()

    async def transcribe(self, windows: list[Window], options: DecodeOptions, admitted: bool = False) -> list[WindowResult]:
        """Queues a request's windows and waits for all their results, in window order. `admitted` is for a
        request that already holds a place (a retry of some of its windows): it is never refused."""
        loop = asyncio.get_running_loop()
        job = Job(options=options, windows=windows, future=loop.create_future(), loop=loop,
                  sequence=next(self.sequence), results=[None] * len(windows))
        with self.condition:
            if len(self.jobs) >= self.queue_size and not admitted:
                raise QueueFull(self._retry_after_locked())
            self.jobs.append(job)
            self._report_queue_locked()
            self.condition.notify_all()
        try:
            return await job.future
        finally:
            self._forget(job)  # a cancelled or timed-out request leaves the queue and its windows are not decoded

    def _retry_after_locked(self) -> int:
        """Seconds until the windows already waiting have likely been decoded."""
        batches = self._waiting_windows_locked() / self.max_batch_size
        return max(1, min(60, math.ceil(batches * self.seconds_per_batch)))

    def _forget(self, job: Job) -> None:
        with self.condition:
            if job in self.jobs:
                self.jobs.remove(job)
                self._report_queue_locked()

    def _report_queue_locked(self) -> None:
        windows = self._waiting_windows_locked()
        seconds = sum(job.pending_seconds() for job in self.jobs)
        self.stats.on_queue_change(windows, seconds)

    def _take_batch_locked(self) -> tuple[DecodeOptions, list[tuple[Job, int]]]:
        """Windows that share the oldest waiting request's options, one per request in turn, so a long file
        does not hold back the short requests that arrive after it."""
        waiting = [job for job in self.jobs if job.next_window < len(job.windows)]
        options = waiting[0].options
        compatible = [job for job in waiting if job.options == options]
        batch: list[tuple[Job, int]] = []
        while len(batch) < self.max_batch_size and compatible:
            for job in list(compatible):
                if len(batch) == self.max_batch_size:
                    break
                batch.append((job, job.next_window))
                job.next_window += 1
                if job.next_window == len(job.windows):
                    compatible.remove(job)
        self._report_queue_locked()
        return options, batch

    def _waiting_windows_locked(self) -> int:
        return sum(len(job.windows) - job.next_window for job in self.jobs)

    def _work(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and self._waiting_windows_locked() == 0:
                    self.condition.wait()
                if self.stopped:
                    return
                # Wait a little for more windows, unless a full batch is already waiting or nobody else is coming.
                deadline = time.monotonic() + self.batch_wait_seconds
                while (not self.stopped and self._waiting_windows_locked() < self.max_batch_size
                       and self.stats.arriving(len(self.jobs)) > 0 and (remaining := deadline - time.monotonic()) > 0):
                    self.condition.wait(remaining)
                if self.stopped:
                    return
                if self._waiting_windows_locked() == 0:
                    continue  # the waiting requests were cancelled meanwhile
                options, batch = self._take_batch_locked()
            self._run(options, batch)

    def _run(self, options: DecodeOptions, batch: list[tuple[Job, int]]) -> None:
        self.stats.on_batch(len(batch))
        started = time.monotonic()
        try:
            results = run_splitting_on_oom(self.run_batch, [job.windows[i].samples for job, i in batch], options)
        except Exception as error:  # one failed batch fails its requests, never the worker
            log.exception("batch of %d windows failed", len(batch))
            for job in {id(job): job for job, _ in batch}.values():
                job.loop.call_soon_threadsafe(_set_exception, job.future, error)
            return
        self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * (time.monotonic() - started)
        for (job, index), result in zip(batch, results):
            job.results[index] = result
            job.done_windows += 1
            if job.done_windows == len(job.windows):
                job.loop.call_soon_threadsafe(_set_result, job.future, job.results)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
