"""The speech engine: loads a Whisper checkpoint and decodes batches of <= 30 s windows. It knows nothing of HTTP."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, WhisperForConditionalGeneration, WhisperProcessor

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30.0
# Whisper's own rule for dropping a window as silence: likely no speech and a low-confidence decode.
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}



class OutOfMemory(Exception):
    """A batch did not fit in accelerator memory; smaller batches may."""


@dataclass(frozen=True)
class DecodeOptions:
    """What a request asks of the decoder; windows batch together only when these are equal."""

    task: str = "transcribe"  # or "translate"
    language: str | None = None  # ISO-639-1 code; None detects it per window
    prompt: str | None = None
    temperature: float = 0.0


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float


@dataclass
class WindowResult:
    language: str | None
    segments: list[Segment] = field(default_factory=list)


class ChosenTokenLogprobs(LogitsProcessor):
    """Records the log-probability of each chosen token as decoding goes, holding one step of scores rather than
    all of them (output_scores on large-v3 keeps steps x batch x 51866 floats: gigabytes at batch 16)."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._record(input_ids)
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _record(self, sequences: torch.Tensor) -> None:
        if self.previous is not None:  # the token picked from the previous step's scores is now the last one
            self.chosen.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(batch, generated tokens) log-probabilities, once generate has returned the final sequences."""
        self._record(sequences)
        self.previous = None
        return torch.stack(self.chosen, dim=1).cpu()


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


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


class WhisperEngine:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", offline: bool = False,
                 max_new_tokens: int | None = None, fixed_new_tokens: bool = False, cpu_threads: int | None = None):
        self.model_name = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.offline = offline
        # A fixed decode length (benchmarks) forces exactly max_new_tokens tokens per window, whatever the weights say.
        self.max_new_tokens = max_new_tokens
        self.fixed_new_tokens = fixed_new_tokens
        self.cpu_threads = cpu_threads
        self.load_seconds: float | None = None

    def load(self) -> None:
        started = time.monotonic()
        if self.device == "cpu" and self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
        self.processor = WhisperProcessor.from_pretrained(self.model_name, local_files_only=self.offline)
        self.model = WhisperForConditionalGeneration.from_pretrained(
            self.model_name, dtype=self.dtype, attn_implementation="sdpa", local_files_only=self.offline,
        ).to(self.device).eval()
        tokenizer = self.processor.tokenizer
        generation = self.model.generation_config
        self.eot = generation.eos_token_id
        self.sot = generation.decoder_start_token_id
        self.timestamp_begin = generation.no_timestamps_token_id + 1
        self.no_speech_id = tokenizer.convert_tokens_to_ids("<|nospeech|>")
        if self.no_speech_id == tokenizer.unk_token_id:  # checkpoints before large-v3 call it <|nocaptions|>
            self.no_speech_id = tokenizer.convert_tokens_to_ids("<|nocaptions|>")
        extractor = self.processor.feature_extractor
        self.hann_window = torch.hann_window(extractor.n_fft, device=self.device)
        self.mel_filters = torch.from_numpy(extractor.mel_filters).to(self.device, torch.float32)
        self.id_to_language = {token_id: token[2:-2] for token, token_id in generation.lang_to_id.items()}
        self.languages = set(self.id_to_language.values())
        self.load_seconds = time.monotonic() - started

    def warm_up(self, max_batch_size: int) -> None:
        """Runs the smallest and the largest batch once, so the first requests pay no compile or allocation cost
        and a batch size that cannot fit shows up before the server reports ready."""
        noise = np.random.default_rng(0).normal(0, 0.05, SAMPLE_RATE).astype(np.float32)
        for size in sorted({1, max_batch_size}):
            try:
                self.transcribe([noise] * size, DecodeOptions(language="en"), max_new_tokens=4)
            except OutOfMemory as error:
                raise OutOfMemory(f"a batch of {size} windows does not fit on {self.device}: lower --max-batch-size") from error

    @torch.inference_mode()
    def transcribe(self, windows: list[np.ndarray], options: DecodeOptions,
                   max_new_tokens: int | None = None) -> list[WindowResult]:
        """Decodes each window (16 kHz mono float32, <= 30 s) with timestamps; segment times are window-relative."""
        try:
            return self._transcribe(windows, options, max_new_tokens or self.max_new_tokens)
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            raise OutOfMemory(str(error)) from error

    def _transcribe(self, windows, options, max_new_tokens):
        features = self.log_mel(windows).to(self.dtype)
        encoder_outputs = self.model.get_encoder()(features)
        no_speech = self._no_speech_probs(encoder_outputs)
        generate_args = dict(
            encoder_outputs=encoder_outputs, return_timestamps=True, task=options.task, language=options.language,
            return_dict_in_generate=True, force_unique_generate_call=True,
        )
        if options.temperature > 0:
            generate_args.update(do_sample=True, temperature=options.temperature)
        if options.prompt:
            generate_args["prompt_ids"] = self._prompt_ids(options.prompt)
        if max_new_tokens:
            generate_args["max_new_tokens"] = max_new_tokens
            if self.fixed_new_tokens:
                generate_args["min_new_tokens"] = max_new_tokens
        recorder = ChosenTokenLogprobs()
        output = self.model.generate(**generate_args, logits_processor=LogitsProcessorList([recorder]))
        logprobs = recorder.finish(output.sequences)
        generated = output.sequences[:, -logprobs.shape[1]:].tolist()
        logprobs = logprobs.tolist()
        results = []
        for row, tokens in enumerate(generated):
            language = self._language_of(output.sequences[row].tolist(), options.language)
            token_logprobs = logprobs[row]
            duration = len(windows[row]) / SAMPLE_RATE
            segments = self._segments(tokens, token_logprobs, duration, no_speech[row], options.temperature)
            results.append(WindowResult(language=language, segments=self._drop_if_silence(segments)))
        return results

    def log_mel(self, windows: list[np.ndarray]) -> torch.Tensor:
        """Whisper's log-mel features, as its feature extractor computes them for audio zero-padded to 30 s, but with
        the STFT run only over the audio (plus one FFT of zeros) and the all-zero frames filled in: a 1 s clip costs
        1/30 of the work. Batched, on the model's device."""
        extractor = self.processor.feature_extractor
        frames = extractor.nb_max_frames  # 3000
        longest = max(len(w) for w in windows) + extractor.n_fft
        batch = torch.zeros(len(windows), min(longest, extractor.n_samples), dtype=torch.float32)
        for row, window in enumerate(windows):
            batch[row, :len(window)] = torch.from_numpy(window[:extractor.n_samples])
        batch = batch.to(self.device)
        stft = torch.stft(batch, extractor.n_fft, extractor.hop_length, window=self.hann_window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        computed = torch.clamp(self.mel_filters.T @ power, min=1e-10).log10()[..., :frames]
        # Frames past the audio are FFTs of zeros: log10 of the 1e-10 floor.
        log_spec = torch.full((len(windows), computed.shape[1], frames), -10.0, device=self.device)
        log_spec[..., :computed.shape[2]] = computed
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        """<|startofprev|> and the prompt's last tokens: at most half the decoder's context, as OpenAI keeps it."""
        ids = self.processor.get_prompt_ids(prompt, return_tensors="pt")
        keep = self.model.config.max_target_positions // 2 - 1
        return torch.cat([ids[:1], ids[1:][-keep:]]).to(self.device)

    def _no_speech_probs(self, encoder_outputs) -> list[float]:
        """Probability of <|nospeech|> right after <|startoftranscript|>, as OpenAI's decoder reports it."""
        batch = encoder_outputs.last_hidden_state.shape[0]
        start = torch.full((batch, 1), self.sot, device=self.device)
        logits = self.model(encoder_outputs=encoder_outputs, decoder_input_ids=start).logits[:, -1].float()
        return torch.softmax(logits, dim=-1)[:, self.no_speech_id].tolist()

    def _language_of(self, sequence: list[int], requested: str | None) -> str | None:
        if requested:
            return requested
        after_start = sequence.index(self.sot) + 1 if self.sot in sequence else None
        return self.id_to_language.get(sequence[after_start]) if after_start is not None and after_start < len(sequence) else None

    def _segments(self, tokens, token_logprobs, duration, no_speech_prob, temperature) -> list[Segment]:
        """Splits a window's tokens into segments at timestamp tokens, clamped to the window and kept in order."""
        tokenizer = self.processor.tokenizer
        if self.eot in tokens:
            cut = tokens.index(self.eot)
            tokens, token_logprobs = tokens[:cut], token_logprobs[:cut]
        segments: list[Segment] = []
        start, text_tokens, text_logprobs = None, [], []

        def close(end: float) -> None:
            nonlocal start, text_tokens, text_logprobs
            text = tokenizer.decode(text_tokens, skip_special_tokens=True).strip()
            previous_end = segments[-1].end if segments else 0.0
            begin = min(max(start or 0.0, previous_end), duration)
            if text and segments and begin >= duration:  # timestamps past the window's end: same segment
                last = segments[-1]
                last.text, last.tokens = f"{last.text} {text}", last.tokens + text_tokens
                last.compression_ratio = compression_ratio(last.text)
            elif text:
                segments.append(Segment(
                    start=round(begin, 2), end=round(min(max(end, begin), duration), 2), text=text,
                    tokens=list(text_tokens), avg_logprob=float(np.mean(text_logprobs)),
                    compression_ratio=compression_ratio(text), no_speech_prob=no_speech_prob, temperature=temperature,
                ))
            start, text_tokens, text_logprobs = None, [], []

        for token, logprob in zip(tokens, token_logprobs):
            if token >= self.timestamp_begin:
                time_at = (token - self.timestamp_begin) * 0.02
                if text_tokens:
                    close(time_at)
                else:
                    start = time_at
            elif token < self.eot:
                text_tokens.append(token)
                text_logprobs.append(logprob)
        if text_tokens:
            close(duration)
        return segments

    @staticmethod
    def _drop_if_silence(segments: list[Segment]) -> list[Segment]:
        if not segments:
            return segments
        avg_logprob = float(np.mean([s.avg_logprob for s in segments]))
        if segments[0].no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD:
            return []
        return segments
