"""``ciss export``, ``predict`` (and, with the runtime, check/deploy/rollback/serve)."""

from __future__ import annotations

from pathlib import Path

import click

from ciss import hints
from ciss.cli.base import (
    ENGINE_CHOICE,
    device_option,
    main,
    open_store,
    pick_step,
    store_option,
)
from ciss.tables import pct, table


@main.command()
@store_option
@click.option("--step", type=int, default=None,
              help="Step number (default: latest); -1 is the latest, -2 the one before.")
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
              help="Folder for the <stem>.png masks (created when every input is readable).")
@click.option("--step", type=int, default=None,
              help="Step number (default: the deployed step; the latest when none is); "
                   "-1 is the latest, -2 the one before.")
@click.option("--engine", type=ENGINE_CHOICE, default=None,
              help="Engine (default: the deployed one for the deployed step, else the one "
                   "that serves on this host); exported first when the step lacks it.")
@device_option
def predict(store_path, images, out, step, engine, device) -> None:
    """Segment images or folders of images: one palette PNG per image, pixel value = class
    id, same size.

    Example: ciss predict photos/ --out masks/
    """
    store = open_store(store_path)
    step, engine, which = pick_step(store, step, engine)
    paths = _image_paths(images)  # every input checked before anything is written
    from ciss.data.imageio import read_image, write_mask
    from ciss.engines.load import load_engine, ort_providers, serving_engine
    from ciss.runtime.deploy import ensure_engine
    from ciss.runtime.segmenter import Segmenter

    engine = engine or serving_engine(store.card(step).artifacts, device)
    ensure_engine(store, step, engine)
    store.require_signed(step)
    seg = Segmenter(load_engine(store, step, engine, ort_providers(device), device=device),
                    store.card(step).classes)
    for path in paths:
        labels = seg.segment(read_image(path))
        out.mkdir(parents=True, exist_ok=True)  # only once an image was read
        write_mask(out / f"{path.stem}.png", labels)
    click.echo(f"wrote {len(paths)} masks to {out} with {which}, engine {engine} "
               f"({seg.engine.describe()}, device {device}), {len(seg.classes)} classes")


def _image_paths(inputs) -> list[Path]:
    """Files as given, folders as the images directly in them (sorted); refused before
    anything is written: a missing path, an empty folder, two images with one stem."""
    from ciss.data.layouts import IMAGE_SUFFIXES

    paths: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise click.UsageError(f"{p}: no image in this folder "
                                       f"({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise click.UsageError(f"{p}: no such file or folder")
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise click.UsageError(f"images share a file stem ({', '.join(dup[:3])}); their masks "
                               "would collide")
    return paths
