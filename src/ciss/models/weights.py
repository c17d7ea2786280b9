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
        raise CissError(f"{path}: cannot read weights ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CissError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved files
