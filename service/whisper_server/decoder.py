"""The static-slot Whisper decoder: the checkpoint's own decoder modules and weights, our decode loop.

S slots (--max-batch-size) each hold one 30 s window while it decodes. Every slot has a preallocated self-attention
KV cache over Whisper's 448 decoder positions and the cross-attention K/V of its window, computed once when the
window joins. One decode step advances every busy slot by one token, each at its own position, with fixed shapes:
the slot's input token, KV written at the slot's position, attention over the whole cache under a per-slot mask,
Whisper's decoding rules and the token choice, all on the device. Nothing in the step reads the device from the host,
so on CUDA it is captured once per slot-count bucket as a CUDA graph and replayed; on CPU the same code runs eagerly.
The host reads back one small tensor per step (which slots finished) and a finished slot's tokens.

Callers see slots (stable ids); the caches are indexed by rows. Busy rows are kept packed at the front (a freed row
is filled by moving the last busy row into it before the next step or admission), so a step runs in the bucket of
the busy count, whatever slot a long window holds. Joining windows take the rows right after the busy ones, so their
K/V is written into the cache in place and their attention reads it through views: no gathered copies of the cache.
Admissions run in a few shapes only (admission sizes x prefix widths), all run once at warm-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

NEGATIVE_INFINITY = float("-inf")
# Random123's Philox2x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
PHILOX_MULTIPLIER = 0xD256D193
PHILOX_KEY_STEP = 0x9E3779B9
PHILOX_ROUNDS = 10
WORD = 0xFFFFFFFF

# Attention backends, chosen rather than left to PyTorch: on sm90 with a recent cuDNN it puts cuDNN first for every
# scaled_dot_product_attention in the process, which builds a plan per new shape (hundreds of ms) and is unproven
# under CUDA-graph capture. Flash where there is no mask, memory-efficient where the decoder's per-slot mask is;
# math only as the last resort (and visible in attention_report). CPU has flash (masks included) and math.
ENCODER_SELF_ATTENTION = "encoder self-attention"
DECODER_SELF_ATTENTION = "decoder self-attention"  # under the per-slot position mask, in steps and admissions
DECODER_CROSS_ATTENTION = "decoder cross-attention"
UNMASKED = {"cuda": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
            "cpu": (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)}
MASKED = {"cuda": (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
          "cpu": (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)}
ATTENTION_BACKENDS = {ENCODER_SELF_ATTENTION: UNMASKED, DECODER_SELF_ATTENTION: MASKED,
                      DECODER_CROSS_ATTENTION: UNMASKED}


def attention_backends(attention: str, device: torch.device) -> tuple[SDPBackend, ...]:
    """The backends `attention` may use on `device`, in order of preference."""
    return ATTENTION_BACKENDS[attention][device.type if device.type == "cuda" else "cpu"]


def attention_context(attention: str, device: torch.device):
    """Restricts scaled_dot_product_attention to the attention's backends, in their order, while it runs."""
    return sdpa_kernel(list(attention_backends(attention, device)), set_priority=True)


class AttentionRecorder(TorchDispatchMode):
    """Records, for every scaled_dot_product_attention call under it, the backend PyTorch dispatches it to with the
    backends enabled at that moment (torch._fused_sdp_choice: the choice the call itself makes)."""

    def __init__(self):
        super().__init__()
        self.backends: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name == "aten::scaled_dot_product_attention":
            choice = torch._fused_sdp_choice(*args, **kwargs)
            self.backends.append(SDPBackend(choice).name if choice >= 0 else "none")
        return func(*args, **kwargs)


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids Whisper's decoding rules need, from the checkpoint's generation config and tokenizer."""

    end_of_text: int
    start_of_transcript: int
    no_timestamps: int
    no_speech: int
    languages: tuple[int, ...]
    suppress: tuple[int, ...]  # never generated
    begin_suppress: tuple[int, ...]  # not generated as a window's first token
    max_initial_timestamp_index: int | None  # the first timestamp is at most this many 20 ms steps

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1


@dataclass
class Finished:
    """A window that finished in the last step: its generated tokens (end of text excluded), their log-probs, and
    the sum of every sampled token's log-prob, end of text included (OpenAI's avg_logprob counts it). With beams or
    several samples, the one OpenAI's ranker picks (the highest sum over its length). `row` holds its cross-attention
    caches until the next step or admission (rows are compacted only then)."""

    slot: int
    row: int
    tokens: list[int]
    logprobs: list[float]
    sum_logprob: float


@dataclass(frozen=True)
class Piece:
    """Part of an admission run as one batch: `count` windows in rows [start, start + count), computed as `size`
    rows (the extra rows are free ones after them: their writes land where nothing reads)."""

    start: int
    count: int
    size: int


def philox2x32(counter: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox2x32-10, as Random123 defines it, elementwise over int64 tensors that hold 32-bit words: two random words
    that depend on the counter and key alone (the same in any batch, on any device). The 32 x 32-bit product is built
    from 16-bit halves, so no int64 product overflows."""
    low, high = counter
    for _ in range(PHILOX_ROUNDS):
        by_low, by_high = PHILOX_MULTIPLIER * (low & 0xFFFF), PHILOX_MULTIPLIER * (low >> 16)  # each < 2^48
        product_low = by_low + ((by_high & 0xFFFF) << 16)
        low, high = ((by_high >> 16) + (product_low >> 32)) ^ key ^ high, product_low & WORD
        key = (key + PHILOX_KEY_STEP) & WORD
    return low, high


def multiply_low32(words: torch.Tensor, constant: int) -> torch.Tensor:
    """(words x constant) mod 2^32 for 32-bit words held in int64, the constant taken in 16-bit halves so that no
    int64 product overflows."""
    return (words * (constant & 0xFFFF) + (((words * (constant >> 16)) & 0xFFFF) << 16)) & WORD


def lowbias32(words: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 (hash-prospector): a 32-bit bijection whose every output bit flips with about even
    odds when any input bit does."""
    words = words ^ (words >> 16)
    words = multiply_low32(words, 0x7FEB352D)
    words = words ^ (words >> 15)
    words = multiply_low32(words, 0x846CA68B)
    return words ^ (words >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, stream: torch.Tensor, entry_words: torch.Tensor
                 ) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32 [rows, entries], that depends on each row's (seed, step, stream) and the entry
    alone: Philox keyed by the seed and counting (step, stream) gives the row a word, lowbias32 mixes it with each
    entry's own random word, and 23 bits of that make a uniform in (0, 1)."""
    row_word, _ = philox2x32((step & WORD, stream & WORD), seed & WORD)
    words = lowbias32(entry_words ^ row_word[:, None])
    uniform = ((words >> 9).float() + 0.5) * 2.0 ** -23  # never 0 or 1 in float32
    return -(-uniform.log()).log()


def bucket_sizes(slots: int) -> list[int]:
    """Slot counts a step is run (and on CUDA captured) for: powers of two below `slots`, and `slots`."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return sizes + [slots]


def bucket_for(count: int, buckets: list[int]) -> int:
    """The smallest bucket holding `count`."""
    return next(size for size in buckets if size >= count)


def admission_sizes(slots: int) -> list[int]:
    """Batch sizes an admission (encoder, cross-K/V, first logits, prefix) runs in: 1, 2, 4, then every multiple of
    8, and `slots`, so padding wastes at most 7 rows."""
    return sorted({size for size in (1, 2, 4) if size < slots} | set(range(8, slots, 8)) | {slots})


def prefill_widths(positions: int) -> list[int]:
    """Prefix widths a prefill runs in: 4, 16, 64, 256 (each prompt fits one; the longest prompt is half the
    decoder's context), and the whole context but the step's own position."""
    return [width for width in (4, 16, 64, 256) if width < positions - 1] + [positions - 1]


def admission_pieces(start: int, count: int, sizes: list[int], rows: int) -> list[Piece]:
    """Splits an admission of `count` windows at rows [start, start + count) into pieces of the admission sizes: one
    padded piece where the padding fits in the `rows` free rows after them, else exact pieces, largest first."""
    pieces = []
    while count:
        padded = bucket_for(count, sizes)
        if start + padded <= rows:
            pieces.append(Piece(start, count, padded))
            break
        exact = max(size for size in sizes if size <= count)
        pieces.append(Piece(start, exact, exact))
        start, count = start + exact, count - exact
    return pieces


def capture_graphs(functions: dict, device: torch.device) -> dict:
    """One CUDA graph per function (keyed as given), the standard way: warm-up runs on a side stream first (cuBLAS
    handles, kernel choice, allocator), then capture. The functions read and write only persistent buffers, so a
    replay needs no inputs copied in and leaves its results where the host reads them. All graphs share one memory
    pool for their temporaries (only one replays at a time), captured from the first function (the largest) on so
    the later ones reuse its blocks."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for function in functions.values():
            for _ in range(3):
                function()
    torch.cuda.current_stream(device).wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for key, function in functions.items():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            function()
        graphs[key] = graph
    torch.cuda.synchronize(device)
    return graphs


class SlotDecoder:
    """`group` sequences per slot (1: greedy, or one sample at a fallback temperature). With a group of N, a window
    decodes N sequences at once in N rows of the self-attention caches that share its one row of cross-attention K/V:
    at temperature 0 a beam search (OpenAI's BeamSearchDecoder: N beams, `patience` x N finished candidates), above
    it N independent samples (OpenAI's best_of); the ranker keeps the sequence with the best sum of log-probs over
    its length."""

    def __init__(self, model, tokens: SpecialTokens, slots: int, group: int = 1, patience: float = 1.0):
        config = model.config
        self.model = model
        self.special = tokens
        self.slots = slots
        self.group = group
        self.candidates = max(1, round(group * patience))  # finished beams a window collects before it is done
        self.device, self.dtype = model.device, model.dtype
        decoder = model.model.decoder
        self.layers = decoder.layers
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.positions = config.max_target_positions  # 448
        self.frames = config.max_source_positions  # 1500 encoder frames per 30 s
        self.vocab_size = config.vocab_size
        self.buckets = bucket_sizes(slots)
        self.admission_sizes = admission_sizes(slots)
        # Padding an admission to one of a few sizes buys a GPU fixed shapes (attention plans, warmed once); on a CPU,
        # where the encoder costs the same per window at any batch size, each padding row is a wasted encoder pass.
        self.padded_admissions = self.device.type == "cuda"
        self.widths = prefill_widths(self.positions)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.free = list(range(slots))  # host-side: slots not decoding, kept sorted
        self.row_of: dict[int, int] = {}  # busy slot -> its row in the caches
        self.slot_at: list[int | None] = [None] * slots  # row -> the slot it holds
        self.joining: set[int] = set()  # slots allocated whose windows are not in yet: rows stay put meanwhile
        self.chosen: dict[int, tuple[int, float]] = {}  # watched slot -> the token it chose last step, its log-prob
        self._allocate()

    @staticmethod
    def bytes_per_slot(config, dtype: torch.dtype, group: int = 1) -> int:
        """Device memory one slot holds: self-attention KV over 448 positions per sequence of its group and
        cross-attention KV over 1500 frames in every decoder layer, plus the token and log-prob histories of its
        sequences and of its beam search's finished candidates (a group's worth, and a spare)."""
        element = torch.finfo(dtype).bits // 8
        kv = 2 * config.decoder_layers * config.d_model * (group * config.max_target_positions
                                                           + config.max_source_positions)
        return kv * element + (2 * group + 1) * config.max_target_positions * (8 + 4)

    def _allocate(self) -> None:
        layers, slots, device = len(self.layers), self.slots, self.device
        sequences = slots * self.group  # sequence rows: slot row r holds rows [r * group, (r + 1) * group)
        cache = dict(device=device, dtype=self.dtype)
        self.self_keys = torch.zeros(layers, sequences, self.heads, self.positions, self.head_dim, **cache)
        self.self_values = torch.zeros_like(self.self_keys)
        self.cross_keys = torch.zeros(layers, slots, self.heads, self.frames, self.head_dim, **cache)
        self.cross_values = torch.zeros_like(self.cross_keys)
        # Per-sequence decoding state. `length` tokens are in the sequence; the next goes at index `length`.
        self.tokens = torch.full((sequences, self.positions), self.special.end_of_text, dtype=torch.long,
                                 device=device)
        self.logprobs = torch.zeros(sequences, self.positions, device=device)
        self.score = torch.zeros(sequences, device=device)  # sum of the sequence's log-probs (-inf: no beam)
        # A beam search's finished candidates per slot row (one spare column takes the ones not kept).
        candidates = self.candidates + 1
        self.finished_tokens = torch.full((slots, candidates, self.positions), self.special.end_of_text,
                                          dtype=torch.long, device=device)
        self.finished_logprobs = torch.zeros(slots, candidates, self.positions, device=device)
        self.finished_score = torch.zeros(slots, candidates, device=device)
        self.finished_count = torch.zeros(slots, dtype=torch.long, device=device)
        self.length = torch.ones(sequences, dtype=torch.long, device=device)
        self.begin = torch.ones(sequences, dtype=torch.long, device=device)  # where the generated tokens start
        self.limit = torch.full((sequences,), self.positions, dtype=torch.long, device=device)  # most tokens in it
        self.min_length = torch.zeros(sequences, dtype=torch.long, device=device)  # end of text is banned below this
        self.temperature = torch.zeros(sequences, device=device)
        self.seed = torch.zeros(sequences, dtype=torch.long, device=device)  # keys the window's samples (32 bits)
        self.timestamps = torch.ones(sequences, dtype=torch.bool, device=device)  # the timestamp rules apply
        self.last_timestamp = torch.full((sequences,), -1, dtype=torch.long, device=device)  # -1: none generated yet
        self.active = torch.zeros(sequences, dtype=torch.bool, device=device)
        self.done = torch.zeros(sequences, dtype=torch.bool, device=device)  # its window finished in the last step
        # Constants of the rules, built once.
        special = self.special
        self.vocab = torch.arange(self.vocab_size, device=device)
        # Each vocabulary entry's random word, which the sampling noise mixes with the row's (fixed: Philox key 0).
        self.vocab_words, _ = philox2x32((self.vocab, torch.zeros_like(self.vocab)), torch.zeros_like(self.vocab))
        self.key_positions = torch.arange(self.positions, device=device)
        self.row_index = torch.arange(sequences, device=device)
        self.beam = self.row_index % self.group  # each sequence row's place in its slot's group
        self.always_banned = self._mask(special.suppress + (special.no_timestamps,))
        self.first_banned = self._mask(special.begin_suppress)
        self.is_timestamp = self.vocab >= special.timestamp_begin
        self.is_text = self.vocab < special.end_of_text
        self.is_end = self.vocab == special.end_of_text
        initial = self.is_timestamp.clone()
        if special.max_initial_timestamp_index is not None:
            initial &= self.vocab <= special.timestamp_begin + special.max_initial_timestamp_index
        self.not_initial = ~initial  # with timestamps, the first token is one, at most max_initial_timestamp_index in
        self.language_mask = ~self._mask(special.languages)

    def _row_state(self) -> list[tuple[torch.Tensor, int, int]]:
        """Every per-row tensor, with the dimension its rows are on and its rows per slot."""
        group = self.group
        return ([(cache, 1, group) for cache in (self.self_keys, self.self_values)]
                + [(cache, 1, 1) for cache in (self.cross_keys, self.cross_values)]
                + [(state, 0, 1) for state in (self.finished_tokens, self.finished_logprobs, self.finished_score,
                                               self.finished_count)]
                + [(state, 0, group) for state in (self.tokens, self.logprobs, self.score, self.length, self.begin,
                                                   self.limit, self.min_length, self.temperature, self.seed,
                                                   self.timestamps, self.last_timestamp, self.active, self.done)])

    def _sequences(self, rows: slice) -> slice:
        """The sequence rows of these slot rows."""
        return slice(rows.start * self.group, rows.stop * self.group)

    def _mask(self, token_ids) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        if token_ids:
            mask[torch.tensor(sorted(set(token_ids)), device=self.device)] = True
        return mask

    # Slots and rows -----------------------------------------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """Takes `count` free slots for joining windows, in the rows right after the busy ones (contiguous, so their
        K/V is written in place); the rows stay where they are until joined() says the windows are in. One admission
        at a time."""
        if count > len(self.free):
            raise ValueError(f"{count} slots asked for, {len(self.free)} free")
        if self.joining:
            raise RuntimeError("an admission is still joining: one at a time")
        self._compact()
        taken, self.free = self.free[:count], self.free[count:]
        start = len(self.row_of)
        for row, slot in enumerate(taken, start):
            self.row_of[slot], self.slot_at[row] = row, slot
        self.joining.update(taken)
        return taken

    def joined(self, slots: list[int]) -> None:
        """The windows of these slots are in (or gave up): their rows may be compacted again."""
        self.joining.difference_update(slots)

    def release(self, slots: list[int]) -> None:
        """Frees slots (finished or cancelled); a cancelled slot stops decoding at the next step. Its row keeps its
        caches until the next step or admission compacts the rows."""
        slots = [slot for slot in slots if slot in self.row_of]
        if not slots:
            return
        rows = [self.row_of.pop(slot) for slot in slots]
        self.active.view(self.slots, self.group)[torch.tensor(rows, device=self.device)] = False
        for row in rows:
            self.slot_at[row] = None
        self.joining.difference_update(slots)
        self.free = sorted(set(self.free) | set(slots))

    def rows(self, slots: list[int]) -> list[int]:
        return [self.row_of[slot] for slot in slots]

    def cross_attention_kv(self, layer_index: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's cross-attention K and V in these cache rows ([rows, heads, frames, head_dim]): a finished
        window's (Finished.row) until the next step or admission, which the word alignment reads."""
        index = torch.tensor(rows, device=self.device)
        return self.cross_keys[layer_index, index], self.cross_values[layer_index, index]

    @property
    def busy(self) -> int:
        return self.slots - len(self.free)

    @property
    def extent(self) -> int:
        """Rows [0, extent) hold every busy slot (extent == busy once compacted)."""
        return max(self.row_of.values()) + 1 if self.row_of else 0

    def _compact(self) -> None:
        """Moves the last busy rows into the free rows below the busy count, so busy rows fill [0, busy). Not while
        windows are joining: their rows were handed out contiguous and are written in place."""
        if self.joining:
            return
        busy = len(self.row_of)
        holes = [row for row in range(busy) if self.slot_at[row] is None]
        if not holes:
            return
        movers = [row for row in range(busy, self.slots) if self.slot_at[row] is not None]
        for hole, mover in zip(holes, movers):
            for state, dim, rows in self._row_state():  # row to row through views: no temporary copy of the caches
                state.narrow(dim, hole * rows, rows).copy_(state.narrow(dim, mover * rows, rows))
            sequences = self._sequences(slice(mover, mover + 1))
            self.active[sequences] = False
            self.done[sequences] = False
            slot = self.slot_at[mover]
            self.slot_at[hole], self.slot_at[mover], self.row_of[slot] = slot, None, hole

    # Admission ----------------------------------------------------------------------------------------------------

    def pieces(self, slots: list[int]) -> list[Piece]:
        """How an admission into these (just allocated) slots runs: batches of the admission sizes over their rows
        (on a CPU, one batch of exactly those rows)."""
        if not self.padded_admissions:
            return [Piece(self.row_of[slots[0]], len(slots), len(slots))]
        return admission_pieces(self.row_of[slots[0]], len(slots), self.admission_sizes, self.slots)

    def attach(self, piece: Piece, encoder_states: torch.Tensor, prefixes: list[list[int]] | None = None
               ) -> torch.Tensor:
        """Writes the piece's cross-attention K/V (from `encoder_states`, [piece.size, frames, d_model]) into its rows
        in place, and returns the logits after <|startoftranscript|> alone (float32, [piece.count, vocab]): language
        detection and no_speech_prob read them. Given `prefixes` known already (each starting with
        <|startoftranscript|>), their prefill pass is run here and gives those logits too (position 0 sees only
        itself): one decoder pass for the admission instead of two, and prefill() is told `prefilled`."""
        rows = slice(piece.start, piece.start + piece.size)
        # A row starts clean: attention gives the positions a window has not written weight 0, but 0 x NaN is NaN,
        # so one non-finite window's leftovers would poison every later window in its row.
        self.self_keys[:, self._sequences(rows)] = 0
        self.self_values[:, self._sequences(rows)] = 0
        for layer_index, layer in enumerate(self.layers):
            attention = layer.encoder_attn
            self.cross_keys[layer_index, rows] = self._heads(attention.k_proj(encoder_states))
            self.cross_values[layer_index, rows] = self._heads(attention.v_proj(encoder_states))
        group = self.group
        if prefixes is not None:
            tokens = self._prefix_rows(piece, prefixes)
            hidden = self._prefill_pass(piece, tokens[:, :self._prefill_width(prefixes, minimum=1)])
            return self.model.proj_out(hidden[:piece.count * group:group, 0]).float()
        start = torch.full((piece.size * group, 1), self.special.start_of_transcript, device=self.device)
        positions = torch.zeros(piece.size * group, 1, dtype=torch.long, device=self.device)
        hidden = self._decode(start, positions, rows)
        return self.model.proj_out(hidden[:piece.count * group:group, -1]).float()

    def prefill(self, piece: Piece, prefixes: list[list[int]], limits: list[int], min_lengths: list[int],
                temperatures: list[float], timestamps: list[bool] | None = None, prefilled: bool = False,
                read_at: list[int] | None = None, seeds: list[int] | None = None) -> torch.Tensor | None:
        """Writes the KV of each window's forced prefix except its last token (the first step feeds that one), unless
        attach() did (`prefilled`), and sets its row's state; the windows decode from the next step on. A window
        sampled at a temperature draws from its seed (32 bits; 0 where none is given) alone. With
        `read_at` (a position in each prefix), the pass reaches those positions too and returns the logits there
        (float32, [piece.count, vocab]): after a prompt, no_speech_prob reads them at <|startoftranscript|>."""
        group = self.group
        rows = self._prefix_rows(piece, prefixes)
        width = self._prefill_width(prefixes, minimum=max(read_at) + 1 if read_at else 0)
        logits = None
        if width and not prefilled:  # prefilled prefixes have no prompt, so nothing to read after one
            hidden = self._prefill_pass(piece, rows[:, :width])
            if read_at:
                picked = hidden[torch.arange(piece.count, device=self.device) * group,
                                torch.tensor(read_at, device=self.device)]
                logits = self.model.proj_out(picked).float()
        real = self._sequences(slice(piece.start, piece.start + piece.count))

        def each(values, **kind) -> torch.Tensor:  # a window's value for every sequence of its group
            return torch.tensor(values, device=self.device, **kind).repeat_interleave(group)

        lengths = each([len(prefix) for prefix in prefixes])
        self.tokens[real] = rows[:piece.count * group]
        self.length[real] = lengths
        self.begin[real] = lengths
        self.limit[real] = each(limits)
        self.min_length[real] = each(min_lengths)
        self.temperature[real] = each(temperatures, dtype=torch.float32)
        self.seed[real] = each([0] * piece.count if seeds is None else seeds, dtype=torch.long)
        self.timestamps[real] = each([True] * piece.count if timestamps is None else timestamps)
        self.last_timestamp[real] = -1
        # A beam search starts from one beam (the others would repeat it); samples start together.
        self.score[real] = torch.where((self.beam[real] == 0) | (self.temperature[real] > 0), 0.0, NEGATIVE_INFINITY)
        self.finished_count[piece.start:piece.start + piece.count] = 0
        self.done[real] = False
        self.active[real] = True
        return logits

    def _prefix_rows(self, piece: Piece, prefixes: list[list[int]]) -> torch.Tensor:
        """[piece.size x group, 448] on the device: each window's prefix in each sequence of its group, then end of
        text (rows past piece.count: padding)."""
        rows = torch.full((piece.size, self.positions), self.special.end_of_text, dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            rows[row, :len(prefix)] = torch.tensor(prefix)
        return rows.repeat_interleave(self.group, 0).to(self.device)

    def _prefill_width(self, prefixes: list[list[int]], minimum: int = 0) -> int:
        """The width bucket of the longest prefix but its last token (0: nothing to prefill)."""
        width = max(minimum, max(len(prefix) for prefix in prefixes) - 1)
        return bucket_for(width, self.widths) if width else 0

    def _prefill_pass(self, piece: Piece, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder over `tokens` ([piece.size x group, width]) at positions [0, width), writing their KV into the
        rows. Rows with shorter prefixes write padding KV past their own prefix: the step overwrites or masks it."""
        width = tokens.shape[1]
        positions = torch.arange(width, device=self.device).expand(tokens.shape[0], width)
        return self._decode(tokens, positions, slice(piece.start, piece.start + piece.size))

    def warm_up_admissions(self, encode: Callable[[int], torch.Tensor]) -> None:
        """Runs the admission passes once in every shape serving meets (each admission size, and each prefill width
        at it), largest first, over free rows: no slot may be busy. `encode(size)` gives encoder states."""
        if self.row_of:
            raise RuntimeError("admission shapes are warmed with no slot busy")
        for size in reversed(self.admission_sizes):
            piece = Piece(0, size, size)
            self.attach(piece, encode(size))
            for width in self.widths:
                filler = torch.full((size * self.group, width), self.special.start_of_transcript, device=self.device)
                self._prefill_pass(piece, filler)

    # The step -----------------------------------------------------------------------------------------------------

    def capture(self) -> None:
        """On CUDA, captures the step once per bucket, largest first, all sharing one memory pool (no slot may be
        busy)."""
        if self.device.type == "cuda":
            steps = {size: (lambda size=size: self._step(size)) for size in reversed(self.buckets)}
            self.graphs = capture_graphs(steps, self.device)

    def attention_report(self, encode: Callable[[int], torch.Tensor]) -> dict[str, list[str]]:
        """Which backend each attention runs on, as PyTorch dispatches it here: the encoder, an admission (first
        logits and a prefill) and a step, run eagerly over free rows (no slot may be busy)."""
        piece, encoder, decoder = Piece(0, 1, 1), AttentionRecorder(), AttentionRecorder()
        with encoder:
            states = encode(1)
        with decoder:  # per layer: self-attention, then cross-attention
            self.attach(piece, states)
            self._prefill_pass(piece, torch.full((self.group, self.widths[0]), self.special.start_of_transcript,
                                                 device=self.device))
            self._step(1)
        return {ENCODER_SELF_ATTENTION: sorted(set(encoder.backends)),
                DECODER_SELF_ATTENTION: sorted(set(decoder.backends[0::2])),
                DECODER_CROSS_ATTENTION: sorted(set(decoder.backends[1::2]))}

    def step(self, watched: Collection[int] = ()) -> list[Finished]:
        """Advances every busy slot by one token; returns the windows that finished and frees their slots. The token
        each `watched` slot still decoding chose in this step is left in `chosen` (slot -> token, its log-prob)."""
        self._compact()
        size = bucket_for(self.extent, self.buckets)
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
        else:
            self._step(size)
        # The step's one read-back: which slot rows finished (every sequence of a finished window is marked), and
        # with watched slots, the token each slot row's first sequence has just written (at its length - 1) and its
        # log-probability (float32 holds every token id exactly).
        first = slice(0, size * self.group, self.group)
        done = self.done[first]
        if watched:
            newest = (self.length[first] - 1).clamp(min=0)[:, None]
            done, tokens, logprobs = torch.stack([done.float(), self.tokens[first].gather(1, newest).squeeze(1).float(),
                                                  self.logprobs[first].gather(1, newest).squeeze(1)]).cpu().tolist()
            newest = [(int(token), logprob) for token, logprob in zip(tokens, logprobs)]
        else:
            done, newest = done.cpu().tolist(), None
        finished = [row for row, flag in enumerate(done) if flag]
        results = [self._finished(row) for row in finished]
        self.release([result.slot for result in results])
        self.chosen = ({slot: newest[self.row_of[slot]] for slot in watched if slot in self.row_of}
                       if newest is not None else {})
        return results

    def _finished(self, row: int) -> Finished:
        """A finished window's sequence: its one sequence, or among its group's (the beam search's finished
        candidates, topped up with its live beams when it stopped at its length limit with fewer than a group's worth;
        or its samples) the one with the highest sum of log-probs over its length (OpenAI's MaximumLikelihoodRanker,
        length_penalty None), ties to the first."""
        group, end_of_text = self.group, self.special.end_of_text
        rows = self._sequences(slice(row, row + 1))
        begin = int(self.begin[rows.start])
        # (tokens, their log-probs, sum of log-probs) of each candidate, end of text included where it ended so.
        candidates = []
        if group > 1 and float(self.temperature[rows.start]) == 0:
            count = min(int(self.finished_count[row]), self.candidates)
            for tokens, logprobs, score in zip(self.finished_tokens[row, :count].tolist(),
                                               self.finished_logprobs[row, :count].tolist(),
                                               self.finished_score[row, :count].tolist()):
                end = tokens.index(end_of_text, begin) + 1
                candidates.append((tokens[begin:end], logprobs[begin:end], score))
            if len(candidates) < group:  # OpenAI's finalize: the live beams, best first, up to a group's worth
                scores = self.score[rows].tolist()
                live = sorted(range(group), key=lambda beam: -scores[beam])[:group - len(candidates)]
                tokens, logprobs = self.tokens[rows].tolist(), self.logprobs[rows].tolist()
                length = int(self.length[rows.start])
                candidates += [(tokens[beam][begin:length], logprobs[beam][begin:length], scores[beam])
                               for beam in live if scores[beam] > NEGATIVE_INFINITY]
        else:
            tokens, logprobs = self.tokens[rows].tolist(), self.logprobs[rows].tolist()
            for sequence, lengths in zip(range(group), self.length[rows].tolist()):
                candidates.append((tokens[sequence][begin:lengths], logprobs[sequence][begin:lengths],
                                   sum(logprobs[sequence][begin:lengths])))

        def text_length(candidate) -> int:  # the ranker's length: the tokens before end of text
            return len(candidate[0]) - (bool(candidate[0]) and candidate[0][-1] == end_of_text)

        best = max(candidates, key=lambda candidate: candidate[2] / max(text_length(candidate), 1)) \
            if group > 1 else candidates[0]
        tokens, logprobs, score = best
        kept = text_length(best)
        return Finished(self.slot_at[row], row, tokens[:kept], logprobs[:kept], score)

    def _step(self, size: int) -> None:
        """One decode step over slot rows [0, size) (all their sequences): fixed shapes, state read and written in
        place, no host sync."""
        group, vocab = self.group, self.vocab_size
        rows = size * group
        active, length = self.active[:rows], self.length[:rows]
        tokens = self.tokens[:rows]
        position = (length - 1).clamp(min=0)[:, None]
        hidden = self._decode(tokens.gather(1, position), position, slice(0, size))
        logits = self.model.proj_out(hidden[:, -1]).float()
        scores = self._apply_rules(logits, rows)
        chosen = self._choose(scores, self.temperature[:rows],
                              gumbel_noise(self.seed[:rows], length, self.beam[:rows], self.vocab_words))
        chosen_logprob = scores.gather(1, chosen[:, None]).squeeze(1) - scores.logsumexp(-1)
        new_score = self.score[:rows] + chosen_logprob
        if group > 1:
            chosen, chosen_logprob, new_score, searching = self._beam_search(
                scores.log_softmax(-1), chosen, chosen_logprob, new_score, size)
        # Free rows compute too (fixed shapes) but write back what was there.
        at = length.clamp(max=self.positions - 1)[:, None]
        tokens.scatter_(1, at, torch.where(active, chosen, tokens.gather(1, at).squeeze(1))[:, None])
        history = self.logprobs[:rows]
        history.scatter_(1, at, torch.where(active, chosen_logprob, history.gather(1, at).squeeze(1))[:, None])
        self.score[:rows] = torch.where(active, new_score, self.score[:rows])
        is_timestamp = chosen >= self.special.timestamp_begin
        self.last_timestamp[:rows] = torch.where(active & is_timestamp, chosen, self.last_timestamp[:rows])
        new_length = length + active.long()
        ended = active & ((chosen == self.special.end_of_text) | (new_length >= self.limit[:rows]))
        if group > 1:  # a beam search ends with enough finished candidates
            ended |= searching & self._each_sequence(self.finished_count[:size] >= self.candidates)
        # A window is done once none of its sequences is active.
        still = (active & ~ended).view(size, group).any(-1)
        window_done = active.view(size, group).any(-1) & ~still
        self.length[:rows] = new_length
        self.active[:rows] = active & ~ended
        self.done[:rows] = self._each_sequence(window_done)

    def _each_sequence(self, per_window: torch.Tensor) -> torch.Tensor:
        """A value per slot row repeated for each sequence of its group (a view: no host sync in the step)."""
        return per_window[:, None].expand(-1, self.group).reshape(-1)

    def _beam_search(self, logprobs: torch.Tensor, sampled: torch.Tensor, sampled_logprob: torch.Tensor,
                     sampled_score: torch.Tensor, size: int):
        """OpenAI's BeamSearchDecoder.update for every slot at temperature 0, on the device with fixed shapes: each
        beam's candidates are its sum of log-probs plus the next token's; the best `group` that do not end the text
        become the next beams (their self-attention caches and histories reordered to follow their source beams),
        and the candidates ending the text that rank above the last of them join the window's finished candidates,
        best first, up to `patience` x group. Slots above temperature 0 keep their `group` samples. Returns each row's
        token, its log-prob, its new sum, and which rows are searching beams."""
        group, vocab, end_of_text = self.group, self.vocab_size, self.special.end_of_text
        rows = size * group
        searching = (self.temperature[:rows] == 0) & self.active[:rows]
        candidates = (self.score[:rows, None] + logprobs).view(size, group * vocab)
        top_score, top_index = candidates.topk(2 * group, dim=-1)  # sorted: at most `group` of them end the text
        source, token = top_index // vocab, top_index % vocab
        ends = token == end_of_text
        continues = ~ends
        rank = continues.long().cumsum(-1) - 1  # among the candidates that continue
        # The next beams: the first `group` continuing candidates, in order (a spare column takes the rest).
        place = torch.where(continues & (rank < group), rank, group)
        order = torch.full((size, group + 1), 0, dtype=torch.long, device=self.device)
        order.scatter_(1, place, torch.arange(2 * group, device=self.device).expand(size, -1))
        order = order[:, :group]
        next_source = source.gather(1, order)
        next_token, next_score = token.gather(1, order), top_score.gather(1, order)
        # Finished candidates: the ones ending the text ranked before the last next beam, appended best first.
        before_last = (continues.long().cumsum(-1) - continues.long()) < group
        finishing = ends & before_last & torch.isfinite(top_score)
        slot_searching = searching.view(size, group).any(-1)
        finishing &= slot_searching[:, None]
        count = self.finished_count[:size]
        position = count[:, None] + finishing.long().cumsum(-1) - 1
        keep = finishing & (position < self.candidates)
        position = torch.where(keep, position, self.candidates)  # the spare column
        first_row = (torch.arange(size, device=self.device) * group)[:, None]
        parent = first_row + source  # [size, 2 group] global rows
        length = self.length[:rows].view(size, group)[:, :1].clamp(max=self.positions - 1)
        ended_tokens = self.tokens[:rows][parent.flatten()].view(size, 2 * group, self.positions)
        ended_tokens.scatter_(2, length[:, :, None].expand(-1, 2 * group, 1), end_of_text)
        ended_logprobs = self.logprobs[:rows][parent.flatten()].view(size, 2 * group, self.positions)
        eot_logprob = logprobs.view(size, group, vocab)[:, :, end_of_text].gather(1, source)
        ended_logprobs.scatter_(2, length[:, :, None].expand(-1, 2 * group, 1), eot_logprob[:, :, None])
        at = position[:, :, None].expand(-1, -1, self.positions)
        self.finished_tokens[:size].scatter_(1, at, ended_tokens)
        self.finished_logprobs[:size].scatter_(1, at, ended_logprobs)
        self.finished_score[:size].scatter_(1, position, top_score)
        self.finished_count[:size] = (count + keep.long().sum(-1)).clamp(max=self.candidates)
        # Reorder the searching slots' sequences to follow their sources (sampling slots keep theirs).
        next_rows = (first_row + next_source).flatten()
        identity = self.row_index[:rows]
        follow = torch.where(searching, next_rows, identity)
        for state in (self.tokens, self.logprobs, self.last_timestamp):
            state[:rows] = state[:rows][follow]
        for cache in (self.self_keys, self.self_values):
            cache[:, :rows] = cache[:, :rows][:, follow]
        beam_logprob = logprobs[next_rows, next_token.flatten()]
        chosen = torch.where(searching, next_token.flatten(), sampled)
        chosen_logprob = torch.where(searching, beam_logprob, sampled_logprob)
        new_score = torch.where(searching, next_score.flatten(), sampled_score)
        return chosen, chosen_logprob, new_score, searching

    def _apply_rules(self, logits: torch.Tensor, size: int) -> torch.Tensor:
        """Whisper's decoding rules for every slot at once, as transformers' Whisper generation applies them
        (SuppressTokensAtBegin, SuppressTokens, and WhisperTimeStampLogitsProcessor where the slot decodes timestamps),
        before the token is chosen."""
        special = self.special
        length, tokens = self.length[:size, None], self.tokens[:size]
        timestamps = self.timestamps[:size, None]
        generated = length - self.begin[:size, None]
        first = generated == 0
        last = tokens.gather(1, (length - 1).clamp(min=0))
        before_last = tokens.gather(1, (length - 2).clamp(min=0))
        last_is_timestamp = (generated >= 1) & (last >= special.timestamp_begin)
        before_is_timestamp = (generated < 2) | (before_last >= special.timestamp_begin)
        # Timestamps never go backwards; after a lone timestamp the next may repeat it (closing the pair), otherwise
        # it must be later (no second <|0.00|>).
        previous = self.last_timestamp[:size, None]
        floor = torch.where(previous < 0, special.timestamp_begin,
                            torch.where(last_is_timestamp & ~before_is_timestamp, previous, previous + 1))
        timestamp_rules = timestamps & (
            (first & self.not_initial)
            | (last_is_timestamp & before_is_timestamp & self.is_timestamp)  # a pair closed: text or end next
            | (last_is_timestamp & ~before_is_timestamp & self.is_text)  # a pair open: a timestamp or end next
            | (self.is_timestamp & (self.vocab < floor))
        )
        banned = (
            self.always_banned
            | (first & self.first_banned)
            | (self.is_end & (length < self.min_length[:size, None]))
            | timestamp_rules
        )
        scores = logits.masked_fill(banned, NEGATIVE_INFINITY)
        # When the timestamps together are likelier than any single text token, a timestamp comes next.
        logprobs = scores.log_softmax(-1)
        timestamp_mass = logprobs[:, special.timestamp_begin:].logsumexp(-1)
        best_text = logprobs[:, :special.timestamp_begin].max(-1).values
        timestamp_next = timestamps & (timestamp_mass > best_text)[:, None]
        return scores.masked_fill(timestamp_next & ~self.is_timestamp, NEGATIVE_INFINITY)

    @staticmethod
    def _choose(scores: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Greedy where the slot's temperature is 0; otherwise a sample from softmax(scores / temperature) by the
        Gumbel-max trick (argmax of scores / T + G, G ~ Gumbel(0, 1)), with noise from the window's own seed and step
        rather than a batch-wide generator: a window samples the same tokens whichever rows share its step."""
        greedy = scores.argmax(-1)
        sampled = (scores / temperature.clamp(min=1e-6)[:, None] + noise).argmax(-1)
        return torch.where(temperature > 0, sampled, greedy)

    # The decoder layers -------------------------------------------------------------------------------------------

    def _causal_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[rows, 1, queries, 448]: a query at position p sees the cache's keys at positions <= p."""
        return (self.key_positions <= positions[:, :, None])[:, None]

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, rows: slice) -> torch.Tensor:
        """The checkpoint's decoder layers over `tokens` ([rows, T]) at `positions`, for cache rows `rows` (a slice:
        the caches are read and written through views, never gathered). Writes each token's self-attention KV into
        the cache at its position. Arithmetic as in transformers' WhisperAttention (query scaled before SDPA)."""
        decoder = self.model.model.decoder
        group, windows = self.group, rows.stop - rows.start
        sequences = self._sequences(rows)
        local = self.row_index[:windows * group, None]
        self_mask = self._causal_mask(positions)
        hidden = decoder.embed_tokens(tokens) + decoder.embed_positions.weight[positions]
        for layer_index, layer in enumerate(self.layers):
            attention = layer.self_attn
            residual = hidden
            normed = layer.self_attn_layer_norm(hidden)
            query = self._heads(attention.q_proj(normed) * attention.scaling)
            keys, values = self.self_keys[layer_index, sequences], self.self_values[layer_index, sequences]
            keys[local, :, positions] = self._heads(attention.k_proj(normed)).transpose(1, 2)
            values[local, :, positions] = self._heads(attention.v_proj(normed)).transpose(1, 2)
            with attention_context(DECODER_SELF_ATTENTION, self.device):
                attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=self_mask, scale=1.0)
            hidden = residual + attention.out_proj(self._merge(attended))

            cross = layer.encoder_attn
            residual = hidden
            query = self._heads(cross.q_proj(layer.encoder_attn_layer_norm(hidden)) * cross.scaling)
            if group > 1:  # a window's sequences are queries side by side against its one cross-attention K/V
                length = query.shape[2]
                query = query.view(windows, group, self.heads, length, self.head_dim).transpose(1, 2).reshape(
                    windows, self.heads, group * length, self.head_dim)
            with attention_context(DECODER_CROSS_ATTENTION, self.device):
                attended = F.scaled_dot_product_attention(
                    query, self.cross_keys[layer_index, rows], self.cross_values[layer_index, rows], scale=1.0)
            if group > 1:
                attended = attended.view(windows, self.heads, group, length, self.head_dim).transpose(1, 2).reshape(
                    windows * group, self.heads, length, self.head_dim)
            hidden = residual + cross.out_proj(self._merge(attended))

            residual = hidden
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
        return decoder.layer_norm(hidden)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """[rows, T, d_model] -> [rows, heads, T, head_dim]"""
        rows, length, _ = states.shape
        return states.view(rows, length, self.heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _merge(states: torch.Tensor) -> torch.Tensor:
        """[rows, heads, T, head_dim] -> [rows, T, d_model]"""
        rows, heads, length, head_dim = states.shape
        return states.transpose(1, 2).reshape(rows, length, heads * head_dim)
