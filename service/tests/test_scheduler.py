"""The scheduler and reassembly logic, with a deterministic batch function in place of the model."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from whisper_server.audio import Window
from whisper_server.engine import SAMPLE_RATE, DecodeOptions, OutOfMemory, Segment, WindowResult, compression_ratio
from whisper_server.scheduler import BatchScheduler, QueueFull, run_splitting_on_oom
from whisper_server.transcript import assemble, decode_with_fallback


def labelled_window(label: float, seconds: float = 1.0) -> Window:
    """A window whose samples carry a label, so results can be traced back to their window."""
    return Window(offset=0.0, samples=np.full(int(seconds * SAMPLE_RATE), label, np.float32))


def segment(start: float, end: float, text: str) -> Segment:
    return Segment(start, end, text, [], -0.1, 1.0, 0.01, 0.0)


class RecordingModel:
    """Answers each window with its label as text; records batches; fails batches larger than `fits`."""

    def __init__(self, fits: int = 1000):
        self.fits, self.batches, self.lock = fits, [], threading.Lock()

    def __call__(self, samples: list[np.ndarray], options: DecodeOptions) -> list[WindowResult]:
        if len(samples) > self.fits:
            raise OutOfMemory("batch too large")
        with self.lock:
            self.batches.append([float(s[0]) for s in samples])
        return [WindowResult(options.language, [segment(0, 1, f"{s[0]:g}")]) for s in samples]


def test_oom_splits_the_batch_and_keeps_order():
    model = RecordingModel(fits=2)
    windows = [np.full(10, i, np.float32) for i in range(7)]
    results = run_splitting_on_oom(model, windows, DecodeOptions())
    assert [r.segments[0].text for r in results] == [str(i) for i in range(7)]
    assert max(len(batch) for batch in model.batches) <= 2


def test_a_window_that_never_fits_fails_only_its_request():
    model = RecordingModel(fits=0)
    with pytest.raises(OutOfMemory):
        run_splitting_on_oom(model, [np.zeros(10, np.float32)], DecodeOptions())


def run_requests(scheduler: BatchScheduler, requests: list[tuple[list[Window], DecodeOptions]]):
    async def main():
        scheduler.start()
        try:
            return await asyncio.gather(*(scheduler.transcribe(w, o) for w, o in requests), return_exceptions=True)
        finally:
            scheduler.stop()

    return asyncio.run(main())


def test_windows_from_concurrent_requests_share_batches_and_come_back_in_order():
    model = RecordingModel()
    scheduler = BatchScheduler(model, max_batch_size=4, batch_wait_seconds=0.05, queue_size=10)
    long_request = [labelled_window(100 + i) for i in range(6)]
    short_requests = [[labelled_window(i)] for i in range(3)]
    results = run_requests(scheduler, [(long_request, DecodeOptions())] + [(w, DecodeOptions()) for w in short_requests])
    assert [r.segments[0].text for r in results[0]] == [str(100 + i) for i in range(6)]
    assert [[r.segments[0].text for r in result] for result in results[1:]] == [["0"], ["1"], ["2"]]
    # Round robin: the first batch takes one window from each request, so short requests are not stuck behind the long one.
    assert sorted(model.batches[0]) == [0, 1, 2, 100]
    assert all(len(batch) <= 4 for batch in model.batches)


def test_requests_with_different_options_never_share_a_batch():
    model = RecordingModel()
    scheduler = BatchScheduler(model, max_batch_size=8, batch_wait_seconds=0.05, queue_size=10)
    english, german = DecodeOptions(language="en"), DecodeOptions(language="de")
    results = run_requests(scheduler, [([labelled_window(1)], english), ([labelled_window(2)], german),
                                       ([labelled_window(3)], english)])
    assert [r[0].language for r in results] == ["en", "de", "en"]
    assert sorted(sorted(batch) for batch in model.batches) == [[1, 3], [2]]


def test_queue_limit_refuses_new_requests():
    scheduler = BatchScheduler(RecordingModel(), max_batch_size=1, batch_wait_seconds=0, queue_size=2)
    results = run_requests(scheduler, [([labelled_window(i)], DecodeOptions()) for i in range(3)])
    assert isinstance(results[2], QueueFull) and results[2].retry_after_seconds >= 1
    assert [r[0].segments[0].text for r in results[:2]] == ["0", "1"]


def test_assemble_offsets_windows_and_keeps_time_moving_forward():
    windows = [Window(0.0, np.zeros(28 * SAMPLE_RATE)), Window(28.0, np.zeros(30 * SAMPLE_RATE)),
               Window(58.0, np.zeros(5 * SAMPLE_RATE))]
    results = [WindowResult("en", [segment(0, 10, "a"), segment(10, 28.5, "b")]),
               WindowResult("en", [segment(0, 2, "c"), segment(5, 30, "d")]),
               WindowResult(None, [])]
    transcript = assemble(windows, results, 63.0)
    assert [(s.start, s.end, s.text) for s in transcript.segments] == [
        (0, 10, "a"), (10, 28.5, "b"), (28.5, 30, "c"), (33, 58, "d")]
    assert transcript.text == "a b c d" and transcript.language == "en" and transcript.duration == 63.0


def test_repetition_loops_are_decoded_again_at_higher_temperatures():
    class LoopsWhenCold(RecordingModel):
        """Repeats itself on window 1 below temperature 0.4, as a real Whisper does on hard audio."""

        def __call__(self, samples, options):
            with self.lock:
                self.batches.append((options.temperature, [float(s[0]) for s in samples]))
            looping = "the the the the the the the the the the the the the the the the the the the the"
            return [WindowResult("en", [Segment(0, 1, looping if s[0] == 1 and options.temperature < 0.4 else "fine", [],
                                                -0.1, compression_ratio(looping if s[0] == 1 and options.temperature < 0.4
                                                                        else "fine"), 0.01, options.temperature)])
                    for s in samples]

    model = LoopsWhenCold()
    scheduler = BatchScheduler(model, max_batch_size=4, batch_wait_seconds=0, queue_size=1)

    async def main():
        scheduler.start()
        try:
            return await decode_with_fallback(scheduler, [labelled_window(0), labelled_window(1)], DecodeOptions())
        finally:
            scheduler.stop()

    results = asyncio.run(main())
    assert [r.segments[0].text for r in results] == ["fine", "fine"]
    assert [r.segments[0].temperature for r in results] == [0.0, 0.4]
    assert model.batches == [(0.0, [0.0, 1.0]), (0.2, [1.0]), (0.4, [1.0])], "only the looping window is retried"


def test_requests_finishing_out_of_order_leave_the_queue_cleanly():
    """Jobs are compared by identity: removing one that is not first must not compare audio arrays."""
    class HeldModel(RecordingModel):
        """Holds its first batch until released, so the queue is known to be full when a request is cancelled."""

        def __init__(self):
            super().__init__()
            self.release = threading.Event()

        def __call__(self, samples, options):
            self.release.wait(10)
            return super().__call__(samples, options)

    model = HeldModel()
    scheduler = BatchScheduler(model, max_batch_size=1, batch_wait_seconds=0, queue_size=10)

    async def main():
        scheduler.start()
        try:
            slow = asyncio.ensure_future(scheduler.transcribe([labelled_window(1), labelled_window(1)], DecodeOptions()))
            fast = asyncio.ensure_future(scheduler.transcribe([labelled_window(2), labelled_window(2)], DecodeOptions()))
            cancelled = asyncio.ensure_future(scheduler.transcribe([labelled_window(3), labelled_window(3)], DecodeOptions()))
            await asyncio.sleep(0.01)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            model.release.set()
            return await asyncio.gather(slow, fast)
        finally:
            scheduler.stop()

    slow, fast = asyncio.run(main())
    assert [r.segments[0].text for r in slow] == ["1", "1"] and [r.segments[0].text for r in fast] == ["2", "2"]
    assert scheduler.jobs == []
    assert 3.0 not in [label for batch in model.batches for label in batch], "the cancelled request was never decoded"
