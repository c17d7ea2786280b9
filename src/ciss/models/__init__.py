"""Models: the ARCHS table, staged segmentation networks, classifier growth and freezing."""

from ciss.models.build import ARCHS, SegmentationModel, build_model
from ciss.models.surgery import (
    freeze,
    freeze_bn_stats,
    frozen_stages,
    fuse_endpoints,
    grow_classifier,
    sigmoid_form,
)

__all__ = ["ARCHS", "SegmentationModel", "build_model", "freeze", "freeze_bn_stats",
           "frozen_stages", "fuse_endpoints", "grow_classifier", "sigmoid_form"]
