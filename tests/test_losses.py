"""Losses against values computed by hand on tiny tensors, gradients, no in-place edits."""

from __future__ import annotations

import math

import pytest
import torch

from ciss.updater.losses import (
    distillation,
    feature_distillation,
    unbiased_cross_entropy,
    unbiased_distillation,
)


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def px(values):
    """One pixel with the given channel values: [1, K, 1, 1]."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def test_unce_by_hand_one_new_class():
    z = [1.0, 0.5, -0.3, 2.0]  # bg, old1, old2, new  (K_old = 3)
    logits = torch.cat([px(z)] * 4, dim=3)  # 4 pixels in a row
    target = torch.tensor([[[0, 3, 1, 255]]])
    all_ = lse(*z)
    expected = [-(lse(z[0], z[1], z[2]) - all_), -(z[3] - all_), -(z[1] - all_)]
    got = unbiased_cross_entropy(logits, target, num_old=3)
    assert math.isclose(got.item(), sum(expected) / 3, rel_tol=1e-12)  # ignored pixel excluded


def test_unce_many_new_classes_and_target_untouched():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 3, 3, dtype=torch.float64)
    target = torch.randint(0, 7, (2, 3, 3))
    target[0, 0, 0] = 255
    saved = target.clone()
    got = unbiased_cross_entropy(logits, target, num_old=4)
    assert torch.equal(target, saved)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                y = int(target[b, i, j])
                if y == 255:
                    continue
                z = logits[b, :, i, j].tolist()
                num = lse(*z[:4]) if y == 0 else z[y]
                total += -(num - lse(*z))
                n += 1
    assert math.isclose(got.item(), total / n, rel_tol=1e-10)


def test_unkd_by_hand_with_alpha():
    s = [0.2, 1.0, -1.0, 0.7, 0.1]  # student: bg, old1, old2, new1, new2
    t = [1.5, 0.3, -0.2]  # teacher: K_old = 3
    alpha = 2.0
    p = torch.softmax(torch.tensor(t) * alpha, 0).tolist()
    all_ = lse(*s)
    log_q = [lse(s[0], s[3], s[4]) - all_, s[1] - all_, s[2] - all_]
    expected = -sum(pc * lq for pc, lq in zip(p, log_q)) / 3
    got = unbiased_distillation(px(s), px(t), alpha=alpha)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_unkd_mask_averages_over_masked_pixels():
    torch.manual_seed(1)
    s = torch.randn(1, 5, 2, 2, dtype=torch.float64)
    t = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    assert math.isclose(unbiased_distillation(s, t, mask=mask).item(),
                        unbiased_distillation(s[..., :1, :1], t[..., :1, :1]).item(),
                        rel_tol=1e-12)


def test_lwf_kd_renormalises_old_channels():
    s = [0.2, 1.0, -1.0, 5.0]
    t = [1.5, 0.3, -0.2]
    p = torch.softmax(torch.tensor(t, dtype=torch.float64), 0).tolist()
    norm = lse(*s[:3])
    expected = -sum(pc * (sc - norm) for pc, sc in zip(p, s[:3])) / 3
    assert math.isclose(distillation(px(s), px(t)).item(), expected, rel_tol=1e-12)


def test_feature_distillation_is_mse():
    a = torch.ones(1, 2, 2, 2)
    assert feature_distillation(a, a * 3).item() == 4.0


def test_gradients_match_finite_differences():
    torch.manual_seed(2)
    logits = torch.randn(1, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 3, 4], [1, 255, 0]]])
    teacher = torch.randn(1, 3, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: unbiased_cross_entropy(z, target, 3), (logits,))
    assert torch.autograd.gradcheck(lambda z: unbiased_distillation(z, teacher, 1.5), (logits,))


def test_unce_does_not_push_old_classes_down_on_background():
    # A background pixel whose logit mass sits on an old class: UNCE is ~0, plain CE is large.
    logits = px([0.0, 10.0, -5.0])
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert unbiased_cross_entropy(logits, target, num_old=2).item() < 1e-3
    assert torch.nn.functional.cross_entropy(logits, target).item() > 9


# -- base-training losses ---------------------------------------------------------------------
def test_class_weights_by_hand():
    from ciss.updater.losses import class_weights

    counts = torch.tensor([81.0, 9.0, 0.0, 10.0])  # shares .81 .09 0 .10
    w = class_weights(counts, power=0.5, cap=10.0)
    raw = [1 / 0.9, 1 / 0.3, 1 / 0.3, 1 / math.sqrt(0.1)]  # absent class: the largest seen
    norm = 0.81 * raw[0] + 0.09 * raw[1] + 0.10 * raw[3]
    assert torch.allclose(w, torch.tensor([r / norm for r in raw]), atol=1e-6)
    # the pixel-weighted mean weight is 1: the loss keeps its scale
    assert float((counts / counts.sum() * w).sum()) == pytest.approx(1.0)
    capped = class_weights(torch.tensor([9999.0, 1.0]), cap=4.0)
    assert float(capped[1] / capped[0]) == pytest.approx(4.0)


def test_weighted_ce_normalises_by_labelled_pixels():
    from ciss.updater.losses import weighted_cross_entropy

    z = [0.2, 1.0]
    logits = torch.cat([px(z)] * 3, dim=3)
    target = torch.tensor([[[0, 1, 255]]])
    w = torch.tensor([0.5, 3.0])
    expected = (0.5 * -(0.2 - lse(*z)) + 3.0 * -(1.0 - lse(*z))) / 2
    assert float(weighted_cross_entropy(logits, target, w)) == pytest.approx(expected)


def test_dice_by_hand_and_ignore():
    from ciss.updater.losses import dice_loss

    # two pixels, two classes; softmax probabilities p and labels y
    logits = torch.cat([px([2.0, 0.0]), px([0.0, 1.0]), px([5.0, -5.0])], dim=3)
    target = torch.tensor([[[0, 1, 255]]])
    p = [[math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)],
         [1 / (1 + math.e), math.e / (1 + math.e)]]
    d0 = 1 - (2 * p[0][0] + 1) / (p[0][0] + p[1][0] + 1 + 1)
    d1 = 1 - (2 * p[1][1] + 1) / (p[0][1] + p[1][1] + 1 + 1)
    assert float(dice_loss(logits, target)) == pytest.approx((d0 + d1) / 2)


def test_ohem_keeps_the_hardest_pixels():
    from ciss.updater.losses import ohem_cross_entropy

    logits = torch.cat([px([3.0, 0.0]), px([0.0, 3.0]), px([0.0, 0.0]), px([1.0, 0.0])], dim=3)
    target = torch.tensor([[[0, 0, 0, 255]]])
    ces = [-(3 - lse(3, 0)), -(0 - lse(0, 3)), -(0 - lse(0, 0))]
    # keep half of 3 labelled pixels -> 1 pixel, the hardest
    assert float(ohem_cross_entropy(logits, target, keep=0.5)) == pytest.approx(max(ces))


def test_base_loss_is_fp32_under_low_precision_logits():
    from ciss.updater.losses import BASE_LOSSES, base_loss

    logits = torch.randn(2, 3, 4, 4).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 3, (2, 4, 4))
    for name in BASE_LOSSES:
        parts = base_loss(name, logits, target, torch.ones(3))
        assert parts["loss"].dtype == torch.float32, name
        parts["loss"].backward()


def test_incremental_losses_run_in_fp32_under_low_precision(split_dir):
    """Under autocast the network may hand back bf16 logits; the MiB losses must not be
    computed in bf16 (they are sums of logsumexps over many pixels)."""
    from ciss.models import build_model, freeze, grow_classifier
    from ciss.updater.methods import IncrementalStep, MethodConfig

    torch.manual_seed(0)
    teacher = build_model("tiny", num_classes=4).eval()
    student = build_model("tiny", num_classes=4)
    student.load_state_dict(teacher.state_dict())
    grow_classifier(student, 2)
    freeze(student, "stage4")
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    masks = torch.randint(0, 6, (2, 32, 32))
    step = IncrementalStep(student, teacher, 4, MethodConfig("mib"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = step(images, masks)
    assert parts["loss"].dtype == torch.float32
    exact = step(images, masks)["loss"]
    assert float(parts["loss"]) == pytest.approx(float(exact), rel=0.05)


def test_new_class_dice_by_hand():
    from ciss.updater.losses import new_class_dice

    # K_old = 2 (bg, old), one new class (id 2); pixels labelled 2, 0, 1, 255
    logits = torch.cat([px([0.0, 0.0, 0.0])] * 4, dim=3)  # uniform: p_new = 1/3 everywhere
    target = torch.tensor([[[2, 0, 1, 255]]])
    inter, denom = 1 / 3, 3 * (1 / 3) + 1  # three valid pixels' p_new, one labelled new
    want = 1 - (2 * inter + 1) / (denom + 1)
    assert float(new_class_dice(logits, target, num_old=2)) == pytest.approx(want)
    assert float(new_class_dice(logits, torch.tensor([[[0, 0, 1, 1]]]), 2)) == 0.0  # absent
