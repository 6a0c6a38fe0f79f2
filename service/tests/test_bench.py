"""The benchmark itself: its CPU mode end to end on the tiny model (servers and pipeline baseline), and its GPU mode's
refusal to start without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_cpu_benchmark_runs_servers_and_pipeline_on_the_same_work(model_dir, tmp_path):
    """Concurrency 70 is past the server's default bounds (64 uploads at once): the benchmark must size the servers'
    admission to what it sends, or it measures 503s instead of the engine."""
    # 20 tokens: more than the tiny checkpoint's own cap (13), so both sides must force the length to reach it.
    subprocess.run([sys.executable, str(BENCH), "--model", str(model_dir), "--concurrency", "1", "70", "--requests", "70",
                    "--new-tokens", "20", "--pipeline-batch-sizes", "35", "--cpu-threads", "1",
                    "--output", str(tmp_path / "results")], check=True, timeout=600)
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["configuration"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(name, c) for name in ("batching", "batching, words", "batch size 1", "pipeline, batch 35")
                         for c in (1, 70)}
    for row in rows.values():
        assert row["requests"] == 70 and row["failures"] == 0 and row["rtfx"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"]
        assert "retried_at_higher_temperature" in row
    assert rows[("batching", 70)]["max_batch_size"] == 16 and rows[("batch size 1", 70)]["max_batch_size"] == 1
    assert rows[("batching, words", 70)]["max_batch_size"] == 16
    kept = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert kept == report["results"], "each level is kept as it finishes"
    assert {r["decoded_tokens_per_window"] for k, r in rows.items() if k[0].startswith("pipeline")} == {20}
    assert "--fixed-new-tokens" in report["server_args"] and "20" in report["server_args"]
    flags = dict(zip(report["server_args"], report["server_args"][1:]))
    assert int(flags["--max-concurrent-uploads"]) >= 70 and int(flags["--queue-size"]) >= 70
    assert int(flags["--max-queued-audio-seconds"]) >= 70 and float(flags["--max-spool-mb"]) >= 1
    ratio = report["ratio"]
    assert ratio["concurrency"] == 1 and ratio["ratio"] == pytest.approx(ratio["server_rtfx"] / ratio["pipeline_rtfx"], rel=0.01)
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 2 + 8 and "Server to pipeline: " in table


def test_gpu_mode_refuses_to_start_without_a_cuda_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --gpu would run the full GPU benchmark")
    run = subprocess.run([sys.executable, str(BENCH), "--gpu", "--output", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--gpu needs a CUDA device" in run.stderr
    assert not list(tmp_path.iterdir()), "nothing is started or written"


def test_pipeline_levels_that_repeat_a_smaller_batch_run_once():
    bench = load_bench()
    assert bench.pipeline_plan([32, 16], [1, 8, 32, 64]) == [(16, 1), (16, 8), (16, 32), (16, 64), (32, 32), (32, 64)]


def test_ratio_compares_the_best_server_at_concurrency_32_with_the_best_pipeline_run():
    bench = load_bench()
    row = lambda name, c, rtfx: {"configuration": name, "concurrency": c, "rtfx": rtfx}  # noqa: E731
    results = [row("batching", 32, 900.0), row("batching", 64, 1200.0), row("batch size 1", 32, 100.0),
               row("pipeline, batch 16", 32, 110.0), row("pipeline, batch 32", 64, 150.0)]
    ratio = bench.ratio(results, {"batching": 32, "batch size 1": 1}, [1, 8, 32, 64])
    assert (ratio["server_rtfx"], ratio["pipeline"], ratio["pipeline_concurrency"], ratio["ratio"]) == \
        (900.0, "pipeline, batch 32", 64, 6.0)


def test_gpu_report_checks_issue_9_targets_and_shows_gpu_memory():
    bench = load_bench()
    row = lambda name, c, rtfx, p50, p95: {  # noqa: E731
        "configuration": name, "concurrency": c, "requests": 64, "rtfx": rtfx, "p50_ms": p50, "p95_ms": p95,
        "failures": 0, "retried_at_higher_temperature": 0, "gpu_memory_peak_mib": 21000}
    results = [row("batching", 1, 120.0, 250.0, 260.0), row("batching", 32, 1100.0, 800.0, 2600.0),
               row("batch size 1", 32, 130.0, 7000.0, 7400.0), row("pipeline, batch 32", 32, 150.0, 6400.0, 6400.0)]
    report = {"mode": "gpu", "model": "large-v3", "clip_seconds": 30.0, "new_tokens_per_window": 64, "temperature": 0.0,
              "machine": {"gpu": "NVIDIA H100 80GB HBM3, 81559 MiB", "cpus": 16, "load_average_after": [1.0]},
              "results": results, "ratio": bench.ratio(results, {"batching": 32, "batch size 1": 1}, [1, 8, 32, 64])}
    report["targets"] = bench.targets(report)
    assert [(t["measured"], t["met"]) for t in report["targets"]] == [(1100.0, True), (3.25, False), (7.33, True), (250.0, True)]
    table = bench.markdown(report)
    assert "| batching | 32 | 64 | 1100.0 | 800.0 | 2600.0 | 0 | 21000 |" in table
    assert "- p95 / p50 at concurrency 32 <= 3: 3.25 (NOT met)" in table and "= **7.33x**" in table
    results[1]["failures"] = 3  # a level that lost requests measured only what got through
    assert not any(t["met"] for t in bench.targets(report))


def test_gpu_memory_sampler_keeps_the_peak_of_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '1200\\n31000\\n900\\n'\nexec sleep 30\n")  # runs until stopped, as -lms does
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sampler = load_bench().GpuMemorySampler()
    assert sampler.stop() == 31000


def test_real_benchmark_puts_every_peer_on_the_same_real_clips(tiny_en, tmp_path):
    """--real on a few short clips: our server (json, verbose_json, and word timestamps), transformers (long-form generate and the pipeline) and faster-whisper
    (sequential and batched, on the wheel's CTranslate2 file) each transcribe every clip class, and the WER it
    reports is the one its own texts give."""
    from speech import normalize_words, word_errors

    subprocess.run([sys.executable, str(BENCH), "--real", "--model", str(tiny_en), "--short-clips", "2",
                    "--long-clips", "1", "--long-seconds", "32", "--quiet-seconds", "8", "--concurrency", "2",
                    "--classes", "short", "long", "quiet",
                    "--max-batch-size", "2", "--pipeline-batch-sizes", "2", "--cpu-threads", "1",
                    "--output", str(tmp_path / "real")], check=True, timeout=1200)
    report = json.loads((tmp_path / "real.json").read_text())
    systems = {"whisper-server, 2 clients", "whisper-server, 2 clients, verbose_json", "whisper-server, 2 clients, words",
               "transformers generate, long-form", "transformers pipeline, batch 2",
               "faster-whisper transcribe", "faster-whisper transcribe, beam 1", "faster-whisper batched, batch 2",
               "faster-whisper batched, batch 2, beam 1"}
    rows = {(r["system"], r["class"]): r for r in report["results"]}
    assert set(rows) == {(s, c) for s in systems for c in ("short", "long", "quiet")}
    assert report["clips"]["long"]["audio_seconds"] > 30 and report["clips"]["short"]["count"] == 2
    for (system, kind), row in rows.items():
        references = report["clips"][kind]["references"]
        assert row["rtfx"] > 0 and len(row["texts"]) == row["clips"] == len(references)
        errors = sum(word_errors(r, t) for r, t in zip(references, row["texts"]))
        assert row["wer"] == pytest.approx(errors / sum(len(normalize_words(r)) for r in references), abs=1e-4)
        assert row["empty"] == sum(not normalize_words(t) for t in row["texts"])
    server_short = rows[("whisper-server, 2 clients", "short")]
    assert all(normalize_words(t) for t in server_short["texts"]), "real speech gets real words"
    assert (rows[("whisper-server, 2 clients, words", "long")]["texts"]
            == rows[("whisper-server, 2 clients, verbose_json", "long")]["texts"]), "words change no text"
    table = (tmp_path / "real.md").read_text()
    assert all(f"| {system} |" in table for system in systems)


def test_multilingual_table_pools_word_errors_and_detection_per_language_and_overall():
    """--real --languages: a language's WER pools its clips' word errors over their words (not an average of
    rates); "all" pools every language; a system that does not report languages gets no detection figure."""
    bench = load_bench()
    row = lambda system, kind, errors, words, detected, clips, wall: {  # noqa: E731
        "system": system, "class": kind, "word_errors": errors, "words": words, "clips": clips,
        "audio_seconds": 10.0 * clips, "wall_seconds": wall, **({"language_detected": detected} if detected is not None else {})}
    results = [row("server", "de short", 1, 10, 3, 4, 5.0), row("server", "de long", 0, 100, 1, 1, 5.0),
               row("server", "fr short", 9, 30, 0, 4, 10.0), row("server", "fr long", 50, 100, 0, 1, 20.0),
               row("json only", "de short", 2, 10, None, 4, 1.0), row("json only", "de long", 3, 100, None, 1, 1.0)]
    report = {"model": "OpenAI base (wheels)", "machine": {"cpus": 2, "load_average_after": [1.0]}, "cpu_threads": 2,
              "split": "held out", "languages": ["de", "fr"], "results": results,
              "clips": {"de short": {"count": 4}, "de long": {"count": 1}}}
    table = bench.multilingual_markdown(report)
    assert "| server | de | 10.0% | 0.0% | 4/5 | 5.00 |" in table
    assert "| server | fr | 30.0% | 50.0% | 0/5 | 1.67 |" in table
    assert "| server | all | 25.0% | 25.0% | 4/10 | 2.50 |" in table
    assert "| json only | de | 20.0% | 3.0% |  | 25.00 |" in table


def test_decode_paths_splits_the_clips_by_the_decode_faster_whisper_kept():
    """decode_paths.py: a clip is in the temperature-0 part when faster-whisper's first run kept its beam search,
    else in the fallback part; errors and same words are counted per part, and the paired difference over all clips."""
    load_bench()
    spec = importlib.util.spec_from_file_location("decode_paths", BENCH.parent / "decode_paths.py")
    decode_paths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode_paths)
    answer = lambda text, temperature: {"text": text, "language": "de", "temperature": temperature}  # noqa: E731
    references = ["ein zwei drei", "vier fünf", "sechs sieben acht"]
    systems = {"whisper-server zeros": [answer("Ein, zwei drei.", 0.0), answer("vier elf", 0.0), answer("sechs", 0.4)],
               "faster-whisper transcribe, run 1": [answer("ein zwei drei", 0.0), answer("vier fünf", 0.0),
                                                    answer("sechs sieben", 1.0)]}
    rows = {row["system"]: row for row in decode_paths.report(references, systems, resamples=100)["rows"]}
    server = rows["whisper-server zeros"]
    assert server["errors"] == 3 and server["words"] == 8
    assert server["temperature 0"] == {"clips": 2, "errors": 1, decode_paths.SAME: 1}
    assert server["fallback"] == {"clips": 1, "errors": 2, decode_paths.SAME: 0}
    assert server[decode_paths.AGAINST]["difference"] == 2 and server[decode_paths.AGAINST]["worse on"] == 2
    assert "| whisper-server zeros | 3 of 8 | 1 (2 clips) | 1/2 | 2 (1 clips) | +2 (" in decode_paths.markdown(
        {"rows": list(rows.values())})


def test_word_error_rate_keeps_a_words_combining_marks():
    """Thai vowels and tones are combining marks: a word must not fall apart at them, or a transcript in the wrong
    language counts as many insertions as it has marks (and one system's garbage looks worse than another's)."""
    from speech import normalize_words, word_errors

    assert normalize_words("ครับ नमस्ते L'école, Jean-Luc") == ["ครับ", "नमस्ते", "l'école", "jean", "luc"]
    assert word_errors("Bonjour.", "หวันอาตาเชียงว่าง") == 1  # one wrong word, not four


def test_the_judging_sentence_sets_share_nothing_with_the_tests_sentences():
    """Each held-out set judges what was tuned on the development sentences, so no sentence (or its normalised
    words) may be in two sets; every sentence carries its English translation, for the translation rows."""
    from speech import FOREIGN_FILES, load_foreign, normalize_words

    sets = {split: load_foreign(path) for split, path in FOREIGN_FILES.items()}
    assert sets.keys() == {"development", "held out", "held out 2"}
    owner: dict[tuple[str, ...], str] = {}
    for split, languages in sets.items():
        assert set(languages) == {"de", "es", "fr", "it", "pt", "nl"}, split
        for language, pairs in languages.items():
            for pair in pairs:
                assert len(pair) == 2 and all(pair), (split, language, pair)
                words = tuple(normalize_words(pair[0]))
                assert owner.setdefault(words, split) == split, f"{pair[0]!r} is in {owner[words]} and {split}"
    assert {language: len(pairs) for language, pairs in sets["held out 2"].items()} == dict.fromkeys(sets["held out 2"], 25)
