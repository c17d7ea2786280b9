"""``ciss import``: a torchvision checkpoint becomes step 0; mismatches leave the store empty."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ciss.cli import main
from ciss.store import Store
from tests.conftest import refused

ARCH = "lraspp_mobilenet_v3_large"  # the smallest torchvision model of ARCHS


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, split_dir):
    """A plain torchvision model's state dict with the step-0 folder's 16 classes."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=16)
    root = tmp_path_factory.mktemp("ckpt")
    torch.save(tv.state_dict(), root / "model.pth")
    torch.save({"model": tv.state_dict(), "epoch": 3}, root / "training-checkpoint.pt")
    (root / "classes.txt").write_text((split_dir / "step-0" / "classes.txt").read_text())
    return root


def test_import_then_add_classes_export_and_check(checkpoint, split_dir, tmp_path):
    store = tmp_path / "store"
    res = run("import", "--store", store, "--arch", ARCH, "--weights",
              checkpoint / "training-checkpoint.pt", "--classes", checkpoint / "classes.txt",
              "--data", split_dir / "step-0")
    assert res.exit_code == 0, res.output
    card = Store(store).card(0)
    assert card.method == "imported" and card.extra["origin"] == "imported"
    assert len(card.extra["source_sha256"]) == 64 and card.arch == ARCH
    assert set(card.retention["0"]["torch"]) == set(card.classes)  # scored like a trained step
    # the stored model is the checkpoint, bit for bit
    model, _ = Store(store).load_model(0)
    state = torch.load(checkpoint / "model.pth", weights_only=True)
    assert torch.equal(model.stages["classifier"].low_classifier.weight,
                       state["classifier.low_classifier.weight"])
    res = run("add-classes", "--store", store, "--data", split_dir / "step-1", "--iterations",
              2, "--batch-size", 4, "--crop-size", 32)
    assert res.exit_code == 0, res.output
    res = run("export", "--store", store, "--step", 1)
    assert res.exit_code == 0 and "pass" in res.output, res.output
    res = run("check", "--store", store, "--step", 1, "--json")
    doc = json.loads(res.output)  # a random model learned nothing: the check says so
    assert res.exit_code == 1 and doc["step"] == 1 and len(doc["classes"]) == 20
    # ...and it serves (forced past the check, the server told to accept that)
    import urllib.request

    from ciss.runtime.deploy import deploy
    from ciss.runtime.server import ServeConfig, background
    from ciss.runtime.slot import SwapPolicy

    deploy(Store(store), 1, "onnx", force=True)
    image = next((split_dir / "step-1" / "images").iterdir()).read_bytes()
    with background(ServeConfig(store=store, policy=SwapPolicy(accept_forced=True))) as (url, _):
        req = urllib.request.Request(url + "/v1/segment?format=json", data=image,
                                     headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=60) as r:
            doc = json.loads(r.read())
    assert doc["step"] == 1 and len(doc["classes"]) == 21


def test_aux_keys_are_dropped_and_said(checkpoint, split_dir, tmp_path):
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    tv = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=16,
                                      aux_loss=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, tmp_path / "m.safetensors")
    res = run("import", "--store", tmp_path / "s", "--arch", "deeplabv3_mobilenet_v3_large",
              "--weights", tmp_path / "m.safetensors", "--classes", checkpoint / "classes.txt",
              "--data", split_dir / "step-0")
    assert res.exit_code == 0, res.output
    assert "dropped" in res.output and "aux_classifier" in res.output
    assert Store(tmp_path / "s").card(0).extra["dropped_keys"]


@pytest.mark.parametrize("case", ["count", "missing", "arch", "pickle", "whole", "noarch",
                                  "named"])
def test_mismatches_are_refused_and_the_store_stays_empty(case, checkpoint, split_dir,
                                                           tmp_path):
    store = tmp_path / "store"
    weights, classes, arch = checkpoint / "model.pth", checkpoint / "classes.txt", ARCH
    if case == "count":
        classes = tmp_path / "c.txt"
        classes.write_text("background\na\nb\n")
        words = ["3 class names", "16 output channels"]
    elif case == "missing":
        state = torch.load(weights, weights_only=True)
        state.pop("classifier.cbr.0.weight")
        weights = tmp_path / "broken.pth"
        torch.save(state, weights)
        words = ["1 missing keys", "classifier.cbr.0.weight"]
    elif case == "arch":
        arch = "deeplabv3_mobilenet_v3_large"
        words = ["does not fit deeplabv3_mobilenet_v3_large"]
    elif case == "pickle":
        weights = tmp_path / "evil.pth"
        import argparse  # any class outside torch's allow-list: weights_only refuses it

        torch.save({"model": argparse.Namespace(payload="code")}, weights)
        words = ["pickled Python objects", "model.state_dict()"]
    elif case == "whole":  # #30: torch.save(model), the common mistake
        weights = tmp_path / "whole.pth"
        torch.save(torch.nn.Conv2d(3, 4, 1), weights)
        words = ["whole.pth: holds pickled Python objects", "torch.save(model.state_dict(), PATH)"]
    elif case == "noarch":  # #30: was "--arch None: ..."
        arch = None
        words = ["model.pth: a state-dict file needs --arch (one of"]
    else:
        weights = "COCO_WITH_VOC_LABELS_V1"
        arch = "deeplabv3_resnet50"
        words = ["not in the local torch hub cache", "put https://"]
    res = run("import", "--store", store, *(["--arch", arch] if arch else []), "--weights",
              weights, "--classes", classes, "--data", split_dir / "step-0")
    refused(res, *words)
    assert "--arch None" not in res.output
    assert not (store / "steps").exists() or not any((store / "steps").iterdir())


def test_imagenet_offline_says_which_file_to_put_where(monkeypatch, tmp_path, split_dir):
    import urllib.error

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    res = run("train", "--store", tmp_path / "s", "--data", split_dir / "step-0", "--arch",
              ARCH, "--weights", "imagenet", "--iterations", 1)
    refused(res, "put that file at", str(tmp_path / "hub" / "checkpoints"))
    assert len(res.output.strip().splitlines()) == 1


def test_a_local_backbone_file_is_loaded(tmp_path):
    from torchvision.models import mobilenet_v3_large

    from ciss.models import build_model

    torch.manual_seed(1)
    state = mobilenet_v3_large(weights=None).state_dict()  # an ImageNet classifier's layout
    torch.save(state, tmp_path / "backbone.pth")
    model = build_model(ARCH, num_classes=3, weights=str(tmp_path / "backbone.pth"))
    assert torch.equal(model.stages["stem"][0][0].weight, state["features.0.0.weight"])
