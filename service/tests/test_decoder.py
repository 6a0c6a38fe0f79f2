"""The slot decoder's machinery that CUDA graphs rely on, checked on CPU: slot packing (compaction) and buckets, the
graph replay dispatch, the capture sequence and its shared pool, a step that never needs the host to read the device,
the attention backends chosen per attention, admissions that write the caches in place (no gathered copies) and
run only in shapes the warm-up ran."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from whisper_server import decoder as decoder_module
from whisper_server.decoder import (DECODER_CROSS_ATTENTION, DECODER_SELF_ATTENTION, ENCODER_SELF_ATTENTION,
                                    Piece, admission_pieces, admission_sizes, attention_context, bucket_for,
                                    SlotDecoder, bucket_sizes, capture_graphs, prefill_widths)
from whisper_server.decoding import SAMPLE_RATE, DecodeOptions, OutOfMemory
from whisper_server.engine import AdmissionStream, WhisperEngine
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


def test_admissions_run_in_a_few_sizes_and_widths():
    assert admission_sizes(4) == [1, 2, 4]
    assert admission_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert admission_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert prefill_widths(448) == [4, 16, 64, 256, 447], "the longest prompt (224 tokens) fits 256"
    sizes = admission_sizes(64)
    assert admission_pieces(0, 33, sizes, 64) == [Piece(0, 33, 40)], "padded into the free rows after them"
    assert admission_pieces(60, 3, sizes, 64) == [Piece(60, 3, 4)]
    assert admission_pieces(61, 3, sizes, 64) == [Piece(61, 2, 2), Piece(63, 1, 1)], "no room to pad: exact pieces"
    assert admission_pieces(27, 37, sizes, 64) == [Piece(27, 32, 32), Piece(59, 4, 4), Piece(63, 1, 1)]


def test_freed_rows_are_filled_from_the_top_so_busy_slots_stay_packed(engine):
    decoder = engine.decoder
    assert decoder.allocate(3) == [0, 1, 2] and decoder.rows([0, 1, 2]) == [0, 1, 2]
    decoder.joined([0, 1, 2])
    decoder.release([0])
    assert decoder.extent == 3, "a freed row stays as it is until the next step or admission"
    assert decoder.allocate(1) == [0] and decoder.rows([0]) == [2], "joining rows come right after the busy ones"
    assert decoder.rows([1, 2]) == [1, 0], "the last busy row moved into the hole"
    with pytest.raises(RuntimeError, match="one at a time"):
        decoder.allocate(1)
    decoder.release([1])
    decoder.step()
    assert decoder.rows([0, 2]) == [2, 0], "no compaction while windows are joining: their rows stay contiguous"
    decoder.joined([0])
    decoder.step()
    assert decoder.rows([0, 2]) == [1, 0] and decoder.extent == 2
    decoder.release([0, 2])
    assert decoder.busy == 0 and decoder.free == list(range(8))


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


def test_capture_warms_up_on_a_side_stream_then_captures_largest_first_into_one_pool(monkeypatch):
    events: list[tuple] = []
    pools = iter(["pool 1", "pool 2"])

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
    def capturing(graph, pool=None):
        events.append(("capture", pool))
        yield
        events.append(("captured",))

    fake_cuda = dict(Stream=lambda device=None: Stream(), current_stream=lambda device=None: Stream(),
                     stream=on_stream, CUDAGraph=Graph, graph=capturing, synchronize=lambda device=None: None,
                     graph_pool_handle=lambda: next(pools))
    for name, value in fake_cuda.items():
        monkeypatch.setattr(torch.cuda, name, value)
    steps = {size: (lambda size=size: events.append(("step", size))) for size in (4, 2, 1)}
    graphs = capture_graphs(steps, torch.device("cuda"))
    assert list(graphs) == [4, 2, 1] and all(isinstance(graph, Graph) for graph in graphs.values())
    warm_up = [("step", size) for size in (4, 2, 1) for _ in range(3)]
    captures = [event for size in (4, 2, 1) for event in (("capture", "pool 1"), ("step", size), ("captured",))]
    assert events == [("wait",), ("side stream",), *warm_up, ("main stream",), ("wait",), *captures]


def test_the_decoder_captures_its_step_buckets_largest_first(engine, monkeypatch):
    captured = []
    monkeypatch.setattr(engine.decoder, "device", torch.device("cuda"))
    monkeypatch.setattr(decoder_module, "capture_graphs", lambda functions, device: captured.append(list(functions)) or {})
    engine.decoder.capture()
    assert captured == [[8, 4, 2, 1]]


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
    before = engine.decoder.length[engine.decoder.rows(slots)].tolist()
    engine.release([slots[0]])
    engine.step()
    assert engine.decoder.rows([slots[1]]) == [0], "the busy row moved into the freed one"
    assert engine.decoder.length[0].item() == before[1] + 1 and not engine.decoder.active[1], \
        "the released slot did not advance"
    while engine.busy_slots():
        engine.step()


def test_slots_that_cannot_fit_are_refused_at_start_with_the_size_that_fits(engine, monkeypatch):
    """The CUDA-only sizing check, run on CPU with the device's free memory stood in."""
    per_slot = engine.bytes_per_slot
    # tiny model: 2 layers, d_model 64, float32; the histories of its sequence and of two beam-candidate rows
    assert per_slot == 2 * 2 * 64 * (448 + 1500) * 4 + 3 * 448 * 12
    five_beams = SlotDecoder.bytes_per_slot(engine.model.config, torch.float32, group=5)
    assert five_beams == 2 * 2 * 64 * (5 * 448 + 1500) * 4 + 11 * 448 * 12, "each beam its own self-attention KV"
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


def test_each_attention_runs_in_its_chosen_backends_never_cudnn():
    cuda = torch.device("cuda")
    enabled = lambda: (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),  # noqa: E731
                       torch.backends.cuda.cudnn_sdp_enabled())
    with attention_context(DECODER_SELF_ATTENTION, cuda):
        assert enabled() == (False, True, False), "masked: memory-efficient"
    for unmasked in (ENCODER_SELF_ATTENTION, DECODER_CROSS_ATTENTION):
        with attention_context(unmasked, cuda):
            assert enabled() == (True, True, False), "no mask: flash first"
    assert enabled()[2], "PyTorch's own default (cuDNN allowed) is back outside"


def test_the_attention_report_shows_the_backend_each_attention_was_dispatched_to(engine, monkeypatch):
    """On CPU flash serves all three. With the masked attention given the CUDA choice (memory-efficient, which CPU
    lacks), the decoder's self-attention alone falls to math: the choice is applied per attention where it runs."""
    assert engine.attention_backends == {ENCODER_SELF_ATTENTION: ["FLASH_ATTENTION"],
                                         DECODER_SELF_ATTENTION: ["FLASH_ATTENTION"],
                                         DECODER_CROSS_ATTENTION: ["FLASH_ATTENTION"]}
    monkeypatch.setitem(decoder_module.MASKED, "cpu", decoder_module.MASKED["cuda"])
    with torch.inference_mode():
        report = engine.decoder.attention_report(engine._encode_silence)
    assert report == {ENCODER_SELF_ATTENTION: ["FLASH_ATTENTION"], DECODER_SELF_ATTENTION: ["MATH"],
                      DECODER_CROSS_ATTENTION: ["FLASH_ATTENTION"]}


class CacheReads(TorchDispatchMode):
    """Records every op that copies rows out of the KV caches by index (a gather) instead of reading a view."""

    GATHERS = {"aten::index", "aten::index_select", "aten::gather", "aten::take"}

    def __init__(self, caches):
        super().__init__()
        self.storages = {cache.untyped_storage().data_ptr() for cache in caches}
        self.gathers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = args[0] if args else None
        if (func._schema.name in self.GATHERS and isinstance(source, torch.Tensor)
                and source.untyped_storage().data_ptr() in self.storages):
            self.gathers.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_joining_windows_write_the_caches_in_place_with_no_gathered_copies(engine):
    decoder = engine.decoder
    caches = (decoder.self_keys, decoder.self_values, decoder.cross_keys, decoder.cross_values)
    before = [cache.clone() for cache in caches]
    busy = engine.admit([(noise(6), DecodeOptions(language="en"))] * 2)
    engine.step()
    reads = CacheReads(caches)
    with torch.inference_mode(), reads:
        joined = engine.admit([(noise(7), DecodeOptions(prompt="hello world")), (noise(8), DecodeOptions())])
        engine.step()
    assert reads.gathers == [], "admissions and steps read the caches through views"
    rows = decoder.rows(joined)
    assert rows == [2, 3]
    for cache, old in zip(caches, before):
        assert not torch.equal(cache[:, rows], old[:, rows]), "the joining rows' caches were written in place"
    engine.release(busy + joined)


def test_admissions_of_every_size_run_only_in_shapes_the_warm_up_ran(engine, monkeypatch):
    shapes: set[tuple] = set()
    decoder = engine.decoder

    def spy(owner, name, describe):
        original = getattr(owner, name)

        def recorded(*args):
            shapes.add((name, *describe(*args)))
            return original(*args)

        monkeypatch.setattr(owner, name, recorded)

    spy(engine, "_encode", lambda features: (features.shape[0],))
    spy(decoder, "attach", lambda piece, states, prefixes=None: (piece.size,))
    spy(decoder, "_prefill_pass", lambda piece, tokens: (piece.size, tokens.shape[1]))
    monkeypatch.setattr(decoder, "padded_admissions", True)  # as on a GPU, where fixed shapes pay
    with torch.inference_mode():
        decoder.warm_up_admissions(engine._encode_silence)
    warmed, shapes = set(shapes), set()
    assert {shape[1] for shape in warmed if shape[0] == "_encode"} == set(decoder.admission_sizes)
    prompts = (None, "hello", "the quick brown fox jumps over the lazy dog " * 30)
    for busy in (0, 3, 5):
        for count in range(1, engine.capacity - busy + 1):
            held = engine.admit([(noise(busy), DecodeOptions(language="en"))] * busy) if busy else []
            windows = [(noise(count + i), DecodeOptions(prompt=prompts[(count + i) % 3])) for i in range(count)]
            slots = engine.admit(windows)
            assert sorted(decoder.rows(held + slots)) == list(range(busy + count))
            engine.release(held + slots)
    assert shapes and shapes <= warmed, f"unwarmed shapes: {shapes - warmed}"


def test_on_a_cpu_an_admission_encodes_its_windows_and_no_padding(engine, monkeypatch):
    encoded: list[int] = []
    original = engine._encode
    monkeypatch.setattr(engine, "_encode", lambda features: encoded.append(features.shape[0]) or original(features))
    slots = engine.admit([(noise(seed), DecodeOptions(language="en")) for seed in range(5)])
    engine.release(slots)
    assert encoded == [5], "five windows, five encoder rows (padded, they would be eight)"


def test_a_long_window_in_slot_31_with_2_busy_runs_the_2_bucket(tmp_path):
    """Thirty windows leave after a step (cancelled); the one in slot 31 keeps decoding beside the one in slot 1. The busy rows are
    compacted, so the steps run in the 2-slot bucket, and both windows' tokens are those they get decoded alone."""
    torch.set_num_threads(1)
    engine = WhisperEngine(str(make_test_model(tmp_path / "model")), device="cpu", slots=32, max_new_tokens=12)
    engine.load()
    decoder = engine.decoder
    replays: list[int] = []
    decoder.graphs = {size: ReplayedStep(decoder, size, replays) for size in decoder.buckets}
    long_windows = {1: (noise(31, 3.0), DecodeOptions(language="en")), 31: (noise(32, 5.0), DecodeOptions())}
    alone = {slot: decode(engine, [window])[0] for slot, window in long_windows.items()}
    windows = [long_windows.get(slot, (noise(slot), DecodeOptions(language="en"))) for slot in range(32)]
    slots = engine.admit(windows)
    assert slots == list(range(32))
    engine.step()
    engine.release([slot for slot in slots if slot not in long_windows])
    replays.clear()
    results = {}
    while engine.busy_slots():
        results.update((slot, result.tokens) for slot, result in engine.step())
    assert set(replays) == {2}, "two busy slots step in the 2-slot bucket, not the 32 of slot 31"
    assert results == alone


def test_joining_windows_are_encoded_on_the_admission_stream_and_the_main_stream_waits_on_the_device(
        engine, monkeypatch):
    """CUDA streams stood in on CPU: the encoder runs inside the admission stream after what the main stream queued,
    its event is recorded there, and attaching makes the main stream wait for that event (no host wait) and keeps
    the encoder states' memory for the main stream before the first cross-K/V write."""
    events: list = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append((self.name, "waits for", other.name))

        def wait_event(self, event):
            events.append((self.name, "waits for", "encoded"))

    class Event:
        def record(self, stream):
            events.append(("encoded", "recorded on", stream.name))

        def query(self):
            return True

    @contextlib.contextmanager
    def on_stream(stream):
        events.append(("enter", stream.name))
        yield
        events.append(("leave", stream.name))

    main = Stream("main")
    for name, value in dict(Stream=lambda device=None: Stream("admission"), current_stream=lambda device=None: main,
                            stream=on_stream, Event=Event).items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: events.append(("kept for", stream.name)))
    monkeypatch.setattr(engine, "admission_stream", AdmissionStream("cuda"))
    attach = engine.decoder.attach
    monkeypatch.setattr(engine.decoder, "attach", lambda *args: events.append("attach") or attach(*args))
    hook = engine.model.get_encoder().register_forward_hook(lambda *_: events.append("encoder"))
    try:
        admission = engine.encode([(noise(9), DecodeOptions(language="en"))] * 2)
        assert events == [("admission", "waits for", "main"), ("enter", "admission"), "encoder",
                          ("encoded", "recorded on", "admission"), ("leave", "admission")]
        events.clear()
        assert engine.encoded(admission)
        slots = engine.attach(admission)
        assert events == [("main", "waits for", "encoded"), ("kept for", "main"), "attach"]
    finally:
        hook.remove()
    engine.release(slots)


def test_a_window_whose_prefix_is_known_joins_in_one_decoder_pass(engine, monkeypatch):
    """Language given and no prompt: the prefill pass also gives the logits after <|startoftranscript|> (for
    no_speech_prob), so the admission runs the decoder once; a window that needs its language detected first, or
    has a prompt before <|startoftranscript|>, takes two passes."""
    passes = []
    decode_layers = engine.decoder._decode
    monkeypatch.setattr(engine.decoder, "_decode", lambda *args: passes.append(1) or decode_layers(*args))
    for options, expected in ((DecodeOptions(language="en"), 1), (DecodeOptions(language="de", task="translate"), 1),
                              (DecodeOptions(), 2), (DecodeOptions(language="en", prompt="hello"), 2)):
        passes.clear()
        slots = engine.admit([(noise(10), options), (noise(11), DecodeOptions(language="fr"))])
        assert len(passes) == expected, options
        engine.release(slots)


@pytest.mark.parametrize("stage", ["encoder", "attach"])
def test_an_admission_out_of_memory_gives_its_slots_back_and_the_engine_serves_on(engine, monkeypatch, stage):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    window = (np.zeros(SAMPLE_RATE, np.float32), DecodeOptions(language="en"))
    free = engine.free_slots()
    failing = (engine, "_encode") if stage == "encoder" else (engine.decoder, "attach")
    with monkeypatch.context() as patched:
        patched.setattr(*failing, out_of_memory)
        with pytest.raises(OutOfMemory, match="out of memory"):
            engine.admit([window, window])
    assert engine.free_slots() == free, "the failed admission's slots are free again"
    slots = engine.admit([window])
    while engine.busy_slots():
        engine.step()
    assert engine.free_slots() == free and len(slots) == 1
