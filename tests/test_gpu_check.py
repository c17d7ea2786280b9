"""The GPU acceptance script's --smoke run: every stage on the CPU, so it cannot rot before a
GPU is lent (the full run is benchmarks/gpu_check.py on a GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = doc["stages"]
    assert list(stages) == ["env", "data", "base", "add", "add_ft", "export", "serve",
                            "torchrun"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert stages["add"]["images_per_s"] > 0 and 0 <= stages["add"]["data_wait_share"] < 1
    assert stages["export"]["onnx_parity_step1"] is True
    assert stages["serve"]["swap"]["failed"] == 0 and stages["serve"]["c8"]["errors"] == 0
    assert stages["torchrun"]["world_size"] == 2
    assert "| serve | ok |" in (tmp_path / "gpu_check.md").read_text()


def test_report_is_written_after_every_stage(tmp_path, monkeypatch):
    """A run cut off by a device lease's time limit keeps the stages it finished."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # restored after the test
    import gpu_check
    report = gpu_check.Report(tmp_path, {"mode": "test", "machine": "here"})
    report.stage("first", lambda: {"figure": 1})
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["stages"]["first"]["figure"] == 1 and doc["mode"] == "test"
    report.stage("second", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["stages"]["second"]["status"] == "failed"
    assert "| second | failed |" in (tmp_path / "gpu_check.md").read_text()
