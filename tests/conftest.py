"""Shared fixtures: tiny real data, written once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    slow = os.environ.get("CISS_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set CISS_SLOW=1 (make test-all)"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (none visible to torch)"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small full-label synthetic folder: 64 train + 24 val images of 32x32."""
    from ciss.data.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(out, SyntheticConfig(size=32, n_train=64, n_val=24, seed=1))
    return out


@pytest.fixture(scope="session")
def split_dir(synthetic_dir, tmp_path_factory) -> Path:
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split

    out = tmp_path_factory.mktemp("split") / "15-5"
    write_split(open_folder(synthetic_dir), parse_scenario("15-5"), out)
    return out


@pytest.fixture(scope="session")
def base_store(split_dir, tmp_path_factory) -> Path:
    """A store with one trained step 0 (tiny, 1 epoch): a real model to test against."""
    from ciss.store import Store
    from ciss.updater.loop import LoopConfig
    from ciss.updater.train import train_base

    root = tmp_path_factory.mktemp("store") / "store"
    train_base(Store(root), split_dir / "step-0", loop=LoopConfig(epochs=1, batch_size=8),
               progress=False)
    return root


@pytest.fixture(scope="session")
def story(base_store, split_dir, tmp_path_factory) -> Path:
    """Step 1 = mib, step 2 = ft (both from step 0, 2 epochs each), every step in ONNX."""
    from ciss.exporters.export import export_step
    from ciss.store import Store
    from ciss.updater.add_classes import UpdateConfig, add_classes
    from ciss.updater.loop import LoopConfig
    from ciss.updater.methods import MethodConfig

    root = tmp_path_factory.mktemp("story") / "store"
    shutil.copytree(base_store, root)
    store = Store(root)
    for method in ("mib", "ft"):
        add_classes(store, split_dir / "step-1", method=MethodConfig(method=method),
                    update=UpdateConfig(parent=0), loop=LoopConfig(epochs=2, batch_size=8),
                    progress=False)
    for step in store.steps():
        export_step(store, step, ["onnx"])
    return root


@pytest.fixture
def store_copy(base_store, tmp_path) -> Path:
    """A private copy of the base store that a test may modify."""
    dest = tmp_path / "store"
    shutil.copytree(base_store, dest)
    return dest


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for servers and torchrun)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_folder(root: Path, classes: list[str], n: int = 4, size=(20, 16), values=None,
                suffix=".png") -> Path:
    """A hand-made dataset folder: random images, masks with the given values."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"s{i}{suffix}")
        mask = np.zeros((h, w), dtype=np.uint8)
        vals = values if values is not None else list(range(1, len(classes)))
        for j, v in enumerate(vals):
            mask[j % h, :] = v
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")
    return root
