"""``ciss collect export`` (#31 items 3-4): selection rules, the Label Studio / CVAT / COCO
tasks checked by the tools' own libraries or our readers, and round trips: export -> paint the
new class -> read back through ``open_folder`` gives back the masks exactly."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ciss.cli import main
from ciss.data.collection import items, read_meta
from ciss.data.folder import open_folder
from ciss.data.layouts import read_cvat
from ciss.data.select import select
from ciss.data.tasks import load_tasks, voc_colour, write_tasks
from ciss.runtime.collect import Collector, CollectPolicy, Scored

CLASSES = ["background", "disc", "square"]


def _item(seed: int, novelty: float, uncertainty: float, dominant: int) -> Scored:
    rng = np.random.default_rng(seed)
    h, w = 30, 40
    small = rng.integers(0, 255, (3, 4, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    labels = np.zeros((h, w), np.uint8)
    y, x = int(rng.integers(0, 15)), int(rng.integers(0, 20))
    labels[y:y + 12, x:x + 15] = dominant
    labels[0:4, 0:6] = 3 - dominant  # a little of the other class
    pooled = [0.5, 0.4, 0.1] if dominant == 1 else [0.5, 0.1, 0.4]
    return Scored(image, labels, {"uncertainty": uncertainty, "novelty": novelty,
                                  "novel_share": 0.0, "largest_region": 0.0, "pooled": pooled},
                  step=1, engine="onnx", classes=CLASSES, calibration=None,
                  received_at=dt.datetime(2026, 12, 4, 0, 0, seed, tzinfo=dt.timezone.utc))


@pytest.fixture
def collection(tmp_path):
    folder = tmp_path / "collected"
    c = Collector(CollectPolicy(folder, random_share=1.0, per_minute=100, max_distance=0))
    for i in range(8):
        assert c.consider(_item(i, novelty=float(i), uncertainty=0.1 * i,
                                dominant=1 + i % 2)).startswith("kept")
    return folder


def _predictions(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p / "prediction.png")) for p in items(folder)}


def _new_mask(shape, seed: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    y, x = 5 + seed % 7, 3 + seed % 11
    m[y:y + 9, x:x + 13] = True
    return m


def test_selection_rules():
    metas = [{"id": str(i), "classes": CLASSES,
              "scores": {"novelty": float(i), "uncertainty": 0.1 * i},
              "pooled": [0.5, 0.4, 0.1] if i % 2 else [0.5, 0.1, 0.4]} for i in range(10)]
    assert select(metas, 3, "score") == [9, 8, 7]
    balanced = select(metas, 4, "balanced")
    assert balanced[0] == 9  # the most unusual first
    # the budget is shared between both predicted classes instead of the top-4 by score
    assert {i % 2 for i in balanced[:2]} == {0, 1}
    assert select(metas, 4, "random", seed=1) == select(metas, 4, "random", seed=1)
    assert select(metas, 40, "balanced") and len(select(metas, 40, "balanced")) == 10
    with pytest.raises(ValueError):
        select(metas, 3, "best")
    # without a calibration, uncertainty alone ranks
    flat = [dict(m, scores={"novelty": None, "uncertainty": m["scores"]["uncertainty"]})
            for m in metas]
    assert select(flat, 2, "score") == [9, 8]


def test_label_studio_tasks_decode_with_label_studio_converter_and_round_trip(
        collection, tmp_path):
    from label_studio_converter.brush import decode_rle, mask2rle

    out = tmp_path / "ls"
    res = CliRunner().invoke(main, ["collect", "export", str(collection), "--budget", "5",
                                    "--format", "label-studio", "--new-class", "forklift",
                                    "--out", str(out), "--store", str(tmp_path / "none")])
    assert res.exit_code == 0, res.output
    assert "wrote 5 task(s) of 8 held" in res.output and "disc, square, forklift" in res.output
    tasks = json.loads((out / "tasks.json").read_text())
    config = (out / "label_config.xml").read_text()
    for name in ("disc", "square", "forklift"):
        assert f'<Label value="{name}"' in config
    preds = _predictions(collection)
    assert len(tasks) == 5
    for t in tasks:
        cid = t["data"]["ciss_id"]
        assert (out / "images" / f"{cid}.png").is_file()
        assert t["data"]["image"] == f"/data/local-files/?d=images/{cid}.png"
        result = t["predictions"][0]["result"]
        assert result and all(r["readonly"] for r in result)
        for r in result:  # Label Studio's own decoder gives back the prediction exactly
            h, w = r["original_height"], r["original_width"]
            alpha = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[..., 3]
            cid_class = CLASSES.index(r["value"]["brushlabels"][0])
            assert np.array_equal(alpha > 0, preds[cid] == cid_class)

    # the annotator: takes the pre-annotation (read-only) and paints the new class; Label
    # Studio's JSON export holds tasks with annotations (the images beside it, in images/)
    export = tmp_path / "ls-export"
    shutil.copytree(out / "images", export / "images")
    want = {}
    for k, t in enumerate(tasks):
        cid = t["data"]["ciss_id"]
        m = _new_mask(preds[cid].shape, k)
        want[cid] = m.astype(np.uint8)
        h, w = m.shape
        painted = {"id": f"p{k}", "type": "brushlabels", "from_name": "label",
                   "to_name": "image", "original_width": w, "original_height": h,
                   "origin": "manual", "value": {"format": "rle", "brushlabels": ["forklift"],
                                                 "rle": mask2rle(m.astype(np.uint8) * 255)}}
        t["id"] = k + 1
        t["annotations"] = [{"id": 100 + k, "was_cancelled": False, "ground_truth": False,
                             "result": t["predictions"][0]["result"] + [painted]}]
    tasks.append({"id": 99, "data": {"image": "/data/upload/1/deadbeef-x.png"},
                  "annotations": [{"was_cancelled": True, "result": []}]})  # skipped
    (export / "project-1-at-2026-12-04.json").write_text(json.dumps(tasks))
    folder = open_folder(export)
    assert folder.layout == "label-studio"
    assert folder.classes.names == ("background", "forklift")  # read-only regions are context
    for stem, m in want.items():
        assert np.array_equal(folder.read_mask(stem), m)

    # a polygon (percent of the image) and overlapping classes
    stem = next(iter(want))
    h, w = want[stem].shape
    tasks[0]["annotations"][0]["result"].append(
        {"id": "poly", "type": "polygonlabels", "from_name": "p", "to_name": "image",
         "original_width": w, "original_height": h,
         "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["crate"]}})
    (export / "project-1-at-2026-12-04.json").write_text(json.dumps(tasks))
    folder = open_folder(export)
    got = folder.read_mask(tasks[0]["data"]["ciss_id"])
    crate = folder.classes.names.index("crate")
    assert (got == crate).sum() > 0.2 * h * w / 4  # the top-left quarter, less the overlap
    assert (got[:h // 2, :w // 2][want[stem][:h // 2, :w // 2] == 1] == 255).all()


def test_label_studio_errors_name_the_file(collection, tmp_path):
    out = tmp_path / "ls"
    CliRunner().invoke(main, ["collect", "export", str(collection), "--budget", "2", "--format",
                              "label-studio", "--out", str(out)])
    # the tasks as exported, not annotated yet: one line saying what to do
    res = CliRunner().invoke(main, ["data", "check", "--data", str(out)])
    assert res.exit_code == 1 and "no task has an annotation" in res.output, res.output
    tasks = json.loads((out / "tasks.json").read_text())
    tasks[0]["annotations"] = [{"result": []}]
    tasks[0]["data"]["image"] = "/data/local-files/?d=elsewhere/gone.png"
    (out / "tasks.json").write_text(json.dumps(tasks))
    res = CliRunner().invoke(main, ["data", "check", "--data", str(out)])
    assert res.exit_code == 1 and "tasks.json: task 0: image" in res.output, res.output
    assert "gone.png" in res.output


def test_cvat_export_reads_back_and_a_painted_class_round_trips(collection, tmp_path):
    out = tmp_path / "cvat"
    res = CliRunner().invoke(main, ["collect", "export", str(collection), "--budget", "8",
                                    "--format", "cvat", "--new-class", "forklift",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(out / "annotations.zip") as z:
        names = set(z.namelist())
    assert {"labelmap.txt", "ImageSets/Segmentation/default.txt"} <= names
    assert sum(n.startswith("SegmentationClass/") for n in names) == 8
    raw = read_cvat(out)  # the project's own CVAT reader
    assert raw.classes.names == ("background", "disc", "square", "forklift")
    preds = _predictions(collection)
    for stem in raw.images:
        assert np.array_equal(raw.read_mask(stem), preds[stem])
    forklift = voc_colour(3)
    assert f"forklift:{forklift[0]},{forklift[1]},{forklift[2]}::" in (
        out / "labelmap.txt").read_text()
    want = {}
    for k, stem in enumerate(sorted(raw.images)):  # the annotator paints the new class
        p = out / "SegmentationClass" / f"{stem}.png"
        rgb = np.asarray(Image.open(p).convert("RGB")).copy()
        m = _new_mask(rgb.shape[:2], k)
        rgb[m] = forklift
        Image.fromarray(rgb).save(p)
        want[stem] = np.where(m, 3, preds[stem])
    folder = open_folder(out)
    assert folder.layout == "cvat"
    for stem, m in want.items():
        assert np.array_equal(folder.read_mask(stem), m)


def test_coco_export_reads_back_exactly(collection, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    picks = [items(collection)[i] for i in (0, 3, 5)]
    write_tasks(out, load_tasks(picks), "coco", ["forklift"])
    coco = COCO(str(out / "annotations" / "instances_default.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["disc", "square",
                                                                    "forklift"]
    folder = open_folder(out, require_train=False)
    assert folder.layout == "coco"
    for p in picks:
        stem = f"train__{p.name}"
        want = np.asarray(Image.open(p / "prediction.png"))
        assert np.array_equal(folder.read_mask(stem), want)


def test_export_refuses_bad_requests_and_writes_nothing(collection, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("mine")
    runs = {
        "exists and is not empty": ["--out", str(out)],
        "already knows this class": ["--out", str(tmp_path / "a"), "--new-class", "Disc"],
        "given twice": ["--out", str(tmp_path / "b"), "--new-class", "f", "--new-class", "F"],
    }
    for message, extra in runs.items():
        res = CliRunner().invoke(main, ["collect", "export", str(collection), "--budget", "2",
                                        "--format", "cvat", *extra])
        assert res.exit_code == 2 and message in res.output, res.output
    assert (out / "x").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["x"]
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "a").exists()
    empty = tmp_path / "empty"
    Collector(CollectPolicy(empty))
    res = CliRunner().invoke(main, ["collect", "export", str(empty), "--budget", "2",
                                    "--format", "coco", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "holds no image yet" in res.output


def test_export_is_recorded_in_the_store_event_log(collection, tmp_path, story):
    from ciss.store import Store

    root = tmp_path / "store"
    shutil.copytree(story, root)
    res = CliRunner().invoke(main, ["collect", "export", str(collection), "--budget", "2",
                                    "--format", "coco", "--out", str(tmp_path / "c"),
                                    "--store", str(root)])
    assert res.exit_code == 0, res.output
    ev = [e for e in Store(root).events() if e["kind"] == "exported"][-1]
    assert ev["tasks"] == 2 and ev["format"] == "coco" and len(ev["ids"]) == 2
    assert {read_meta(p)["id"] for p in items(collection)} >= set(ev["ids"])
    from ciss.analysis.overview import build_overview, render_overview

    page = render_overview(build_overview(Store(root)))
    assert "exported for annotation" in page and "2 image(s) of" in page


def test_label_studio_reader_refuses_ambiguous_exports_naming_the_file(collection, tmp_path):
    out = tmp_path / "ls"
    CliRunner().invoke(main, ["collect", "export", str(collection), "--budget", "2", "--format",
                              "label-studio", "--out", str(out)])
    tasks = json.loads((out / "tasks.json").read_text())
    for t in tasks:
        t["annotations"] = [{"result": []}]
    cases = {
        "is also the image of a task": tasks + [tasks[0]],
        "is not a task object": tasks + ["oops"],
        "has no label name": [dict(tasks[0], annotations=[{"result": [
            dict(tasks[0]["predictions"][0]["result"][0], readonly=False,
                 value={"format": "rle", "rle": [0], "brushlabels": [" "]})]}])],
    }
    for message, doc in cases.items():
        (out / "tasks.json").write_text(json.dumps(doc))
        res = CliRunner().invoke(main, ["data", "check", "--data", str(out)])
        assert res.exit_code == 1 and message in res.output and "tasks.json" in res.output, \
            res.output
