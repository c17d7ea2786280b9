"""The commands of docs/scale-out.md that can run here: rollout.sh and the OIP client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ciss.analysis.tolerances import GateThresholds
from ciss.runtime.deploy import deploy
from ciss.runtime.server import ServeConfig, background
from ciss.runtime.slot import SwapPolicy
from ciss.store import Store

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

LOOSE_GATE = GateThresholds(max_mean_drop=100, max_class_drop=100)


def _rollout(store: Path, step: int, repo: Path, cwd: Path, gate_args: str):
    env = {**os.environ, "CISS": f"{sys.executable} -m ciss", "GATE_ARGS": gate_args}
    env.pop("TRITON_URL", None)
    return subprocess.run(["bash", str(EXAMPLES / "rollout.sh"), str(store), str(step),
                           str(repo)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_rollout_script_gates_then_adds_a_triton_version(story, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    store = tmp_path / "store"
    shutil.copytree(story, store)
    repo = tmp_path / "triton-repo"
    res = _rollout(store, 1, repo, tmp_path, "--max-mean-drop 100 --max-class-drop 100")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (repo / "ciss_onnx" / "2" / "model.onnx").stat().st_size > 0
    config = text_format.Parse((repo / "ciss_onnx" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx"
    assert (tmp_path / "gate-step1.json").exists()
    assert not [p for p in (repo / "ciss_onnx").iterdir() if p.name.startswith(".")]

    res = _rollout(store, 2, repo, tmp_path, "--max-mean-drop -100")
    assert res.returncode == 1 and "refused by the retention gate" in res.stdout
    assert sorted(p.name for p in (repo / "ciss_onnx").iterdir()) == ["2", "config.pbtxt"]


def test_oip_client_example_against_ciss_serve(story, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(story, root)
    deploy(Store(root), 1, "onnx", thresholds=LOOSE_GATE)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 44, 3), np.uint8)).save(image)
    # --model-name ciss_onnx: the same URLs as Triton serving the exported repository
    config = ServeConfig(store=root, model_name="ciss_onnx",
                         policy=SwapPolicy(gate=LOOSE_GATE))
    with background(config) as (url, _):
        res = subprocess.run([sys.executable, str(EXAMPLES / "oip_client.py"), "--url",
                              url.removeprefix("http://"), "--model", "ciss_onnx", str(image),
                              str(tmp_path / "mask.png")], capture_output=True, text=True,
                             timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "version 2" in res.stdout
    assert Image.open(tmp_path / "mask.png").size == (44, 30)
