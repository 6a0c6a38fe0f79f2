"""The one-command GPU check, dry-run on CPU with the tiny model: every level runs in its own process and both
summaries are written, with what each level measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GPU_CHECK = Path(__file__).parents[1] / "bench" / "gpu_check.py"


def test_the_cpu_dry_run_measures_every_level_and_writes_both_summaries(model_dir, tmp_path):
    # The realtime level at real-time pace: one turn, 1 and 2 live sessions keep it to seconds.
    run = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--model", str(model_dir),
                          "--output", str(tmp_path), "--exact-windows", "3", "--level-seconds", "5",
                          "--realtime-sessions", "1,2", "--realtime-turns", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {level: status["status"] for level, status in summary["levels"].items()} == {
        "model": "ok", "engine": "ok", "server": "ok", "pipeline": "ok", "realtime": "ok"}
    assert summary["capture"]["works"] is None, "no capture on CPU"
    assert set(summary["attention_backends"]) == {"encoder self-attention", "decoder self-attention",
                                                  "decoder cross-attention"}
    assert all(backends == ["FLASH_ATTENTION"] for backends in summary["attention_backends"].values())
    exactness = summary["exactness"]
    assert exactness["windows"] == 3 and exactness["equal"] == 3, "float32 on CPU: every window equals generate's"
    assert [row["concurrency"] for row in summary["server"]] == [1, 32, 64]
    for row in summary["server"] + [summary["pipeline"]]:
        assert row["failures"] == 0 and row["rtfx"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"]
    assert summary["pipeline"]["configuration"] == "pipeline, batch 32"
    assert summary["single_clip_p50_ms"] == summary["server"][0]["p50_ms"]
    assert summary["server_start_to_ready_seconds"] > 0 and summary["engine_ready_seconds"] > 0
    assert summary["pipeline_multiple"] > 0 and summary["elapsed_seconds"] < 480
    realtime = {(row["system"], row["sessions"]): row for row in summary["realtime"]}
    assert set(realtime) == {(system, sessions) for sessions in (1, 2) for system in
                             ("whisper-server, /v1/realtime", "generate per turn, no cross-session batching")}
    for row in realtime.values():
        assert row["failures"] == 0 and row["turns"] == row["expected_turns"] == row["sessions"]
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] and row["first_delta_p50_ms"] <= row["latency_p50_ms"]
    table = (tmp_path / "summary.md").read_text()
    assert "| server | 32 |" in table and "| pipeline, batch 32 | 32 |" in table
    assert "decoder self-attention: FLASH_ATTENTION" in table and "3/3 (100%)" in table
    assert "RTFx at concurrency 64 >= 2000" in table, "the issue's targets are listed"
    assert "| whisper-server, /v1/realtime | 2 | 2/2 |" in table, "the live sessions' table"


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_capture_is_reported_and_the_rest_is_measured_without_graphs(tmp_path, monkeypatch):
    """The GPU path's plan, with each level's process stood in: the engine level with graphs exits 3 having
    recorded the capture error, so the engine and the server run again with the step eager, then the pipeline."""
    gpu_check = load_gpu_check()
    args = gpu_check.parse_args(["--output", str(tmp_path)])
    check = gpu_check.Check(args, [])
    ran = []

    def run(level):
        ran.append(level)
        if level == "engine":
            check.levels[level] = {"capture": {"works": False, "error": "RuntimeError: operation not permitted when "
                                                                        "stream is capturing"}}
            check.status[level] = {"status": "failed (exit 3)"}
            return 3
        check.levels[level] = {"ready_seconds": 1.0, "attention_backends": {"decoder self-attention": ["MATH"]}}
        check.status[level] = {"status": "ok"}
        return 0

    monkeypatch.setattr(check, "run", run)
    summary = check.main()
    assert ran == ["model", "engine", "engine:eager", "server:eager", "pipeline", "realtime:eager"]
    assert summary["capture"] == {"works": False, "graphs": None,
                                  "error": "RuntimeError: operation not permitted when stream is capturing"}
    assert summary["attention_backends"] == {"decoder self-attention": ["MATH"]}, "measured by the eager engine"
    table = (tmp_path / "summary.md").read_text()
    assert "- CUDA-graph capture works: **no**: RuntimeError: operation not permitted" in table
