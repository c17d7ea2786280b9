"""SMP and Hugging Face SegFormer through the staged interface: the same maths as their
library's forward, rebuilt from the card, trained elsewhere, imported, grown, exported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ciss.cli import main
from ciss.models import build_model
from ciss.store import Store
from tests.conftest import refused

smp = pytest.importorskip("segmentation_models_pytorch", reason="pip install 'ciss[smp]'")
transformers = pytest.importorskip("transformers", reason="pip install 'ciss[transformers]'")

SMP_CASES = [("unet", "resnet18"), ("fpn", "mit_b0"), ("deeplabv3plus", "resnet18"),
             ("unet", "efficientnet-b0"), ("unet", "mobilenet_v2")]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_segformer(num_labels: int, **kw):
    cfg = transformers.SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                       num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16,
                                       num_labels=num_labels, **kw)
    return transformers.SegformerForSemanticSegmentation(cfg)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize("decoder,encoder", SMP_CASES)
def test_smp_stages_compute_what_smp_computes(decoder, encoder):
    from ciss.models.smp import SMPSegmentation, arch_name

    torch.manual_seed(0)
    lib = smp.create_model(decoder, encoder_name=encoder, encoder_weights=None, classes=5).eval()
    model = SMPSegmentation(arch_name(lib), 5, module=lib).eval()
    x = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        ours, theirs = model(x), lib(_normalised(x))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert model.stage_names[-2:] == ("head", "classifier")
    assert ("stem" in model.stage_names) == (encoder != "mit_b0")  # mit has no stem
    # every parameter SMP's forward uses sits in a stage (nothing left out of training)
    lib(_normalised(x)).sum().backward()
    used = {id(p) for p in lib.parameters() if p.grad is not None}
    assert used <= {id(p) for p in model.parameters()}
    # an odd size serves too: padded to the output stride inside, cropped back
    odd = torch.randint(0, 256, (1, 3, 45, 70), dtype=torch.uint8)
    with torch.no_grad():
        assert model(odd).shape == (1, 5, 45, 70)


def test_segformer_stages_compute_what_transformers_computes():
    from ciss.models.segformer import SegFormer

    torch.manual_seed(0)
    lib = tiny_segformer(4).eval()
    model = SegFormer("segformer", 4, module=lib).eval()
    x = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    with torch.no_grad():
        theirs = lib(pixel_values=_normalised(x)).logits
        ours = model.run(model.begin(x), model.stage_names)["logits"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert model.stage_names == ("stage1", "stage2", "stage3", "stage4", "head", "classifier")
    assert model(x).shape == (2, 4, 64, 48)  # upsampled to the input


@pytest.mark.parametrize("arch", ["smp-unet-resnet18", "smp-fpn-mit_b0", "segformer-b0"])
def test_rebuilt_from_the_card_config(arch):
    torch.manual_seed(0)
    a = build_model(arch, num_classes=3).eval()
    config = json.loads(json.dumps(a.config))  # as the card stores it
    b = build_model(arch, num_classes=3, config=config).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_a_family_without_its_extra_names_it(monkeypatch):
    import builtins

    from ciss.errors import CissError

    real = builtins.__import__

    def no_smp(name, *a, **k):
        if name.startswith("segmentation_models_pytorch"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_smp)
    with pytest.raises(CissError, match=r"pip install 'ciss\[smp\]'"):
        build_model("smp-unet-resnet18", num_classes=3)


def test_unsupported_encoder_and_decoder_are_named():
    from ciss.errors import CissError

    with pytest.raises(CissError, match="decoder 'pspnet' is not supported"):
        build_model("smp-pspnet-resnet18", num_classes=3)
    with pytest.raises(CissError, match="vgg11.*not supported.*resnet"):
        build_model("smp-unet-vgg11", num_classes=3)


def _train_elsewhere(model: torch.nn.Module, forward, folder, steps: int = 30) -> None:
    """A plain torch loop of the test's own (not ciss's): SGD on the folder's train images."""
    from PIL import Image

    stems = (folder / "train.txt").read_text().split() if (folder / "train.txt").exists() \
        else sorted(p.stem for p in (folder / "images").iterdir())
    x = torch.stack([torch.from_numpy(np.array(Image.open(next(
        (folder / "images").glob(f"{s}.*"))).convert("RGB"))).permute(2, 0, 1) for s in stems])
    y = torch.stack([torch.from_numpy(np.array(Image.open(folder / "masks" / f"{s}.png")))
                     .long() for s in stems])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(stems), (8,), generator=g)
        logits = forward(_normalised(x[idx]))
        logits = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear")
        loss = torch.nn.functional.cross_entropy(logits, y[idx], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, split_dir):
    """An SMP Unet and a SegFormer trained by a plain loop, saved as their libraries save."""
    root = tmp_path_factory.mktemp("saved")
    names = (split_dir / "step-0" / "classes.txt").read_text().split("\n")
    names = [n for n in names if n]
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=len(names),
                    decoder_channels=(32, 16, 16, 8, 8))
    _train_elsewhere(unet, unet, split_dir / "step-0")
    unet.save_pretrained(root / "unet")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    seg = tiny_segformer(len(names), id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})
    _train_elsewhere(seg, lambda x: seg(pixel_values=x).logits, split_dir / "step-0")
    seg.save_pretrained(root / "segformer")
    transformers.SegformerImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
                                         ).save_pretrained(root / "segformer")
    return root


def test_smp_unet_imported_grown_exported_and_checked(saved, split_dir, tmp_path):
    store = tmp_path / "store"
    res = run("import", "--store", store, "--weights", saved / "unet", "--classes",
              saved / "classes.txt", "--data", split_dir / "step-0")
    assert res.exit_code == 0, res.output
    card = Store(store).card(0)
    assert card.arch == "smp-unet-resnet18" and card.method == "imported"
    assert card.model_config["smp"]["decoder_channels"] == [32, 16, 16, 8, 8]
    # the stored step is the saved model: same logits as SMP's own forward
    model, _ = Store(store).load_model(0)
    lib = smp.from_pretrained(str(saved / "unet")).eval()
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lib(_normalised(x)), rtol=1e-4, atol=1e-4)
    res = run("add-classes", "--store", store, "--data", split_dir / "step-1", "--iterations",
              3, "--batch-size", 4)
    assert res.exit_code == 0, res.output
    child = Store(store).card(1)
    assert child.frozen == ["stem", "stage1", "stage2", "stage3"]  # the family's default
    assert child.config["loop"]["optimizer"] == "sgd" and child.config["loop"]["encoder_lr"] == 0.1
    assert child.model_config == card.model_config
    res = run("export", "--store", store, "--step", 1)
    assert res.exit_code == 0 and "pass" in res.output, res.output
    res = run("check", "--store", store, "--step", 1, "--json")
    assert json.loads(res.output)["step"] == 1 and res.exit_code in (0, 1)
    _diagnose_int8_and_serve(store, tmp_path)


def _diagnose_int8_and_serve(store, tmp_path):
    """The rest of the story on a foreign family: diagnosis per stage, INT8 behind its gate,
    the served segmenter on ONNX Runtime."""
    from ciss.errors import CheckFailed
    from ciss.exporters.export import export_step
    from ciss.runtime.loading import load_segmenter

    res = run("diagnose", "--store", store, "--step", 1, "--out", tmp_path / "diag")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    child, _ = Store(store).load_model(1)
    assert list(doc["cka"]) == list(child.stage_names)  # every stage compared, stem or not
    try:
        (res8,) = export_step(Store(store), 1, ["int8"])
        assert res8.path.name == "model.int8.onnx"
    except CheckFailed as exc:  # a barely trained model may lose too much: the gate says so
        assert "INT8" in str(exc)
    seg = load_segmenter(Store(store), 1, "onnx")
    labels = seg.segment(np.zeros((37, 53, 3), np.uint8))
    assert labels.shape == (37, 53) and labels.max() < len(seg.classes)


def test_segformer_imported_with_its_names_and_preprocessing(saved, split_dir, tmp_path):
    store = tmp_path / "store"
    res = run("import", "--store", store, "--weights", saved / "segformer",
              "--data", split_dir / "step-0")
    assert res.exit_code == 0, res.output
    assert "preprocessor_config.json" in res.output
    card = Store(store).card(0)
    names = [n for n in (saved / "classes.txt").read_text().split("\n") if n]
    assert card.classes == names  # from id2label, no --classes needed
    assert card.extra["preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    model, _ = Store(store).load_model(0)
    lib = transformers.SegformerForSemanticSegmentation.from_pretrained(
        str(saved / "segformer")).eval()
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        theirs = lib(pixel_values=(x.float() / 255 - 0.5) / 0.5).logits
        ours = model.run(model.begin(x), model.stage_names)["logits"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    res = run("add-classes", "--store", store, "--data", split_dir / "step-1", "--iterations",
              3, "--batch-size", 4, "--freeze", "stage2")
    assert res.exit_code == 0, res.output
    res = run("export", "--store", store, "--step", 1)
    assert res.exit_code == 0 and "pass" in res.output, res.output
    # the graph normalises as the author did: ONNX Runtime matches the torch model
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Store(store).step_dir(1) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    child, _ = Store(store).load_model(1)
    with torch.no_grad():
        want = child(x).numpy()
    got = sess.run(["logits"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    _diagnose_int8_and_serve(store, tmp_path)


@pytest.mark.parametrize("case", ["generic", "count", "class", "foreign", "reduce"])
def test_folder_refusals_leave_the_store_empty(case, saved, split_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved / "segformer", folder)
    cfg = json.loads((folder / "config.json").read_text())
    extra = []
    if case == "generic":
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(len(cfg["id2label"]))}
        words = ["generic names", "--classes"]
    elif case == "count":
        (tmp_path / "c.txt").write_text("background\na\nb\n")
        extra = ["--classes", tmp_path / "c.txt"]
        words = ["3 class names", "16 output channels"]
    elif case == "class":
        cfg["architectures"] = ["SegformerForImageClassification"]
        words = ["SegformerForImageClassification", "not supported"]
    elif case == "foreign":
        cfg = {"hello": 1}
        words = ["neither an SMP", "--arch"]
    else:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        pre["do_reduce_labels"] = True
        (folder / "preprocessor_config.json").write_text(json.dumps(pre))
        words = ["do_reduce_labels", "background"]
    (folder / "config.json").write_text(json.dumps(cfg))
    store = tmp_path / "store"
    res = run("import", "--store", store, "--weights", folder, "--data", split_dir / "step-0",
              *extra)
    refused(res, *words)
    assert not (store / "steps").exists() or not any((store / "steps").iterdir())


def test_train_takes_the_families(split_dir, tmp_path):
    res = run("train", "--store", tmp_path / "s", "--data", split_dir / "step-0", "--arch",
              "segformer-b0", "--iterations", 2, "--batch-size", 4, "--quiet")
    assert res.exit_code == 0, res.output
    card = Store(tmp_path / "s").card(0)
    assert card.arch == "segformer-b0" and card.config["loop"]["encoder_lr"] == 0.1
    assert card.model_config["transformers"]["hidden_sizes"] == [32, 64, 160, 256]
    model, _ = Store(tmp_path / "s").load_model(0)
    assert model.stage_names[0] == "stage1"


def test_train_starts_from_a_local_encoder(tmp_path):
    """--weights PATH: an SMP encoder file, a SegFormer snapshot folder (nothing downloads)."""
    from ciss.errors import CissError

    torch.manual_seed(3)
    donor = smp.Unet("resnet18", encoder_weights=None, classes=2)
    torch.save(donor.encoder.state_dict(), tmp_path / "enc.pth")
    model = build_model("smp-unet-resnet18", num_classes=3, weights=str(tmp_path / "enc.pth"))
    assert torch.equal(model.stages["stem"][0].weight, donor.encoder.conv1.weight)
    seg = tiny_segformer(5)
    seg.save_pretrained(tmp_path / "mit")
    cfg = {"transformers": {k: v for k, v in seg.config.to_dict().items()}}
    got = build_model("segformer", num_classes=3, config=cfg, weights=str(tmp_path / "mit"))
    assert torch.equal(got.stages["stage1"].patch_embeddings.proj.weight,
                       seg.segformer.stages[0].patch_embeddings.proj.weight)
    with pytest.raises(CissError, match="not a resnet34 encoder"):
        build_model("smp-unet-resnet34", num_classes=3, weights=str(tmp_path / "enc.pth"))
    with pytest.raises(CissError, match="another MiT size"):
        build_model("segformer-b0", num_classes=3, weights=str(tmp_path / "mit"))
