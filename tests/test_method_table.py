"""Methods as one table (every list derives from it) and DKD against its published losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ciss.cli import main
from ciss.errors import CissError
from ciss.models import build_model, freeze, grow_classifier, sigmoid_form
from ciss.store import Store
from ciss.updater.add_classes import UpdateConfig, add_classes
from ciss.updater.defaults import step_defaults
from ciss.updater.loop import LoopConfig
from ciss.updater.method_table import BENCHMARK_METHODS, METHODS
from ciss.updater.methods import LOSSES, IncrementalStep, MethodConfig


def test_every_row_has_its_losses_and_every_list_derives_from_the_table():
    assert set(LOSSES) == set(METHODS)
    assert set(METHODS) <= set(BENCHMARK_METHODS)
    for name, row in METHODS.items():
        assert step_defaults(name).kd_weight == row.kd_weight
    res = CliRunner().invoke(main, ["add-classes", "--help"])
    for name in METHODS:
        assert name in res.output
    with pytest.raises(CissError, match="unknown; choose from mib, ft"):
        step_defaults("mib2")


def test_unknown_method_is_refused_before_anything_is_written(store_copy, split_dir):
    store = Store(store_copy)
    with pytest.raises(CissError, match="--method lwf2: unknown"):
        add_classes(store, split_dir / "step-1", method=MethodConfig(method="lwf2"),
                    progress=False)
    assert store.steps() == [0]


@pytest.mark.parametrize("arch", ["tiny", "lraspp_mobilenet_v3_large"])
def test_sigmoid_form_keeps_every_prediction(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5).eval()
    x = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    before = model(x)
    sigmoid_form(model)
    after = model(x)
    assert torch.equal(before.argmax(1), after.argmax(1))
    # each logit became z_c - z_0, so the background logit is the constant 0
    assert torch.allclose(after, before - before[:, :1], atol=1e-4)
    assert after[:, 0].abs().max() < 1e-5
    again = copy.deepcopy(model)
    sigmoid_form(again)
    assert torch.equal(again(x), after)


def _dkd_reference(student, teacher, x, y, k_old, w):
    """DKD's released losses (cvlab-yonsei/DKD trainer_voc.py, models/loss.py), rewritten
    here: positive/negative parts by a matmul over the classifier's input, BCE reductions of
    the mean over pixels per class summed over classes; no auxiliary head."""
    feats = {}

    def grab(key):
        return lambda _m, args: feats.__setitem__(key, args[0])

    hs = student.stages["classifier"].register_forward_pre_hook(grab("s"))
    ht = teacher.stages["classifier"].register_forward_pre_hook(grab("t"))
    s, t = student(x), teacher(x).detach()
    hs.remove()
    ht.remove()
    n_new = s.shape[1] - k_old
    target = torch.zeros_like(s[:, k_old:])
    for c in range(n_new):
        target[:, c] = (y == k_old + c).float()
    valid = (y != 255).float()[:, None]
    mbce = (F.binary_cross_entropy_with_logits(s[:, k_old:], target, reduction="none")
            * valid).sum((0, 2, 3)).div(valid.sum()).sum()
    kd = F.binary_cross_entropy_with_logits(
        s[:, 1:k_old], t[:, 1:k_old].sigmoid(), reduction="none").mean((0, 2, 3)).sum()

    def part(feat, conv, positive):
        wt = conv.weight[1:k_old, :, 0, 0]
        wt = wt.where(wt > 0 if positive else wt < 0, torch.zeros_like(wt))
        return torch.matmul(feat.permute(0, 2, 3, 1), wt.T).permute(0, 3, 1, 2)

    terms = []
    for positive in (True, False):
        ps = part(feats["s"], student.stages["classifier"], positive)
        pt = part(feats["t"], teacher.stages["classifier"], positive).detach()
        terms.append(F.binary_cross_entropy_with_logits(
            ps, pt.sigmoid(), reduction="none").mean((0, 2, 3)).sum())
    return mbce + w * (kd + terms[0] + terms[1])


def test_dkd_losses_match_the_published_definition():
    torch.manual_seed(0)
    teacher = build_model("tiny", num_classes=4).eval()
    sigmoid_form(teacher)
    student = copy.deepcopy(teacher)
    grow_classifier(student, 2, init="random")
    sigmoid_form(student)
    freeze(student, "stage2")
    student.train()
    step = IncrementalStep(student, teacher, 4, MethodConfig(method="dkd", kd_weight=5.0))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 6, (2, 32, 32))
    y[(y >= 1) & (y < 4)] = 0  # a new-class folder: new labels, background, ignored
    y[0, :4] = 255
    got = step(x, y)
    want = _dkd_reference(student, teacher, x, y, 4, 5.0)
    assert torch.allclose(got["loss"], want, atol=1e-5)
    # a replayed memory image labels old classes: as in DKD-M they teach through distillation
    # only (negatives for the new classes, nothing for the old sigmoids)
    y_mem = y.clone()
    y_mem[1, 8:16] = 2
    with torch.no_grad():
        assert torch.allclose(step(x, y_mem)["loss"],
                              _dkd_reference(student, teacher, x, y_mem, 4, 5.0), atol=1e-5)
    got["loss"].backward()
    cls = student.stages["classifier"]
    # the background row is the constant 0: no loss reaches it
    assert cls.weight.grad[0].abs().max() == 0 and cls.bias.grad[0] == 0
    assert cls.weight.grad[4:].abs().max() > 0


def test_dkd_step_is_stored_with_a_zero_background_row(store_copy, split_dir):
    store = Store(store_copy)
    parent, _ = store.load_model(0)
    rep = add_classes(store, split_dir / "step-1", method=MethodConfig(method="dkd",
                                                                      kd_weight=5.0),
                      update=UpdateConfig(parent=0), loop=LoopConfig(epochs=1, batch_size=8),
                      progress=False)
    assert rep.card.method == "dkd" and rep.card.config["method"]["kd_weight"] == 5.0
    model, _ = store.load_model(rep.step)
    w = model.classifier_convs()[0]
    assert w.weight[0].abs().max() == 0 and w.bias[0] == 0
    # the old rows changed (trained), the parent's stored weights did not
    again, _ = store.load_model(0)
    assert torch.equal(again.classifier_convs()[0].weight, parent.classifier_convs()[0].weight)


def test_endpoint_fusion_averages_shared_weights_and_keeps_new_rows():
    from ciss.models import fuse_endpoints

    torch.manual_seed(0)
    parent = build_model("tiny", num_classes=4).eval()
    student = copy.deepcopy(parent)
    grow_classifier(student, 2, init="random")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    trained = copy.deepcopy(student.state_dict())
    w = fuse_endpoints(student, parent, 4, 2)
    assert w == pytest.approx((2 / 6) ** 0.5)
    conv = student.classifier_convs()[0]
    ref = parent.classifier_convs()[0]
    name = next(k for k, v in student.state_dict().items()
                if v.data_ptr() == conv.weight.data_ptr())
    assert torch.allclose(conv.weight[:4], (1 - w) * ref.weight + w * trained[name][:4])
    assert torch.equal(conv.weight[4:], trained[name][4:])  # new rows: as trained
    stem = next(k for k in trained if k.startswith("stages.stem") and k.endswith("weight"))
    assert torch.allclose(student.state_dict()[stem],
                          (1 - w) * parent.state_dict()[stem] + w * trained[stem])


@pytest.mark.parametrize("arch", ["lraspp_mobilenet_v3_large", "smp-unet-resnet18",
                                  "segformer-b0"])
def test_dkd_runs_on_every_family(arch):
    """Summed classifiers (LRASPP), 3x3 heads (SMP) and SegFormer's decode head: the sigmoid
    rewrite keeps predictions and every DKD term reaches the trainable weights."""
    pytest.importorskip({"smp-unet-resnet18": "segmentation_models_pytorch",
                         "segformer-b0": "transformers"}.get(arch, "torch"))
    torch.manual_seed(0)
    teacher = build_model(arch, num_classes=4).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    before = teacher(x).argmax(1)
    sigmoid_form(teacher)
    assert torch.equal(before, teacher(x).argmax(1))
    student = copy.deepcopy(teacher)
    grow_classifier(student, 2, init="random")
    sigmoid_form(student)
    freeze(student, "stage2")
    student.train()
    y = torch.randint(0, 6, (2, 64, 64))
    y[(y > 0) & (y < 4)] = 0
    out = IncrementalStep(student, teacher, 4, MethodConfig(method="dkd", kd_weight=5.0))(x, y)
    assert all(float(out[k]) > 0 for k in ("bce", "kd", "pos", "neg"))
    out["loss"].backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().max() > 0
               for c in student.classifier_convs())
