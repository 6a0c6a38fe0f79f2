"""The static-slot Whisper decoder: the checkpoint's own decoder modules and weights, our decode loop.

S slots (--max-batch-size) each hold one 30 s window while it decodes. Every slot has a preallocated self-attention
KV cache over Whisper's 448 decoder positions and the cross-attention K/V of its window, computed once when the
window joins. One decode step advances every busy slot by one token, each at its own position, with fixed shapes:
the slot's input token, KV written at the slot's position, attention over the whole cache under a per-slot mask,
Whisper's decoding rules and the token choice, all on the device. Nothing in the step reads the device from the host,
so on CUDA it is captured once per slot-count bucket as a CUDA graph and replayed; on CPU the same code runs eagerly.
The host reads back one small tensor per step (which slots finished) and a finished slot's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEGATIVE_INFINITY = float("-inf")


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
    """A window that finished in the last step: its generated tokens (end of text excluded) and their log-probs."""

    slot: int
    tokens: list[int]
    logprobs: list[float]


def bucket_sizes(slots: int) -> list[int]:
    """Slot counts a step is run (and on CUDA captured) for: powers of two below `slots`, and `slots`."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return sizes + [slots]


def bucket_for(extent: int, buckets: list[int]) -> int:
    """The smallest bucket covering slots [0, extent)."""
    return next(size for size in buckets if size >= extent)


def capture_step_graphs(step, buckets: list[int], device: torch.device) -> dict[int, torch.cuda.CUDAGraph]:
    """One CUDA graph of `step(k)` per bucket k, the standard way: warm-up runs on a side stream first (cuBLAS
    handles, kernel choice, allocator), then capture. The step reads and writes only persistent buffers, so a replay
    needs no inputs copied in and leaves its results where the host reads them; each graph keeps its own memory pool
    for its temporaries. Must be called with no slot busy: the warm-up steps run on whatever the slots hold."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for size in buckets:
            for _ in range(3):
                step(size)
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = {}
    for size in buckets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(size)
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs


class SlotDecoder:
    def __init__(self, model, tokens: SpecialTokens, slots: int):
        config = model.config
        self.model = model
        self.special = tokens
        self.slots = slots
        self.device, self.dtype = model.device, model.dtype
        decoder = model.model.decoder
        self.layers = decoder.layers
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.positions = config.max_target_positions  # 448
        self.frames = config.max_source_positions  # 1500 encoder frames per 30 s
        self.vocab_size = config.vocab_size
        self.buckets = bucket_sizes(slots)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.free = list(range(slots))  # host-side: slots not decoding, kept sorted
        self.extent = 0  # slots [0, extent) hold every busy slot
        self._allocate()

    @staticmethod
    def bytes_per_slot(config, dtype: torch.dtype) -> int:
        """Device memory one slot holds: self-attention KV over 448 positions and cross-attention KV over 1500 frames
        in every decoder layer, plus its token and log-prob history."""
        element = torch.finfo(dtype).bits // 8
        kv = 2 * config.decoder_layers * config.d_model * (config.max_target_positions + config.max_source_positions)
        return kv * element + config.max_target_positions * (8 + 4)

    def _allocate(self) -> None:
        layers, slots, device = len(self.layers), self.slots, self.device
        cache = dict(device=device, dtype=self.dtype)
        self.self_keys = torch.zeros(layers, slots, self.heads, self.positions, self.head_dim, **cache)
        self.self_values = torch.zeros_like(self.self_keys)
        self.cross_keys = torch.zeros(layers, slots, self.heads, self.frames, self.head_dim, **cache)
        self.cross_values = torch.zeros_like(self.cross_keys)
        # Per-slot decoding state. `length` tokens are in the sequence; the next goes at index `length`.
        self.tokens = torch.full((slots, self.positions), self.special.end_of_text, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(slots, self.positions, device=device)
        self.length = torch.ones(slots, dtype=torch.long, device=device)
        self.begin = torch.ones(slots, dtype=torch.long, device=device)  # where the generated tokens start
        self.limit = torch.full((slots,), self.positions, dtype=torch.long, device=device)  # most tokens in the sequence
        self.min_length = torch.zeros(slots, dtype=torch.long, device=device)  # end of text is banned below this
        self.temperature = torch.zeros(slots, device=device)
        self.last_timestamp = torch.full((slots,), -1, dtype=torch.long, device=device)  # -1: none generated yet
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.done = torch.zeros(slots, dtype=torch.bool, device=device)  # finished in the last step
        # Constants of the rules, built once.
        special = self.special
        self.vocab = torch.arange(self.vocab_size, device=device)
        self.key_positions = torch.arange(self.positions, device=device)
        self.slot_index = torch.arange(slots, device=device)
        self.always_banned = self._mask(special.suppress + (special.no_timestamps,))
        self.first_banned = self._mask(special.begin_suppress)
        self.is_timestamp = self.vocab >= special.timestamp_begin
        self.is_text = self.vocab < special.end_of_text
        self.is_end = self.vocab == special.end_of_text
        initial = self.is_timestamp.clone()
        if special.max_initial_timestamp_index is not None:
            initial &= self.vocab <= special.timestamp_begin + special.max_initial_timestamp_index
        self.first_banned |= ~initial  # the first token is a timestamp, at most max_initial_timestamp_index in
        self.language_mask = ~self._mask(special.languages)

    def _mask(self, token_ids) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        if token_ids:
            mask[torch.tensor(sorted(set(token_ids)), device=self.device)] = True
        return mask

    # Slots --------------------------------------------------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """The lowest free slots, so the busy ones stay packed at the front and steps run in small buckets."""
        if count > len(self.free):
            raise ValueError(f"{count} slots asked for, {len(self.free)} free")
        taken, self.free = self.free[:count], self.free[count:]
        self.extent = max(self.extent, taken[-1] + 1) if taken else self.extent
        return taken

    def release(self, slots: list[int]) -> None:
        """Frees slots (finished or cancelled); a cancelled slot stops decoding at the next step."""
        if not slots:
            return
        self.active[torch.tensor(slots, device=self.device)] = False
        self.free = sorted(set(self.free) | set(slots))
        busy = set(range(self.slots)) - set(self.free)
        self.extent = max(busy) + 1 if busy else 0

    @property
    def busy(self) -> int:
        return self.slots - len(self.free)

    # Admission ----------------------------------------------------------------------------------------------------

    def attach(self, slots: list[int], encoder_states: torch.Tensor) -> torch.Tensor:
        """Computes each joining window's cross-attention K/V once, into its slot, and returns the logits after
        <|startoftranscript|> alone (float32, [windows, vocab]): language detection and no_speech_prob read them."""
        index = torch.tensor(slots, device=self.device)
        windows = len(slots)
        # A slot starts clean: attention gives the positions a window has not written weight 0, but 0 x NaN is NaN,
        # so one non-finite window's leftovers would poison every later window in its slot.
        self.self_keys.index_fill_(1, index, 0.0)
        self.self_values.index_fill_(1, index, 0.0)
        for layer_index, layer in enumerate(self.layers):
            attention = layer.encoder_attn
            self.cross_keys[layer_index, index] = self._heads(attention.k_proj(encoder_states))
            self.cross_values[layer_index, index] = self._heads(attention.v_proj(encoder_states))
        start = torch.full((windows, 1), self.special.start_of_transcript, device=self.device)
        positions = torch.zeros(windows, 1, dtype=torch.long, device=self.device)
        hidden = self._decode(start, positions, index, index, self._causal_mask(positions))
        return self.model.proj_out(hidden[:, -1]).float()

    def prefill(self, slots: list[int], prefixes: list[list[int]], limits: list[int], min_lengths: list[int],
                temperatures: list[float]) -> None:
        """Writes the KV of each window's forced prefix except its last token (the first step feeds that one) and
        sets the slot's state; the slots are decoding from the next step on."""
        index = torch.tensor(slots, device=self.device)
        rows = torch.full((len(slots), self.positions), self.special.end_of_text, dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            rows[row, :len(prefix)] = torch.tensor(prefix)
        rows = rows.to(self.device)
        width = max(len(prefix) for prefix in prefixes) - 1
        # Rows with shorter prefixes write padding KV past their own prefix: the step overwrites or masks it.
        positions = torch.arange(width, device=self.device).expand(len(slots), width)
        self._decode(rows[:, :width], positions, index, index, self._causal_mask(positions))
        lengths = torch.tensor([len(prefix) for prefix in prefixes], device=self.device)
        self.tokens[index] = rows
        self.length[index] = lengths
        self.begin[index] = lengths
        self.limit[index] = torch.tensor(limits, device=self.device)
        self.min_length[index] = torch.tensor(min_lengths, device=self.device)
        self.temperature[index] = torch.tensor(temperatures, dtype=torch.float32, device=self.device)
        self.last_timestamp[index] = -1
        self.done[index] = False
        self.active[index] = True

    # The step -----------------------------------------------------------------------------------------------------

    def capture(self) -> None:
        """On CUDA, captures the step once per bucket (no slot may be busy)."""
        if self.device.type == "cuda":
            self.graphs = capture_step_graphs(self._step, self.buckets, self.device)

    def step(self) -> list[Finished]:
        """Advances every busy slot by one token; returns the windows that finished and frees their slots."""
        size = bucket_for(self.extent, self.buckets)
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
        else:
            self._step(size)
        finished = self.done[:size].cpu().nonzero().flatten().tolist()  # the step's one read-back: which slots finished
        if not finished:
            return []
        index = torch.tensor(finished, device=self.device)
        tokens, logprobs = self.tokens[index].tolist(), self.logprobs[index].tolist()
        begins, lengths = self.begin[index].tolist(), self.length[index].tolist()
        results = []
        for row, slot in enumerate(finished):
            end = lengths[row] - (tokens[row][lengths[row] - 1] == self.special.end_of_text)
            results.append(Finished(slot, tokens[row][begins[row]:end], logprobs[row][begins[row]:end]))
        self.release(finished)
        return results

    def _step(self, size: int) -> None:
        """One decode step over slots [0, size): fixed shapes, state read and written in place, no host sync."""
        active, length = self.active[:size], self.length[:size]
        tokens = self.tokens[:size]
        position = (length - 1).clamp(min=0)[:, None]
        hidden = self._decode(tokens.gather(1, position), position, slice(0, size), self.slot_index[:size],
                              self._causal_mask(position))
        logits = self.model.proj_out(hidden[:, -1]).float()
        scores = self._apply_rules(logits, size)
        chosen = self._choose(scores, self.temperature[:size])
        chosen_logprob = scores.gather(1, chosen[:, None]).squeeze(1) - scores.logsumexp(-1)
        # Free slots compute too (fixed shapes) but write back what was there.
        at = length.clamp(max=self.positions - 1)[:, None]
        tokens.scatter_(1, at, torch.where(active, chosen, tokens.gather(1, at).squeeze(1))[:, None])
        history = self.logprobs[:size]
        history.scatter_(1, at, torch.where(active, chosen_logprob, history.gather(1, at).squeeze(1))[:, None])
        is_timestamp = chosen >= self.special.timestamp_begin
        self.last_timestamp[:size] = torch.where(active & is_timestamp, chosen, self.last_timestamp[:size])
        new_length = length + active.long()
        finished = active & ((chosen == self.special.end_of_text) | (new_length >= self.limit[:size]))
        self.length[:size] = new_length
        self.active[:size] = active & ~finished
        self.done[:size] = finished

    def _apply_rules(self, logits: torch.Tensor, size: int) -> torch.Tensor:
        """Whisper's decoding rules for every slot at once, as transformers' Whisper generation applies them
        (SuppressTokensAtBegin, SuppressTokens, WhisperTimeStampLogitsProcessor), before the token is chosen."""
        special = self.special
        length, tokens = self.length[:size, None], self.tokens[:size]
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
        banned = (
            self.always_banned
            | (first & self.first_banned)
            | (self.is_end & (length < self.min_length[:size, None]))
            | (last_is_timestamp & before_is_timestamp & self.is_timestamp)  # a pair closed: text or end next
            | (last_is_timestamp & ~before_is_timestamp & self.is_text)  # a pair open: a timestamp or end next
            | (self.is_timestamp & (self.vocab < floor))
        )
        scores = logits.masked_fill(banned, NEGATIVE_INFINITY)
        # When the timestamps together are likelier than any single text token, a timestamp comes next.
        logprobs = scores.log_softmax(-1)
        timestamp_mass = logprobs[:, special.timestamp_begin:].logsumexp(-1)
        best_text = logprobs[:, :special.timestamp_begin].max(-1).values
        return scores.masked_fill((timestamp_mass > best_text)[:, None] & ~self.is_timestamp, NEGATIVE_INFINITY)

    @staticmethod
    def _choose(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Greedy where the slot's temperature is 0; otherwise a sample from softmax(scores / temperature) by the
        exponential race (argmax of scores / T - log E, E ~ Exp(1)), which uses torch's graph-safe RNG."""
        greedy = scores.argmax(-1)
        race = torch.empty_like(scores).exponential_().clamp_(min=torch.finfo(scores.dtype).tiny).log_()
        sampled = (scores / temperature.clamp(min=1e-6)[:, None] - race).argmax(-1)
        return torch.where(temperature > 0, sampled, greedy)

    # The decoder layers -------------------------------------------------------------------------------------------

    def _causal_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[rows, 1, queries, 448]: a query at position p sees the cache's keys at positions <= p."""
        return (self.key_positions <= positions[:, :, None])[:, None]

    def _decode(self, tokens, positions, slots, slot_index, self_mask) -> torch.Tensor:
        """The checkpoint's decoder layers over `tokens` ([rows, T]) at `positions`, for cache rows `slots` (a slice:
        views, as in the step; or an index tensor: copies, at admission). Writes each token's self-attention KV
        into the cache at its position. Arithmetic as in transformers' WhisperAttention (query scaled before SDPA)."""
        decoder = self.model.model.decoder
        hidden = decoder.embed_tokens(tokens) + decoder.embed_positions.weight[positions]
        for layer_index, layer in enumerate(self.layers):
            attention = layer.self_attn
            residual = hidden
            normed = layer.self_attn_layer_norm(hidden)
            query = self._heads(attention.q_proj(normed) * attention.scaling)
            keys, values = self.self_keys[layer_index], self.self_values[layer_index]
            keys[slot_index[:, None], :, positions] = self._heads(attention.k_proj(normed)).transpose(1, 2)
            values[slot_index[:, None], :, positions] = self._heads(attention.v_proj(normed)).transpose(1, 2)
            attended = F.scaled_dot_product_attention(query, keys[slots], values[slots], attn_mask=self_mask, scale=1.0)
            hidden = residual + attention.out_proj(self._merge(attended))

            cross = layer.encoder_attn
            residual = hidden
            query = self._heads(cross.q_proj(layer.encoder_attn_layer_norm(hidden)) * cross.scaling)
            attended = F.scaled_dot_product_attention(
                query, self.cross_keys[layer_index][slots], self.cross_values[layer_index][slots], scale=1.0)
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
