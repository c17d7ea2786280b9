"""Reading weight files safely: tensors only, never arbitrary pickles."""

from __future__ import annotations

from pathlib import Path

import torch

from ciss.errors import CissError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pth``/``.pt`` (loaded with
    ``weights_only=True``: tensors and plain containers, no code). Training checkpoints that
    nest it under ``model``, ``state_dict`` or ``model_state_dict`` are accepted.

    Raises:
        CissError: missing file, unsupported suffix, or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CissError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pth", ".pt", ".bin"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise CissError(f"{path}: unknown weights format '{suffix}'; use .pth, .pt or "
                            ".safetensors")
    except CissError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickle refusals and corrupt files alike
        if "Weights only load failed" in str(exc):  # torch.save(model): pickled code
            raise CissError(f"{path}: holds pickled Python objects (a whole model saved with "
                            "torch.save(model)?), which ciss never unpickles; save "
                            "torch.save(model.state_dict(), PATH) and import that") from None
        raise CissError(f"{path}: cannot read weights ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CissError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved files


def load_encoder_file(target: torch.nn.Module, path: Path, prefixes: tuple[str, ...],
                      what: str) -> None:
    """Load a local encoder (backbone) state dict into ``target``.

    Keys may carry any of ``prefixes`` (e.g. ``encoder.``, ``backbone.``); keys ``target``
    does not have (a classifier head such as ``fc.*``) are ignored, but every key it has must
    be there.

    Raises:
        CissError: an unreadable file, or one that is not an encoder of this architecture.
    """
    state = read_state_dict(Path(path))
    for prefix in prefixes:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    own = target.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    missing = sorted(set(own) - set(usable))
    if missing:
        raise CissError(f"{path}: not {what}; missing or misshapen {len(missing)} keys, e.g. "
                        f"{', '.join(missing[:3])}")
    target.load_state_dict(usable)
