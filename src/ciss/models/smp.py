"""segmentation_models_pytorch (SMP) models through the staged interface.

The SMP modules are reused as they are: the encoder's own blocks become ciss's stages (stem at
1/2, stage1..stage4 at 1/4..1/32), the decoder is the head and the segmentation head's conv is
the classifier. SMP's forward asks for sides divisible by the encoder's output stride; the
adapter pads the normalised image at the bottom and right and crops the logits back, so any
image size serves (SMP users pad the same way).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ciss.errors import CissError
from ciss.models.staged import IMAGENET_MEAN, IMAGENET_STD, SegmentationModel, State

# SMP model classes whose forward is encoder -> decoder(features) -> segmentation_head, by
# the lower-case names SMP's create_model takes (and ciss's smp-<decoder>-<encoder> names).
DECODERS = ("unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet", "manet", "pan")
# Encoders whose blocks are split into stages here (name prefixes, as SMP names them).
ENCODERS = ("resnet", "resnext", "efficientnet-b", "mobilenet_v2", "mit_b")


def _require_smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise CissError("SMP models need segmentation_models_pytorch: pip install "
                        "'ciss[smp]'") from None
    return smp


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


def encoder_stages(encoder: nn.Module, name: str) -> dict[str, nn.Module]:
    """The encoder's blocks as stem (1/2) and stage1..stage4 (1/4..1/32); mit has no stem.

    Raises:
        CissError: an encoder this adapter does not split (the supported ones are named).
    """
    kind = type(encoder).__name__
    if kind == "ResNetEncoder":
        e = encoder
        return {"stem": nn.Sequential(e.conv1, e.bn1, e.relu),
                "stage1": nn.Sequential(e.maxpool, e.layer1), "stage2": e.layer2,
                "stage3": e.layer3, "stage4": e.layer4}
    if kind == "MobileNetV2Encoder":
        f, cuts = encoder.features, [0, 2, 4, 7, 14, len(encoder.features)]
        return {n: f[a:b] for n, a, b in zip(("stem", "stage1", "stage2", "stage3", "stage4"),
                                             cuts, cuts[1:])}
    if kind == "EfficientNetEncoder":
        e, idx = encoder, encoder._out_indexes
        stages: dict[str, nn.Module] = {"stem": nn.Sequential(e._conv_stem, e._bn0, e._swish)}
        for i, (a, b) in enumerate(zip([-1, *idx[:3]], idx), start=1):
            stages[f"stage{i}"] = _EfficientBlocks(e._blocks, a + 1, b + 1, e._drop_connect_rate)
        return stages
    if kind == "MixVisionTransformerEncoder":
        e = encoder
        return {f"stage{i}": _MitStage(getattr(e, f"patch_embed{i}"), getattr(e, f"block{i}"),
                                       getattr(e, f"norm{i}")) for i in range(1, 5)}
    raise CissError(f"SMP encoder {name} ({kind}) is not supported; ciss splits "
                    f"{', '.join(p + '*' for p in ENCODERS)} into stages")


def parse_arch(arch: str) -> tuple[str, str]:
    """``smp-unet-resnet18`` -> ("unet", "resnet18").

    Raises:
        CissError: not of that form, or a decoder that does not fit the staged interface.
    """
    parts = arch.split("-", 2)
    if len(parts) != 3 or parts[0] != "smp":
        raise CissError(f"--arch {arch}: SMP models are named smp-<decoder>-<encoder>, "
                        "e.g. smp-unet-resnet18")
    if parts[1] not in DECODERS:
        raise CissError(f"--arch {arch}: SMP decoder '{parts[1]}' is not supported (choose "
                        f"from {', '.join(DECODERS)})")
    return parts[1], parts[2]


def smp_config(arch: str, config: dict | None) -> dict:
    """The SMP constructor arguments: ``config`` (an imported model's) or the arch's defaults."""
    decoder, encoder = parse_arch(arch)
    cfg = {k: v for k, v in (config or {}).get("smp", {}).items() if not k.startswith("_")}
    return {"_model_class": decoder, "encoder_name": encoder, **cfg}


class SMPSegmentation(SegmentationModel):
    """An SMP model (Unet, FPN, DeepLabV3Plus, ...): stem, stage1..4, head, classifier.

    Args:
        arch: ``smp-<decoder>-<encoder>``.
        num_classes: output channels.
        config: ``{"smp": constructor arguments, "mean", "std"}`` (what the card stores).
        module: an existing SMP model to wrap (``ciss import``), else one is built.
        weights: None (random init), "imagenet" (the encoder's ImageNet weights, which SMP
            downloads on first use) or a local encoder state-dict file (keys as
            ``model.encoder`` has them, optionally prefixed ``encoder.``).
    """

    def __init__(self, arch: str, num_classes: int, config: dict | None = None,
                 module: nn.Module | None = None, weights: str | None = None) -> None:
        config = dict(config or {})
        super().__init__(arch, num_classes, tuple(config.get("mean", IMAGENET_MEAN)),
                         tuple(config.get("std", IMAGENET_STD)))
        ctor = smp_config(arch, config)
        if module is None:
            smp = _require_smp()
            local = weights not in (None, "imagenet")
            if local and not Path(weights).is_file():
                raise CissError(f"--weights {weights}: neither 'imagenet' nor an encoder file; a "
                                "saved SMP model is imported with 'ciss import --weights DIR'")
            kwargs = {k: v for k, v in ctor.items() if k not in ("_model_class", "classes")}
            kwargs["encoder_weights"] = None if local else weights
            module = smp.create_model(ctor["_model_class"], classes=num_classes, **kwargs)
            if local:
                from ciss.models.weights import load_encoder_file

                load_encoder_file(module.encoder, Path(weights), ("encoder.",),
                                  f"a {ctor['encoder_name']} encoder")
        if getattr(module, "classification_head", None) is not None:
            raise CissError(f"{arch}: SMP models with aux_params (a classification head) are "
                            "not supported; save the model without it")
        if module.encoder._depth != 5:
            raise CissError(f"{arch}: encoder_depth {module.encoder._depth}; ciss needs the "
                            "five encoder stages (encoder_depth 5, SMP's default)")
        self.output_stride = int(module.encoder.output_stride)
        self.stages.update(encoder_stages(module.encoder, ctor["encoder_name"]))
        self.stages["head"] = module.decoder
        head = module.segmentation_head
        self.stages["classifier"] = head[0]
        # parameter-free parts of SMP's segmentation head (upsampling, activation)
        self.upsample = head[1]
        self.activation = head[2]
        self.has_stem = "stem" in self.stages
        keep = {k: v for k, v in dict(getattr(module, "config", {}) or ctor).items()
                if not k.startswith("_") and k not in ("classes", "encoder_weights")}
        keep.setdefault("encoder_name", ctor["encoder_name"])
        self.config = {"smp": _jsonable(keep), **self.preprocessing}
        self.check_stages()

    def begin(self, image: torch.Tensor) -> State:
        x = (image.float() - self.mean) / self.std
        h, w = x.shape[-2:]
        s = self.output_stride
        x = F.pad(x, (0, (s - w % s) % s, 0, (s - h % s) % s))
        state = {"x": x, "f0": x}
        if not self.has_stem:  # SMP's mit encoder gives an empty 1/2 feature
            n, _, ph, pw = x.shape
            state["f1"] = x.new_zeros((n, 0, ph // 2, pw // 2))
        return state

    def run_stage(self, name: str, state: State) -> State:
        m = self.stages[name]
        if name == "stem":
            state["f1"] = m(state.pop("x"))
        elif name.startswith("stage"):
            i = int(name[-1])
            src = state.pop("x") if i == 1 and not self.has_stem else state[f"f{i}"]
            state["features" if i == 4 else f"f{i + 1}"] = m(src)
        elif name == "head":
            feats = [state.pop(k) for k in ("f0", "f1", "f2", "f3", "f4")]
            state["head"] = m([*feats, state["features"]])
        elif name == "classifier":
            state["logits"] = self.activation(self.upsample(m(state.pop("head"))))
        else:
            raise KeyError(name)
        return state

    def finish(self, state: State, size) -> torch.Tensor:
        # the padding sits at the bottom and right: crop it away first
        return super().finish({"logits": state["logits"][..., : size[0], : size[1]]}, size)


def _jsonable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple)
                                 else str(o)))


def arch_name(module: nn.Module) -> str:
    """The ciss name of a loaded SMP model, e.g. smp-unet-resnet18."""
    return f"smp-{type(module).__name__.lower()}-{module.config['encoder_name']}"


def load_saved(folder: Path) -> nn.Module:
    """An SMP model saved with ``save_pretrained`` (config.json + model.safetensors).

    Raises:
        CissError: unreadable config, an unknown model class, or weights that do not fit.
    """
    smp = _require_smp()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = config.get("_model_class", "")
    if name.lower() not in DECODERS:
        raise CissError(f"{folder / 'config.json'}: SMP model class '{name}' is not supported "
                        f"(choose from {', '.join(DECODERS)})")
    try:
        # encoder_weights=None: the saved weights replace them; nothing is downloaded
        return smp.from_pretrained(str(folder), encoder_weights=None)
    except Exception as exc:  # noqa: BLE001 - a mismatch or corrupt file, said in one line
        raise CissError(f"{folder}: cannot load the SMP model ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
