"""`whisper-server make-test-model`: a random-weight Whisper checkpoint in the layout of a real one, built offline."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from .alignment import default_alignment_heads

# Architectures: "tiny" runs the whole server on CPU in seconds; "large-v3" has the real model's shapes for GPU benchmarks.
ARCHITECTURES = {
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                     decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128),
}
# A real Whisper vocabulary has 50257 ordinary tokens before the special ones; large-v3 is padded to that size.
REAL_ORDINARY_VOCAB = 50257
TINY_ORDINARY_VOCAB = 600
# Random weights never choose end-of-text, so this cap is the tiny model's decode length: 16 tokens after the 3-token
# forced prefix (transformers adds the prefix to max_length), about what a real model decodes for a few seconds of
# speech (a real checkpoint allows 448).
TINY_MAX_LENGTH = 16
TIMESTAMP_COUNT = 1501  # <|0.00|> .. <|30.00|> in 20 ms steps

CORPUS = (
    "the quick brown fox jumps over the lazy dog. speech to text on a graphics card is fast when requests are batched. "
    "hello world, this is a test of the whisper server. one two three four five six seven eight nine ten. "
    "she sells sea shells by the sea shore; peter piper picked a peck of pickled peppers! "
    "how much wood would a woodchuck chuck if a woodchuck could chuck wood? 0123456789 "
)


def special_tokens() -> list[str]:
    """Whisper's special tokens in the order of a real multilingual (large-v3) vocabulary."""
    return (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{code}|>" for code in LANGUAGES]
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    )


def train_ordinary_vocab(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on a small built-in corpus, padded with filler tokens up to `size`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(size, TINY_ORDINARY_VOCAB), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[],
    )
    tokenizer.train_from_iterator([CORPUS] * 50, trainer=trainer)
    vocab = tokenizer.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    # Filler tokens keep the real id layout (special tokens start at `size`) without needing a real corpus.
    for index in itertools.count():
        if len(vocab) >= size:
            break
        vocab.setdefault(f"Ġfiller{index}", len(vocab))
    return vocab, merges


def build_tokenizer(ordinary_size: int) -> WhisperTokenizer:
    vocab, merges = train_ordinary_vocab(ordinary_size)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens()[1:]})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMP_COUNT)])
    return tokenizer


def make_test_model(directory: str | Path, architecture: str = "tiny", seed: int = 0, max_length: int | None = None,
                    init_std: float = 0.02) -> Path:
    """`max_length` overrides the decode length cap (tokens per window, prompt excluded); a larger `init_std` makes
    the random model's output depend more on its audio (the exactness tests use both)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape = ARCHITECTURES[architecture]
    ordinary_size = REAL_ORDINARY_VOCAB if architecture == "large-v3" else TINY_ORDINARY_VOCAB
    tokenizer = build_tokenizer(ordinary_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special_tokens()}
    assert ids["<|endoftext|>"] == ordinary_size, "special tokens must follow the ordinary vocabulary"
    eot, sot, no_timestamps = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]

    config = WhisperConfig(
        vocab_size=len(tokenizer), max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        begin_suppress_tokens=[tokenizer.convert_tokens_to_ids("Ġ"), eot], suppress_tokens=[], init_std=init_std,
        **shape,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    if architecture == "large-v3":
        model = model.half()  # as the real checkpoint ships: 3 GB rather than 6
    model.save_pretrained(directory, safe_serialization=True)

    feature_extractor = WhisperFeatureExtractor(feature_size=shape["num_mel_bins"])
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(directory)
    feature_extractor.save_pretrained(directory)  # preprocessor_config.json, as in a real checkpoint

    generation = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=max_length or (TINY_MAX_LENGTH if architecture == "tiny" else 448),
        begin_suppress_tokens=config.begin_suppress_tokens, suppress_tokens=[],
        is_multilingual=True, no_timestamps_token_id=no_timestamps, max_initial_timestamp_index=50,
        prev_sot_token_id=ids["<|startofprev|>"],
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        # The reference's default where a checkpoint names none (real ones carry their own): the upper half's heads.
        alignment_heads=[list(pair) for pair in default_alignment_heads(config.decoder_layers,
                                                                        config.decoder_attention_heads)],
    )
    generation.save_pretrained(directory)
    return directory
