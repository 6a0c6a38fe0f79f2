"""A stalled-head attack on whisper-server under a 1,024 open-files limit (soft and hard, as outside containers):
1,100 connections from 127.0.0.2-5 each send ~2 KB of a request head and never end it. For --seconds it samples,
once a second, the server's open descriptors and RSS, its log lines, whether /healthz answers on the port the
cluster's probes use, and how many attack connections the server has closed; one transcription is asked for 2 s in.

    python service/bench/stalled_connections.py --baseline /tmp/before/service

runs the server of this checkout and, beside it in the same invocation, the one at --baseline (a checkout's
service/ folder, e.g. `git worktree add /tmp/before <commit>`; there the probes used the API port). Tiny
random-weight model, defaults otherwise. One JSON line per server, then a Markdown table."""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SERVICE = Path(__file__).resolve().parents[1]
PAD = b"X-Pad: " + b"p" * 2000 + b"\r\n"
HEAD = b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n" + PAD


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def attack(code: Path, model: Path, speech: Path, probe_on_metrics_port: bool, seconds: int, folder: Path) -> dict:
    port, metrics_port = free_port(), free_port()
    log_path = folder / f"{code.parent.name}-{port}.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "whisper_server.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu", "--cpu-threads", "1"],
            env={**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    connections: list[socket.socket] = []
    try:
        for _ in range(1500):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        status = Path(f"/proc/{server.pid}/status")

        def descriptors() -> int:
            return len(os.listdir(f"/proc/{server.pid}/fd"))

        def rss_mb() -> int:
            return int(next(line for line in status.read_text().splitlines() if line.startswith("VmRSS")).split()[1]) // 1024

        def log_lines() -> int:
            return log_path.read_bytes().count(b"\n")

        before = {"descriptors": descriptors(), "rss_mb": rss_mb(), "log_lines": log_lines()}
        started = time.monotonic()
        for n in range(1100):
            connection = socket.socket()
            connection.bind((f"127.0.0.{2 + n % 4}", 0))
            connection.settimeout(3)
            try:
                connection.connect(("127.0.0.1", port))
                connection.sendall(HEAD)
            except OSError:
                connection.close()
                continue
            connection.setblocking(False)
            connections.append(connection)
        selector = selectors.DefaultSelector()
        for connection in connections:
            selector.register(connection, selectors.EVENT_READ)
        probe = f"http://127.0.0.1:{metrics_port if probe_on_metrics_port else port}/healthz"
        closed = probes_answered = probes_failed = peak_descriptors = peak_rss = 0
        transcription = None
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            for key, _ in selector.select(timeout=0):
                selector.unregister(key.fileobj)
                closed += 1
            try:
                answered = httpx.get(probe, timeout=2).status_code == 200
            except httpx.HTTPError:
                answered = False
            probes_answered, probes_failed = probes_answered + answered, probes_failed + (not answered)
            if transcription is None and tick - started > 2:
                try:
                    with open(speech, "rb") as handle:
                        transcription = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                                                   files={"file": ("speech.wav", handle)}, timeout=20).status_code
                except httpx.HTTPError as error:
                    transcription = type(error).__name__
            peak_descriptors, peak_rss = max(peak_descriptors, descriptors()), max(peak_rss, rss_mb())
            time.sleep(max(0.0, 1 - (time.monotonic() - tick)))
        return {"code": str(code), "before": before, "attack_connections": len(connections),
                "closed_by_server": closed, "still_open": len(connections) - closed, "peak_descriptors": peak_descriptors,
                "peak_rss_mb": peak_rss, "log_lines": log_lines() - before["log_lines"],
                "log_mb": round(log_path.stat().st_size / 2**20, 1), "probe_port": "metrics" if probe_on_metrics_port else "api",
                "probes_answered": probes_answered, "probes_failed": probes_failed, "transcription": transcription}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        for connection in connections:
            connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout's service/ folder, run beside this one")
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # this process holds the attack
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        subprocess.run([sys.executable, "-m", "whisper_server.cli", "make-test-model", str(folder / "model")],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(SERVICE)})
        subprocess.run(["espeak-ng", "-w", str(folder / "speech.wav"), "Hello, this is a test of the speech server."],
                       check=True)
        runs = [(SERVICE, True)] + ([(args.baseline.resolve(), False)] if args.baseline else [])
        results = []
        for code, on_metrics_port in runs:
            results.append(attack(code, folder / "model", folder / "speech.wav", on_metrics_port, args.seconds, folder))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n| server | still open after {args.seconds} s | peak descriptors | peak RSS MB | log lines (MB) | probes "
          "answered | transcription |\n| --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        print(f"| {result['code']} | {result['still_open']} of {result['attack_connections']} | "
              f"{result['peak_descriptors']} | {result['peak_rss_mb']} | {result['log_lines']} ({result['log_mb']}) | "
              f"{result['probes_answered']} of {result['probes_answered'] + result['probes_failed']} "
              f"({result['probe_port']} port) | {result['transcription']} |")


if __name__ == "__main__":
    main()
