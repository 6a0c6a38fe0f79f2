"""Does the CPU side starve the decode loop? Measures, on one server, the decode step time with every slot busy
and the HTTP side quiet (one long file decoding), then the same under a burst of concurrent requests (uploads,
audio decoding, pipe traffic at once), and how fast the event loop answers /healthz meanwhile.

CPU (tiny random-weight model):            python service/bench/burst.py
GPU (large-v3 shapes, random FP16 weights): python service/bench/burst.py --gpu

Every window decodes exactly --new-tokens tokens (--fixed-new-tokens), so both phases do the same work per step.
Step times come from the server's own whisper_decode_step_seconds, counted only over intervals in which windows
were waiting for a slot throughout (all slots busy), so ramp-up steps over fewer slots do not flatter either phase.
The burst's clients are one asyncio thread and the probes run in their own process, so that on a small machine the
load generator's threads do not take the CPU from the server being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench import Server, admission_args, speech_like_samples, wav_bytes


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text  # on the metrics port
    wanted = ("whisper_decode_step_seconds_sum", "whisper_decode_step_seconds_count", "whisper_queue_depth",
              "whisper_batch_size_sum")
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) for name in wanted}


class Probe:
    """Polls /healthz every 20 ms and /metrics every 100 ms, from its own process, while a phase runs."""

    def __init__(self, url: str, metrics_url: str):
        self.url, self.metrics_url = url, metrics_url
        self.health_ms: list[float] = []
        self.samples: list[dict[str, float]] = []

    def __enter__(self):
        context = multiprocessing.get_context("spawn")
        self.results, sender = context.Pipe(duplex=False)
        self.stop = context.Event()
        self.process = context.Process(target=_probe, args=(self.url, self.metrics_url, self.stop, sender), daemon=True)
        self.process.start()
        sender.close()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.health_ms, self.samples = self.results.recv()
        self.process.join()

    def full_slot_steps(self, slots: int) -> tuple[int, float]:
        """(steps, mean seconds) over the intervals between metric samples during which windows were waiting for
        a slot at both ends and every step ran all slots."""
        steps, seconds = 0, 0.0
        for before, after in zip(self.samples, self.samples[1:]):
            count = after["whisper_decode_step_seconds_count"] - before["whisper_decode_step_seconds_count"]
            busy = after["whisper_batch_size_sum"] - before["whisper_batch_size_sum"]
            if count and before["whisper_queue_depth"] > 0 and after["whisper_queue_depth"] > 0 and busy == count * slots:
                steps += int(count)
                seconds += after["whisper_decode_step_seconds_sum"] - before["whisper_decode_step_seconds_sum"]
        return steps, seconds / steps if steps else float("nan")

    def summary(self, label: str, slots: int, **extra) -> dict:
        steps, mean = self.full_slot_steps(slots)
        health = sorted(self.health_ms)
        return {"phase": label, **extra, "full_slot_steps": steps, "step_ms": round(mean * 1000, 2),
                "healthz_probes": len(health), "healthz_p50_ms": round(statistics.median(health), 1),
                "healthz_p99_ms": round(health[int(len(health) * 0.99)], 1), "healthz_max_ms": round(health[-1], 1)}


def _probe(url: str, metrics_url: str, stop, results) -> None:
    health_ms: list[float] = []
    samples: list[dict[str, float]] = []

    def scrape() -> None:
        with httpx.Client(base_url=metrics_url, timeout=30) as client:
            while not stop.wait(0.1):
                samples.append(metrics(client))

    scraper = threading.Thread(target=scrape)
    scraper.start()
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.wait(0.02):
            started = time.perf_counter()
            client.get("/healthz")
            health_ms.append((time.perf_counter() - started) * 1000)
    scraper.join()
    results.send((health_ms, samples))


def post(url: str, audio: bytes) -> int:
    with httpx.Client(base_url=url, timeout=900) as client:
        return client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", audio, "audio/wav")},
                           data={"language": "en"}).status_code


async def post_all(url: str, clips: list[bytes]) -> list[int]:
    """Every clip at once, from one thread."""
    limits = httpx.Limits(max_connections=len(clips))
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def one(clip: bytes) -> int:
            response = await client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", clip, "audio/wav")},
                                         data={"language": "en"})
            return response.status_code

        return await asyncio.gather(*(one(clip) for clip in clips))


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="large-v3 shapes, random weights, FP16 on CUDA")
    parser.add_argument("--model", help="checkpoint directory (default: a random-weight one written for the run)")
    parser.add_argument("--slots", type=int, default=16, help="--max-batch-size of the server")
    parser.add_argument("--requests", type=int, default=64, help="concurrent requests in the burst")
    parser.add_argument("--clip-seconds", type=float, default=30.0, help="audio per burst request (one window)")
    parser.add_argument("--quiet-windows", type=int, help="windows of the quiet phase's one file (default 4 x slots)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per window, fixed")
    parser.add_argument("--cpu-threads", type=int, default=1, help="CPU: torch threads in the engine process")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="whisper-burst-"))
    model = args.model or str(workdir / "model")
    if not args.model:
        subprocess.run(["whisper-server", "make-test-model", model, "--architecture", "large-v3" if args.gpu else "tiny"],
                       check=True, stdout=subprocess.DEVNULL)
    device = ["--device", "cuda", "--dtype", "float16"] if args.gpu else ["--device", "cpu", "--cpu-threads",
                                                                         str(args.cpu_threads)]
    quiet_windows = args.quiet_windows or 4 * args.slots
    clip = wav_bytes(speech_like_samples(args.clip_seconds))
    server = Server(["--model", model, *device, "--max-batch-size", str(args.slots), "--max-new-tokens",
                     str(args.new_tokens), "--fixed-new-tokens", "--request-timeout-seconds", "3600",
                     "--max-upload-mb", "1024", *admission_args(args.requests, clip, args.clip_seconds, quiet_windows * 30)],
                    workdir / "server.log")
    url, metrics_url = server.url, server.metrics_url
    try:
        server.wait_ready(900)
        post(url, wav_bytes(speech_like_samples(5)))  # warm the HTTP path
        results = []

        long_file = wav_bytes(speech_like_samples(quiet_windows * 29.5))
        with Probe(url, metrics_url) as probe:
            status = post(url, long_file)
        results.append(probe.summary("quiet: one long file", args.slots, requests=1,
                                     audio_seconds=round(quiet_windows * 29.5), failures=int(status != 200)))
        print(json.dumps(results[-1]), flush=True)

        with Probe(url, metrics_url) as probe:
            statuses = asyncio.run(post_all(url, [clip] * args.requests))
        results.append(probe.summary(f"burst: {args.requests} concurrent clips", args.slots, requests=args.requests,
                                     audio_seconds=round(args.requests * args.clip_seconds),
                                     failures=sum(status != 200 for status in statuses)))
        print(json.dumps(results[-1]), flush=True)
    finally:
        server.stop()

    quiet, burst = results
    print(f"\n{'gpu' if args.gpu else 'cpu'}, {args.slots} slots, {args.new_tokens} tokens per window, "
          f"{os.cpu_count()} CPUs, load average after {os.getloadavg()[0]:.2f}\n")
    print("| phase | step ms (all slots busy) | steps measured | /healthz p50 ms | p99 ms | max ms | failures |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['phase']} | {r['step_ms']} | {r['full_slot_steps']} | {r['healthz_p50_ms']} | "
              f"{r['healthz_p99_ms']} | {r['healthz_max_ms']} | {r['failures']} |")
    print(f"\nstep time under the burst: {burst['step_ms'] / quiet['step_ms']:.2f}x the quiet value")


if __name__ == "__main__":
    main()
