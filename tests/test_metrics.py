"""analysis/metrics against a confusion matrix worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ciss.analysis.metrics import (
    Scores,
    confusion_matrix,
    harmonic_iou,
    iou_per_class,
    mean_iou,
    restrict_predictions,
)
from ciss.errors import CissError

# 3 classes; the 7th pixel is ignored (255), so 7 pixels are scored:
#   (gt, pred) = (0,0) (0,1) (1,1) (1,1) (1,0) (2,2) (2,1)
TARGET = [0, 0, 1, 1, 1, 2, 255, 2]
PRED = [0, 1, 1, 1, 0, 2, 2, 1]
# rows = ground truth, columns = prediction
CM = [[1, 1, 0],
      [1, 2, 0],
      [0, 1, 1]]
# IoU = tp / (row sum + column sum - tp):
#   class 0: 1 / (2 + 2 - 1) = 1/3;  class 1: 2 / (3 + 4 - 2) = 2/5;  class 2: 1 / (2 + 1 - 1) = 1/2
IOU = [1 / 3, 2 / 5, 1 / 2]


def test_confusion_matrix_and_iou_by_hand():
    cm = confusion_matrix(np.array(PRED), np.array(TARGET), 3)
    assert cm.tolist() == CM
    assert cm.sum() == 7  # the ignored pixel is not counted
    assert iou_per_class(cm) == pytest.approx(IOU)
    assert mean_iou(IOU) == pytest.approx(37 / 90)  # (10 + 12 + 15) / 30 / 3
    assert mean_iou(IOU, [1, 2]) == pytest.approx(0.45)


def test_torch_input_and_2d_shapes_give_the_same_matrix():
    cm = confusion_matrix(torch.tensor(PRED).view(2, 4), torch.tensor(TARGET).view(2, 4), 3)
    assert cm.tolist() == CM


def test_class_without_ground_truth_is_none_and_left_out_of_means():
    # class 3 is never in the ground truth, but predicted once: it costs class 0 a pixel
    cm = confusion_matrix(np.array([0, 3, 1]), np.array([0, 0, 1]), 4)
    iou = iou_per_class(cm)
    assert iou == [0.5, 1.0, None, None]
    assert mean_iou(iou) == pytest.approx(0.75)
    s = Scores(("background", "a", "b", "c"), iou, cm)
    assert s.per_class() == {"background": 0.5, "a": 1.0, "b": None, "c": None}
    assert s.miou([2, 3]) is None


def test_out_of_range_predictions_are_refused_not_clamped():
    # before #29 a prediction of class 5 among 3 classes was clamped to class 2 and the step
    # scored as if the model had predicted it: now it says the model and classes differ
    with pytest.raises(CissError, match=r"outside 0\.\.2 \(e\.g\. 5\)"):
        confusion_matrix(np.array([0, 5, 1]), np.array([0, 1, 1]), 3)
    with pytest.raises(CissError, match="outside"):
        confusion_matrix(np.array([-1, 0]), np.array([0, 0]), 3)
    # on ignored pixels whatever was predicted does not count
    cm = confusion_matrix(np.array([0, 9]), np.array([0, 255]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_out_of_range_targets_are_skipped():
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 7, 1]), 3)
    assert cm.sum() == 2 and cm[1, 1] == 1


def test_harmonic_iou_by_hand():
    assert harmonic_iou(0.5, 0.25) == pytest.approx(1 / 3)  # 2 * 0.125 / 0.75
    assert harmonic_iou(0.0, 0.0) == 0.0
    assert harmonic_iou(None, 0.5) is None


def test_restrict_predictions_turns_unlabelled_classes_into_background():
    pred = torch.tensor([0, 1, 2, 3, 2])
    assert restrict_predictions(pred, [0, 2]).tolist() == [0, 0, 2, 0, 2]
    assert restrict_predictions(pred, [0, 1, 2, 3, 9]).tolist() == pred.tolist()
