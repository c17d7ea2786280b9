"""Hugging Face transformers' SegFormer through the staged interface.

``SegformerForSemanticSegmentation``: the four Mix Transformer encoder stages are stage1..4
(there is no stem: the first patch embedding is part of stage1), the all-MLP decode head is the
head and its final 1x1 conv the classifier. Logits come out at 1/4 of the input and are
upsampled bilinearly (align_corners=False), as transformers' own loss and post-processing do.
The encoder normalises with LayerNorm (no running statistics); the decode head has one
BatchNorm, the only one ``--bn-stats`` concerns.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ciss.errors import CissError
from ciss.models.staged import IMAGENET_MEAN, IMAGENET_STD, SegmentationModel, State

# The SegFormer paper's MiT-b0..b5 sizes (Xie et al. 2021, Table 6; transformers' configs of
# the nvidia/mit-b* checkpoints); sr_ratios and heads are shared.
SIZES = {"b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
         "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
         "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
         "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
         "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
         "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768)}
MODEL_CLASS = "SegformerForSemanticSegmentation"


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise CissError("SegFormer models need transformers: pip install "
                        "'ciss[transformers]'") from None
    return transformers


def default_config(arch: str) -> dict:
    """The transformers config of ``segformer-b0`` .. ``segformer-b5``."""
    size = arch.removeprefix("segformer-")
    if size not in SIZES:
        raise CissError(f"--arch {arch}: choose from "
                        + ", ".join(f"segformer-{s}" for s in SIZES))
    hidden, depths, decoder = SIZES[size]
    return {"hidden_sizes": hidden, "depths": depths, "decoder_hidden_size": decoder}


class _DecodeHeadPart(nn.Module):
    """SegformerDecodeHead up to (not including) its classifier: per-stage MLPs to one width,
    upsampled to the 1/4 map, concatenated (deepest first), fused, BN, ReLU, dropout."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.linear_projections = getattr(head, "linear_projections", None) or head.linear_c
        self.linear_fuse = head.linear_fuse
        self.batch_norm = head.batch_norm
        self.activation = head.activation
        self.dropout = head.dropout

    def forward(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        n, size = hidden[-1].shape[0], hidden[0].shape[2:]
        maps = []
        for h, proj in zip(hidden, self.linear_projections):
            height, width = h.shape[2], h.shape[3]
            h = proj(h).transpose(1, 2).reshape(n, -1, height, width)
            maps.append(nn.functional.interpolate(h, size=size, mode="bilinear",
                                                  align_corners=False))
        x = self.linear_fuse(torch.cat(maps[::-1], dim=1))
        return self.dropout(self.activation(self.batch_norm(x)))


class SegFormer(SegmentationModel):
    """SegFormer b0..b5 (or any SegformerForSemanticSegmentation config).

    Args:
        arch: ``segformer-b0`` .. ``segformer-b5``, or ``segformer`` for an imported config.
        num_classes: output channels.
        config: ``{"transformers": the model's config dict, "mean", "std"}``.
        module: an existing ``SegformerForSemanticSegmentation`` (``ciss import``).
        weights: None (random init), or a local MiT encoder: a ``save_pretrained`` folder of
            a SegFormer (e.g. a snapshot of nvidia/mit-b0) or its ``.safetensors`` file,
            whose ``segformer.*`` weights become the encoder's.
    """

    def __init__(self, arch: str, num_classes: int, config: dict | None = None,
                 module: nn.Module | None = None, weights: str | None = None) -> None:
        config = dict(config or {})
        super().__init__(arch, num_classes, tuple(config.get("mean", IMAGENET_MEAN)),
                         tuple(config.get("std", IMAGENET_STD)))
        if module is None:
            tf = _require_transformers()
            raw = config.get("transformers") or default_config(arch)
            cfg = tf.SegformerConfig(**{k: v for k, v in raw.items()
                                        if k not in ("id2label", "label2id", "num_labels")})
            cfg.num_labels = num_classes
            module = tf.SegformerForSemanticSegmentation(cfg)
            if weights is not None:
                _load_encoder(module, weights)
        cfg = module.config
        if not getattr(cfg, "reshape_last_stage", True):
            raise CissError(f"{arch}: reshape_last_stage=False configs are not supported")
        encoder = module.segformer
        blocks = getattr(encoder, "stages", None)
        if blocks is None:
            raise CissError("this transformers version lays SegFormer out differently; "
                            "ciss needs transformers >= 5 (pip install 'ciss[transformers]')")
        for i, block in enumerate(blocks, start=1):
            self.stages[f"stage{i}"] = block
        self.stages["head"] = _DecodeHeadPart(module.decode_head)
        self.stages["classifier"] = module.decode_head.classifier
        raw = {k: v for k, v in cfg.to_dict().items()
               if k not in ("id2label", "label2id", "num_labels", "transformers_version",
                            "architectures", "_name_or_path", "torch_dtype", "dtype")}
        self.config = {"transformers": json.loads(json.dumps(raw, default=str)),
                       **self.preprocessing}
        self.check_stages()

    def run_stage(self, name: str, state: State) -> State:
        m = self.stages[name]
        if name.startswith("stage"):
            i = int(name[-1])
            src = state.pop("x") if i == 1 else state[f"h{i - 1}"]
            state["features" if i == 4 else f"h{i}"] = m(src)
        elif name == "head":
            state["head"] = m([state.pop("h1"), state.pop("h2"), state.pop("h3"),
                               state["features"]])
        elif name == "classifier":
            state["logits"] = m(state.pop("head"))
        else:
            raise KeyError(name)
        return state


def _load_encoder(module: nn.Module, weights: str) -> None:
    """``--weights``: the MiT encoder of a local SegFormer snapshot (folder or file)."""
    from ciss.models.weights import load_encoder_file

    path = Path(weights)
    if path.is_dir():
        # transformers reads the snapshot (and maps the key layout of the version that wrote
        # it onto this one); only the encoder is taken
        tf = _require_transformers()
        try:
            encoder = tf.SegformerModel.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - said in one line
            raise CissError(f"--weights {weights}: cannot load a SegFormer encoder "
                            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
                            ) from None
        try:
            module.segformer.load_state_dict(encoder.state_dict())
        except RuntimeError as exc:
            raise CissError(f"--weights {weights}: another MiT size than this arch "
                            f"({str(exc).splitlines()[0][:200]})") from None
        return
    if not path.is_file():
        raise CissError(f"--weights {weights}: no such file or folder (SegFormer encoders "
                        "load from a local snapshot; nothing is downloaded)")
    load_encoder_file(module.segformer, path, ("segformer.",), "a SegFormer (MiT) encoder of "
                      "this size")


def load_saved(folder: Path) -> nn.Module:
    """A ``SegformerForSemanticSegmentation`` saved with ``save_pretrained``.

    Raises:
        CissError: another model class, or weights that do not load.
    """
    tf = _require_transformers()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    classes = config.get("architectures") or []
    if MODEL_CLASS not in classes:
        raise CissError(f"{folder / 'config.json'}: transformers model {', '.join(classes) or '?'}"
                        f" is not supported (ciss imports {MODEL_CLASS})")
    try:
        return tf.SegformerForSemanticSegmentation.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a mismatch or corrupt file, said in one line
        raise CissError(f"{folder}: cannot load the SegFormer ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
