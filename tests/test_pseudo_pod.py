"""PLOP's pieces against values computed by hand: entropy thresholds, which pixels are
relabelled, the Local POD embedding and its loss; and plop / mib --pseudo end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ciss.updater.pod import local_pod, pod_embedding
from ciss.updater.pseudo import EntropyHistogram, normalised_entropy, pseudo_label


def px(*columns):
    """[1, K, 1, W] logits from per-pixel channel lists."""
    return torch.tensor(columns, dtype=torch.float32).T.reshape(1, len(columns[0]), 1, -1)


def test_normalised_entropy_by_hand():
    logits = px([0.0, 0.0], [math.log(3), 0.0])  # p = (.5,.5) and (.75,.25)
    h = normalised_entropy(logits)[0, 0]
    assert float(h[0]) == pytest.approx(1.0)
    want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert float(h[1]) == pytest.approx(want, rel=1e-5)


def test_thresholds_are_per_class_medians_with_a_floor():
    hist = EntropyHistogram(3, bins=10)
    # background pixels predicted as class 1 with entropies .05 .15 .35 -> median bin 1 (.1-.2)
    hist.counts[1, [0, 1, 3]] = 1
    hist.counts[2, 0] = 4  # all in the first bin -> median bin 0 -> .1
    thr = hist.thresholds(floor=0.001)
    assert thr[0] == 0.001  # never predicted on background: the floor
    assert thr[1] == pytest.approx(0.2) and thr[2] == pytest.approx(0.1)
    hist.counts[2, 0] = 0
    hist.counts[2, 0] = 1
    assert hist.thresholds(floor=0.5)[2] == 0.5


def test_histogram_counts_background_pixels_by_the_parents_argmax():
    hist = EntropyHistogram(3, bins=10)
    logits = px([0.0, 9.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 9.0])
    hist.add(logits, torch.tensor([[[0, 0, 4]]]))  # the third pixel is a new class: skipped
    assert hist.counts[1].sum() == 1 and hist.counts[0].sum() == 1 and hist.counts[2].sum() == 0
    assert hist.counts[0, 9] == 1  # uniform over 3 classes: entropy 1 -> the last bin


def test_which_pixels_are_relabelled():
    # pixels: confident old 1 | unconfident | confident background | new class 4 | ignore
    logits = px([0.0, 9.0, 0.0], [0.0, 0.1, 0.0], [9.0, 0.0, 0.0], [0.0, 9.0, 0.0],
                [0.0, 9.0, 0.0])
    target = torch.tensor([[[0, 0, 0, 4, 255]]])
    thr = torch.tensor([0.5, 0.5, 0.5])
    out, share = pseudo_label(target, logits, thr)
    assert out.tolist() == [[[1, 255, 0, 4, 255]]]
    assert float(share[0]) == pytest.approx(2 / 3)
    kept, _ = pseudo_label(target, logits, thr, unsure=0)  # mib --pseudo keeps them background
    assert kept.tolist() == [[[1, 0, 0, 4, 255]]]
    assert target.tolist() == [[[0, 0, 0, 4, 255]]]  # not modified in place


def test_pod_embedding_by_hand():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    sq = (x ** 2)[0, 0].numpy()
    emb = pod_embedding(x, scales=(1, 2))[0].numpy()
    want = [sq.mean(1), sq.mean(0)]  # scale 1: along H (mean over W), along W (mean over H)
    for i in range(2):
        for j in range(2):
            win = sq[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            want += [win.mean(1), win.mean(0)]
    assert np.allclose(emb, np.concatenate(want))


def test_local_pod_loss_by_hand():
    s = [torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)]
    t = [torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2)]
    # layer 1: every entry of the D-long embedding differs by 1 -> norm sqrt(D); layer 2: 0
    d = pod_embedding(t[0]).shape[1]
    loss = local_pod(s, t, n_classes=8, n_new=2, factor=0.5)
    assert float(loss) == pytest.approx(0.5 * 2.0 * math.sqrt(d) / 2)  # /2 layers


@pytest.mark.parametrize("method,pseudo", [("plop", False), ("mib", True)])
def test_plop_and_mib_pseudo_train_end_to_end(method, pseudo, store_copy, split_dir):
    from ciss.store import Store
    from ciss.updater.add_classes import add_classes
    from ciss.updater.loop import LoopConfig
    from ciss.updater.methods import MethodConfig

    rep = add_classes(Store(store_copy), split_dir / "step-1",
                      method=MethodConfig(method=method, pseudo=pseudo),
                      loop=LoopConfig(iterations=3, batch_size=4), progress=False)
    hist = rep.fit.history[-1]
    assert all(math.isfinite(v) for v in hist.values())
    assert ("pod" in hist) == (method == "plop")
    assert rep.card.method == method and rep.card.config["method"]["pseudo"] == pseudo


def test_plop_distils_encoder_stages_and_logits_not_the_decoder():
    """PLOP's code distils the backbone's stages and the logits (new channels summed into
    the background), never the decoder's output: a student whose encoder equals the
    parent's and whose new rows add nothing has no POD, whatever its decoder does."""
    import copy

    from ciss.models import build_model, freeze, grow_classifier
    from ciss.updater.methods import IncrementalStep, MethodConfig, run_collect

    torch.manual_seed(0)
    teacher = build_model("tiny", num_classes=4).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    _, maps = run_collect(teacher, teacher.begin(x), teacher.stage_names, True)
    assert list(maps) == ["stem", "stage1", "stage2", "stage3", "stage4"]

    student = copy.deepcopy(teacher)
    grow_classifier(student, 2, init="random")
    conv = student.classifier_convs()[0]
    with torch.no_grad():  # new rows give logit 0: exp adds to the background, not the sum
        conv.weight[4:] = 0
        conv.bias[4:] = 0
        for p in student.stages["head"].parameters():  # the decoder moved: not distilled
            p.add_(0.1 * torch.randn_like(p))
    freeze(student, "stem")
    student.eval()
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    step = IncrementalStep(student, teacher, 4, MethodConfig(method="plop"),
                           thresholds=torch.full((4,), 0.5))
    pod_head_moved = step(x, y)["pod"]
    # the logits differ (the decoder moved), so only the logits term can be non-zero; its
    # factor is 0.0005: set it to 0 and the POD must vanish
    step0 = IncrementalStep(student, teacher, 4, MethodConfig(method="plop",
                                                             pod_logits_weight=0.0),
                            thresholds=torch.full((4,), 0.5))
    assert float(step0(x, y)["pod"]) == 0.0 and float(pod_head_moved) > 0
    with torch.no_grad():  # a moved encoder stage is distilled
        for p in student.stages["stage3"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert float(step0(x, y)["pod"]) > 0
