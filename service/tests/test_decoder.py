"""The slot decoder's machinery that CUDA graphs rely on, checked on CPU: slot packing and buckets, the graph replay
dispatch, the capture sequence, and a step that never needs the host to read the device."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from whisper_server.decoder import bucket_for, bucket_sizes, capture_step_graphs
from whisper_server.decoding import SAMPLE_RATE, DecodeOptions, OutOfMemory
from whisper_server.engine import WhisperEngine
from whisper_server.test_model import make_test_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> WhisperEngine:
    torch.set_num_threads(1)
    engine = WhisperEngine(str(make_test_model(tmp_path_factory.mktemp("decoder") / "model")), device="cpu", slots=8)
    engine.load()
    engine.warm_up()
    return engine


def noise(seed: int, seconds: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32)


def test_buckets_cover_every_slot_count():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert [bucket_for(extent, bucket_sizes(24)) for extent in (1, 2, 3, 5, 9, 16, 17, 24)] == [1, 2, 4, 8, 16, 16, 24, 24]


def test_slots_are_taken_lowest_first_so_busy_slots_stay_packed(engine):
    decoder = engine.decoder
    assert decoder.allocate(3) == [0, 1, 2] and decoder.extent == 3
    decoder.release([1])
    assert decoder.extent == 3 and decoder.allocate(1) == [1], "a freed slot is reused before a higher one"
    decoder.release([2])
    assert decoder.extent == 2, "steps shrink to the smaller bucket when the top slots free up"
    decoder.release([0, 1])
    assert decoder.extent == 0 and decoder.free == list(range(8))


class ReplayedStep:
    """Stands in for a captured graph: a replay runs the step it captured, eagerly, and is counted."""

    def __init__(self, decoder, size: int, replays: list[int]):
        self.decoder, self.size, self.replays = decoder, size, replays

    def replay(self) -> None:
        self.replays.append(self.size)
        self.decoder._step(self.size)


def decode(engine: WhisperEngine, windows) -> dict[int, list[int]]:
    owners = dict(zip(engine.admit(windows[:3]), range(3)))
    later, results = list(enumerate(windows))[3:], {}
    while owners:
        for slot, result in engine.step():
            results[owners.pop(slot)] = result.tokens
        if later and len(results) >= 1:  # a window joins once the first has finished: a hole in the packed slots
            index, window = later.pop(0)
            owners.update(zip(engine.admit([window]), [index]))
    return results


def test_steps_replay_the_graph_of_the_bucket_that_covers_the_busy_slots(engine):
    windows = [(noise(seed, 1 + seed), DecodeOptions(language="en" if seed % 2 else None)) for seed in range(5)]
    eager = decode(engine, windows)
    replays: list[int] = []
    engine.decoder.graphs = {size: ReplayedStep(engine.decoder, size, replays) for size in engine.decoder.buckets}
    try:
        replayed = decode(engine, windows)
    finally:
        engine.decoder.graphs = {}
    assert replayed == eager
    assert set(replays) <= {1, 2, 4} and replays[0] == 4, "three windows run in the 4-slot bucket, never 8"


def test_capture_warms_up_on_a_side_stream_then_captures_one_graph_per_bucket(monkeypatch):
    events: list[tuple] = []

    class Stream:
        def wait_stream(self, other):
            events.append(("wait",))

    class Graph:
        pass

    @contextlib.contextmanager
    def on_stream(stream):
        events.append(("side stream",))
        yield
        events.append(("main stream",))

    @contextlib.contextmanager
    def capturing(graph):
        events.append(("capture",))
        yield
        events.append(("captured",))

    fake_cuda = dict(Stream=lambda device=None: Stream(), current_stream=lambda device=None: Stream(),
                     stream=on_stream, CUDAGraph=Graph, graph=capturing, synchronize=lambda device=None: None)
    for name, value in fake_cuda.items():
        monkeypatch.setattr(torch.cuda, name, value)
    graphs = capture_step_graphs(lambda size: events.append(("step", size)), [1, 2, 4], torch.device("cuda"))
    assert set(graphs) == {1, 2, 4} and all(isinstance(graph, Graph) for graph in graphs.values())
    warm_up = [("step", size) for size in (1, 2, 4) for _ in range(3)]
    captures = [event for size in (1, 2, 4) for event in (("capture",), ("step", size), ("captured",))]
    assert events == [("wait",), ("side stream",), *warm_up, ("main stream",), ("wait",), *captures]


class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for the device or builds a tensor from host data: none may appear in
    a step that is captured as a CUDA graph."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
               "aten::unique_consecutive", "aten::repeat_interleave", "aten::lift_fresh", "aten::equal", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNCING:
            self.found.append(name)
        if name.startswith("aten::index"):  # a boolean index is a hidden nonzero
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or []):
                self.found.append(f"{name} with a boolean index")
        return func(*args, **(kwargs or {}))


def test_the_step_never_waits_for_the_device(engine):
    engine.admit([(noise(1), DecodeOptions(language="en")), (noise(2), DecodeOptions(temperature=0.7)),
                  (noise(3), DecodeOptions(prompt="hello world", task="translate"))])
    mode = HostReads()
    with torch.inference_mode(), mode:
        for _ in range(5):
            engine.decoder._step(4)
    assert mode.found == []
    engine.release(engine.busy_slots())


def test_a_slot_freed_mid_decode_stops_at_the_next_step(engine):
    slots = engine.admit([(noise(4), DecodeOptions(language="en")), (noise(5), DecodeOptions(language="en"))])
    engine.step()
    lengths = engine.decoder.length[:2].tolist()
    engine.release([slots[0]])
    engine.step()
    assert engine.decoder.length[:2].tolist() == [lengths[0], lengths[1] + 1], "the released slot did not advance"
    while engine.busy_slots():
        engine.step()


def test_slots_that_cannot_fit_are_refused_at_start_with_the_size_that_fits(engine, monkeypatch):
    """The CUDA-only sizing check, run on CPU with the device's free memory stood in."""
    per_slot = engine.bytes_per_slot
    assert per_slot == 2 * 2 * 64 * (448 + 1500) * 4 + 448 * 12, "tiny model: 2 layers, d_model 64, float32"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(9.5 * per_slot), 100 * per_slot))
    monkeypatch.setattr(engine, "device", "cuda")
    with pytest.raises(OutOfMemory) as refused:
        engine._allocate_decoder()
    message = str(refused.value)
    assert "8 decode slots (--max-batch-size) need" in message and "--max-batch-size 7 fits" in message
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * per_slot, 100 * per_slot))
    assert engine._allocate_decoder().slots == 8, "8 slots fit in 80% of 10 slots' worth"


def test_a_failed_capture_names_the_way_to_run_eagerly_and_can_be_turned_off(engine, monkeypatch):
    def broken_capture():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine.decoder, "capture", broken_capture)
    with pytest.raises(RuntimeError, match="--cuda-graphs false runs the same step eagerly"):
        engine.warm_up()
    monkeypatch.setattr(engine, "cuda_graphs", False)
    engine.warm_up()  # no capture: the step runs eagerly, and the engine is warm and idle
    assert engine.decoder.busy == 0
