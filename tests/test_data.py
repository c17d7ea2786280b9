"""Dataset folders: every validation of DESIGN §3 names the file and the reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ciss.data.classes import ClassList
from ciss.data.folder import hash_split, open_folder
from ciss.data.imageio import read_image
from ciss.errors import CissError
from tests.conftest import make_folder


def test_class_list_round_trip(tmp_path):
    cl = ClassList(("background", "cat", "dog"))
    cl.write(tmp_path / "classes.txt")
    assert ClassList.from_file(tmp_path / "classes.txt") == cl
    assert cl.index("dog") == 2 and cl.objects == ("cat", "dog")
    assert cl.extended(["dog", "cow"]).names == ("background", "cat", "dog", "cow")


@pytest.mark.parametrize("text,reason", [
    ("background\ncat\ncat\n", "duplicate class name 'cat'"),
    ("background\n\ncat\n", "line 2 is an empty class name"),
    ("cat\nbackground\n", "first class must be 'background'"),
    ("", "empty"),
])
def test_bad_class_lists(tmp_path, text, reason):
    root = make_folder(tmp_path / "d", ["background", "a"])
    (root / "classes.txt").write_text(text)
    with pytest.raises(CissError, match=reason) as err:
        open_folder(root)
    assert "classes.txt" in str(err.value)


def test_good_folder_opens_with_hash_split(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a", "b"], n=30)
    f = open_folder(root)
    assert sorted(f.train + f.val) == sorted(f"s{i}" for i in range(30))
    assert not set(f.train) & set(f.val)
    assert f.presence["s0"] == frozenset({0, 1, 2})
    assert hash_split([f"s{i}" for i in range(30)]) == (f.train, f.val)


def test_missing_mask(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"])
    (root / "masks" / "s1.png").unlink()
    with pytest.raises(CissError, match=r"s1\.png: has no mask"):
        open_folder(root)


def test_extra_mask(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"])
    (root / "images" / "s2.png").unlink()
    with pytest.raises(CissError, match=r"masks/s2\.png: mask has no image"):
        open_folder(root)


def test_size_mismatch(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"])
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(root / "masks" / "s0.png")
    with pytest.raises(CissError, match=r"s0\.png: mask is 5x5 but its image s0\.png is 20x16"):
        open_folder(root)


def test_mask_values_outside_classes(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"], values=[1, 7])
    with pytest.raises(CissError, match=r"s0\.png: mask values \[7\] are not class ids"):
        open_folder(root)


def test_ignore_value_is_allowed(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"], values=[1, 255], n=12)
    assert open_folder(root).presence["s0"] == frozenset({0, 1})


def test_rgb_mask_refused(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"])
    Image.new("RGB", (20, 16)).save(root / "masks" / "s0.png")
    with pytest.raises(CissError,
                       match=r"s0\.png: mask is a colour image \(mode RGB\).*labelmap"):
        open_folder(root)


def test_jpeg_masks_are_named_lossy(tmp_path):
    """#30: masks saved as .jpg were reported as "has no mask", with no word of JPEG."""
    root = make_folder(tmp_path / "d", ["background", "a"])
    mask = root / "masks" / "s0.png"
    Image.open(mask).convert("L").save(root / "masks" / "s0.jpg")
    mask.unlink()
    with pytest.raises(CissError, match=r"s0\.jpg: masks must be PNG; JPEG is lossy"):
        open_folder(root)


def test_truncated_image(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"], suffix=".jpg", size=(96, 80))
    data = (root / "images" / "s3.jpg").read_bytes()
    (root / "images" / "s3.jpg").write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(CissError, match=r"s3\.jpg: truncated or corrupt image"):
        open_folder(root)


def test_unreadable_image(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"])
    (root / "images" / "s0.png").write_bytes(b"not an image at all")
    with pytest.raises(CissError, match=r"s0\.png: not a readable image"):
        open_folder(root)


def test_decompression_bomb(tmp_path):
    from ciss.data import imageio

    root = make_folder(tmp_path / "d", ["background", "a"])
    with pytest.raises(CissError, match=r"s\d\.png: 20x16 = 320 pixels exceeds the limit"):
        imageio.read_image(root / "images" / "s0.png", str(root / "images" / "s0.png"),
                           max_pixels=100)


def test_empty_split_and_split_lists(tmp_path):
    root = make_folder(tmp_path / "d", ["background", "a"], n=3)
    (root / "train.txt").write_text("")
    (root / "val.txt").write_text("s0\ns1\ns2\n")
    with pytest.raises(CissError, match="train split is empty"):
        open_folder(root)
    (root / "train.txt").write_text("s0\nnope\n")
    with pytest.raises(CissError, match=r"train\.txt: names 1 stems with no image/mask pair"):
        open_folder(root)
    (root / "train.txt").write_text("s0\n")
    (root / "val.txt").write_text("s0\n")
    with pytest.raises(CissError, match="'s0' is also in train.txt"):
        open_folder(root)


def test_missing_or_file_path(tmp_path):
    with pytest.raises(CissError, match="no such dataset folder"):
        open_folder(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CissError, match="is a file"):
        open_folder(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CissError, match="classes.txt: missing"):
        open_folder(tmp_path / "empty")


def test_image_modes_decode_to_rgb():
    rgb = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(10, 12, 3)
    for mode in ("L", "RGBA", "P", "I;16", "CMYK"):
        img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else Image.fromarray(
            rgb[..., 0].astype(np.uint16) * 257)
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
        out = read_image(buf.getvalue())
        assert out.shape == (10, 12, 3) and out.dtype == np.uint8, mode
    # 16-bit: full-range scaling keeps the 8-bit value
    img16 = Image.fromarray(np.full((4, 4), 200 * 257, np.uint16))
    buf = io.BytesIO()
    img16.save(buf, format="TIFF")
    assert read_image(buf.getvalue())[0, 0, 0] == 200


def test_exif_rotation_applied():
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert read_image(buf.getvalue()).shape == (30, 10, 3)


def test_voc_layout(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"2007_{i}.jpg")
        m = Image.fromarray(np.full((8, 8), 15 if i % 2 else 255, np.uint8), mode="L").convert("P")
        m.save(root / "SegmentationClass" / f"2007_{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / "unlabelled.jpg")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_0\n2007_1\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_2\n2007_3\n")
    f = open_folder(tmp_path)
    assert f.layout == "voc" and len(f.classes) == 21 and f.classes.names[15] == "person"
    assert f.train == ["2007_0", "2007_1"] and f.val == ["2007_2", "2007_3"]
    assert f.presence["2007_1"] == frozenset({15})


def test_exif_orientation_for_tools_that_annotated_the_raw_pixels(tmp_path):
    """A photo stored 40x20 with EXIF 'rotate 90' displays as 20x40; a tool that annotated
    the stored pixels writes a 40x20 mask. The default (apply) names the fix; ignore reads it."""
    from click.testing import CliRunner

    from ciss.cli import main

    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    for i in range(3):
        img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
        exif = img.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees to display
        img.save(root / "images" / f"p{i}.jpg", exif=exif.tobytes())
        mask = np.zeros((20, 40), np.uint8)
        mask[:, :10] = 1
        Image.fromarray(mask, mode="L").save(root / "masks" / f"p{i}.png")
    with pytest.raises(CissError, match="pass --exif ignore"):
        open_folder(root)
    folder = open_folder(root, exif="ignore")
    assert folder.load(folder.train[0])[0].shape == (20, 40, 3)
    (root / "ciss.json").write_text('{"exif": "ignore"}')
    assert not open_folder(root).exif  # the folder carries the choice
    res = CliRunner().invoke(main, ["data", "check", str(root), "--exif", "apply"])
    assert res.exit_code == 1 and "--exif ignore" in res.output
