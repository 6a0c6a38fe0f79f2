"""The continuous-batching scheduler, with a deterministic stand-in engine in place of the model, and the
reassembly of window results into a transcript."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np

import pytest

from whisper_server.decoding import (SAMPLE_RATE, DecodeOptions, EngineFailure, OutOfMemory, Segment, Window,
                                     WindowResult, compression_ratio)
from whisper_server.scheduler import SchedulerEvents, SlotScheduler, is_silence, needs_fallback
from whisper_server.segmentation import speech_within
from whisper_server.transcript import (PartialText, TranscriptBuilder, assemble, segment_logprobs,
                                       transcribe_pieces)

TIMESTAMP = 50364  # the stand-in's segments sit between this timestamp token and the next
LOOPING = "the the the the the the the the the the the the the the the the the the the the"


def labelled(label: float, seconds: float = 1.0, offset: float = 0.0) -> Window:
    """A window whose samples carry a label, so results can be traced back to their window."""
    return Window(offset, np.full(int(seconds * SAMPLE_RATE), label, np.float32))


def segment(start: float, end: float, text: str, temperature: float = 0.0) -> Segment:
    return Segment(start, end, text, [], -0.1, compression_ratio(text), 0.01, temperature)


class StandInEngine:
    """Slots like the real engine's: a window labelled L decodes in `steps(L)` steps and answers its label as text
    (or a repetition loop where `loops(L, temperature)`), in the language given or else "xx", as a decode that
    `resume(L, seconds)` says goes on at that many seconds into the window (None: done), with the average
    log-probability `logprob(L, temperature)` and no-speech probability `no_speech(L)`; with partials, each step
    but its last reports the step's number as a text token. Admitting a label in
    `fails`, or stepping while one in `step_fails` is in a slot, raises `error`; `healthy` is what the device answers
    after that. An encoder pass is done `encoding_steps` decode steps after it started. Records every admission,
    when each joined, and which labels each step ran."""

    def __init__(self, capacity: int, steps=lambda label: 1, loops=lambda label, temperature: False, fails=(),
                 step_fails=(), error: Exception = OutOfMemory("the stand-in ran out of memory"), healthy: bool = True,
                 resume=lambda label, seconds: None, logprob=lambda label, temperature: -0.2,
                 no_speech=lambda label: 0.01):
        self.capacity, self.steps_for, self.loops, self.fails = capacity, steps, loops, set(fails)
        self.resume, self.logprob, self.no_speech = resume, logprob, no_speech
        self.partials: dict[int, list[tuple[int, float]]] = {}
        self.step_fails, self.error, self.is_healthy = set(step_fails), error, healthy
        self.slots: dict[int, list] = {}  # slot -> [label, options, steps left]
        self.admissions: list[list[tuple[float, DecodeOptions]]] = []
        self.steps: list[list[float]] = []
        self.released: list[int] = []
        self.encoding_steps = 0  # decode steps an encoder pass takes to finish beside them
        self.attached: list[int] = []  # the step count at each attach
        self.detections: list[tuple[float, tuple[str, ...]]] = []  # (seconds of audio, candidates) per detection

    def free_slots(self) -> int:
        return self.capacity - len(self.slots)

    def healthy(self) -> bool:
        return self.is_healthy

    def encode(self, windows):
        labels = [(float(samples[0]), options) for samples, options in windows]
        if self.fails & {label for label, _ in labels}:
            raise self.error
        self.admissions.append(labels)
        free = sorted(set(range(self.capacity)) - set(self.slots))[:len(windows)]
        for slot in free:  # taken now, decoding once attached
            self.slots[slot] = None
        return {"slots": free, "labels": labels, "seconds": [len(samples) / SAMPLE_RATE for samples, _ in windows],
                "encoded_at": len(self.steps) + self.encoding_steps}

    def encoded(self, admission):
        return len(self.steps) >= admission["encoded_at"]

    def attach(self, admission):
        for slot, (label, options), seconds in zip(admission["slots"], admission["labels"], admission["seconds"]):
            self.slots[slot] = [label, options, self.steps_for(label), seconds]
        self.attached.append(len(self.steps))
        return admission["slots"]

    def window_language(self, slot: int) -> str | None:
        return self.slots[slot][1].language or "xx"

    def window_no_speech_prob(self, slot: int) -> float:
        return self.no_speech(self.slots[slot][0])

    def partial_tokens(self):
        return self.partials

    def detect_language(self, samples, candidates) -> str:
        self.detections.append((len(samples) / SAMPLE_RATE, candidates))
        return candidates[-1] if candidates else "yy"

    def step(self):
        self.steps.append(sorted(entry[0] for entry in self.slots.values() if entry))
        if self.step_fails & set(self.steps[-1]):
            raise self.error
        finished = []
        for slot, entry in sorted((slot, entry) for slot, entry in self.slots.items() if entry):
            entry[2] -= 1
            if entry[2] == 0:
                label, options, _, seconds = self.slots.pop(slot)
                text = LOOPING if self.loops(label, options.temperature) else f"{label:g}"
                decoded = replace(segment(0, 1, text, options.temperature), tokens=[int(label)],
                                  start_token=TIMESTAMP, end_token=TIMESTAMP + 1)
                finished.append((slot, WindowResult(
                    options.language or "xx", [decoded],
                    avg_logprob=self.logprob(label, options.temperature),
                    compression_ratio=compression_ratio(text), temperature=options.temperature, duration=seconds,
                    no_speech_prob=self.no_speech(label), resume_at=self.resume(label, seconds))))
        self.partials = {slot: [(len(self.steps), -0.5)] for slot, entry in self.slots.items()
                         if entry and entry[1].partials}
        return finished

    def release(self, slots):
        self.released.extend(slots)
        for slot in slots:
            self.slots.pop(slot, None)


class Harness:
    """Drives a SlotScheduler step by step, as the engine process's loop does, recording what each request got."""

    def __init__(self, engine: StandInEngine, fixed_length: bool = False, condition_on_previous_text: bool = False):
        self.engine = engine
        self.done: dict[int, list[WindowResult]] = {}
        self.arriving: dict[int, dict[int, WindowResult]] = {}
        self.window_order: dict[int, list[int]] = {}  # the order a request's windows came back in
        self.failed: dict[int, Exception] = {}
        self.finished_at: dict[int, int] = {}
        self.scheduler = SlotScheduler(engine, SchedulerEvents(on_window=self._window, on_done=self._done,
                                                               on_failed=self.failed.__setitem__),
                                       fixed_length=fixed_length,
                                       condition_on_previous_text=condition_on_previous_text)

    def _window(self, key, index, result):
        assert key not in self.done, "no window after the request's end"
        assert index not in self.arriving.setdefault(key, {}), "each window is reported once"
        self.arriving[key][index] = result
        self.window_order.setdefault(key, []).append(index)

    def _done(self, key):
        results = self.arriving.pop(key, {})
        self.done[key] = sorted(results.values(), key=lambda result: result.offset)  # audio order
        self.finished_at[key] = len(self.engine.steps)

    def submit(self, key: int, labels: list[float], options: DecodeOptions = DecodeOptions(language="en"),
               seconds: float = 1.0) -> None:
        self.scheduler.submit(key, options, [labelled(label, seconds, index * seconds)
                                             for index, label in enumerate(labels)])

    def run(self, steps: int | None = None) -> None:
        """Runs until idle, or for a number of steps."""
        target = len(self.engine.steps) + steps if steps is not None else None
        while not self.scheduler.idle and (target is None or len(self.engine.steps) < target):
            self.scheduler.run_once()

    def texts(self, key: int) -> list[str]:
        return [result.segments[0].text for result in self.done[key]]


def test_windows_of_concurrent_requests_share_steps_and_come_back_in_order():
    harness = Harness(StandInEngine(capacity=4, steps=lambda label: 1 + int(label) % 3))
    harness.submit(0, [100 + i for i in range(6)])
    for key in (1, 2, 3):
        harness.submit(key, [key])
    harness.run()
    assert harness.texts(0) == [str(100 + i) for i in range(6)]
    assert [harness.texts(key) for key in (1, 2, 3)] == [["1"], ["2"], ["3"]]
    # Fair shares: the first admission takes one window from each request, so the clips are not behind the file.
    assert sorted(label for label, _ in harness.engine.admissions[0]) == [1, 2, 3, 100]
    assert max(len(step) for step in harness.engine.steps) == 4, "every slot was busy"


def test_a_clip_joins_the_running_batch_instead_of_waiting_for_it():
    """A long file holds every slot; a clip posted mid-decode takes the next slot that frees, ahead of the file's
    waiting windows, and is answered while the file is still decoding."""
    harness = Harness(StandInEngine(capacity=2, steps=lambda label: 5))
    harness.submit(0, [100 + i for i in range(10)])
    harness.run(steps=2)
    harness.submit(1, [1])
    harness.run()
    joined = next(i for i, step in enumerate(harness.engine.steps) if 1 in step)
    assert joined == 5, "the clip's window joined at the first free slot"
    assert 100 + 2 in harness.engine.steps[joined], "beside the file's windows, which kept decoding"
    assert harness.finished_at[1] == 10 < harness.finished_at[0] == 30


def test_requests_with_different_options_share_admissions_and_steps():
    harness = Harness(StandInEngine(capacity=8, steps=lambda label: 3))
    options = [DecodeOptions(language="en"), DecodeOptions(language="de", task="translate"),
               DecodeOptions(prompt="Kubernetes"), DecodeOptions(temperature=0.6)]
    for key, option in enumerate(options):
        harness.submit(key, [key], option)
    harness.run()
    detected = [replace(option, language=option.language or "yy") for option in options]  # before they queue
    assert [options for _, options in harness.engine.admissions[0]] == detected, "one admission, every option kept"
    assert harness.engine.steps == [[0, 1, 2, 3]] * 3
    assert [harness.done[key][0].language for key in range(4)] == ["en", "de", "yy", "yy"]


def test_windows_arriving_during_decoding_wait_briefly_to_share_one_encoder_pass():
    now = [0.0]
    engine = StandInEngine(capacity=8, steps=lambda label: 100 if label >= 100 else 2)
    harness = Harness(engine)
    harness.scheduler = SlotScheduler(engine, harness.scheduler.events, admission_wait=0.010, clock=lambda: now[0])
    harness.submit(0, [100])
    harness.scheduler.run_once()
    assert len(engine.admissions) == 1, "an idle engine admits at once"
    harness.submit(1, [1])
    now[0] += 0.004
    harness.submit(2, [2])
    harness.scheduler.run_once()
    assert len(engine.admissions) == 1 and len(engine.steps) == 2, "the file steps on while the clips wait"
    now[0] += 0.007
    harness.scheduler.run_once()
    assert [label for label, _ in engine.admissions[1]] == [1, 2], "both clips in one admission after 10 ms"
    harness.submit(3, [3, 4, 5, 6, 7, 8, 9])
    harness.scheduler.run_once()
    assert len(engine.admissions) == 3, "windows enough for every free slot go in at once"


def test_windows_are_encoded_while_the_busy_slots_step_on_and_join_when_encoded():
    engine = StandInEngine(capacity=4, steps=lambda label: 10 if label >= 100 else 2)
    engine.encoding_steps = 3  # the encoder of a joining batch takes three decode steps' time
    harness = Harness(engine)
    harness.submit(0, [100])
    harness.scheduler.run_once()
    assert engine.attached == [0], "an idle engine does not wait: the window joins at once"
    harness.submit(1, [1, 2])
    harness.run(steps=3)
    assert len(engine.admissions) == 2 and engine.attached == [0], "the clips are encoding"
    assert engine.steps[1:] == [[100]] * 3, "the file kept decoding meanwhile"
    harness.run(steps=1)
    assert engine.attached == [0, 4] and engine.steps[4] == [1, 2, 100], "joined once encoded, at the next step"
    harness.run()
    assert harness.texts(1) == ["1", "2"] and harness.texts(0) == ["100"]


def test_a_request_cancelled_while_its_windows_encode_gets_no_slot():
    engine = StandInEngine(capacity=4, steps=lambda label: 10 if label >= 100 else 2)
    engine.encoding_steps = 2
    harness = Harness(engine)
    harness.submit(0, [100])
    harness.scheduler.run_once()
    harness.submit(1, [1])
    harness.scheduler.run_once()
    harness.scheduler.cancel(1)
    assert harness.scheduler.joining is not None, "its encoder pass is still running"
    harness.run()
    assert engine.released == [1] and 1 not in harness.done, "its slot was freed as it joined"
    assert harness.texts(0) == ["100"] and all(step == [100] for step in engine.steps[2:])


def test_one_slot_is_shared_round_robin():
    harness = Harness(StandInEngine(capacity=1))
    harness.submit(0, [100, 101, 102])
    harness.submit(1, [200, 201])
    harness.run(steps=1)
    harness.submit(2, [300])
    harness.run()
    assert [admission[0][0] for admission in harness.engine.admissions] == [100, 200, 300, 101, 201, 102]


def test_a_looping_window_is_retried_hotter_and_keeps_its_request_s_place():
    """Window 1 repeats itself below temperature 0.4; its retries go ahead of a newer request's windows."""
    engine = StandInEngine(capacity=2, loops=lambda label, temperature: label == 1 and temperature < 0.4)
    harness = Harness(engine)
    harness.submit(0, [1])
    harness.submit(1, [7, 8, 9])
    harness.run()
    assert [[(label, options.temperature) for label, options in admission] for admission in engine.admissions] == [
        [(1, 0.0), (7, 0.0)], [(1, 0.2), (8, 0.0)], [(1, 0.4), (9, 0.0)]]
    assert harness.texts(0) == ["1"] and harness.done[0][0].segments[0].temperature == 0.4
    assert harness.texts(1) == ["7", "8", "9"]


def test_when_every_temperature_fails_the_likeliest_try_that_does_not_loop_is_kept():
    """Window 1 is unsure at every temperature (and loops, with the best log-probability of all, at 0.2): the try at
    0.6 is kept, as faster-whisper keeps it, not the last one at 1.0. Window 2 loops at every temperature: the
    likeliest loop is kept."""
    logprobs = {0.0: -1.5, 0.2: -0.5, 0.4: -1.3, 0.6: -1.1, 0.8: -1.4, 1.0: -2.0}
    engine = StandInEngine(capacity=2, loops=lambda label, temperature: label == 2 or temperature == 0.2,
                           logprob=lambda label, temperature: logprobs[temperature] if label == 1 else
                           -0.3 - temperature)
    harness = Harness(engine)
    harness.submit(0, [1, 2])
    harness.run()
    assert len(engine.admissions) == 6, "each window is tried at all six temperatures"
    kept = harness.done[0]
    assert (kept[0].temperature, kept[0].avg_logprob, harness.texts(0)[0]) == (0.6, -1.1, "1")
    assert (kept[1].temperature, harness.texts(0)[1]) == (0.0, LOOPING)
    assert harness.scheduler.idle and not harness.scheduler.requests


def test_fixed_length_decoding_has_no_fallback():
    engine = StandInEngine(capacity=2, loops=lambda label, temperature: True)
    harness = Harness(engine, fixed_length=True)
    harness.submit(0, [1])
    harness.run()
    assert len(engine.admissions) == 1 and harness.done[0][0].segments[0].text == LOOPING


def test_cancelling_a_request_frees_its_slots_before_the_next_step():
    engine = StandInEngine(capacity=2, steps=lambda label: 100)
    harness = Harness(engine)
    harness.submit(0, [100 + i for i in range(8)])
    harness.run(steps=3)
    harness.scheduler.cancel(0)
    assert sorted(engine.released) == [0, 1] and harness.scheduler.idle
    assert harness.scheduler.waiting_windows() == 0
    harness.submit(1, [1])
    harness.run()
    assert engine.steps[3:] == [[1]] * 100, "the next request decodes alone, at once"
    assert 0 not in harness.done and harness.texts(1) == ["1"]


def test_a_failed_admission_fails_only_the_requests_in_it():
    engine = StandInEngine(capacity=1, fails={13})
    harness = Harness(engine)
    harness.submit(0, [13])
    harness.run()
    harness.submit(1, [2])
    harness.run()
    assert isinstance(harness.failed[0], OutOfMemory) and 0 not in harness.done
    assert harness.texts(1) == ["2"]


def test_a_failed_admission_on_a_working_device_fails_only_its_requests():
    engine = StandInEngine(capacity=1, fails={13}, error=RuntimeError("a bug in admission"))
    harness = Harness(engine)
    harness.submit(0, [13])
    harness.run()
    harness.submit(1, [2])
    harness.run()
    assert isinstance(harness.failed[0], RuntimeError) and harness.texts(1) == ["2"]


def test_a_failed_admission_on_a_broken_device_ends_the_engine():
    engine = StandInEngine(capacity=1, fails={13}, error=RuntimeError("CUDA error: an illegal memory access"),
                           healthy=False)
    harness = Harness(engine)
    harness.submit(0, [13])
    with pytest.raises(EngineFailure):
        harness.run()
    assert isinstance(harness.failed[0], RuntimeError)


def test_a_failed_step_fails_every_request_in_it_and_ends_the_engine():
    """A step serves every busy slot: its failure is no one request's fault, and on a GPU it recurs (sticky CUDA
    errors), so the engine stops rather than failing every request from then on."""
    engine = StandInEngine(capacity=2, steps=lambda label: 5, step_fails={13}, error=RuntimeError("step failed"))
    harness = Harness(engine)
    harness.submit(0, [13])
    harness.submit(1, [2])
    with pytest.raises(EngineFailure, match="step failed"):
        harness.run()
    assert set(harness.failed) == {0, 1} and not harness.done


def test_out_of_memory_in_a_step_fails_its_requests_and_the_engine_goes_on():
    engine = StandInEngine(capacity=2, steps=lambda label: 5, step_fails={13})
    harness = Harness(engine)
    harness.submit(0, [13])
    harness.run()
    harness.submit(1, [2])
    harness.run()
    assert isinstance(harness.failed[0], OutOfMemory) and harness.texts(1) == ["2"]


def result(avg_logprob: float, no_speech_prob: float = 0.01, text: str = "some words") -> WindowResult:
    return WindowResult("en", [segment(0, 1, text)], avg_logprob=avg_logprob, no_speech_prob=no_speech_prob,
                        compression_ratio=compression_ratio(text))


def test_openai_s_fallback_and_no_speech_rules():
    assert needs_fallback(result(-1.2)), "an unsure decode is retried hotter"
    assert needs_fallback(result(-0.3, text=LOOPING)), "so is a repetition loop"
    assert not needs_fallback(result(-0.3))
    assert is_silence(result(-1.2, no_speech_prob=0.7)) and not needs_fallback(result(-1.2, no_speech_prob=0.7))
    assert not is_silence(result(-0.9, no_speech_prob=0.9)), "a confident decode is speech, whatever no_speech says"
    assert not is_silence(result(-3.0, no_speech_prob=0.5))


def test_silence_is_dropped_without_a_fallback():
    class Silent(StandInEngine):
        def step(self):
            return [(slot, replace(found, no_speech_prob=0.9, avg_logprob=-1.5)) for slot, found in super().step()]

    engine = Silent(capacity=2)
    harness = Harness(engine)
    harness.submit(0, [1, 2])
    harness.run()
    assert len(engine.admissions) == 1, "no retry at a higher temperature"
    assert [found.segments for found in harness.done[0]] == [[], []]


def test_a_decode_that_stops_short_continues_from_its_last_timestamp_beside_other_windows():
    """Window 1 (of 10 s) stops at 6 s, its continuation at 8.5 s; their rest goes back into the queue at the head of
    the request, decodes beside the other windows, and the results come back in audio order."""
    resume = {(1, 10.0): 6.0, (1, 4.0): 2.5}
    engine = StandInEngine(capacity=2, steps=lambda label: 3, resume=lambda label, seconds: resume.get((label, round(seconds, 2))))
    harness = Harness(engine)
    harness.submit(0, [1, 2, 3], seconds=10.0)
    harness.submit(1, [7])
    harness.run()
    offsets = [found.offset for found in harness.done[0]]
    assert offsets == [0.0, 6.0, 8.5, 10.0, 20.0]
    assert [found.duration for found in harness.done[0]] == [10.0, 4.0, 1.5, 10.0, 10.0]
    assert [found.segments[0].text for found in harness.done[0]] == ["1", "1", "1", "2", "3"]
    assert [[label for label, _ in admission] for admission in engine.admissions] == [[1, 7], [1, 2], [1, 3]], \
        "each continuation goes ahead of the request's next window, beside it"
    assert harness.texts(1) == ["7"]


def test_conditioned_windows_decode_one_after_another_each_prompted_with_the_text_before_it():
    """condition_on_previous_text: a file's windows, a continuation too, decode in order and one at a time (beside
    other requests' windows), each prompted with its request's tokens so far, timestamps included; a window kept at a
    temperature above 0.5 is left out and starts the prompt again, as in OpenAI's transcribe."""
    engine = StandInEngine(capacity=4, steps=lambda label: 2,
                           resume=lambda label, seconds: 6.0 if (label, seconds) == (2, 10.0) else None,
                           logprob=lambda label, temperature: -2.0 if label == 3 and temperature < 0.6 else -0.2)
    harness = Harness(engine, condition_on_previous_text=True)
    harness.submit(0, [1, 2, 3, 4], seconds=10.0)
    harness.submit(1, [7, 8])
    harness.run()
    said = lambda *labels: tuple(token for label in labels for token in (TIMESTAMP, label, TIMESTAMP + 1))
    admitted = [(label, options.temperature, options.previous_tokens)
                for admission in engine.admissions for label, options in admission]
    assert [entry for entry in admitted if entry[0] < 7] == [
        (1, 0.0, ()), (2, 0.0, said(1)), (2, 0.0, said(1, 2)), (3, 0.0, said(1, 2, 2)), (3, 0.2, said(1, 2, 2)),
        (3, 0.4, said(1, 2, 2)), (3, 0.6, said(1, 2, 2)), (4, 0.0, ())]
    assert [entry for entry in admitted if entry[0] >= 7] == [(7, 0.0, ()), (8, 0.0, said(7))]
    assert all(sum(label < 7 for label in step) <= 1 for step in engine.steps), "one window of the file at a time"
    assert any(len(step) == 2 for step in engine.steps), "beside the other request's windows"
    assert harness.texts(0) == ["1", "2", "2", "3", "4"] and harness.texts(1) == ["7", "8"]

    engine = StandInEngine(capacity=4, steps=lambda label: 2)
    harness = Harness(engine)
    harness.submit(0, [1, 2, 3, 4], seconds=10.0)
    harness.run()
    assert [[(label, options.previous_tokens) for label, options in admission] for admission in engine.admissions] \
        == [[(1, ()), (2, ()), (3, ()), (4, ())]], "unconditioned, a file's windows decode side by side"


def test_a_first_window_of_30_s_detects_the_language_once_at_its_admission():
    engine = StandInEngine(capacity=4)
    harness = Harness(engine)
    harness.submit(0, [1, 2, 3, 4], DecodeOptions(), seconds=30.0)
    harness.run()
    assert engine.detections == []
    assert [[(label, options.language) for label, options in admission] for admission in engine.admissions] == [
        [(1, None)], [(2, "xx"), (3, "xx"), (4, "xx")]]
    assert {found.language for found in harness.done[0]} == {"xx"}


def test_the_language_is_detected_over_the_first_30_s_of_speech():
    """Windows shorter than 30 s, a lone short one too: the first 30 s of the windows' speech together decide,
    before any window queues, and every window decodes in that language; a languages[] hint is passed on as the
    candidates."""
    engine = StandInEngine(capacity=4)
    harness = Harness(engine)
    harness.submit(0, [1, 2, 3, 4], DecodeOptions(), seconds=12.0)
    harness.submit(1, [5, 6], DecodeOptions(languages=("de", "fr")), seconds=3.0)
    harness.submit(2, [7], DecodeOptions(), seconds=0.5)
    harness.run()
    assert engine.detections == [(30.0, ()), (6.0, ("de", "fr")), (0.5, ())]
    admitted = {label: options.language for admission in engine.admissions for label, options in admission}
    assert admitted == {1: "yy", 2: "yy", 3: "yy", 4: "yy", 5: "fr", 6: "fr", 7: "yy"}
    assert [{found.language for found in harness.done[key]} for key in range(3)] == [{"yy"}, {"fr"}, {"yy"}]


def test_assemble_offsets_windows_and_keeps_time_moving_forward_inside_the_audio():
    results = [WindowResult("en", [segment(0, 10, " a"), segment(10, 28.5, " b")], offset=0.0),
               WindowResult("en", [segment(0, 2, " c"), segment(5, 30, " d")], offset=28.0),
               WindowResult("en", [segment(0, 4, " e")], offset=60.0)]
    transcript = assemble(results, 63.0)
    assert [(s.start, s.end, s.text, s.seek) for s in transcript.segments] == [
        (0, 10, " a", 0), (10, 28.5, " b", 0), (28.5, 30, " c", 2800), (33, 58, " d", 2800), (60, 63, " e", 6000)]
    assert transcript.text == "a b c d e" and transcript.language == "en" and transcript.duration == 63.0


def test_text_from_tokens_puts_no_space_between_segments_of_languages_without_spaces():
    """Chinese and Japanese tokens spell no space between words, so none comes between segments or windows; a
    segment keeps its own leading space, as OpenAI's do."""
    results = [WindowResult("zh", [segment(0, 3, "今天天气很好。"), segment(3, 6, "我们去公园吧。")], offset=0.0),
               WindowResult("zh", [segment(0, 2, "好的。")], offset=30.0)]
    assert assemble(results, 33.0).text == "今天天气很好。我们去公园吧。好的。"
    results = [WindowResult("en", [segment(0, 3, " Hello there."), segment(3, 6, " Good day.")], offset=0.0)]
    transcript = assemble(results, 6.0)
    assert transcript.text == "Hello there. Good day." and transcript.segments[0].text == " Hello there."


def test_a_segment_that_holds_almost_no_speech_is_dropped():
    """Speech heard at 1-4 s and 20-23 s of a 30 s window: the segments over the silence between them (one touching
    0.05 s of speech, one over none) are dropped as made up; the sentences are kept, a short word (0.3 s heard) too.
    With the rule off (0), or with no speech detection, every segment stays."""
    results = [WindowResult("en", [segment(0.5, 3.95, " One sentence."), segment(3.95, 10, " Thank you."),
                                   segment(10, 19.95, " Bye."), segment(19.95, 22, " Another"),
                                   segment(22, 23.5, " sentence."), segment(28, 29, " Yes.")], offset=0.0)]
    heard = [(1.0, 4.0), (20.0, 23.0), (28.4, 28.7)]
    builder = TranscriptBuilder(30.0, min_segment_speech=0.1)
    builder.speech = heard
    builder.add(results[0])
    assert builder.transcript().text == "One sentence. Another sentence. Yes."
    assert speech_within(heard, 3.5, 20.5) == 1.0
    for minimum, speech in ((0.0, heard), (0.1, None)):
        builder = TranscriptBuilder(30.0, min_segment_speech=minimum)
        builder.speech = speech
        builder.add(results[0])
        assert len(builder.transcript().segments) == 6


def test_each_window_is_reported_when_final_not_when_its_request_ends():
    """Streaming sends a window's text as soon as it is final: the scheduler reports each window as it finishes,
    after the fallback decision (a looping window only once, from its retry), and the request's end after the last."""
    harness = Harness(StandInEngine(capacity=4, steps=lambda label: 6 if label == 1 else 1,
                                    loops=lambda label, temperature: label == 3 and temperature == 0))
    harness.submit(0, [1, 2, 3])
    harness.run(steps=4)  # the quick window and the retried one are done; the slow one needs 6 steps
    assert harness.window_order[0] == [1, 2] and 0 not in harness.done, "finished windows come before the slow one"
    assert harness.arriving[0][2].segments[0].temperature == 0.2, "the looping window is reported from its retry"
    harness.run()
    assert harness.window_order[0] == [1, 2, 0]
    assert harness.texts(0) == ["1", "2", "3"]


def test_live_turns_go_ahead_of_files_which_still_progress():
    """A file holds every slot and four clips wait; six live turns arrive: each slot that frees goes to a live turn,
    except one that stays the files' while their windows wait, so the captions come first and files never stop."""
    harness = Harness(StandInEngine(capacity=4, steps=lambda label: 3))
    harness.submit(0, [100 + i for i in range(12)])
    harness.run(steps=1)
    for key in range(1, 5):
        harness.submit(key, [200 + key])
    for key in range(11, 17):
        harness.scheduler.submit(key, DecodeOptions(language="en"), [labelled(key)], live=True)
    arrived = len(harness.engine.steps)
    harness.run()
    live_done = max(harness.finished_at[key] for key in range(11, 17))
    # The file's windows in slots finish their 2 remaining steps, then two rounds of three live windows (3 steps
    # each), ahead of the clips that arrived before them.
    assert live_done == arrived + 2 + 2 * 3
    during = harness.engine.steps[arrived:live_done]
    assert all(any(label >= 100 for label in step) for step in during), "files decode at every step meanwhile"
    assert max(sum(label < 100 for label in step) for step in during) == 3, "live turns hold all slots but one"
    assert harness.texts(0) == [str(100 + i) for i in range(12)]


def test_a_request_whose_windows_keep_falling_back_pays_from_its_own_share():
    """One slot; request 0's windows repeat themselves at every temperature (six decodes each, ten steps a decode),
    request 1's decode once. Request 1 arrives after request 0's first decode and still gets every other decode:
    it finishes within twice its own work, not after request 0's retries."""
    engine = StandInEngine(capacity=1, steps=lambda label: 10, loops=lambda label, temperature: label < 10)
    harness = Harness(engine)
    harness.submit(0, [1, 2, 3])
    harness.run(steps=10)
    harness.submit(1, [11, 12, 13])
    harness.run()
    assert harness.finished_at[1] <= 10 + 2 * 30 + 10, harness.finished_at
    assert harness.texts(1) == ["11", "12", "13"] and harness.texts(0) == [LOOPING] * 3


def test_windows_shown_as_they_decode_report_each_step_and_keep_their_first_decode():
    """Every decode repeats itself. A live window with partials reports each step's tokens and is final at its first
    decode (its text was shown); one without partials, or one the no-speech rule might yet call silence (its text
    is held to its end), still falls back through all six temperatures."""
    engine = StandInEngine(capacity=4, steps=lambda label: 3, loops=lambda label, temperature: True,
                           no_speech=lambda label: 0.9 if label == 3 else 0.01)
    harness = Harness(engine)
    partials = []
    harness.scheduler.events.on_partials = partials.extend
    shown = DecodeOptions(language="en", partials=True)
    harness.scheduler.submit(1, shown, [labelled(1)], live=True)
    harness.scheduler.submit(2, DecodeOptions(language="en"), [labelled(2)], live=True)
    harness.scheduler.submit(3, shown, [labelled(3)], live=True)
    harness.run()
    assert partials == [(1, 0, [(1, -0.5)]), (1, 0, [(2, -0.5)])], "each step but the last, for the shown window alone"
    assert [label for admission in engine.admissions for label, _ in admission].count(1) == 1
    assert harness.done[1][0].temperature == 0.0 and harness.texts(1) == [LOOPING]
    assert [[options.temperature for label, options in admission if label == 3] for admission in
            engine.admissions] == [[0.0], [0.2], [0.4], [0.6], [0.8], [1.0]]


class ScriptedEngine:
    """Answers transcribe() with a script of (window, text tokens or result), as the engine process delivers them."""

    token_bytes = [b" Hel", b"lo", b"\xe6\x97", b"\xa5", b" wor", b"ld", b"  ", b"!", b"."]

    def __init__(self, script):
        self.script = script

    async def transcribe(self, windows, options, live):
        assert len(windows) == 2
        for item in self.script:
            yield item


def test_partial_text_is_whole_characters_in_audio_order_and_adds_up_to_the_transcript():
    """Window 1's text arrives before window 0 is final: it waits. Window 0's first text loses its leading space as
    the transcript does, a character split over two tokens shows once whole, trailing spaces wait for what follows,
    and each window's last piece adds what its final text has beyond what was shown."""
    script = [(1, made_final(4)), (0, made_final(0)), (0, made_final(1, 2)), (0, made_final(3, 6)),
              (0, WindowResult("en", [segment(0, 1, " Hello\u65e5!")], offset=0.0)),
              (1, made_final(5)), (1, WindowResult("en", [segment(0, 1, " world.")], offset=30.0))]
    samples = np.zeros(40 * SAMPLE_RATE, np.float32)
    builder = TranscriptBuilder(40.0)

    async def pieces():
        return [piece async for piece in transcribe_pieces(ScriptedEngine(script), samples, DecodeOptions(),
                                                            asyncio.Semaphore(1), builder, detect_speech=False)]

    deltas = [piece.delta for piece in asyncio.run(pieces())]
    assert deltas == ["Hel", "lo", "\u65e5", "!", " wor", "ld", "."]
    assert "".join(deltas) == builder.transcript().text == "Hello\u65e5! world."


def test_logprobs_ride_on_each_piece_the_tokens_it_shows_and_the_last_piece_has_the_rest():
    """With logprobs, each partial piece carries the tokens it shows (a token whose character is not whole yet rides
    with the piece it arrived for, its string empty) and the window's last piece the tokens its partials did not
    give: in all, each window's tokens once, in order, spelled as the final segments spell them."""
    final = {0: [0, 1, 2, 3, 7], 1: [4, 5, 8]}
    script = [(1, made_final(4)), (0, made_final(0)), (0, made_final(1, 2)), (0, made_final(3)),
              (0, WindowResult("en", [token_segment(final[0], " Hello\u65e5!")], offset=0.0)),
              (1, made_final(5)), (1, WindowResult("en", [token_segment(final[1], " world.")], offset=30.0))]
    builder = TranscriptBuilder(40.0)

    async def pieces():
        return [piece async for piece in transcribe_pieces(
            ScriptedEngine(script), np.zeros(40 * SAMPLE_RATE, np.float32), DecodeOptions(logprobs=True),
            asyncio.Semaphore(1), builder, detect_speech=False)]

    pieces = asyncio.run(pieces())
    expected = [("Hel", [(" Hel", 0)]), ("lo", [("lo", 1), ("", 2)]), ("\u65e5", [("\u65e5", 3)]), ("!", [("!", 7)]),
                (" wor", [(" wor", 4)]), ("ld", [("ld", 5)]), (".", [(".", 8)])]
    assert [(piece.delta, [(entry["token"], entry["logprob"]) for entry in piece.logprobs]) for piece in pieces] == [
        (delta, [(string, -0.1 * token) for string, token in tokens]) for delta, tokens in expected]
    assert [entry for piece in pieces for entry in piece.logprobs] == segment_logprobs(builder.segments,
                                                                                       ScriptedEngine.token_bytes)


def made_final(*tokens: int) -> list[tuple[int, float]]:
    """Text tokens as the engine reports them made final, each with a log-probability: -0.1 times its id."""
    return [(token, -0.1 * token) for token in tokens]


def token_segment(tokens: list[int], text: str) -> Segment:
    return replace(segment(0, 1, text), tokens=tokens, logprobs=[logprob for _, logprob in made_final(*tokens)])


def test_partial_text_never_shows_half_a_character():
    text = PartialText([b"\xe6", b"\x97", b"\xa5", b"a"])
    for token, expected in ((0, ""), (1, ""), (2, "\u65e5"), (3, "\u65e5a")):
        text.add(made_final(token))
        assert text.text == expected
