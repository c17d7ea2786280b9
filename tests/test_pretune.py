"""NeST's classifier pre-tuning: the generated rows, the importance start, what it may change,
every family's classifier, and the option through the command line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn.utils import parametrize

from ciss.cli import main
from ciss.data.classes import ClassList
from ciss.data.dataset import SegmentationDataset, label_lut
from ciss.data.folder import open_folder
from ciss.data.transforms import TrainTransform
from ciss.errors import CissError
from ciss.models import build_model, freeze, freeze_bn_stats, grow_classifier
from ciss.store import Store
from ciss.updater.add_classes import UpdateConfig, pretune_share
from ciss.updater.distributed import DistInfo
from ciss.updater.loop import LoopConfig
from ciss.updater.pretune import GeneratedRows, importance_sums, pretune
from tests.conftest import refused, write_colour_world


@pytest.mark.parametrize("taps", [1, 3])
def test_generated_rows_are_the_importance_weighted_mixture(taps):
    torch.manual_seed(0)
    k_old, n_new, d = 4, 2, 5
    weight = torch.randn(k_old + n_new, d, taps, taps)
    gen = GeneratedRows(torch.rand(n_new, k_old, d), torch.rand(n_new, k_old), k_old)
    with torch.no_grad():
        gen.bg_scale.copy_(torch.rand(d) + 0.5)
        got = gen(weight)
    for c in range(n_new):
        want = sum(gen.mix[c, k] * gen.importance[c, k].view(d, 1, 1) * weight[k]
                   for k in range(k_old))
        torch.testing.assert_close(got[k_old + c], want)
    assert torch.equal(got[1:k_old], weight[1:k_old])  # old rows exactly as they were
    bg = weight[0] * gen.bg_scale.view(d, 1, 1)
    torch.testing.assert_close(got[0], bg * weight[0].norm() / bg.norm())  # norm kept


def test_importance_sums_match_the_definition():
    torch.manual_seed(1)
    n, d, k_old, h, w = 2, 6, 3, 4, 5
    feats = torch.randn(n, d, h, w)
    probs = torch.rand(n, k_old, h, w).softmax(dim=1)
    labels = torch.randint(0, 5, (n, h, w))
    weight = torch.randn(k_old, d, 3, 3)
    sums, counts = importance_sums(feats, probs, labels, weight, [3, 4])
    ws = weight.sum(dim=(2, 3))
    for i, c in enumerate([3, 4]):
        want = torch.zeros(k_old, d)
        pixels = 0
        for b, y, x in zip(*torch.nonzero(labels == c, as_tuple=True)):
            f = feats[b, :, y, x]
            want += probs[b, :, y, x].view(-1, 1) * ((f.view(1, -1) * ws) > 0).float()
            pixels += 1
        torch.testing.assert_close(sums[i], want)
        assert counts[i] == pixels


def _grown(arch: str, k_old: int, n_new: int, seed: int = 0):
    torch.manual_seed(seed)
    teacher = build_model(arch, num_classes=k_old).eval()
    student = copy.deepcopy(teacher)
    grow_classifier(student, n_new, init="random")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student


def _run(teacher, student, folder_dir, share=1.0, iterations=12, stage="stem"):
    folder = open_folder(folder_dir)
    parent = ("background", *(f"c{i}" for i in range(1, teacher.num_classes)))
    classes = ClassList(parent).extended([n for n in folder.classes.objects if n not in parent])
    lut = label_lut(folder.classes, classes)
    freeze(student, stage)
    freeze_bn_stats(student, False)  # the statistics would move if the pre-tuning let them
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    new_ids = list(range(teacher.num_classes, len(classes)))
    data = SegmentationDataset(folder, folder.train, lut, TrainTransform(32), seed=0)
    result = pretune(student, teacher, teacher.num_classes, data, folder, lut, new_ids, share,
                     LoopConfig(iterations=iterations, batch_size=2, lr=3e-3, evals=0,
                                warmup=0.0), DistInfo(), progress=False)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    for n, b in student.named_buffers():
        assert torch.equal(b, buffers[n]), n  # no BatchNorm statistic moved
    with_new = [s for s in folder.train if folder.presence[s] & {3, 4}]
    assert result.stats_images == len(with_new) > 0  # the start read every such image
    return result


def _check_rows(teacher, student, start, direction=True):
    k_old = teacher.num_classes
    for t_conv, s_conv, s0 in zip(teacher.classifier_convs(), student.classifier_convs(), start):
        assert not parametrize.is_parametrized(s_conv)
        w, w0 = s_conv.weight, t_conv.weight
        assert torch.equal(w[1:k_old], w0[1:k_old])  # old rows bit-equal
        if s_conv.bias is not None:
            assert torch.equal(s_conv.bias[:k_old], t_conv.bias)
        torch.testing.assert_close(w[0].norm(), w0[0].norm())  # background norm kept...
        assert not direction or not torch.allclose(w[0], w0[0])  # ...its direction trained
        assert not torch.allclose(w[k_old:], s0[k_old:])  # the new rows were replaced
        assert torch.isfinite(w).all()


def test_pretune_fits_only_new_rows_and_the_background_direction(tmp_path):
    teacher, student = _grown("tiny", 3, 2)  # background, c1, c2; then new1, new2
    start = [c.weight.detach().clone() for c in student.classifier_convs()]
    trunk = {k: v.clone() for k, v in student.state_dict().items() if "classifier" not in k}
    folder = write_colour_world(tmp_path / "f", ["c1", "c2", "new1", "new2"], n_train=8,
                                n_val=2)
    result = _run(teacher, student, folder, iterations=40)
    _check_rows(teacher, student, start)
    for k, v in student.state_dict().items():
        if "classifier" not in k:
            assert torch.equal(v, trunk[k]), k  # nothing outside the classifier moved
    assert result.iterations == 40
    assert result.last_loss < result.first_loss  # the unbiased CE went down


@pytest.mark.parametrize("arch", ["lraspp_mobilenet_v3_large", "smp-unet-resnet18"])
def test_pretune_on_summed_and_kxk_classifiers(arch, tmp_path):
    if arch.startswith("smp"):
        pytest.importorskip("segmentation_models_pytorch", reason="pip install 'ciss[smp]'")
    teacher, student = _grown(arch, 3, 1)
    convs = student.classifier_convs()
    # LRASPP sums two classifiers; SMP's head is 3x3: each is fitted in its own right
    assert len(convs) == 2 if arch.startswith("lraspp") else convs[0].kernel_size == (3, 3)
    start = [c.weight.detach().clone() for c in convs]
    folder = write_colour_world(tmp_path / "f", ["c1", "c2", "new1"], n_train=4, n_val=1)
    _run(teacher, student, folder, iterations=4, stage="stage3")
    # (four steps on a random LRASPP can scale its background row uniformly: norm kept, same
    # direction; the tiny test above checks the direction)
    _check_rows(teacher, student, start, direction=False)


def test_the_share_default_and_refusals():
    # measured on tiny (BENCHMARKS.md §11j); the families trained elsewhere keep it opt-in
    assert pretune_share(UpdateConfig(), "mib", "tiny") == pytest.approx(1 / 3)
    assert pretune_share(UpdateConfig(), "mib", "lraspp_mobilenet_v3_large") == 0.0
    assert pretune_share(UpdateConfig(), "lwf", "tiny") == 0.0  # its row does not ask for it
    assert pretune_share(UpdateConfig(pretune=0.3), "lwf", "tiny") == 0.3
    assert pretune_share(UpdateConfig(pretune=0.0), "mib", "tiny") == 0.0
    with pytest.raises(CissError, match="from 0"):
        pretune_share(UpdateConfig(pretune=1.5), "mib", "tiny")
    with pytest.raises(CissError, match="sigmoid"):
        pretune_share(UpdateConfig(pretune=0.2), "dkd", "tiny")


def test_cli_pretune_reaches_the_card_and_bad_shares_write_nothing(store_copy, split_dir):
    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    common = ("add-classes", "--store", store_copy, "--data", split_dir / "step-1",
              "--from", 0, "--iterations", 20, "--batch-size", 4, "--quiet")
    res = run(*common, "--pretune", 0.25)
    assert res.exit_code == 0, res.output
    assert "s pre-tuning the classifier" in res.output
    card = Store(store_copy).card(1)
    assert card.config["update"]["pretune"] == 0.25 and "hparams" not in card.to_json()
    assert card.extra["pretune"]["iterations"] == 5  # a quarter of the 20-step budget
    assert card.timings["pretune_s"] > 0 and "seconds" not in card.extra["pretune"]
    refused(run(*common, "--pretune", 1.5), "--pretune 1.5")
    refused(run(*common, "--pretune", 0.2, "--method", "dkd"), "sigmoid")
    res = run(*common, "--pretune", 0)
    assert res.exit_code == 0, res.output
    assert "pre-tuning" not in res.output
    card = Store(store_copy).card(2)
    assert card.extra["pretune"] is None and card.config["update"]["pretune"] == 0.0
    doc = json.loads(run("steps", "--store", store_copy, "--json").output)
    assert [d["step"] for d in doc] == [0, 1, 2]  # the refused runs wrote nothing
    assert np.isfinite(card.retention["0"]["torch"]["background"])


def test_benchmark_names_turn_the_pretuning_on_and_off():
    from ciss.benchmark import method_parts, pretune_of
    from ciss.models.recipes import NEST_SHARE

    name, ons = method_parts("mib+pretune+memory")
    assert name == "mib" and ons == {"pretune", "memory"}
    assert pretune_of(ons, 0.0) == NEST_SHARE  # asked for where the recipe has none
    assert pretune_of(ons, 0.25) == 0.25  # the recipe's share where it has one
    assert pretune_of(method_parts("mib+nopretune")[1], 0.25) == 0.0
    assert pretune_of(method_parts("mib")[1], 0.25) is None  # the default decides
