"""The one-command GPU check, dry-run on CPU with the tiny model: every level runs in its own process and both
summaries are written, with what each level measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GPU_CHECK = Path(__file__).parents[1] / "bench" / "gpu_check.py"


def test_the_cpu_dry_run_measures_every_level_and_writes_both_summaries(model_dir, tmp_path):
    run = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--model", str(model_dir),
                          "--output", str(tmp_path), "--exact-windows", "3", "--level-seconds", "5"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {level: status["status"] for level, status in summary["levels"].items()} == {
        "model": "ok", "engine": "ok", "server": "ok", "pipeline": "ok"}
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
    table = (tmp_path / "summary.md").read_text()
    assert "| server | 32 |" in table and "| pipeline, batch 32 | 32 |" in table
    assert "decoder self-attention: FLASH_ATTENTION" in table and "3/3 (100%)" in table
    assert "RTFx at concurrency 64 >= 2000" in table, "the issue's targets are listed"
