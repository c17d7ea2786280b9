"""Models saved by their own library (``save_pretrained`` folders): SMP and transformers.

Both write ``config.json`` beside ``model.safetensors``; the config says which library wrote
it (SMP: ``_model_class``; transformers: ``architectures`` and ``model_type``). This module
loads such a folder into the staged interface, with the class names and preprocessing the
author saved, and knows nothing of stores or scoring.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ciss.errors import CissError
from ciss.models.staged import IMAGENET_MEAN, IMAGENET_STD, SegmentationModel

GENERIC_LABEL = re.compile(r"^LABEL_\d+$")
BACKGROUND = "background"  # ciss's name of class 0 (data.classes; models do not import data)
BACKGROUND_ALIASES = {"__background__", "_background_", "background", "Background"}


@dataclass
class Loaded:
    """A model read from a library folder.

    Attributes:
        model: the staged model (eval mode).
        names: class names the folder carries (None: none, or only generic LABEL_i).
        notes: one-line remarks for the user (generic names, preprocessing used).
        library: "smp" or "transformers".
    """

    model: SegmentationModel
    names: list[str] | None
    library: str
    notes: list[str] = field(default_factory=list)


def is_library_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_library_folder(folder: Path, mean=None, std=None) -> Loaded:
    """Read an SMP or transformers ``save_pretrained`` folder.

    Args:
        folder: the folder (``config.json`` beside the weights).
        mean, std: the normalisation of x/255 to use instead of the one the folder implies
            (the user's ``--mean``/``--std``; three values each).

    The model's ``config["init"]`` records the folder and its weights' sha256.

    Raises:
        CissError: a config that is neither library's, an unsupported model class (the
            supported ones are named), weights that do not load, or a bad mean/std.
    """
    folder = Path(folder)
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CissError(f"{path}: unreadable config ({exc})") from None
    if not isinstance(config, dict):
        raise CissError(f"{path}: not a model config (a JSON object)")
    if "_model_class" in config:
        loaded = _smp(folder, config)
    elif "model_type" in config or "architectures" in config:
        loaded = _transformers(folder, config)
    else:
        raise CissError(f"{path}: neither an SMP (_model_class) nor a transformers "
                        "(architectures, model_type) save_pretrained config; a plain state "
                        "dict file needs --arch")
    if mean is not None or std is not None:
        p = loaded.model.preprocessing
        try:
            loaded.model.set_preprocessing(p["mean"] if mean is None else mean,
                                           p["std"] if std is None else std)
        except ValueError as exc:
            raise CissError(f"--mean/--std: {exc}") from None
        p = loaded.model.preprocessing
        loaded.notes = [n for n in loaded.notes if not n.startswith("preprocessing:")]
        loaded.notes.append(f"preprocessing: --mean/--std (x/255 - {p['mean']}) / {p['std']}")
    loaded.model.config["init"] = _folder_record(folder, config)
    return loaded


def _folder_record(folder: Path, config: dict) -> dict:
    from ciss.models.imagenet import sha256_of

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    record = {"weights": "imported", "source": str(folder.resolve())}
    if files:
        record["sha256"] = sha256_of(files[0])
    if config.get("encoder_weights"):
        record["encoder_weights"] = config["encoder_weights"]  # what the author started from
    return record


def _smp(folder: Path, config: dict) -> Loaded:
    from ciss.models.smp import SMPSegmentation, arch_name, load_saved
    from ciss.models.smp_encoders import encoder_preprocessing

    module = load_saved(folder).eval()
    n = module.segmentation_head[0].out_channels
    # SMP's config.json has no preprocessing: it is the encoder's (SMP's
    # get_preprocessing_params), known offline from the encoder's name and weights variant
    variant = config.get("encoder_weights")
    model = SMPSegmentation(arch_name(module), n, module=module,
                            weights=variant if isinstance(variant, str) else None).eval()
    _, _, where = encoder_preprocessing(module.config["encoder_name"], variant)
    p = model.preprocessing
    return Loaded(model, None, "smp", [f"preprocessing: (x/255 - {p['mean']}) / {p['std']}, "
                                       f"the encoder's ({where})"])


def _transformers(folder: Path, config: dict) -> Loaded:
    from ciss.models.segformer import SIZES, SegFormer, load_saved

    module = load_saved(folder).eval()
    mean, std, note = _hf_preprocessing(folder)
    raw = module.config
    size = next((f"segformer-{s}" for s, (h, d, dec) in SIZES.items()
                 if list(raw.hidden_sizes) == h and list(raw.depths) == d
                 and raw.decoder_hidden_size == dec), "segformer")
    n = int(raw.num_labels)
    model = SegFormer(size, n, config={"mean": mean, "std": std}, module=module).eval()
    labels = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    names = [labels.get(i, "") for i in range(n)]
    notes = [note]
    if not all(names) or all(GENERIC_LABEL.match(x) for x in names):
        notes.append("config.json's id2label holds generic names (LABEL_0, ...): give the "
                     "class names with --classes")
        names = None
    else:
        names = [BACKGROUND if x in BACKGROUND_ALIASES else x for x in names]
    return Loaded(model, names, "transformers", notes)


def _hf_preprocessing(folder: Path) -> tuple[list[float], list[float], str]:
    """mean/std on x/255 from ``preprocessor_config.json`` (ImageNet's when absent)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return (list(IMAGENET_MEAN), list(IMAGENET_STD),
                "preprocessing: ImageNet mean/std on x/255 (no preprocessor_config.json)")
    try:
        pre = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CissError(f"{path}: unreadable ({exc})") from None
    if pre.get("do_reduce_labels") or pre.get("reduce_labels"):
        raise CissError(f"{path}: do_reduce_labels is set: the model has no background "
                        "class (label 0 was ignored in training); ciss needs background as "
                        "class 0")
    scale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
    if pre.get("do_normalize", True):
        mean = [float(v) for v in pre.get("image_mean", IMAGENET_MEAN)]
        std = [float(v) for v in pre.get("image_std", IMAGENET_STD)]
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    # (x * scale - mean) / std  ==  (x / 255 - mean') / std'  with  m' = m / (255 * scale)
    k = 255.0 * scale
    mean, std = [m / k for m in mean], [s / k for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise CissError(f"{path}: image_mean/image_std need three values (RGB)")
    return mean, std, f"preprocessing: {path.name} (mean {mean}, std {std} on x/255)"
