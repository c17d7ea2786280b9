"""``ciss export``, ``predict`` (and, with the runtime, check/deploy/rollback/serve)."""

from __future__ import annotations

from pathlib import Path

import click

from ciss import hints
from ciss.cli.base import ENGINE_CHOICE, main, open_store, store_option
from ciss.tables import pct, table


@main.command()
@store_option
@click.option("--step", type=int, default=None, help="Step number (default: latest).")
@click.option("--format", "formats", multiple=True, default=["onnx"], show_default=True,
              help="onnx, int8, tensorrt or triton; repeat for several.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (the Triton model repository).")
@click.option("--triton-gpu", default=None,
              help="The GPU model the Triton repository is for, e.g. 'NVIDIA H100 80GB HBM3' "
                   "(default: this host's; its plan is the one copied).")
@click.option("--triton-device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto",
              show_default=True,
              help="Instance kind of the repository's ONNX model (auto: GPU when there is a "
                   "plan or a GPU here).")
@click.option("--trt-precision", type=click.Choice(["fp16", "fp32", "int8"]), default="fp16",
              show_default=True,
              help="TensorRT plan precision (int8: built from the calibrated INT8 model).")
@click.option("--device", default="auto", show_default=True,
              help="Where the ONNX parity gate runs: auto (the GPU when onnxruntime-gpu and "
                   "CUDA are here), cpu, cuda. Both sides in exact fp32 (TF32 off).")
def export(store_path, step, formats, out, triton_gpu, triton_device, trt_precision,
           device) -> None:
    """Compile a step to ONNX (and INT8, TensorRT, a Triton repository) behind parity gates.

    Example: ciss export --step 1 --format onnx --format int8
    """
    store = open_store(store_path)
    step = store.resolve(step)  # cheap refusals before the heavy imports below
    from ciss.exporters.export import export_step

    results = export_step(store, step, list(formats), out,
                          triton_gpu=triton_gpu, triton_device=triton_device,
                          trt_precision=trt_precision, device=device)
    rows = []
    for r in results:
        p = r.parity
        rows.append([r.format, str(r.path),
                     "-" if p is None or p.max_abs_logit_diff is None
                     else f"{p.max_abs_logit_diff:.1e}",
                     "-" if p is None else f"{100 * p.label_agreement:.3f}",
                     "-" if p is None else f"{pct(p.miou_torch)} / {pct(p.miou_engine)}",
                     "pass" if p is None or p.passed else "FAIL"])
    click.echo(table(["format", "artifact", "max |dlogit|", "label agree %",
                      "mIoU torch/engine", "gate"], rows))
    for r in results:
        if r.note:
            click.echo(r.note)
    click.echo(f"next: {next_commands(results)}")


def next_commands(results) -> str:
    """What to run after an export on this host: the engine that will serve here."""
    import torch

    made = {r.format for r in results}
    if "tensorrt" in made:
        return hints.EXPORT_TRT()
    if torch.cuda.is_available():
        return hints.EXPORT_GPU()
    return hints.EXPORT_CPU()


@main.command()
@store_option
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for the <stem>.png masks.")
@click.option("--step", type=int, default=None, help="Step number (default: latest).")
@click.option("--engine", type=ENGINE_CHOICE, default="onnx", show_default=True)
def predict(store_path, images, out, step, engine) -> None:
    """Segment images: one palette PNG per image, pixel value = class id, same size.

    Example: ciss predict photo.jpg --out masks/
    """
    from ciss.data.imageio import read_image, write_mask
    from ciss.runtime.loading import load_segmenter

    seg = load_segmenter(open_store(store_path), step, engine)
    out.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise click.UsageError("two images share a file stem; their masks would collide")
    for path in images:
        labels = seg.segment(read_image(path))
        write_mask(out / f"{path.stem}.png", labels)
    click.echo(f"wrote {len(images)} masks to {out} ({seg.engine.describe()}, "
               f"{len(seg.classes)} classes)")
