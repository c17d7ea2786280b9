"""Resumable training checkpoints: tensors in safetensors, everything else in JSON."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from ciss.failpoints import failpoint


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                meta["state"][str(idx)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def recover_checkpoint(folder: Path) -> None:
    """Finish or undo an interrupted ``save_checkpoint``; run before every save and load.

    Recovery rule of the folder swap (``store.files.recover_swap``): with both the folder and
    ``.<name>.old``, the swap finished and ``.old`` is deleted; with only ``.old``, the kill
    fell between the renames and ``.old``, the last complete checkpoint, is renamed back and
    used; an incomplete new ``.<name>.<hex>`` is deleted. (Before #29 the ``.old`` was left
    and the rerun failed with "Directory not empty".)
    """
    from ciss.store.files import recover_swap

    recover_swap(folder)


def save_checkpoint(folder: Path, *, key: str, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, extra: dict | None = None,
                    best: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint for a finished ``epoch`` atomically (folder swap, see
    ``recover_checkpoint``), with the best-validated weights so far when there are any."""
    from safetensors.torch import save_file

    from ciss.store.files import raise_if_no_space

    folder = Path(folder)
    recover_checkpoint(folder)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()},
                      str(tmp / "best.safetensors"))
        meta = {"key": key, "epoch": epoch, "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(), "extra": extra or {}}
        (tmp / "meta.json").write_text(json.dumps(meta, default=float))
        failpoint("checkpoint.tmp_written", tmp)
    except BaseException as exc:  # a full disk: the previous checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_no_space(exc, tmp, sum(t.numel() * t.element_size()
                                        for t in tensors.values()))
        raise
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.rename(folder, old)
        failpoint("checkpoint.old_aside", old)
    os.rename(tmp, folder)
    failpoint("checkpoint.before_old_removed", old)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, *, key: str, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler) -> dict | None:
    """Restore a checkpoint written with the same ``key``; returns its meta, or None."""
    from safetensors.torch import load_file

    folder = Path(folder)
    recover_checkpoint(folder)
    if not (folder / "meta.json").exists():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("key") != key:
        return None
    tensors = load_file(str(folder / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    return meta


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    """The best-validated weights saved with a checkpoint, or None."""
    from safetensors.torch import load_file

    path = Path(folder) / "best.safetensors"
    return load_file(str(path)) if path.exists() else None
