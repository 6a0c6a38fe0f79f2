"""The speech engine: a Whisper checkpoint, its log-mel front end and encoder, and the slot decoder. Windows join
free decode slots (their encoder pass batched together, on a second CUDA stream so that it overlaps the decode
steps), every step advances all busy slots, and finished windows come back as segments. It knows nothing of HTTP or
of requests."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .alignment import alignment_matrices, alignment_sequence, default_alignment_heads
from .decoder import ENCODER_SELF_ATTENTION, Piece, SlotDecoder, SpecialTokens, attention_context
from .decoding import SAMPLE_RATE, TIME_PRECISION, Capabilities, DecodeOptions, OutOfMemory, Segment, WindowResult, compression_ratio
from .segmentation import decoded_until

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# How a window shorter than 30 s is padded to the encoder's 3000 frames: "reference" pads the audio with silence, as
# transformers does and OpenAI's transcribe did before its release 20240927 (the padding frames hold the log-mel
# floor, the peak - 8); "zeros" pads the log-mel features with 0.0 after the audio's frames, as faster-whisper and
# OpenAI's transcribe since then do.
FEATURE_PADDINGS = ("reference", "zeros")
# Language detection pads speech shorter than 30 s as faster-whisper's detect_language does, whatever the decoding's
# padding: on a short clip the padding is most of the encoder's input, and so padded the server detects what
# faster-whisper detects on all 120 development and held-out clips (service/bench/language_detection.py).
DETECTION_PADDING = "zeros"
# The most of a window's prompt (half the decoder's context: 223 tokens after <|startofprev|>) keywords[] may take;
# a prompt given beside them keeps the rest.
KEYWORD_TOKENS = 112
# Memory left beside the KV caches for the encoder's activations and the step graphs, as a share of free memory.
ACTIVATION_RESERVE = 0.2


def read_capabilities(generation) -> tuple[Capabilities, dict[str, int], dict[str, int]]:
    """The checkpoint's capabilities, its language token ids by code and its task token ids. English-only generation
    configs (is_multilingual false) have neither language nor task ids, and need none."""
    lang_to_id = getattr(generation, "lang_to_id", None) or {}
    if not getattr(generation, "is_multilingual", bool(lang_to_id)):
        return Capabilities(False, ("en",), ("transcribe",)), {}, {}
    task_to_id = dict(getattr(generation, "task_to_id", None) or {})
    if not lang_to_id or not {"transcribe", "translate"} <= set(task_to_id):
        raise ValueError("the checkpoint's generation config is multilingual (is_multilingual true) but lacks "
                         "lang_to_id or task_to_id: the forced language and task tokens cannot be chosen")
    language_ids = {token[2:-2]: token_id for token, token_id in lang_to_id.items()}
    return Capabilities(True, tuple(sorted(language_ids)), ("transcribe", "translate")), language_ids, task_to_id


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return DTYPES[dtype]


def last_tokens(backend, text: str, count: int) -> list[int]:
    """The last `count` tokens of the text (a tokenizers backend's byte-level BPE), tokenizing only as much of its end
    as they need, so a 60 KB prompt costs each window what its last tokens cost. A tail cut mid-word may split
    differently from the whole text at the cut, so its first two pieces are dropped; the rest split as the whole's."""
    tail = 16 * count
    while True:
        cut = max(0, len(text) - tail)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text[cut:])[2 if cut else 0:]
        ids = [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]
        if not cut or len(ids) >= count:
            return ids[-count:]
        tail *= 4


def window_seed(samples: np.ndarray, temperature: float) -> int:
    """The seed a window's samples at `temperature` are drawn from: its audio's CRC-32, started from the temperature,
    so the same audio is sampled the same way on every run, in any request and batch, and differently at each
    temperature."""
    return zlib.crc32(np.ascontiguousarray(samples, dtype=np.float32).tobytes(), round(temperature * 100))


T = TypeVar("T")


class AdmissionStream:
    """Where joining windows are encoded: on CUDA a second stream, so their encoder pass runs while the decode steps
    go on on the main stream, and an event that says when it is done; on CPU inline, done at once."""

    def __init__(self, device: str):
        self.stream = torch.cuda.Stream(device) if device == "cuda" else None

    def run(self, work: Callable[[], T]) -> tuple[T, object]:
        """`work()` on the admission stream, after what the main stream has queued; its result and its event."""
        if self.stream is None:
            return work(), None
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            result = work()
            event = torch.cuda.Event()
            event.record(self.stream)
        return result, event

    @staticmethod
    def done(event) -> bool:
        return event is None or event.query()

    @staticmethod
    def join(event, tensors: list[torch.Tensor]) -> None:
        """The main stream waits (on the device, not the host) for the work, and keeps its results' memory from
        being reused by the admission stream until the main stream is done with them."""
        if event is None:
            return
        main = torch.cuda.current_stream()
        main.wait_event(event)
        for tensor in tensors:
            tensor.record_stream(main)


@dataclass
class Admission:
    """Windows joining: their slots (allocated), the batches they run in and, once encoded, their encoder states."""

    slots: list[int]
    windows: list[tuple[np.ndarray, DecodeOptions]]
    pieces: list[Piece]
    states: list[torch.Tensor]  # per piece, [piece.size, frames, d_model]
    encoded: object  # the admission stream's event (None: encoded inline)
    max_new_tokens: int | None


@dataclass
class SlotWindow:
    """What the engine remembers of a window while it decodes in a slot."""

    duration: float
    language: str | None
    no_speech_prob: float
    temperature: float
    start_of_transcript: list[int]  # the forced prefix after any prompt: what the alignment pass starts from
    word_timestamps: bool
    timestamps: bool  # decoded with timestamp tokens (else: one segment, no seek)
    logprobs: bool  # its segments keep their tokens' log-probabilities
    partials: bool = False  # its text tokens are reported as they are decoded
    tokens: list[int] = field(default_factory=list)  # with partials and timestamps: the tokens generated so far
    token_logprobs: list[float] = field(default_factory=list)  # and their log-probabilities
    reported: int = 0  # with partials and timestamps: the tokens up to here make the segments reported


class WhisperEngine:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", offline: bool = False,
                 max_new_tokens: int | None = None, fixed_new_tokens: bool = False, cpu_threads: int | None = None,
                 slots: int = 16, cuda_graphs: bool = True, feature_padding: str = "reference", beam_size: int = 1):
        self.model_name = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.offline = offline
        # A fixed decode length (benchmarks) forces exactly max_new_tokens tokens per window, whatever the weights say.
        self.max_new_tokens = max_new_tokens
        self.fixed_new_tokens = fixed_new_tokens
        self.cpu_threads = cpu_threads
        self.capacity = slots
        self.cuda_graphs = cuda_graphs
        if feature_padding not in FEATURE_PADDINGS:
            raise ValueError(f"feature_padding must be one of {', '.join(FEATURE_PADDINGS)}, got {feature_padding!r}")
        self.feature_padding = feature_padding
        # Sequences per window: beam_size beams at temperature 0 and as many samples at the fallback temperatures
        # (OpenAI's beam_size and best_of); 1 is greedy.
        self.beam_size = beam_size
        self.load_seconds: float | None = None
        self.windows: dict[int, SlotWindow] = {}
        # slot -> the text tokens the last step made final (partials), each with its log-probability
        self.partials: dict[int, list[tuple[int, float]]] = {}
        self.attention_backends: dict[str, list[str]] = {}  # per attention, the backends it ran on at warm-up

    def load(self) -> None:
        started = time.monotonic()
        if self.device == "cpu" and self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
        self.processor = WhisperProcessor.from_pretrained(self.model_name, local_files_only=self.offline)
        self.model = WhisperForConditionalGeneration.from_pretrained(
            self.model_name, dtype=self.dtype, attn_implementation="sdpa", local_files_only=self.offline,
        ).to(self.device).eval()
        tokenizer, generation, config = self.processor.tokenizer, self.model.generation_config, self.model.config
        self.capabilities, self.language_ids, self.task_ids = read_capabilities(generation)
        no_speech = tokenizer.convert_tokens_to_ids("<|nospeech|>")
        if no_speech == tokenizer.unk_token_id:  # checkpoints before large-v3 call it <|nocaptions|>
            no_speech = tokenizer.convert_tokens_to_ids("<|nocaptions|>")
        self.special = SpecialTokens(
            end_of_text=generation.eos_token_id, start_of_transcript=generation.decoder_start_token_id,
            no_timestamps=generation.no_timestamps_token_id,
            no_speech=no_speech, languages=tuple(self.language_ids.values()),
            suppress=tuple(generation.suppress_tokens or ()), begin_suppress=tuple(generation.begin_suppress_tokens or ()),
            max_initial_timestamp_index=getattr(generation, "max_initial_timestamp_index", None),
        )
        self.start_of_previous = tokenizer.convert_tokens_to_ids("<|startofprev|>")
        heads = getattr(generation, "alignment_heads", None)
        self.alignment_heads = ([tuple(pair) for pair in heads] if heads else
                                default_alignment_heads(config.decoder_layers, config.decoder_attention_heads))
        self.id_to_language = {token_id: code for code, token_id in self.language_ids.items()}
        self.positions = config.max_target_positions
        # OpenAI's sample length: at most half the decoder's context (224 tokens) after the prefix, or fewer where the
        # checkpoint's max_length says so (the random test models).
        self.sample_length = min(generation.max_length or self.positions, self.positions // 2)
        extractor = self.processor.feature_extractor
        self.hann_window = torch.hann_window(extractor.n_fft, device=self.device)
        self.mel_filters = torch.from_numpy(extractor.mel_filters).to(self.device, torch.float32)
        self.decoder = self._allocate_decoder()
        self.admission_stream = AdmissionStream(self.device)
        self.load_seconds = time.monotonic() - started

    def _allocate_decoder(self) -> SlotDecoder:
        """The KV caches for --max-batch-size slots, refused up front when they plainly cannot fit."""
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            self.memory_after_load = free, total
            if self.capacity * self.bytes_per_slot > free * (1 - ACTIVATION_RESERVE):
                raise OutOfMemory(self._sizing_advice())
        try:
            return SlotDecoder(self.model, self.special, self.capacity, group=self.beam_size)
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(self._sizing_advice()) from error

    @property
    def bytes_per_slot(self) -> int:
        return SlotDecoder.bytes_per_slot(self.model.config, self.dtype, self.beam_size)

    def _sizing_advice(self) -> str:
        per_slot = self.bytes_per_slot
        message = (f"{self.capacity} decode slots (--max-batch-size) need {self.capacity * per_slot / 2**30:.1f} GiB "
                   f"of KV cache ({per_slot / 2**20:.0f} MiB per slot) on {self.device}")
        if self.device != "cuda":
            return message
        free, total = self.memory_after_load
        fits = max(0, int(free * (1 - ACTIVATION_RESERVE) // per_slot))
        return (f"{message}, with {free / 2**30:.1f} of {total / 2**30:.1f} GiB free after loading the model and "
                f"{ACTIVATION_RESERVE:.0%} of it kept for activations: --max-batch-size {fits} fits")

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Captures the step graphs, runs the encoder and the admission passes once in every shape serving meets on a
        GPU (each padded admission size, each prefill width), records which backend each attention runs on, then
        decodes a window in every slot at once and one alone, so the first requests pay no capture, plan or allocation
        cost and a slot count that cannot fit fails here, before the server reports ready."""
        noise = np.random.default_rng(0).normal(0, 0.05, SAMPLE_RATE).astype(np.float32)
        try:
            if self.cuda_graphs:
                self._capture()
            if self.decoder.padded_admissions:  # a CPU admits in exact sizes: there is no fixed set of shapes to warm
                self.decoder.warm_up_admissions(self._encode_silence)
            self.attention_backends = self.decoder.attention_report(self._encode_silence)
            for count in (self.capacity, 1):
                self.admit([(noise, DecodeOptions(language="en"))] * count, max_new_tokens=4)
                while self.decoder.busy:
                    self.step()
            self.detect_language(noise)
        except (torch.OutOfMemoryError, OutOfMemory) as error:
            raise OutOfMemory(self._sizing_advice()) from error

    def _encode_silence(self, windows: int) -> torch.Tensor:
        extractor = self.processor.feature_extractor
        shape = (windows, extractor.feature_size, extractor.nb_max_frames)
        return self._encode(torch.full(shape, -1.5, dtype=self.dtype, device=self.device))  # log-mel of silence

    def _encode(self, features: torch.Tensor) -> torch.Tensor:
        with attention_context(ENCODER_SELF_ATTENTION, torch.device(self.device)):
            return self.model.get_encoder()(features).last_hidden_state

    def _capture(self) -> None:
        try:
            self.decoder.capture()
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            raise RuntimeError(f"capturing the decode step as CUDA graphs failed ({type(error).__name__}: {error}); "
                               "--cuda-graphs false runs the same step eagerly, slower") from error

    def token_bytes(self) -> list[bytes]:
        """The bytes of every text token (ids below end of text): Whisper's byte-level BPE spells each byte as one
        character of GPT-2's byte alphabet."""
        byte_of = {character: byte for byte, character in bytes_to_unicode().items()}
        pieces = self.processor.tokenizer.convert_ids_to_tokens(list(range(self.special.end_of_text)))
        return [bytes(byte_of[character] for character in piece) for piece in pieces]

    # Slots --------------------------------------------------------------------------------------------------------

    def free_slots(self) -> int:
        return len(self.decoder.free)

    def busy_slots(self) -> list[int]:
        return sorted(self.windows)

    def healthy(self) -> bool:
        """Whether the device still works after an error: CUDA errors such as an illegal address are sticky, and
        every later call fails with them. The CPU has no such state."""
        if self.device != "cuda":
            return True
        try:
            torch.cuda.synchronize()
            torch.zeros(1, device=self.device).add_(1).item()
            return True
        except Exception:  # noqa: BLE001 - any error here means the context is gone
            return False

    def release(self, slots: list[int]) -> None:
        """Stops decoding these slots' windows (their requests were cancelled or failed)."""
        self.decoder.release(slots)
        for slot in slots:
            self.windows.pop(slot, None)

    def admit(self, windows: list[tuple[np.ndarray, DecodeOptions]], max_new_tokens: int | None = None) -> list[int]:
        """Puts windows (16 kHz mono float32, <= 30 s) into free slots, encoded and attached at once. Returns the
        slots."""
        return self.attach(self.encode(windows, max_new_tokens))

    @torch.inference_mode()
    def encode(self, windows: list[tuple[np.ndarray, DecodeOptions]], max_new_tokens: int | None = None) -> Admission:
        """Takes free slots for the windows and starts their log-mel and encoder pass on the admission stream, in
        the batches of the admission sizes (padded with silence); the slots decode once attach() has run."""
        slots = self.decoder.allocate(len(windows))
        pieces = self.decoder.pieces(slots)
        samples = [samples for samples, _ in windows]

        def encode_pieces() -> list[torch.Tensor]:
            states, start = [], 0
            for piece in pieces:
                features = self.log_mel(samples[start:start + piece.count]).to(self.dtype)
                padding = features.new_full((piece.size - piece.count, *features.shape[1:]), -1.5)  # silence
                states.append(self._encode(torch.cat([features, padding])))
                start += piece.count
            return states

        with self._slots_released_on_failure(slots):
            states, encoded = self.admission_stream.run(encode_pieces)
        return Admission(slots, windows, pieces, states, encoded, max_new_tokens)

    @contextmanager
    def _slots_released_on_failure(self, slots: list[int]) -> Iterator[None]:
        """An admission that fails gives its slots back; a CUDA out-of-memory error becomes OutOfMemory, which fails
        the admission's requests and leaves the engine serving the others."""
        try:
            yield
        except torch.OutOfMemoryError as error:
            self.decoder.release(slots)
            torch.cuda.empty_cache()
            raise OutOfMemory(str(error)) from error
        except BaseException:
            self.decoder.release(slots)
            raise

    def encoded(self, admission: Admission) -> bool:
        """Whether the admission's encoder pass is done (attach() would not wait for it)."""
        return self.admission_stream.done(admission.encoded)

    @torch.inference_mode()
    def attach(self, admission: Admission) -> list[int]:
        """The encoded windows join their slots: cross-attention K/V written into their rows, language detection
        where none was given, no_speech_prob, and their forced prefixes. Returns the slots, decoding from the next
        step."""
        slots, windows = admission.slots, admission.windows
        with self._slots_released_on_failure(slots):
            self.admission_stream.join(admission.encoded, admission.states)
            # The detected language comes from the logits after <|startoftranscript|> alone, as in OpenAI's decoder and
            # transformers' detect_language, and so does no_speech_prob without a prompt (with one, OpenAI reads it at
            # <|startoftranscript|> after the prompt: the prefill pass below). A piece whose prefixes are known
            # already (language given, no prompt) gets them from its prefill pass.
            parts = [slice(piece.start - admission.pieces[0].start,
                           piece.start - admission.pieces[0].start + piece.count) for piece in admission.pieces]
            known = [self._known_prefixes([options for _, options in windows[part]]) for part in parts]
            first = torch.cat([self.decoder.attach(piece, states, prefixes)
                               for piece, states, prefixes in zip(admission.pieces, admission.states, known)])
            no_speech = first.softmax(-1)[:, self.special.no_speech]
            detected = first.masked_fill(self.decoder.language_mask, float("-inf")).argmax(-1)
            no_speech, detected = no_speech.tolist(), detected.tolist()
            for row, (_, options) in enumerate(windows):  # a languages[] hint: the likeliest of its candidates
                if options.languages and not options.language and self.capabilities.multilingual:
                    candidates = [self.language_ids[code] for code in options.languages]
                    detected[row] = candidates[int(first[row, candidates].argmax())]
            prefixes, starts, limits, min_lengths, admitted = [], [], [], [], []
            for (samples, options), detected_id, no_speech_prob in zip(windows, detected, no_speech):
                start, language = self._start_of_transcript(options, detected_id)
                prompt = self._prompt_ids(options.prompt, options.keywords, options.previous_tokens)
                prefix = prompt + start + self._timestamp_mode(options)  # as _prefix() makes it
                limit = self._limit(len(prefix), admission.max_new_tokens or self.max_new_tokens)
                prefixes.append(prefix)
                starts.append(len(prompt))  # where <|startoftranscript|> sits
                limits.append(limit)
                min_lengths.append(limit if self.fixed_new_tokens else 0)
                # Partials follow one sequence: a beam search's best sequence can change until it ends.
                admitted.append(SlotWindow(len(samples) / SAMPLE_RATE, language, no_speech_prob, options.temperature,
                                           start, options.word_timestamps, options.timestamps, options.logprobs,
                                           options.partials and self.beam_size == 1))
            temperatures = [options.temperature for _, options in windows]
            timestamps = [options.timestamps for _, options in windows]
            seeds = [window_seed(samples, options.temperature) for samples, options in windows]
            for piece, part, prefilled in zip(admission.pieces, parts, known):
                after_prompt = self.decoder.prefill(piece, prefixes[part], limits[part], min_lengths[part],
                                                    temperatures[part], timestamps[part], prefilled=prefilled is not None,
                                                    read_at=starts[part] if any(starts[part]) else None,
                                                    seeds=seeds[part])
                if after_prompt is not None:
                    for window, probability in zip(admitted[part],
                                                   after_prompt.softmax(-1)[:, self.special.no_speech].tolist()):
                        window.no_speech_prob = probability
            self.decoder.joined(slots)
        self.windows.update(zip(slots, admitted))
        return slots

    @torch.inference_mode()
    def detect_language(self, samples: np.ndarray, candidates: tuple[str, ...] = (),
                        padding: str = DETECTION_PADDING) -> str:
        """The likeliest language (of the candidates, if any) of up to 30 s of speech: one encoder pass over its
        features, padded as `padding` says, and the logits after <|startoftranscript|>, as OpenAI's detect_language
        reads them. English-only checkpoints: English."""
        if not self.capabilities.multilingual:
            return "en"
        states = self._encode(self.detection_features(samples, padding).to(self.dtype))
        start = torch.tensor([[self.special.start_of_transcript]], device=self.device)
        logits = self.model(encoder_outputs=(states,), decoder_input_ids=start).logits[0, -1].float()
        ids = [self.language_ids[code] for code in candidates] or list(self.language_ids.values())
        return self.id_to_language[ids[int(logits[ids].argmax())]]

    def detection_features(self, samples: np.ndarray, padding: str = DETECTION_PADDING) -> torch.Tensor:
        """What detection reads: with "zeros", every frame centred within the audio, as faster-whisper's
        detect_language keeps them (one frame more than its decoding keeps: it holds the audio's last samples)."""
        return self.log_mel([samples], padding, end_frame=True)

    def window_language(self, slot: int) -> str | None:
        """The language a busy slot's window decodes in (given, or detected at its admission)."""
        return self.windows[slot].language

    def window_no_speech_prob(self, slot: int) -> float:
        return self.windows[slot].no_speech_prob

    def partial_tokens(self) -> dict[int, list[tuple[int, float]]]:
        """Per slot decoding with partials, the text tokens the last step made final, where it made any, each with
        its log-probability."""
        return self.partials

    def _start_of_transcript(self, options: DecodeOptions, detected_id: int | None) -> tuple[list[int], str]:
        """The forced tokens after any prompt, and the window's language: <|startoftranscript|>, then on a
        multilingual checkpoint the language (given, else the detected one) and the task. English-only checkpoints
        take <|startoftranscript|> alone (a language or task token after it makes them end at once, with no text)."""
        if not self.capabilities.multilingual:
            return [self.special.start_of_transcript], "en"
        language_id = self.language_ids[options.language] if options.language else detected_id
        return ([self.special.start_of_transcript, language_id, self.task_ids[options.task]],
                self.id_to_language[language_id])

    def _timestamp_mode(self, options: DecodeOptions) -> list[int]:
        """What follows the start of transcript: nothing when timestamps are decoded, else <|notimestamps|>."""
        return [] if options.timestamps else [self.special.no_timestamps]

    def _prefix(self, options: DecodeOptions, detected_id: int | None) -> tuple[list[int], str]:
        """The forced prefix (the prompt, if any, the start of transcript, and <|notimestamps|> where timestamps are
        not decoded) and the window's language."""
        start, language = self._start_of_transcript(options, detected_id)
        return (self._prompt_ids(options.prompt, options.keywords, options.previous_tokens) + start
                + self._timestamp_mode(options), language)

    def _known_prefixes(self, options: list[DecodeOptions]) -> list[list[int]] | None:
        """The windows' prefixes when they need nothing from the model first (each names its language, or the
        checkpoint is English-only) and start with <|startoftranscript|> (no prompt); else None."""
        if not all((option.language or not self.capabilities.multilingual) and not option.prompt and not option.keywords
                   and not option.previous_tokens for option in options):
            return None
        return [self._prefix(option, None)[0] for option in options]

    def _limit(self, prefix_length: int, max_new_tokens: int | None) -> int:
        """Most tokens in a slot's sequence, prefix included: max_new_tokens (or the sample length) after the prefix,
        within the 448 positions, where OpenAI's decoder stops too."""
        return min(prefix_length + (max_new_tokens or self.sample_length), self.positions)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, WindowResult]]:
        """One decode step over every busy slot; the windows that finished, with their (now free) slots."""
        try:
            finished = self.decoder.step([slot for slot, window in self.windows.items() if window.partials])
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            raise OutOfMemory(str(error)) from error
        self.partials = {}
        for slot, (token, logprob) in self.decoder.chosen.items():
            if made_final := self._made_final(self.windows[slot], token, logprob):
                self.partials[slot] = made_final
        results, aligning = [], []
        for item in finished:
            window = self.windows.pop(item.slot)
            result = self._result(item.tokens, item.logprobs if window.logprobs else None, item.sum_logprob, window)
            results.append((item.slot, result))
            if window.word_timestamps and result.segments:
                aligning.append((item.row, window, result))
        if aligning:
            self._align(aligning)
        return results

    def _made_final(self, window: SlotWindow, token: int, logprob: float) -> list[tuple[int, float]]:
        """The text tokens, with their log-probabilities, a window decoding with partials can report once it has
        chosen `token`: without timestamps the token itself, if text; with them, those of the segments a timestamp
        pair has just closed (blank ones left out, as _segments leaves them), since the seek decodes again whatever
        follows a decode's last pair."""
        if not window.timestamps:
            return [(token, logprob)] if token < self.special.end_of_text else []
        window.tokens.append(token)
        window.token_logprobs.append(logprob)
        tokens, timestamp_begin = window.tokens, self.special.timestamp_begin
        if len(tokens) < 2 or tokens[-2] < timestamp_begin or token < timestamp_begin:
            return []
        closed = slice(window.reported, len(tokens) - 1)
        window.reported = closed.stop
        segments = self._segments(tokens[closed], WindowResult(None, duration=window.duration),
                                  window.token_logprobs[closed])
        return [pair for segment in segments for pair in zip(segment.tokens, segment.logprobs)]

    def _result(self, tokens: list[int], logprobs: list[float] | None, sum_logprob: float,
                window: SlotWindow) -> WindowResult:
        """A finished decode: OpenAI's decode-level figures, and its finished segments with where it goes on (with
        `logprobs`, each token's, the segments keep their text tokens')."""
        text = self.processor.tokenizer.decode([t for t in tokens if t < self.special.end_of_text]).strip()
        result = WindowResult(
            window.language, tokens=tokens, avg_logprob=sum_logprob / (len(tokens) + 1),
            compression_ratio=compression_ratio(text), no_speech_prob=window.no_speech_prob,
            temperature=window.temperature, duration=window.duration)
        kept, result.resume_at = ((len(tokens), None) if self.fixed_new_tokens or not window.timestamps
                                  else decoded_until(tokens, self.special.timestamp_begin, window.duration))
        result.segments = self._segments(tokens[:kept], result, logprobs)
        return result

    def _align(self, windows: list[tuple[int, SlotWindow, WindowResult]]) -> None:
        """One batched pass over the windows that finished together and asked for words, while their cache rows
        still hold their cross-attention K/V (until the next step or admission): each result gets its alignment
        matrix, which the HTTP process turns into words."""
        rows = [row for row, _, _ in windows]
        texts = [[token for segment in result.segments for token in segment.tokens] for _, _, result in windows]
        sequences = [alignment_sequence(window.start_of_transcript, self.special.no_timestamps, text,
                                        self.special.end_of_text) for (_, window, _), text in zip(windows, texts)]
        frames = [min(round(window.duration * SAMPLE_RATE) // self.processor.feature_extractor.hop_length // 2,
                      self.model.config.max_source_positions) for _, window, _ in windows]
        try:
            matrices = alignment_matrices(self.model, lambda layer: self.decoder.cross_attention_kv(layer, rows),
                                          self.alignment_heads, sequences,
                                          [len(window.start_of_transcript) for _, window, _ in windows], frames)
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            raise OutOfMemory(str(error)) from error
        for (_, _, result), matrix in zip(windows, matrices):
            result.alignment = matrix

    # Front end and results ----------------------------------------------------------------------------------------

    def log_mel(self, windows: list[np.ndarray], padding: str | None = None, end_frame: bool = False) -> torch.Tensor:
        """Whisper's log-mel features, as its feature extractor computes them for audio zero-padded to 30 s, but with
        the STFT run only over the audio (plus one FFT of zeros) and the all-zero frames filled in: a 1 s clip costs
        1/30 of the work. Batched, on the model's device. With `padding` (default: the engine's feature_padding)
        "zeros", the frames after each window's audio are 0.0 instead, as faster-whisper pads them (`end_frame`: after
        the frame centred on the audio's end too)."""
        extractor = self.processor.feature_extractor
        frames = extractor.nb_max_frames  # 3000
        longest = max(len(w) for w in windows) + extractor.n_fft
        batch = np.zeros((len(windows), min(longest, extractor.n_samples)), dtype=np.float32)
        for row, window in enumerate(windows):
            batch[row, :len(window)] = window[:extractor.n_samples]
        batch = torch.from_numpy(batch).to(self.device)
        stft = torch.stft(batch, extractor.n_fft, extractor.hop_length, window=self.hann_window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        computed = torch.clamp(self.mel_filters.T @ power, min=1e-10).log10()[..., :frames]
        # Frames past the audio are FFTs of zeros: log10 of the 1e-10 floor.
        log_spec = torch.full((len(windows), computed.shape[1], frames), -10.0, device=self.device)
        log_spec[..., :computed.shape[2]] = computed
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        features = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        if (padding or self.feature_padding) == "zeros":  # faster-whisper's decoding keeps len // hop frames
            audio_frames = torch.tensor([len(window) // extractor.hop_length + end_frame for window in windows],
                                        device=self.device)
            features.masked_fill_(torch.arange(frames, device=self.device) >= audio_frames[:, None, None], 0.0)
        return features

    def _prompt_ids(self, prompt: str | None, keywords: tuple[str, ...] = (), previous: tuple[int, ...] = ()
                    ) -> list[int]:
        """<|startofprev|>, the keywords (as faster-whisper puts its hotwords: first), then the last tokens of the prompt
        followed by the previous windows' tokens: at most half the decoder's context, as OpenAI keeps a prompt. The
        keywords, joined by commas, take up to KEYWORD_TOKENS of it (the whole keywords that fit, in the order given),
        the prompt and previous tokens the rest. Keywords and prompt are text:
        "<|endoftext|>" in them is those characters, never the control token (as OpenAI's tokenizer encodes text;
        transformers' get_prompt_ids refuses such a prompt, and its tokenizer reads "<|0.00|>" as a timestamp)."""
        if not prompt and not keywords and not previous:
            return []
        backend = self.processor.tokenizer.backend_tokenizer  # its byte-level BPE alone, without added tokens
        keyword_ids: list[int] = []
        for index in range(len(keywords), 0, -1):  # the most keywords that fit
            keyword_ids = last_tokens(backend, " " + ", ".join(keywords[:index]), KEYWORD_TOKENS + 1)
            if len(keyword_ids) <= KEYWORD_TOKENS:
                break
            keyword_ids = []
        room = self.positions // 2 - 1 - len(keyword_ids)
        prompt_ids = (last_tokens(backend, " " + prompt.strip(), room) if prompt else []) + list(previous)
        return [self.start_of_previous] + keyword_ids + prompt_ids[-room:]

    def _segments(self, tokens: list[int], result: WindowResult, logprobs: list[float] | None = None
                  ) -> list[Segment]:
        """Splits a decode's tokens into segments at timestamp tokens, clamped to the window and kept in order; each
        carries its decode's figures, as OpenAI's segments do, and with `logprobs` (one per token) its text tokens'."""
        tokenizer = self.processor.tokenizer
        timestamp_begin, end_of_text, duration = self.special.timestamp_begin, self.special.end_of_text, result.duration
        segments: list[Segment] = []
        start, start_token, text_tokens, text_logprobs = None, None, [], []

        def close(end: float, end_token: int | None) -> None:
            nonlocal start, start_token, text_tokens, text_logprobs
            # The text as the tokens spell it, leading space included (OpenAI's segments keep it; languages written
            # without spaces get none between segments).
            text = tokenizer.decode(text_tokens, skip_special_tokens=True)
            previous_end = segments[-1].end if segments else 0.0
            begin = min(max(start or 0.0, previous_end), duration)
            if text.strip() and segments and begin >= duration:  # timestamps past the window's end: same segment
                last = segments[-1]
                last.text, last.tokens, last.end_token = last.text + text, last.tokens + text_tokens, end_token
                if last.logprobs is not None:
                    last.logprobs = last.logprobs + text_logprobs
            elif text.strip():
                segments.append(Segment(
                    start=round(begin, 2), end=round(min(max(end, begin), duration), 2), text=text,
                    tokens=list(text_tokens), avg_logprob=result.avg_logprob,
                    compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob,
                    temperature=result.temperature, start_token=start_token, end_token=end_token,
                    logprobs=list(text_logprobs) if logprobs is not None else None,
                ))
            start, start_token, text_tokens, text_logprobs = None, None, [], []

        for token, logprob in zip(tokens, logprobs if logprobs is not None else [0.0] * len(tokens)):
            if token >= timestamp_begin:
                time_at = (token - timestamp_begin) * TIME_PRECISION
                if text_tokens:
                    close(time_at, token)
                else:
                    start, start_token = time_at, token
            elif token < end_of_text:
                text_tokens.append(token)
                text_logprobs.append(logprob)
        if text_tokens:
            close(duration, None)
        return segments
