"""Annotation-tool exports, each written offline with the format's own conventions (COCO with
pycocotools), read by ``open_folder``, checked, converted, and used by add-classes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ciss.cli import main
from ciss.data.folder import open_folder
from ciss.errors import CissError
from tests.conftest import STEP_ITERATIONS

COLOURS = {"background": (0, 0, 0), "dots-disc": (250, 50, 50), "dots-square": (50, 250, 50),
           "dots-triangle": (50, 50, 250), "dots-ring": (250, 250, 50),
           "dots-cross": (250, 50, 250)}


@pytest.fixture(scope="module")
def source(split_dir):
    """The story's new-class folder in the ciss layout: 5 new classes labelled alone, old
    objects in the same images labelled background (the overlap setting)."""
    return split_dir / "step-1"


def samples(src):
    folder = open_folder(src)
    for split in ("train", "val"):
        for stem in getattr(folder, split):
            yield split, stem, folder.images[stem], folder.read_mask(stem), folder.classes


def write_coco(src, root, rle_every=2):
    """COCO instances: one annotation per class region, polygons and RLE (compressed and not),
    arbitrary category ids, Roboflow's unused root category."""
    from pycocotools import mask as cocomask

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    cat_ids = {"dots-disc": 7, "dots-square": 3, "dots-triangle": 12, "dots-ring": 5,
               "dots-cross": 40}
    docs = {}
    ann_id = 1
    for split, _stem, image, mask, classes in samples(src):
        doc = docs.setdefault(split, {"images": [], "annotations": [], "categories": [
            {"id": 0, "name": "my-project", "supercategory": "none"}] + [
            {"id": i, "name": n, "supercategory": "my-project"} for n, i in cat_ids.items()]})
        image_id = len(doc["images"]) + 1
        shutil.copyfile(image, root / "images" / image.name)
        h, w = mask.shape
        doc["images"].append({"id": image_id, "file_name": image.name, "height": h, "width": w})
        for name, cid in cat_ids.items():
            region = (mask == classes.index(name)).astype(np.uint8)
            if not region.any():
                continue
            rle = cocomask.encode(np.asfortranarray(region))
            if ann_id % rle_every == 0:
                seg = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:  # uncompressed RLE: run lengths in column-major order
                flat = region.ravel(order="F")
                runs, cur, n = [], 0, 0
                for v in flat:
                    if v != cur:
                        runs.append(n)
                        cur, n = v, 0
                    n += 1
                runs.append(n)
                seg = {"size": [h, w], "counts": runs}
            doc["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cid,
                                       "segmentation": seg, "iscrowd": 1,
                                       "area": int(region.sum()), "bbox": [0, 0, w, h]})
            ann_id += 1
    for split, doc in docs.items():
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def write_cvat(src, root):
    """CVAT Segmentation mask 1.1: labelmap.txt (background not first), RGB masks."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    (root / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\n"
        + "".join(f"{n}:{','.join(map(str, c))}::\n" for n, c in reversed(COLOURS.items())))
    lists = {"train": [], "val": []}
    for split, stem, image, mask, classes in samples(src):
        shutil.copyfile(image, root / "JPEGImages" / f"{stem}.png")
        rgb = np.zeros(mask.shape + (3,), np.uint8)
        for i, name in enumerate(classes.names):
            rgb[mask == i] = COLOURS[name]
        Image.fromarray(rgb).save(root / "SegmentationClass" / f"{stem}.png")
        lists[split].append(stem)
    for split, stems in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems))
    return root


def write_roboflow(src, root):
    for split, stem, image, mask, classes in samples(src):
        d = root / ("train" if split == "train" else "valid")
        if not d.exists():
            d.mkdir(parents=True)
            (d / "_classes.csv").write_text(
                "Pixel Value, Class\n" + "".join(f" {i}, {n}\n" for i, n in
                                                 enumerate(classes.names)))
        shutil.copyfile(image, d / f"{stem}.png")
        Image.fromarray(mask, mode="L").save(d / f"{stem}_mask.png")
    return root


def test_coco_cvat_and_roboflow_read_back_the_same_masks(source, tmp_path):
    ref = open_folder(source)
    for writer in (write_coco, write_cvat, write_roboflow):
        folder = open_folder(writer(source, tmp_path / writer.__name__))
        assert folder.layout == writer.__name__.split("_")[1]
        assert set(folder.classes.names) == set(ref.classes.names), writer.__name__
        assert "my-project" not in folder.classes.names  # the unused root category
        assert len(folder.train) == len(ref.train) and len(folder.val) == len(ref.val)
        for stem in ref.train[:5] + ref.val[:3]:
            mine = next(s for s in folder.images if s.endswith(stem))
            want = ref.read_mask(stem)
            got = folder.read_mask(mine)
            names = np.array(folder.classes.names)[np.minimum(got, len(folder.classes) - 1)]
            assert np.array_equal(names, np.array(ref.classes.names)[want]), (writer, stem)


def test_coco_overlaps_are_ignored_and_crowds_kept(tmp_path):
    from pycocotools import mask as cocomask

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "images" / "a.jpg")
    blob = np.zeros((40, 60), np.uint8)
    blob[20:35, 25:50] = 1
    rle = cocomask.encode(np.asfortranarray(blob))
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 60}],
           "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
                "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
               {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 1,
                "segmentation": {"size": [40, 60], "counts": rle["counts"].decode()}}]}
    (root / "annotations" / "instances.json").write_text(json.dumps(doc))
    folder = open_folder(root, require_train=False)
    mask = folder.read_mask("train__a")
    cat, dog = folder.classes.index("cat"), folder.classes.index("dog")
    assert (mask == 255).sum() > 0 and (mask[22:28, 26:29] == 255).all()  # overlap ignored
    assert (mask == dog).sum() > 0 and (mask == cat).sum() > 0  # the crowd region is kept


@pytest.mark.parametrize("fmt", ["coco", "cvat", "roboflow", "cityscapes"])
def test_a_broken_export_names_the_culprit_and_writes_nothing(fmt, source, tmp_path):
    root = tmp_path / fmt
    if fmt == "coco":
        write_coco(source, root)
        (root / "images" / sorted((root / "images").iterdir())[0].name).unlink()
        culprit = "not found"
    elif fmt == "cvat":
        write_cvat(source, root)
        m = sorted((root / "SegmentationClass").iterdir())[0]
        arr = np.asarray(Image.open(m)).copy()
        arr[:3, :3] = (1, 2, 3)
        Image.fromarray(arr).save(m)
        culprit = "colour (1,2,3) on 9 pixels is not in"
    elif fmt == "roboflow":
        write_roboflow(source, root)
        m = sorted((root / "train").glob("*_mask.png"))[0]
        arr = np.asarray(Image.open(m)).copy()
        arr[0, 0] = 9
        Image.fromarray(arr, mode="L").save(m)
        culprit = "pixel values [9] are not in _classes.csv"
    else:
        d = root / "gtFine" / "train" / "aachen"
        d.mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 26, np.uint8)).save(d / "a_000001_gtFine_labelIds.png")
        culprit = "no image"
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["data", "convert", str(root), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert culprit in res.output and "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    res = CliRunner().invoke(main, ["data", "check", str(root)])
    assert res.exit_code == 1 and culprit in res.output


def test_cityscapes_official_names_and_ignore(tmp_path):
    root = tmp_path / "cs"
    for split in ("train", "val"):
        gt, im = root / "gtFine" / split / "ulm", root / "leftImg8bit" / split / "ulm"
        gt.mkdir(parents=True)
        im.mkdir(parents=True)
        for i in range(2):
            ids = np.zeros((8, 12), np.uint8)
            ids[:, :3], ids[:, 3:6], ids[:, 6:9], ids[:, 9:] = 7, 26, 1, 4  # road car ego static
            Image.fromarray(ids).save(gt / f"ulm_{i:06d}_000019_gtFine_labelIds.png")
            Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(
                im / f"ulm_{i:06d}_000019_leftImg8bit.png")
    folder = open_folder(root)
    assert folder.layout == "cityscapes" and len(folder.classes) == 20
    assert folder.classes.names[1:4] == ("road", "sidewalk", "building")
    mask = folder.read_mask(folder.train[0])
    assert (mask[:, :3] == folder.classes.index("road")).all()
    assert (mask[:, 3:6] == folder.classes.index("car")).all()
    assert (mask[:, 6:9] == 255).all() and (mask[:, 9:] == 0).all()
    assert len(folder.train) == 2 and len(folder.val) == 2


def test_data_check_reports_layout_classes_and_shares(source, tmp_path):
    root = write_cvat(source, tmp_path / "cvat")
    res = CliRunner().invoke(main, ["data", "check", str(root), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["layout"] == "cvat" and doc["problems"] == []
    ref = open_folder(source)
    assert doc["split"] == {"train": len(ref.train), "val": len(ref.val)}
    assert sum(doc["pixel_share"].values()) == pytest.approx(1.0)


def test_add_classes_from_coco_and_cvat_matches_the_ciss_layout(story, source, tmp_path):
    from ciss.store import Store
    from ciss.updater.add_classes import UpdateConfig, add_classes
    from ciss.updater.loop import LoopConfig

    results = {}
    for name, folder in (("ciss", source), ("coco", write_coco(source, tmp_path / "coco")),
                         ("cvat", write_cvat(source, tmp_path / "cvat"))):
        root = tmp_path / f"store-{name}"
        shutil.copytree(story, root)
        rep = add_classes(Store(root), folder, update=UpdateConfig(parent=0), progress=False,
                          loop=LoopConfig(iterations=STEP_ITERATIONS, batch_size=8, lr=1e-2))
        card = rep.card
        old = [v for k, v in card.retention["0"]["torch"].items() if k != "background" and v]
        new = [card.retention[str(rep.step)]["torch"][c] for c in card.new_classes]
        results[name] = (sum(old) / len(old), sum(new) / len(new))
    base = Store(story).card(0).retention["0"]["torch"]
    base_old = np.mean([v for k, v in base.items() if k != "background"])
    for name in ("coco", "cvat"):
        old, new = results[name]
        assert old >= 0.9 * base_old and new >= 0.8 * results["ciss"][1], (name, results)


def test_unknown_layouts_still_get_the_ciss_message(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CissError, match="classes.txt: missing"):
        open_folder(tmp_path / "x")
