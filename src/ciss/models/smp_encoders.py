"""SMP encoders split into ciss's stages, and each encoder's own preprocessing.

Every encoder becomes stem (1/2) and stage1..stage4 (1/4..1/32), each stage exactly the blocks
between two of the features SMP's forward hands to the decoder, so the staged forward computes
what the encoder computes. The split is chosen by the encoder's type (SMP names two different
classes ``EfficientNetEncoder``), and the ``tu-`` universal encoders are split at the layers
timm's ``feature_info`` taps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ciss.errors import CissError
from ciss.models.staged import IMAGENET_MEAN, IMAGENET_STD

# encoders split here, as SMP names them (name prefixes; for messages and docs)
SUPPORTED = ("resnet", "resnext", "efficientnet-b", "timm-efficientnet-b",
             "timm-tf_efficientnet_lite", "mobilenet_v2", "mit_b", "tu-<timm model>")
INCEPTION = (0.5, 0.5, 0.5)  # mean = std = 0.5 on x/255 (TF-trained weights)
STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4")


class _EfficientBlocks(nn.Module):
    """A run of SMP EfficientNet blocks with their drop-connect rates by global index, as
    the encoder's own forward applies them."""

    def __init__(self, blocks: nn.ModuleList, start: int, stop: int, rate: float | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks[start:stop])
        self.rates = [(rate or 0.0) * i / len(blocks) for i in range(start, stop)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, rate)
        return x


class _MitStage(nn.Module):
    """One Mix Transformer stage: patch embedding, blocks, norm (SMP's mit forward)."""

    def __init__(self, embed: nn.Module, block: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.embed, self.block, self.norm = embed, block, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.block(self.embed(x))).contiguous()


class _TimmStage(nn.Module):
    """Consecutive layers of a timm feature extractor, NCHW in and out.

    Channels-last models (their features are NHWC inside) get the image as it is and their
    feature permuted back to NHWC on entry, NCHW on exit: what SMP's encoder does to the
    features it returns, so the values are the same.
    """

    def __init__(self, layers: OrderedDict, nhwc_in: bool, nhwc_out: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(layers)
        self.nhwc_in, self.nhwc_out = nhwc_in, nhwc_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc_in:
            x = x.permute(0, 2, 3, 1)
        x = self.layers(x)
        if not isinstance(x, torch.Tensor):
            raise CissError("this timm encoder passes tuples between its layers; ciss "
                            "cannot split it into stages")
        return x.permute(0, 3, 1, 2).contiguous() if self.nhwc_out else x


def _named(stages: list[nn.Module], stem: bool) -> dict[str, nn.Module]:
    return dict(zip(STAGE_NAMES if stem else STAGE_NAMES[1:], stages))


def _timm_groups(model: nn.Module, name: str) -> list[OrderedDict]:
    """The feature extractor's layers grouped so that each group ends at one tapped feature."""
    from timm.models._features import FeatureDictNet

    groups: list[OrderedDict] = []
    if isinstance(model, FeatureDictNet):  # FeatureListNet too: a dict of top-level layers
        group: OrderedDict = OrderedDict()
        for key, layer in model.items():
            group[key] = layer
            if key in model.return_layers:
                groups.append(group)
                group = OrderedDict()
        return groups
    # timm's own feature classes for EfficientNet / MobileNet: stem, then blocks whose
    # outputs are taken after the block counts in _stage_out_idx (0: the stem's output)
    cuts = sorted(getattr(model, "_stage_out_idx", {}) or {})
    if not cuts or getattr(model, "feature_hooks", None) is not None:
        raise CissError(f"SMP encoder tu-{name} ({type(model).__name__}): timm builds its "
                        "features with hooks, which ciss cannot split into stages; choose a "
                        "timm model whose features_only form is a FeatureListNet (ResNet, "
                        "ConvNeXt, RegNet) or an EfficientNet / MobileNet")
    head = [(k, getattr(model, k)) for k in ("conv_stem", "bn1", "act1") if hasattr(model, k)]
    start = 0
    for i, cut in enumerate(cuts):
        group = OrderedDict(head if i == 0 else [])
        group.update((f"blocks_{j}", model.blocks[j]) for j in range(start, cut))
        groups.append(group)
        start = cut
    return groups


def _timm_universal(encoder: nn.Module) -> dict[str, nn.Module]:
    if encoder._is_vgg_style:
        raise CissError(f"SMP encoder tu-{encoder.name}: its features start at full "
                        "resolution (VGG style); ciss splits encoders whose first feature is "
                        "at 1/2 or 1/4")
    groups = _timm_groups(encoder.model, encoder.name)
    stem = not encoder._is_transformer_style
    if len(groups) != (5 if stem else 4):
        raise CissError(f"SMP encoder tu-{encoder.name}: {len(groups)} feature levels; ciss "
                        "needs the five of encoder_depth 5")
    nhwc = bool(encoder._is_channel_last)
    return _named([_TimmStage(g, nhwc and i > 0, nhwc) for i, g in enumerate(groups)], stem)


def encoder_stages(encoder: nn.Module, name: str) -> dict[str, nn.Module]:
    """The encoder's blocks as stem (1/2) and stage1..stage4 (1/4..1/32); mit and
    transformer-style ``tu-`` encoders have no stem.

    Raises:
        CissError: an encoder this adapter does not split (the supported ones are named).
    """
    from segmentation_models_pytorch.encoders import (
        efficientnet,
        mix_transformer,
        mobilenet,
        resnet,
        timm_efficientnet,
        timm_universal,
    )

    e = encoder
    if isinstance(e, resnet.ResNetEncoder):
        return {"stem": nn.Sequential(e.conv1, e.bn1, e.relu),
                "stage1": nn.Sequential(e.maxpool, e.layer1), "stage2": e.layer2,
                "stage3": e.layer3, "stage4": e.layer4}
    if isinstance(e, mobilenet.MobileNetV2Encoder):
        f, cuts = e.features, [0, 2, 4, 7, 14, len(e.features)]
        return {n: f[a:b] for n, a, b in zip(STAGE_NAMES, cuts, cuts[1:])}
    if isinstance(e, efficientnet.EfficientNetEncoder):  # lukemelas' blocks (efficientnet-b*)
        idx = e._out_indexes
        stages: dict[str, nn.Module] = {"stem": nn.Sequential(e._conv_stem, e._bn0, e._swish)}
        for i, (a, b) in enumerate(zip([-1, *idx[:3]], idx), start=1):
            stages[f"stage{i}"] = _EfficientBlocks(e._blocks, a + 1, b + 1, e._drop_connect_rate)
        return stages
    if isinstance(e, timm_efficientnet.EfficientNetBaseEncoder):  # timm's blocks
        cuts = [0, *e._stage_idxs, len(e.blocks)]
        return {"stem": nn.Sequential(e.conv_stem, e.bn1),
                **{f"stage{i}": e.blocks[a:b]
                   for i, (a, b) in enumerate(zip(cuts, cuts[1:]), start=1)}}
    if isinstance(e, mix_transformer.MixVisionTransformerEncoder):
        return {f"stage{i}": _MitStage(getattr(e, f"patch_embed{i}"), getattr(e, f"block{i}"),
                                       getattr(e, f"norm{i}")) for i in range(1, 5)}
    if isinstance(e, timm_universal.TimmUniversalEncoder):
        return _timm_universal(e)
    raise CissError(f"SMP encoder {name} ({type(e).__name__}) is not supported; ciss splits "
                    f"{', '.join(p + '*' for p in SUPPORTED)} into stages")


def encoder_preprocessing(encoder: str, weights: str | None = None
                          ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """The mean/std on x/255 an SMP encoder's pretrained weights expect, read offline.

    ``tu-`` encoders: timm's ``pretrained_cfg`` (what SMP's ``get_preprocessing_params``
    reads for them). SMP's own encoders: SMP asks the hub for these, so they are tabled here
    from the timm configs they were converted from: the TF-ported EfficientNet-Lite and
    AdvProp weights take mean = std = 0.5, the others ImageNet's mean/std. ``weights`` is the
    variant (imagenet, advprop, ...) when known.

    Returns:
        (mean, std, where the values come from).
    """
    if encoder.startswith("tu-") or encoder.startswith("timm-tf_efficientnet_lite"):
        try:
            import timm

            cfg = timm.models.get_pretrained_cfg(encoder.removeprefix("tu-")
                                                 .removeprefix("timm-"))
        except Exception:  # noqa: BLE001 - an unknown name: the default below
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            return (tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std),
                    f"timm's pretrained_cfg of {cfg.architecture}")
    elif weights == "advprop":
        return INCEPTION, INCEPTION, f"SMP's {encoder} advprop weights"
    return IMAGENET_MEAN, IMAGENET_STD, f"ImageNet's (SMP's {encoder} weights)"


def hub_source(encoder: str) -> tuple[str, str | None]:
    """Where the library downloads ``encoder``'s ImageNet weights: (hub repo, revision).

    Raises:
        CissError: the encoder has no ImageNet weights in its library.
    """
    if encoder.startswith("tu-"):
        import timm

        name = encoder.removeprefix("tu-")
        cfg = timm.models.get_pretrained_cfg(name) if timm.models.is_model_pretrained(
            name) else None
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise CissError(f"--weights imagenet: timm has no pretrained weights for {name}")
        return cfg.hf_hub_id or cfg.url, None
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder, {}).get("pretrained_settings", {})
    if "imagenet" not in settings:
        raise CissError(f"--weights imagenet: SMP's {encoder} has no ImageNet weights (it has: "
                        f"{', '.join(settings) or 'none'})")
    return settings["imagenet"]["repo_id"], settings["imagenet"].get("revision")


def cached_sha256(repo: str, revision: str | None) -> str | None:
    """sha256 of the weights file a library downloaded from ``repo`` (None: not found)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - SMP depends on it
        return None
    from ciss.models.imagenet import sha256_of

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(path, str):
            return sha256_of(path)
    return None
