"""Load generator for whisper-server: RTFx (audio seconds per wall second) and p50/p95 latency at several
concurrency levels, with cross-request batching on and with --max-batch-size 1, in the same run.

CPU (tiny random-weight model, 1 s clips):   python service/bench/bench.py
GPU (large-v3 shapes, random FP16 weights):   python service/bench/bench.py --gpu
Results go to service/bench/results-<mode>.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).parent
SAMPLE_RATE = 16_000


def speech_like_clip(seconds: float) -> bytes:
    """A voiced, syllable-rate-modulated harmonic signal as WAV bytes: never silence, so every window is decoded."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    samples = 0.2 * voiced * envelope / np.max(np.abs(voiced))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(SAMPLE_RATE)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.process = subprocess.Popen(["whisper-server", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        sys.exit(f"server not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.close()


class GpuMemorySampler:
    """Peak GPU memory in use (nvidia-smi: the caching allocator included), sampled every 100 ms."""

    def __init__(self):
        self.peak_mib, self.stopped = 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.stopped.wait(0.1):
            output = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True).stdout.split()
            if output:
                self.peak_mib = max(self.peak_mib, int(output[0]))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()


def run_level(url: str, clip: bytes, clip_seconds: float, concurrency: int, requests: int) -> dict:
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def worker(count: int):
        nonlocal failures
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(count):
                started = time.perf_counter()
                response = client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", clip, "audio/wav")},
                                       data={"model": "whisper-1", "language": "en"})
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        failures += 1

    shares = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, shares))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency, "requests": requests, "failures": failures, "wall_seconds": round(wall, 3),
        "rtfx": round(len(latencies) * clip_seconds / wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p95_ms": round(latencies[max(0, int(len(latencies) * 0.95) - 1)] * 1000, 1),
    }


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers started below are stopped on the way out
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="large-v3 shapes, random weights, FP16 on CUDA")
    parser.add_argument("--model", help="checkpoint directory (default: a random-weight one written for the run)")
    parser.add_argument("--clip-seconds", type=float, help="length of each request's audio (default 1 on CPU, 30 on GPU)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, help="requests per concurrency level (default 64 on CPU, 128 on GPU)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching configuration's batch size")
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count(), help="CPU: torch threads in the server (default: one per CPU)")
    parser.add_argument("--new-tokens", type=int, default=64, help="GPU: tokens decoded per window, fixed")
    parser.add_argument("--output", type=Path, help="results path without extension (default bench/results-<mode>)")
    args = parser.parse_args()

    mode = "gpu" if args.gpu else "cpu"
    clip_seconds = args.clip_seconds or (30.0 if args.gpu else 1.0)
    requests = args.requests or (128 if args.gpu else 64)
    output = args.output or HERE / f"results-{mode}"
    workdir = Path(tempfile.mkdtemp(prefix="whisper-bench-"))
    model = args.model
    if model is None:
        model = str(workdir / ("whisper-large-v3-random" if args.gpu else "whisper-tiny-random"))
        subprocess.run(["whisper-server", "make-test-model", model, "--architecture", "large-v3" if args.gpu else "tiny"],
                       check=True, stdout=subprocess.DEVNULL)
    device_args = ["--device", "cuda", "--dtype", "float16", "--max-new-tokens", str(args.new_tokens),
                   "--fixed-new-tokens"] if args.gpu else ["--device", "cpu", "--cpu-threads", str(args.cpu_threads)]
    clip = speech_like_clip(clip_seconds)

    configurations = {"batching": args.max_batch_size, "batch size 1": 1}
    results = []
    for label, batch_size in configurations.items():
        server = Server(["--model", model, *device_args, "--max-batch-size", str(batch_size),
                         "--batch-wait-ms", str(args.batch_wait_ms), "--queue-size", "1024"],
                        workdir / f"server-{batch_size}.log")
        try:
            server.wait_ready()
            run_level(server.url, clip, clip_seconds, 2, 8)  # warm the HTTP path
            for concurrency in args.concurrency:
                with GpuMemorySampler() if args.gpu and shutil.which("nvidia-smi") else _no_sampler() as memory:
                    level = run_level(server.url, clip, clip_seconds, concurrency, requests)
                level.update(configuration=label, max_batch_size=batch_size)
                if memory is not None:
                    level["gpu_memory_peak_mib"] = memory.peak_mib
                results.append(level)
                print(json.dumps(level), flush=True)
        finally:
            server.stop()

    load = os.getloadavg()
    report = {
        "mode": mode, "model": "large-v3 architecture, random FP16 weights" if args.gpu else "tiny random-weight model",
        "clip_seconds": clip_seconds, "requests_per_level": requests, "new_tokens_per_window": args.new_tokens if args.gpu else "13 (the tiny model's cap)",
        "cpu_threads": None if args.gpu else args.cpu_threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_after": [round(x, 2) for x in load],
                    "gpu": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                          text=True).stdout.strip() if shutil.which("nvidia-smi") else None},
        "results": results,
    }
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    shutil.rmtree(workdir, ignore_errors=True)


class _no_sampler:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def markdown(report: dict) -> str:
    gpu = report["mode"] == "gpu"
    lines = [f"{report['model']}, {report['clip_seconds']:g} s clips, {report['requests_per_level']} requests per level, "
             f"{report['machine']['gpu'] or str(report['machine']['cpus']) + ' CPUs'}", "",
             "| configuration | concurrency | RTFx | p50 ms | p95 ms | failures |" + (" GPU peak MiB |" if gpu else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if gpu else "")]
    for r in report["results"]:
        lines.append(f"| {r['configuration']} | {r['concurrency']} | {r['rtfx']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['failures']} |" + (f" {r.get('gpu_memory_peak_mib', '')} |" if gpu else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
