"""What decoded audio costs the HTTP process per second of audio: decoding an upload (PyAV) and finding its speech
(Silero VAD), the server's way beside the naive one (frames gathered in a list and concatenated, the detector's
inputs built as full-length copies), each in a fresh process.

    python service/bench/audio_memory.py [--seconds 300 900]

Each run decodes a 16 kHz 16-bit WAV of the given length and runs the detector over it, and reports the peak
resident memory it added (VmHWM, reset after the imports and a warm-up, less VmRSS then). The cost per second is the
slope between the two lengths, so the constant part (the detector's session, a block) does not count in it; the
server's figure (audio.DECODED_BYTES_PER_SECOND) is what the pod sizing uses (infra/server-limits.ts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_server.audio import DECODED_BYTES_PER_SECOND, decode_audio, map_large_buffers  # noqa: E402
from whisper_server.decoding import SAMPLE_RATE  # noqa: E402
from whisper_server.segmentation import (BLOCK_FRAMES, CONTEXT, FRAME, LEVEL_FLOOR, LEVEL_PERCENTILE,  # noqa: E402
                                         TARGET_PEAK, VoiceActivity)


def naive_decode(path: str) -> np.ndarray:
    """The frames in a list, concatenated at the end (the server's way until block-wise decoding)."""
    import av

    with av.open(path) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = [resampled.to_ndarray().reshape(-1) for frame in container.decode(container.streams.audio[0])
                  for resampled in resampler.resample(frame)]
        chunks += [resampled.to_ndarray().reshape(-1) for resampled in resampler.resample(None)]
    samples = np.concatenate(chunks)
    np.count_nonzero(np.isfinite(samples))
    return samples


def naive_probabilities(vad: VoiceActivity, samples: np.ndarray) -> np.ndarray:
    """The detector over full-length copies: padded frames, their peaks, context, inputs (the server's way until
    block-wise detection)."""
    count = -(-len(samples) // FRAME)
    frames = np.zeros((count, FRAME), np.float32)
    frames.reshape(-1)[:len(samples)] = samples
    level = max(float(np.percentile(np.abs(frames).max(axis=1), LEVEL_PERCENTILE)), LEVEL_FLOOR)
    frames *= np.float32(TARGET_PEAK / level)
    context = np.zeros((count, CONTEXT), np.float32)
    context[1:] = frames[:-1, -CONTEXT:]
    inputs = np.concatenate([context, frames], axis=1)
    hidden = cell = np.zeros((1, 1, 128), np.float32)
    probabilities = []
    for first in range(0, count, BLOCK_FRAMES):
        block, hidden, cell = vad.session.run(["speech_probs", "hn", "cn"],
                                              {"input": inputs[first:first + BLOCK_FRAMES], "h": hidden, "c": cell})
        probabilities.append(block.reshape(-1))
    return np.concatenate(probabilities)


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(way: str, path: str, warm_path: str) -> None:
    map_large_buffers()  # as the server does at start, for both ways
    vad = VoiceActivity.shared()
    run = ((lambda p: vad.speech_probabilities(decode_audio(p, 1e9))) if way == "server"
           else (lambda p: naive_probabilities(vad, naive_decode(p))))
    run(warm_path)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = memory_kib("VmRSS")
    started = time.perf_counter()
    probabilities = run(path)
    seconds = time.perf_counter() - started
    print(json.dumps({"peak_added_kib": memory_kib("VmHWM") - before, "seconds": seconds,
                      "frames": len(probabilities)}))


def write_wav(path: Path, seconds: float) -> None:
    rng = np.random.default_rng(0)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        for _ in range(int(seconds // 10)):  # speech-like bursts of noise, 10 s at a time
            gate = np.sin(np.arange(10 * SAMPLE_RATE) / 2000) > 0
            out.writeframes((rng.normal(0, 3000, 10 * SAMPLE_RATE) * gate).astype("<i2").tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs=2, default=[300.0, 900.0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as folder:
        paths = {seconds: Path(folder) / f"{seconds:g}.wav" for seconds in [10.0, *args.seconds]}
        for seconds, path in paths.items():
            write_wav(path, seconds)
        print(f"{'decode + VAD':<34}{'audio s':>9}{'peak added MiB':>16}{'s':>8}")
        slopes = {}
        for way, label in (("server", "block-wise (the server)"), ("naive", "list + concatenate, full copies")):
            peaks = []
            for seconds in args.seconds:
                result = json.loads(subprocess.run([sys.executable, __file__, "--child", way, str(paths[seconds]),
                                                    str(paths[10.0])], capture_output=True, text=True,
                                                   check=True).stdout)
                peaks.append(result["peak_added_kib"])
                print(f"{label:<34}{seconds:>9g}{result['peak_added_kib'] / 1024:>16.1f}{result['seconds']:>8.2f}")
            slopes[label] = (peaks[1] - peaks[0]) / (args.seconds[1] - args.seconds[0])
        for label, slope in slopes.items():
            print(f"{label}: {slope:.1f} KiB per second of audio")
        print(f"stated (audio.DECODED_BYTES_PER_SECOND): {DECODED_BYTES_PER_SECOND / 1024:.1f} KiB per second")


if __name__ == "__main__":
    main()
