"""The install never puts both ONNX Runtime distributions in one environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciss.engines import ort
from ciss.errors import CissError

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def names(reqs: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}


def test_gpu_install_brings_only_the_cuda_capable_onnxruntime():
    base = names(PYPROJECT["project"]["dependencies"])
    extras = {k: names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    assert "onnxruntime" not in base and "onnxruntime-gpu" not in base
    assert extras["gpu"] >= {"onnxruntime-gpu"} and "onnxruntime" not in extras["gpu"]
    assert extras["cpu"] >= {"onnxruntime"}
    for name, deps in extras.items():  # no other extra drags the CPU one in beside it
        if name != "cpu":
            assert "onnxruntime" not in deps, name


def test_a_mixed_install_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(ort, "installed_distributions",
                        lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(CissError, match="shadow each other.*make gpu"):
        ort.import_onnxruntime()
