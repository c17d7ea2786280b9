"""Models: every ARCHS entry builds, grows with bit-identical old logits, and freezes BN."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ciss.errors import CissError
from ciss.models import ARCHS, build_model, freeze, freeze_bn_stats, grow_classifier


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("init", ["background", "random", "mib"])
def test_grow_keeps_old_logits(arch, init, images):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4).eval()
    # Non-trivial BN statistics and biases so that equality is not an accident of zeros.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    for conv in model.classifier_convs():
        torch.nn.init.normal_(conv.bias)
    with torch.no_grad():
        before = model(images)
    grown = copy.deepcopy(model)
    grow_classifier(grown, 3, init=init)
    with torch.no_grad():
        after = grown(images)
    assert after.shape[1] == 7 and grown.num_classes == 7
    assert torch.equal(after[:, 1:4], before[:, 1:4])  # old object classes: bit-identical
    if init == "mib":
        # background and new channels share P(bg or new) = old P(bg): log-sum-exp preserved
        lse = torch.logsumexp(torch.cat([after[:, :1], after[:, 4:]], 1), 1)
        assert torch.allclose(lse, before[:, 0], atol=1e-4)
        assert torch.allclose(after[:, 0], before[:, 0] - math.log(4), atol=1e-4)
    else:
        assert torch.equal(after[:, 0], before[:, 0])


def test_mib_init_copies_background_row():
    model = build_model("tiny", num_classes=3)
    grow_classifier(model, 2, init="mib")
    w = model.stages["classifier"].weight
    assert torch.equal(w[3], w[0]) and torch.equal(w[4], w[0])
    b = model.stages["classifier"].bias
    assert torch.equal(b[3], b[0]) and torch.equal(b[4], b[0])


def test_freeze_keeps_bn_statistics_and_weights():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3)
    freeze(model, "stage2")
    model.train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    stats = {n: b.clone() for n, b in model.named_buffers() if "stages.stage1" in n}
    trainable_stats = {n: b.clone() for n, b in model.named_buffers() if "stages.head" in n
                       and "running_mean" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()
                          if n in frozen)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if n in stats)
    # the trainable part does learn and update its statistics
    assert any(not torch.equal(b, trainable_stats[n]) for n, b in model.named_buffers()
               if n in trainable_stats)
    assert model.stages["stem"].training is False and model.stages["head"].training is True


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_bn_statistics_stay_while_weights_learn(frozen, images):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3)
    freeze(model, "stem")
    freeze_bn_stats(model, frozen)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    conv = model.stages["stage1"][0][0].weight
    w = conv.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(images).logsumexp(1).mean().backward()
    opt.step()
    moved = [not torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True)]
    assert not torch.equal(w, conv.detach())  # the trainable stages learn either way
    if frozen:
        assert not any(moved) and all(not m.training for m in bns)
    else:  # the stem is frozen (eval); every later BatchNorm follows the batch
        assert not any(moved[:2]) and all(moved[2:])
    model.eval()
    model.train()  # a mode switch keeps the choice
    assert all(not m.training for m in bns) == frozen


def test_freeze_errors():
    model = build_model("tiny", num_classes=3)
    with pytest.raises(CissError, match="--freeze stage9: unknown stage for tiny"):
        freeze(model, "stage9")
    with pytest.raises(CissError, match="nothing would be left"):
        freeze(model, "classifier")
    freeze(model, "none")
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_arch_suggests():
    with pytest.raises(CissError, match="did you mean 'deeplabv3_resnet50'"):
        build_model("deeplabv3_resnet5", num_classes=3)
    with pytest.raises(CissError, match="no pretrained weights"):
        build_model("tiny", num_classes=3, weights="imagenet")


def test_odd_input_sizes():
    model = build_model("tiny", num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 37, 53, dtype=torch.uint8))
    assert out.shape == (1, 5, 37, 53)
