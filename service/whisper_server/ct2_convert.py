"""`whisper-server convert-ct2 SRC DST`: a CTranslate2 Whisper model (the folder faster-whisper loads: model.bin,
config.json, tokenizer.json) written as a Hugging Face checkpoint that `WhisperForConditionalGeneration` and
`WhisperProcessor.from_pretrained` load offline.

Exact: every weight is copied bit for bit (float16 and bfloat16 widen to float32 without rounding; `--dtype float16`
keeps float16 sources as they are). CTranslate2 fuses projections that Hugging Face keeps apart: self-attention's
`linear_0` is Q|K|V (K has no bias in Whisper, so its third of the bias must be zero), cross-attention's `linear_1` is
K|V; `decoder/projection` is an alias of the token embeddings (Hugging Face ties them too). Names follow
ctranslate2's own Whisper loader (python/ctranslate2/converters/transformers.py, WhisperLoader). The conversion
fails, naming what it met, on anything it cannot carry over exactly: quantized weights, another architecture, a
weight left over or missing.

The CTranslate2 config.json's alignment heads, suppress lists and language ids go into the generation config.
English-only models (a vocabulary of 51864, as ctranslate2 and faster-whisper tell them apart) get
`is_multilingual: false` and no language or task ids, as OpenAI's *.en checkpoints on the Hub have.

model.bin is little-endian: `u32 version, str spec_name, u32 revision, u32 count`, then `count` variables, each
`str name, u8 rank, u32 dims[rank], u8 dtype, u32 nbytes, data`, then `u32 aliases` and (alias, target) `str` pairs;
a `str` is a u16 length that counts its trailing NUL, then the bytes.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ctranslate2's DataType ids; bfloat16 has no numpy type and is widened by hand.
NUMPY_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
                5: np.dtype("<u2")}
BFLOAT16 = 5
FLOATS = {0, 4, 5}
# ctranslate2's Activation enum value for exact GELU, the only activation Whisper uses.
GELU = 3
# Whisper vocabularies: 51864 tokens for English-only models, 51865 or more for multilingual ones.
MULTILINGUAL_VOCAB = 51865
# OpenAI's max_initial_timestamp (1.0 s) in 20 ms timestamp steps, as the Hub's generation configs carry it.
MAX_INITIAL_TIMESTAMP_INDEX = 50
TIMESTAMP_COUNT = 1501  # <|0.00|> .. <|30.00|>
NOT_LANGUAGES = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                 "<|startofprev|>", "<|nocaptions|>", "<|nospeech|>", "<|notimestamps|>")


class ConversionError(ValueError):
    """The source is not a CTranslate2 Whisper model this converter can carry over exactly."""


@dataclass
class Ct2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]  # aliases resolved: decoder/projection/weight is the embeddings' array
    aliases: dict[str, str]


def read_model_bin(path: str | Path) -> Ct2Model:
    data = memoryview(Path(path).read_bytes())
    offset = 0

    def unpack(fmt: str):
        nonlocal offset
        if offset + struct.calcsize("<" + fmt) > len(data):
            raise ConversionError(f"{path} is truncated at byte {offset}")
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal offset
        (length,) = unpack("H")
        raw = bytes(data[offset:offset + length])
        offset += length
        if not raw.endswith(b"\0"):
            raise ConversionError(f"{path}: a name at byte {offset - length} is not NUL-terminated")
        return raw[:-1].decode("utf-8")

    (version,) = unpack("I")
    spec = string()
    revision, count = unpack("II")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        (rank,) = unpack("B")
        shape = unpack(f"{rank}I")
        dtype_id, nbytes = unpack("BI")
        if dtype_id not in NUMPY_DTYPES:
            raise ConversionError(f"{path}: {name} has unknown dtype id {dtype_id}")
        if offset + nbytes > len(data) or nbytes != NUMPY_DTYPES[dtype_id].itemsize * int(np.prod(shape)):
            raise ConversionError(f"{path} is truncated or inconsistent at {name} ({nbytes} bytes for {shape})")
        array = np.frombuffer(data[offset:offset + nbytes], NUMPY_DTYPES[dtype_id]).reshape(shape)
        offset += nbytes
        if dtype_id == BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif dtype_id not in FLOATS and array.ndim > 0:
            raise ConversionError(f"{path}: {name} is quantized ({array.dtype}); convert an unquantized model "
                                  "(ct2-transformers-converter without --quantization, or --quantization float16)")
        variables[name] = array
    (alias_count,) = unpack("I")
    aliases = dict((string(), string()) for _ in range(alias_count))
    if offset != len(data):
        raise ConversionError(f"{path}: {len(data) - offset} bytes after the last alias (version {version})")
    for alias, target in aliases.items():
        variables[alias] = variables[target]
    return Ct2Model(spec, revision, variables, aliases)


def tensor_pairs(encoder_layers: int, decoder_layers: int) -> Iterator[tuple[str, tuple[str | None, ...]]]:
    """Each CTranslate2 weight and the Hugging Face tensors it is made of, stacked along the first axis in that order
    (None: a part Hugging Face does not have, which CTranslate2 fills with zeros: the K bias)."""

    def linear(ct2: str, *hf: str):
        yield f"{ct2}/weight", tuple(f"{name}.weight" for name in hf)
        yield f"{ct2}/bias", tuple(None if name.endswith(".k_proj") else f"{name}.bias" for name in hf)

    def layer_norm(ct2: str, hf: str):
        yield f"{ct2}/gamma", (f"{hf}.weight",)
        yield f"{ct2}/beta", (f"{hf}.bias",)

    for conv in ("conv1", "conv2"):
        yield f"encoder/{conv}/weight", (f"model.encoder.{conv}.weight",)
        yield f"encoder/{conv}/bias", (f"model.encoder.{conv}.bias",)
    yield "decoder/embeddings/weight", ("model.decoder.embed_tokens.weight",)
    for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        yield f"{side}/position_encodings/encodings", (f"model.{side}.embed_positions.weight",)
        yield from layer_norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for index in range(layers):
            ct2, hf = f"{side}/layer_{index}", f"model.{side}.layers.{index}"
            own = f"{hf}.self_attn"
            yield from linear(f"{ct2}/self_attention/linear_0", f"{own}.q_proj", f"{own}.k_proj", f"{own}.v_proj")
            yield from linear(f"{ct2}/self_attention/linear_1", f"{own}.out_proj")
            yield from layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                cross = f"{hf}.encoder_attn"
                yield from linear(f"{ct2}/attention/linear_0", f"{cross}.q_proj")
                yield from linear(f"{ct2}/attention/linear_1", f"{cross}.k_proj", f"{cross}.v_proj")
                yield from linear(f"{ct2}/attention/linear_2", f"{cross}.out_proj")
                yield from layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            yield from linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            yield from linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            yield from layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")


# Scalars of the spec that describe the architecture; each must hold the value Hugging Face's Whisper implements.
FIXED_SCALARS = {"decoder/activation": GELU, "decoder/pre_norm": 1, "decoder/alibi": 0,
                 "decoder/start_from_zero_embedding": 0}
# Scalars that are defaults for ctranslate2's own alignment, replaced by config.json's alignment_heads.
IGNORED_SCALARS = {"decoder/alignment_heads", "decoder/alignment_layer", "decoder/num_heads", "encoder/num_heads",
                   "decoder/scale_embeddings"}


def layer_count(variables: dict[str, np.ndarray], side: str) -> int:
    return len({match.group(1) for name in variables if (match := re.match(rf"{side}/layer_(\d+)/", name))})


def hf_tensors(model: Ct2Model) -> tuple[dict[str, np.ndarray], int, int]:
    """The Hugging Face state dict (proj_out.weight left to the tie with the embeddings), and the layer counts."""
    variables = model.variables
    if model.spec != "WhisperSpec":
        raise ConversionError(f"model.bin holds a {model.spec}, not a WhisperSpec")
    for name, expected in FIXED_SCALARS.items():
        if name in variables and int(variables[name]) != expected:
            raise ConversionError(f"{name} is {int(variables[name])}; Hugging Face's Whisper implements {expected}")
    if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        if not np.array_equal(variables["decoder/projection/weight"], variables["decoder/embeddings/weight"]):
            raise ConversionError("decoder/projection differs from the embeddings; Whisper ties them")
    encoder_layers, decoder_layers = layer_count(variables, "encoder"), layer_count(variables, "decoder")
    tensors: dict[str, np.ndarray] = {}
    used = {"decoder/projection/weight", *FIXED_SCALARS, *IGNORED_SCALARS}
    for ct2_name, hf_names in tensor_pairs(encoder_layers, decoder_layers):
        if ct2_name not in variables:
            raise ConversionError(f"model.bin has no {ct2_name}")
        fused = variables[ct2_name]
        used.add(ct2_name)
        if fused.shape[0] % len(hf_names):
            raise ConversionError(f"{ct2_name} {fused.shape} does not split into {len(hf_names)} equal parts")
        for hf_name, part in zip(hf_names, np.split(fused, len(hf_names))):
            if hf_name is None:
                if np.any(part):
                    raise ConversionError(f"{ct2_name}: the K bias is not zero; Whisper's k_proj has no bias")
                continue
            tensors[hf_name] = part
    if leftover := sorted(set(variables) - used):
        raise ConversionError(f"model.bin has weights this converter does not know: {', '.join(leftover[:5])}")
    return tensors, encoder_layers, decoder_layers


def hf_config(model: Ct2Model, encoder_layers: int, decoder_layers: int, ids: dict[str, int], ct2_config: dict):
    from transformers import WhisperConfig

    variables = model.variables
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab_size), d_model=int(d_model), num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu", scale_embedding=bool(int(variables.get("decoder/scale_embeddings", 0))),
        tie_word_embeddings=True, architectures=["WhisperForConditionalGeneration"],
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
    )


def generation_config(config, ids: dict[str, int], ct2_config: dict, id_to_token: dict[int, str]):
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= MULTILINGUAL_VOCAB
    languages = {}
    if multilingual:
        languages["lang_to_id"] = {id_to_token[i]: i for i in ct2_config.get("lang_ids", [])
                                   if id_to_token.get(i) not in (None, *NOT_LANGUAGES)}
        if not languages["lang_to_id"]:
            raise ConversionError("a multilingual model needs lang_ids in its config.json")
        languages["task_to_id"] = {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]}
    heads = ct2_config.get("alignment_heads") or [[layer, head] for layer in range(config.decoder_layers // 2,
                                                                                  config.decoder_layers)
                                                  for head in range(config.decoder_attention_heads)]
    return GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        max_length=config.max_target_positions, is_multilingual=multilingual,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX, return_timestamps=False,
        suppress_tokens=list(config.suppress_tokens), begin_suppress_tokens=list(config.begin_suppress_tokens),
        alignment_heads=[list(map(int, head)) for head in heads], **languages,
    )


def hf_tokenizer(source: Path, vocab_size: int):
    """The source's tokenizer.json as a WhisperTokenizer, with the timestamp tokens the model's vocabulary ends with,
    checked id for id against CTranslate2's vocabulary.txt when there is one."""
    from tokenizers import Tokenizer
    from transformers import WhisperTokenizerFast

    if not (source / "tokenizer.json").is_file():
        raise ConversionError(f"{source} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    base = tokenizer.get_vocab_size(with_added_tokens=True)
    if base + TIMESTAMP_COUNT == vocab_size and tokenizer.token_to_id("<|0.00|>") is None:
        tokenizer.add_tokens([f"<|{index * 0.02:.2f}|>" for index in range(TIMESTAMP_COUNT)])
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise ConversionError(f"tokenizer.json has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens with "
                              f"the timestamps; the model's vocabulary has {vocab_size}")
    vocabulary = source / "vocabulary.txt"
    if vocabulary.is_file():
        expected = vocabulary.read_text(encoding="utf-8").split("\n")[:vocab_size]
        ordinary = tokenizer.get_vocab_size(with_added_tokens=False)
        # vocabulary.txt holds byte-level tokens as tokenizer.json does; compare every id.
        mismatched = [i for i, token in enumerate(expected) if tokenizer.id_to_token(i) != token]
        if mismatched:
            raise ConversionError(f"tokenizer.json and vocabulary.txt disagree at {len(mismatched)} ids, first "
                                  f"{mismatched[0]} ({tokenizer.id_to_token(mismatched[0])!r} against "
                                  f"{expected[mismatched[0]]!r}; {ordinary} ordinary tokens)")
    added = [token for token, _ in sorted(((t.content, i) for i, t in tokenizer.get_added_tokens_decoder().items()
                                          if t.special), key=lambda item: item[1])]
    special = [token for token in added if token != "<|endoftext|>"]
    return WhisperTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", additional_special_tokens=special,
        add_prefix_space=False, model_max_length=1024, errors="replace",
    )


def convert(source: str | Path, destination: str | Path, dtype: str = "float32") -> Path:
    """Writes the Hugging Face checkpoint into `destination` (replaced whole, so a failed run leaves nothing half
    written) and returns it."""
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    source, destination = Path(source), Path(destination)
    if not (source / "model.bin").is_file():
        raise ConversionError(f"{source} has no model.bin (a CTranslate2 model folder has model.bin, config.json "
                              "and tokenizer.json)")
    ct2_config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    model = read_model_bin(source / "model.bin")
    tensors, encoder_layers, decoder_layers = hf_tensors(model)
    vocab_size = int(model.variables["decoder/embeddings/weight"].shape[0])
    tokenizer = hf_tokenizer(source, vocab_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>",
            "<|notimestamps|>")}
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    config = hf_config(model, encoder_layers, decoder_layers, ids, ct2_config)
    generation = generation_config(config, ids, ct2_config, id_to_token)

    # The architecture's own state dict (on the meta device: names and shapes, no memory) must be filled exactly.
    with torch.device("meta"):
        expected = WhisperForConditionalGeneration(config).state_dict()
    expected.pop("proj_out.weight")  # tied to model.decoder.embed_tokens.weight
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"weights missing: {missing[:5]}; not in the architecture: {unexpected[:5]}")
    for name, array in tensors.items():
        if tuple(array.shape) != tuple(expected[name].shape):
            raise ConversionError(f"{name}: {tuple(array.shape)} where the architecture has {tuple(expected[name].shape)}")
    target = {"float32": np.float32, "float16": np.float16}[dtype]
    if dtype == "float16" and any(a.dtype == np.float32 for a in tensors.values()):
        raise ConversionError("--dtype float16 would round float32 weights; convert to float32")
    state = {name: torch.from_numpy(np.ascontiguousarray(array.astype(target))) for name, array in tensors.items()}
    config.dtype = dtype

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(staging)
        generation.save_pretrained(staging)
        preprocessor = source / "preprocessor_config.json"
        extractor = (WhisperFeatureExtractor.from_pretrained(source) if preprocessor.is_file()
                     else WhisperFeatureExtractor(feature_size=config.num_mel_bins))
        WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(staging)
        extractor.save_pretrained(staging)
        for path in (staging, *staging.iterdir()):  # mkdtemp and safetensors make them private; a checkpoint is not
            path.chmod(0o755 if path.is_dir() else 0o644)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination
