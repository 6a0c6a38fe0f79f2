"""The share of windows whose greedy tokens (timestamps on) equal transformers' generate(..., return_timestamps=True,
force_unique_generate_call=True), with the windows decoded together in the slot engine and joining mid-decode.
On CPU in float32 the tests require them all equal on a fixed set; in FP16 on a GPU a different summation order
flips near-ties in random weights, so this reports the share and where the first difference falls.

CPU (tiny random-weight model):            python service/bench/exactness.py
GPU (large-v3 shapes, random FP16 weights): python service/bench/exactness.py --gpu
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from whisper_server.decoding import DecodeOptions
from whisper_server.engine import WhisperEngine
from whisper_server.test_model import make_test_model
from whisper_server.verify import decode_windows, reference_tokens, synthetic_clip

PROMPTS = ("hello world", "the quick brown fox jumps over the lazy dog", "Kubernetes on EKS with GPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="large-v3 shapes, random weights, FP16 on CUDA")
    parser.add_argument("--model", help="checkpoint directory (default: a random-weight one written for the run)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per window at most (transformers' rule)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = args.model
    if model is None:
        model = str(Path(tempfile.mkdtemp(prefix="whisper-exact-")) / "model")
        if args.gpu:  # the CLI writes it in float16, as the real checkpoint ships
            subprocess.run(["whisper-server", "make-test-model", model, "--architecture", "large-v3"], check=True,
                           stdout=subprocess.DEVNULL)
        else:
            make_test_model(model, init_std=0.4)
    if not args.gpu:
        torch.set_num_threads(1)  # near-ties flip with the summation order
    engine = WhisperEngine(model, device="cuda" if args.gpu else "cpu", dtype="float16" if args.gpu else "float32",
                           max_new_tokens=args.new_tokens, slots=args.slots)
    engine.load()
    engine.warm_up()

    rng = random.Random(args.seed)
    windows = []
    for index in range(args.windows):
        options = DecodeOptions(task=rng.choice(("transcribe", "translate")),
                                language=rng.choice(("en", "de", "fr", "ja", None)),
                                prompt=rng.choice((None, None) + PROMPTS))
        windows.append((synthetic_clip(args.seed * 1000 + index, rng.uniform(1.0, 30.0)), options))
    started = time.perf_counter()
    expected = [reference_tokens(engine, samples, options) for samples, options in windows]
    reference_seconds = time.perf_counter() - started
    started = time.perf_counter()
    got = decode_windows(engine, windows, joins=sorted(rng.randrange(0, 2 * args.new_tokens) for _ in windows))
    engine_seconds = time.perf_counter() - started
    equal = sum(a == b for a, b in zip(got, expected))
    first_differences = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                         for a, b in zip(got, expected) if a != b]
    print(json.dumps({
        "device": engine.device, "dtype": str(engine.dtype), "windows": len(windows), "equal": equal,
        "equal_share": round(equal / len(windows), 3), "tokens_per_window": statistics.mean(map(len, expected)),
        "first_difference_at": first_differences,
        "seconds": {"transformers_one_window_at_a_time": round(reference_seconds, 2),
                    "slot_engine_all_windows": round(engine_seconds, 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
