r"""The first run of the engine on a GPU, as one command that fits a short device lease (8 minutes in all): each
level runs in its own process under its own time bound, and the summary (JSON and Markdown) is rewritten after
every level, so a level that fails or runs out of time still leaves what the others measured. It reports:

- whether the decode step can be captured as CUDA graphs (else the error, and the rest runs without graphs);
- which attention backend each attention is dispatched to (encoder self-attention, decoder self- and cross-attention);
- the share of windows whose greedy tokens equal transformers' generate (FP16 on the GPU; service/bench/exactness.py);
- the server over HTTP: RTFx and p50/p95 at concurrency 1, 32 and 64 (64 slots), single-clip p50, the time from its
  start to ready; beside it, the transformers ASR pipeline at batch 32, in the same run;
- live sessions (/v1/realtime) at real-time pace, 1, 8 and 32 at once: turn latency p50/p95 and time to the first
  delta, beside one transformers generate call per turn per session in the same run (service/bench/realtime_bench.py);
- peak GPU memory (nvidia-smi, and torch's peak in the engine level), and the issue's targets.

GPU (random-weight large-v3, FP16, 30 s clips, 64 tokens per window), on the device from the repository root with
`.whl` carried (see ../shared/gpu/README.md; the wrapper installs the wheels and writes the checkpoint):
    bash service/bench/gpu_check.sh                    # results in $OUT (or service/bench/gpu-check)
CPU dry run (tiny random-weight model, 1 s clips, 13 tokens; every level, a minute or two):
    python service/bench/gpu_check.py --device cpu --output /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (service/bench/bench.py: the server, the load generator, the pipeline baseline)
import realtime_bench  # noqa: E402  (live sessions beside generate per turn)

# The targets on one H100/H200, random-weight large-v3, 30 s clips, 64 tokens a window.
TARGETS = {"rtfx_at_32": 1000, "rtfx_at_64": 2000, "pipeline_multiple": 10, "single_clip_p50_ms": 250,
           "p95_over_p50_at_32": 3}
# Seconds each level may take at most (GPU; the CPU dry run uses the same shares of a smaller budget).
LEVEL_SECONDS = {"model": 65, "engine": 100, "server": 145, "pipeline": 60, "realtime": 90}
DEFAULT_BUDGET_SECONDS = 480
CONCURRENCY = (1, 32, 64)
REALTIME_SESSIONS = (1, 8, 32)
PIPELINE_BATCH = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", type=Path, help="checkpoint directory, written if missing (default /tmp/lv3 on "
                                                   "cuda, a tiny one under --output on cpu)")
    parser.add_argument("--output", type=Path, default=HERE / "gpu-check", help="folder for the summaries and logs")
    parser.add_argument("--budget-seconds", type=float, help="the whole run, seconds (default 480)")
    parser.add_argument("--slots", type=int, help="the server's --max-batch-size (default 64 on cuda, 8 on cpu)")
    parser.add_argument("--exact-windows", type=int, help="windows compared with generate (default 16; 4 on cpu)")
    parser.add_argument("--level-seconds", type=float, help="a load level starts no request after this "
                                                            "(default 20 on cuda, 15 on cpu)")
    parser.add_argument("--realtime-sessions", default=",".join(map(str, REALTIME_SESSIONS)),
                        help="live session counts of the realtime level, comma-separated (default 1,8,32)")
    parser.add_argument("--realtime-turns", type=int, default=2, help="turns each live session speaks (default 2)")
    parser.add_argument("--level", help=argparse.SUPPRESS)  # internal: run one level in this process
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.model = args.model or (Path("/tmp/lv3") if gpu else args.output / "tiny-model")
    args.budget_seconds = args.budget_seconds or float(DEFAULT_BUDGET_SECONDS)
    args.realtime_sessions = tuple(int(count) for count in args.realtime_sessions.split(","))
    args.slots = args.slots or (64 if gpu else 8)
    args.exact_windows = args.exact_windows or (16 if gpu else 4)
    args.level_seconds = args.level_seconds or (20.0 if gpu else 15.0)
    args.clip_seconds = 30.0 if gpu else 1.0
    args.new_tokens = 64 if gpu else 13
    return args


# The levels, each run in its own process: `gpu_check.py --level NAME`, writing level-NAME.json as it goes ----------

class LevelResult:
    """A level's results, written to its file after every change, so a level killed at its time bound keeps them."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def set(self, **values) -> None:
        self.data.update(values)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def level_model(args: argparse.Namespace, result: LevelResult) -> None:
    from whisper_server.test_model import make_test_model

    started = time.monotonic()
    if (args.model / "model.safetensors").exists():
        result.set(written=False, path=str(args.model))
        return
    make_test_model(args.model, "large-v3" if args.device == "cuda" else "tiny")
    result.set(written=True, path=str(args.model), seconds=round(time.monotonic() - started, 1))


def level_engine(args: argparse.Namespace, result: LevelResult, cuda_graphs: bool) -> None:
    """The engine in this process: load, capture, warm-up (every admission shape), the attention backends, then
    the exactness share, windows one by one until the level's share of time is spent."""
    import random

    import torch

    from whisper_server.decoding import DecodeOptions
    from whisper_server.engine import WhisperEngine
    from whisper_server.verify import decode_windows, reference_tokens, synthetic_clip

    gpu = args.device == "cuda"
    deadline = time.monotonic() + args.engine_seconds * 0.85
    if not gpu:
        torch.set_num_threads(1)  # near-ties flip with the summation order
    started = time.monotonic()
    engine = WhisperEngine(str(args.model), device=args.device, dtype="float16" if gpu else "float32",
                           max_new_tokens=args.new_tokens, slots=args.slots, cuda_graphs=cuda_graphs)
    engine.load()
    result.set(cuda_graphs=cuda_graphs, load_seconds=round(time.monotonic() - started, 2))
    try:
        engine.warm_up()
    except Exception as error:  # noqa: BLE001 - a capture, or a replay of it in the warm-up decode, failed
        if gpu and cuda_graphs:
            cause = error.__cause__ or error
            result.set(capture={"works": False, "error": f"{type(cause).__name__}: {cause}"})
            raise SystemExit(3)  # the context may be broken: the orchestrator runs this level again without graphs
        raise
    graphs = len(engine.decoder.graphs)
    works = bool(graphs) if gpu and cuda_graphs else None  # CPU steps run eagerly: nothing to capture
    result.set(capture={"works": works, "graphs": graphs, "error": "no graphs captured" if works is False else None},
               attention_backends=engine.attention_backends, ready_seconds=round(time.monotonic() - started, 2),
               admission_sizes=engine.decoder.admission_sizes, prefill_widths=engine.decoder.widths)

    rng = random.Random(0)
    windows, expected = [], []
    prompts = (None, None, "hello world", "the quick brown fox jumps over the lazy dog")
    while len(windows) < args.exact_windows and time.monotonic() < deadline:
        options = DecodeOptions(task=rng.choice(("transcribe", "translate")),
                                language=rng.choice(("en", "de", "fr", "ja", None)), prompt=rng.choice(prompts))
        window = (synthetic_clip(len(windows), rng.uniform(1.0, 30.0)), options)
        expected.append(reference_tokens(engine, *window))
        windows.append(window)
    if windows:
        got = decode_windows(engine, windows, joins=sorted(rng.randrange(0, 2 * args.new_tokens) for _ in windows))
        equal = sum(a == b for a, b in zip(got, expected))
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(got, expected) if a != b]
        result.set(exactness={"windows": len(windows), "equal": equal, "equal_share": round(equal / len(windows), 3),
                              "first_difference_at": first, "asked": args.exact_windows})
    if gpu:
        result.set(torch_peak_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20))


def level_server(args: argparse.Namespace, result: LevelResult, cuda_graphs: bool) -> None:
    """`whisper-server serve` over HTTP: time to ready, then each concurrency, kept as it finishes."""
    gpu = args.device == "cuda"
    samples = bench.speech_like_samples(args.clip_seconds)
    clip = bench.wav_bytes(samples)
    server_args = ["--model", str(args.model), "--device", args.device, "--max-batch-size", str(args.slots),
                   "--max-new-tokens", str(args.new_tokens), "--fixed-new-tokens",
                   "--cuda-graphs", "true" if cuda_graphs else "false",
                   *bench.admission_args(max(CONCURRENCY), clip, args.clip_seconds)]
    server_args += ["--dtype", "float16"] if gpu else ["--cpu-threads", "1"]
    server = bench.Server(server_args, args.output / "server.log")
    levels = []
    try:
        result.set(server_args=server_args, cuda_graphs=cuda_graphs,
                   ready_seconds=round(server.wait_ready(timeout=args.server_seconds * 0.6), 1))
        bench.run_server_level(bench.Level("warm-up", 2, args.clip_seconds), server.url, clip, 2, 0.0, math.inf)
        for concurrency in CONCURRENCY:
            level = bench.Level("server", concurrency, args.clip_seconds)
            memory = bench.GpuMemorySampler() if gpu and shutil.which("nvidia-smi") else None
            bench.run_server_level(level, server.url, clip, requests_for(concurrency, gpu), 0.0,
                                   time.perf_counter() + args.level_seconds)
            extra = {"slots": args.slots}
            if memory is not None:
                extra["gpu_memory_peak_mib"] = memory.stop()
            levels.append(level.summary(**extra))
            result.set(levels=levels)
    finally:
        server.stop()


def level_pipeline(args: argparse.Namespace, result: LevelResult) -> None:
    """transformers' ASR pipeline at batch 32 on the same checkpoint and clip, in this process."""
    gpu = args.device == "cuda"
    if not gpu:
        import torch

        torch.set_num_threads(1)
    samples = bench.speech_like_samples(args.clip_seconds)
    started = time.monotonic()
    baseline = bench.PipelineBaseline(str(args.model), args.device, args.new_tokens, 0.0)
    baseline.transcribe(samples, 2, 2)  # warm-up
    result.set(load_seconds=round(time.monotonic() - started, 1))
    level = bench.Level(f"pipeline, batch {PIPELINE_BATCH}", PIPELINE_BATCH, args.clip_seconds)
    memory = bench.GpuMemorySampler() if gpu and shutil.which("nvidia-smi") else None
    extra = baseline.run_level(level, samples, PIPELINE_BATCH, 2 * PIPELINE_BATCH, time.perf_counter() + args.level_seconds)
    if memory is not None:
        extra["gpu_memory_peak_mib"] = memory.stop()
    result.set(level=level.summary(**extra))


def level_realtime(args: argparse.Namespace, result: LevelResult, cuda_graphs: bool) -> None:
    """Live sessions at real-time pace and generate per turn, level by level (service/bench/realtime_bench.py)."""
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        result.set(levels=rows)

    server_args = ["--max-batch-size", str(max(args.slots, *args.realtime_sessions))]
    if args.device == "cuda":
        server_args += ["--cuda-graphs", "true" if cuda_graphs else "false"]
    result.set(manual_commits=not realtime_bench.speech_available(), turns_per_session=args.realtime_turns)
    realtime_bench.run(str(args.model), args.device, args.output / "realtime", args.realtime_sessions,
                       new_tokens=args.new_tokens, server_args=server_args, threads=1, turns=args.realtime_turns,
                       record=record)


def requests_for(concurrency: int, gpu: bool) -> int:
    return max(8, 2 * concurrency) if gpu else max(4, concurrency)


def run_level(args: argparse.Namespace) -> None:
    name, _, variant = args.level.partition(":")
    result = LevelResult(args.output / f"level-{args.level.replace(':', '-')}.json")
    cuda_graphs = variant != "eager"
    try:
        if name == "model":
            level_model(args, result)
        elif name == "engine":
            level_engine(args, result, cuda_graphs)
        elif name == "server":
            level_server(args, result, cuda_graphs)
        elif name == "pipeline":
            level_pipeline(args, result)
        elif name == "realtime":
            level_realtime(args, result, cuda_graphs)
    except SystemExit:
        raise
    except BaseException as error:
        result.set(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
        raise SystemExit(1) from error


# The orchestrator --------------------------------------------------------------------------------------------------

class Check:
    """Runs the levels in order, each bounded by its share of what is left of the budget, and rewrites the
    summaries after each."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args, self.argv = args, argv
        self.started = time.monotonic()
        self.levels: dict[str, dict] = {}
        self.status: dict[str, dict] = {}
        scale = args.budget_seconds / DEFAULT_BUDGET_SECONDS
        self.bounds = {name: seconds * scale for name, seconds in LEVEL_SECONDS.items()}

    def remaining(self) -> float:
        return self.args.budget_seconds - (time.monotonic() - self.started)

    def run(self, level: str) -> int | None:
        name = level.partition(":")[0]
        bound = min(self.bounds[name], self.remaining() - 5)
        path = self.args.output / f"level-{level.replace(':', '-')}.json"
        path.unlink(missing_ok=True)
        if bound < 10:
            self.status[level] = {"status": "skipped", "reason": "the budget ran out"}
            self.write()
            return None
        print(f"== level {level} (at most {bound:.0f} s)", flush=True)
        started = time.monotonic()
        command = [sys.executable, str(Path(__file__)), *self.argv, "--level", level]
        environment = {**os.environ, "GPU_CHECK_LEVEL_SECONDS": str(bound)}
        with open(self.args.output / f"level-{level.replace(':', '-')}.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=bound)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)  # the level and the server it started
                process.wait()
                code, status = None, f"timed out after {bound:.0f} s"
        self.levels[level] = json.loads(path.read_text()) if path.exists() else {}
        self.status[level] = {"status": status, "seconds": round(time.monotonic() - started, 1)}
        if "error" in self.levels[level]:
            self.status[level]["error"] = self.levels[level]["error"]
        print(f"   {status} in {self.status[level]['seconds']} s", flush=True)
        self.write()
        return code

    def main(self) -> dict:
        self.run("model")
        graphs = self.run("engine") == 0
        if not graphs and self.args.device == "cuda":  # capture failed (or never finished): the rest runs eagerly
            self.run("engine:eager")
        self.run("server" if graphs or self.args.device != "cuda" else "server:eager")
        self.run("pipeline")
        self.run("realtime" if graphs or self.args.device != "cuda" else "realtime:eager")
        return self.write()

    def write(self) -> dict:
        summary = summarize(self.args, self.levels, self.status, round(time.monotonic() - self.started, 1))
        (self.args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.args.output / "summary.md").write_text(markdown(summary))
        return summary


def summarize(args: argparse.Namespace, levels: dict[str, dict], status: dict[str, dict], elapsed: float) -> dict:
    engine = levels.get("engine", {})
    capture = engine.get("capture") or {}
    measured = levels.get("engine:eager") or engine
    server = levels.get("server") or levels.get("server:eager") or {}
    rows = {row["concurrency"]: row for row in server.get("levels", [])}
    pipeline = (levels.get("pipeline") or {}).get("level")
    peaks = [row.get("gpu_memory_peak_mib") for row in [*rows.values(), pipeline or {}]]
    peaks = [peak for peak in peaks if peak]
    summary = {
        "device": args.device, "machine": bench.machine(),
        "model": "large-v3 architecture, random FP16 weights" if args.device == "cuda" else "tiny random-weight model",
        "slots": args.slots, "clip_seconds": args.clip_seconds, "new_tokens_per_window": args.new_tokens,
        "capture": {"works": capture.get("works"), "error": capture.get("error"), "graphs": capture.get("graphs")},
        "attention_backends": measured.get("attention_backends"),
        "exactness": measured.get("exactness"),
        "engine_ready_seconds": measured.get("ready_seconds"),
        "server_start_to_ready_seconds": server.get("ready_seconds"),
        "server": [rows[c] for c in sorted(rows)], "pipeline": pipeline,
        "single_clip_p50_ms": rows.get(1, {}).get("p50_ms"),
        "gpu_memory_peak_mib": max(peaks) if peaks else None,
        "engine_torch_peak_allocated_mib": measured.get("torch_peak_allocated_mib"),
        "realtime": (levels.get("realtime") or levels.get("realtime:eager") or {}).get("levels", []),
        "realtime_manual_commits": (levels.get("realtime") or levels.get("realtime:eager") or {}).get("manual_commits"),
        "levels": status, "elapsed_seconds": elapsed,
    }
    best = rows.get(32)
    summary["pipeline_multiple"] = (round(best["rtfx"] / pipeline["rtfx"], 2)
                                    if best and pipeline and pipeline.get("rtfx") else None)
    summary["targets"] = targets(summary, rows)
    return summary


def targets(summary: dict, rows: dict[int, dict]) -> list[dict]:
    """The issue's targets, each with what was measured; a level that lost requests meets none."""
    checks = []
    for concurrency, key in ((32, "rtfx_at_32"), (64, "rtfx_at_64")):
        if concurrency in rows:
            row = rows[concurrency]
            checks.append((f"RTFx at concurrency {concurrency} >= {TARGETS[key]}", row["rtfx"],
                           row["rtfx"] >= TARGETS[key] and not row["failures"]))
    if summary["pipeline_multiple"] is not None:
        checks.append((f"server / pipeline at batch 32 >= {TARGETS['pipeline_multiple']}x",
                       summary["pipeline_multiple"], summary["pipeline_multiple"] >= TARGETS["pipeline_multiple"]))
    if summary["single_clip_p50_ms"] is not None:
        checks.append((f"single-clip p50 <= {TARGETS['single_clip_p50_ms']} ms", summary["single_clip_p50_ms"],
                       summary["single_clip_p50_ms"] <= TARGETS["single_clip_p50_ms"] and not rows[1]["failures"]))
    if 32 in rows and rows[32]["p50_ms"]:
        multiple = round(rows[32]["p95_ms"] / rows[32]["p50_ms"], 2)
        checks.append((f"p95 / p50 at concurrency 32 <= {TARGETS['p95_over_p50_at_32']}", multiple,
                       multiple <= TARGETS["p95_over_p50_at_32"]))
    return [{"target": name, "measured": value, "met": met} for name, value, met in checks]


def markdown(summary: dict) -> str:
    capture = summary["capture"]
    captured = {True: f"yes ({capture['graphs']} graphs)", False: f"**no**: {capture['error']}",
                None: "not tried (CPU)" if summary["device"] == "cpu" else "not measured"}[capture["works"]]
    exact = summary["exactness"]
    lines = [f"# GPU check: {summary['model']}, {summary['machine']['gpu'] or summary['device']}", "",
             f"{summary['slots']} slots, {summary['clip_seconds']:g} s clips, {summary['new_tokens_per_window']} tokens "
             f"per window; torch {summary['machine']['torch']}, transformers {summary['machine']['transformers']}; "
             f"{summary['elapsed_seconds']} s in all", "",
             f"- CUDA-graph capture works: {captured}",
             "- Attention backends: " + ("; ".join(f"{name}: {', '.join(backends) or 'none seen'}"
                                                  for name, backends in summary["attention_backends"].items())
                                         if summary["attention_backends"] else "not measured"),
             "- Windows whose tokens equal generate's: " + (f"{exact['equal']}/{exact['windows']} "
                                                           f"({exact['equal_share']:.0%})" if exact else "not measured"),
             f"- Start to ready: server {summary['server_start_to_ready_seconds']} s, "
             f"engine in-process {summary['engine_ready_seconds']} s",
             f"- Single-clip p50: {summary['single_clip_p50_ms']} ms",
             f"- Peak GPU memory: {summary['gpu_memory_peak_mib']} MiB (nvidia-smi), engine torch peak "
             f"{summary['engine_torch_peak_allocated_mib']} MiB", "",
             "| configuration | concurrency | requests | RTFx | p50 ms | p95 ms | failures | GPU peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in summary["server"] + ([summary["pipeline"]] if summary["pipeline"] else []):
        lines.append(f"| {row['configuration']} | {row['concurrency']} | {row['requests']} | {row['rtfx']} | "
                     f"{row['p50_ms']} | {row['p95_ms']} | {row['failures']} | {row.get('gpu_memory_peak_mib', '')} |")
    if summary["realtime"]:
        lines += ["", "Live sessions at real-time pace" + (" (manual commits: no espeak-ng here)" if summary["realtime_manual_commits"] else "")
                  + "; latency from each turn's end of speech + 500 ms:", "",
                  "| system | sessions | turns | turn latency p50 ms | p95 ms | first delta p50 ms | p95 ms | failures |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in summary["realtime"]:
            lines.append(f"| {row['system']} | {row['sessions']} | {row['turns']}/{row['expected_turns']} | "
                         f"{row['latency_p50_ms']} | {row['latency_p95_ms']} | {row['first_delta_p50_ms']} | "
                         f"{row['first_delta_p95_ms']} | {row['failures']} |")
    lines.append("")
    for target in summary["targets"]:
        lines.append(f"- {target['target']}: {target['measured']} ({'met' if target['met'] else 'NOT met'})")
    lines += ["", "| level | status | seconds |", "| --- | --- | ---: |"]
    for level, status in summary["levels"].items():
        lines.append(f"| {level} | {status['status']}{': ' + status['error'] if status.get('error') else ''} | "
                     f"{status.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.level:
        bound = float(os.environ.get("GPU_CHECK_LEVEL_SECONDS", "120"))
        args.engine_seconds = args.server_seconds = bound
        run_level(args)
        return
    summary = Check(args, argv).main()
    print((args.output / "summary.md").read_text())
    print(f"summaries: {args.output / 'summary.json'}, {args.output / 'summary.md'}")
    if summary["capture"]["works"] is False:
        print("capture failed: the rest was measured with --cuda-graphs false")


if __name__ == "__main__":
    main()
