"""A downscaled copy keeps its annotations on the same pixels (protoquant.data.resize_layouts)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from PIL import Image

from protoquant.config import DataConfig
from protoquant.data.cars import StanfordCars
from protoquant.data.check import check_dataset
from protoquant.data.cub import CUB200
from protoquant.data.funnybirds import FunnyBirds
from protoquant.data.resize import resize_dataset, resized_size
from protoquant.data.resize_layouts import _scaled_line
from tests.data.layouts import (
    CARS_SIZE,
    CARS_TRAIN,
    CUB_BEAK_OF_IMAGE_1,
    write_cars,
    write_cub,
    write_funnybirds,
)

CUB_SHORTER = 20  # every fixture image of CUB is larger: all are resized
CARS_SHORTER = 16  # 48 x 32 -> 24 x 16: scale one half on both axes


def _scale(old: CUB200, new: CUB200, index: int) -> np.ndarray:
    """(new width / old width, new height / old height) of image `index`."""
    with Image.open(old.image_path(index)) as before, Image.open(new.image_path(index)) as after:
        assert after.size == resized_size(*before.size, CUB_SHORTER)
        return np.array(after.size, dtype=np.float64) / np.array(before.size, dtype=np.float64)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cub_boxes_and_parts_follow_the_images(tmp_path, split) -> None:
    src = write_cub(tmp_path / "src")
    report = resize_dataset(src, tmp_path / "dst", CUB_SHORTER)
    assert report.annotations == 2 and report.resized == 7
    old, new = CUB200(src, split), CUB200(tmp_path / "dst", split)
    assert new.files == old.files and np.array_equal(new.labels, old.labels)
    for index in range(len(old)):
        scale = _scale(old, new, index)
        assert np.allclose(new.boxes[index], old.boxes[index] * np.tile(scale, 2), atol=0.006)
        assert np.array_equal(new.part_visible[index], old.part_visible[index])
        visible = old.part_visible[index]
        assert np.allclose(new.part_xy[index][visible], old.part_xy[index][visible] * scale, atol=0.006)
        assert np.array_equal(new.part_xy[index][~visible], old.part_xy[index][~visible])  # (0, 0) stays
        cropped = CUB200(tmp_path / "dst", split, crop_to_box=True).load_image(index)  # the box fits
        assert abs(cropped.width - old.boxes[index][2] * scale[0]) < 2
    for name in ("images.txt", "classes.txt", "train_test_split.txt", "parts/parts.txt"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    for crop in (False, True):  # every box of the copy lies inside its image
        assert (
            check_dataset(DataConfig(dataset="cub", root=str(tmp_path / "dst"), crop_to_box=crop))["problems"]
            == []
        )


def test_a_hand_computed_cub_part(tmp_path) -> None:
    src = write_cub(tmp_path / "src")
    resize_dataset(src, tmp_path / "dst", CUB_SHORTER)
    image_1 = CUB200(tmp_path / "dst", "train")  # image 1 is 60 x 40 -> 30 x 20: half on both axes
    beak = image_1.part_names.index("beak")
    assert tuple(image_1.part_xy[0, beak]) == pytest.approx((CUB_BEAK_OF_IMAGE_1[0] / 2, 6.12), abs=1e-4)
    assert tuple(image_1.boxes[0]) == pytest.approx((5.35, 2.6, 15.45, 10.25), abs=1e-6)


def test_a_second_run_does_not_rescale_twice(tmp_path) -> None:
    src = write_cub(tmp_path / "src")
    resize_dataset(src, tmp_path / "dst", CUB_SHORTER)
    first = (tmp_path / "dst/parts/part_locs.txt").read_bytes()
    again = resize_dataset(src, tmp_path / "dst", CUB_SHORTER)
    assert again.resized == 0 and again.annotations == 2
    assert (tmp_path / "dst/parts/part_locs.txt").read_bytes() == first


def test_a_stopped_copy_has_no_annotations_rather_than_wrong_ones(tmp_path, monkeypatch) -> None:
    src = write_cub(tmp_path / "src")
    resize_dataset(src, tmp_path / "dst", CUB_SHORTER)  # a finished copy, then its source changes
    real, calls = Image.Image.save, []

    def failing_save(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(image, fp, *args, **kwargs)

    for path in sorted((src / "images").rglob("*.jpg"))[:3]:
        Image.new("RGB", (80, 40), "red").save(path)  # newer and larger than their copies
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        resize_dataset(src, tmp_path / "dst", CUB_SHORTER, threads=1)
    monkeypatch.undo()
    assert not (tmp_path / "dst/bounding_boxes.txt").exists()
    assert not (tmp_path / "dst/parts/part_locs.txt").exists()
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        CUB200(tmp_path / "dst", "train")
    resize_dataset(src, tmp_path / "dst", CUB_SHORTER)
    resize_dataset(src, tmp_path / "fresh", CUB_SHORTER)
    for name in ("bounding_boxes.txt", "parts/part_locs.txt"):
        assert (tmp_path / "dst" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


@pytest.mark.parametrize("layout", ["devkit", "torchvision"])
def test_cars_boxes_follow_the_images(tmp_path, layout) -> None:
    src = write_cars(tmp_path / "src", layout=layout)
    report = resize_dataset(src, tmp_path / "dst", CARS_SHORTER)
    assert report.annotations == 2
    for split in ("train", "test"):
        old, new = StanfordCars(src, split), StanfordCars(tmp_path / "dst", split)
        assert new.files == old.files and new.classes == old.classes
        assert np.array_equal(new.labels, old.labels)
        assert np.abs(new.boxes - old.boxes / 2).max() <= 0.5  # rounded to whole pixels
        width, height = (side // 2 for side in CARS_SIZE)
        assert (new.boxes[:, 2] <= width).all() and (new.boxes[:, 3] <= height).all()
        cropped = StanfordCars(tmp_path / "dst", split, crop_to_box=True)
        for index in range(len(new)):
            x1, y1, x2, y2 = new.boxes[index]
            assert cropped.load_image(index).size == (x2 - x1, y2 - y1)
    config = DataConfig(dataset="cars", root=str(tmp_path / "dst"), crop_to_box=True)
    assert check_dataset(config)["problems"] == []
    train = StanfordCars(tmp_path / "dst", "train")
    assert tuple(train.boxes[1]) == (0, 0, 24, 16)  # CARS_TRAIN[1]: the whole 48 x 32 image
    assert CARS_TRAIN[1][2] == (0, 0, 48, 32)


def test_funnybirds_part_maps_keep_exact_colours(tmp_path) -> None:
    src = write_funnybirds(tmp_path / "src")
    report = resize_dataset(src, tmp_path / "dst", 128)
    assert report.annotations == 0 and report.resized > 0
    old, new = FunnyBirds(src, "test"), FunnyBirds(tmp_path / "dst", "test")
    before, after = old.part_map(0), new.part_map(0)
    assert after.shape == (128, 128, 3)
    colours = lambda pixels: set(map(tuple, pixels.reshape(-1, 3).tolist()))  # noqa: E731
    assert colours(after) <= colours(before)  # no blended colour: every pixel keeps a part
    nearest = np.asarray(Image.fromarray(before).resize((128, 128), Image.Resampling.NEAREST))
    assert np.array_equal(after, nearest)
    old_parts, new_parts = old.annotations(0), new.annotations(0)
    assert (new_parts.visible <= old_parts.visible).all()  # a one-pixel part may fall between samples
    assert new_parts.visible[old.part_names.index("beak")]
    with Image.open(new.image_path(0)) as image:
        assert image.size == (128, 128)


def test_unreadable_lines_are_left_for_the_loader() -> None:
    assert _scaled_line("1 a 2 3 4", (0.5, 0.5), {1: 0, 2: 1, 3: 0, 4: 1}) == "1 a 2 3 4"
    assert _scaled_line("1 2 3", (0.5, 0.5), {1: 0, 2: 1, 3: 0, 4: 1}) == "1 2 3"
    assert _scaled_line("1 2 3 4 5", None, {1: 0}) == "1 2 3 4 5"
    assert _scaled_line("7 4 10 8 1", (0.5, 0.25), {2: 0, 3: 1}) == "7 4 5.00 2.00 1"


def test_imagenet_kaggle_boxes_follow_the_images(tmp_path) -> None:
    from protoquant.data.imagenet import ImageNet
    from tests.data.layouts import IMAGENET_VAL, write_imagenet

    src = write_imagenet(tmp_path / "src", val="kaggle")
    report = resize_dataset(src, tmp_path / "dst", 6)  # val images 12 x 16 -> 6 x 8: one half
    assert report.annotations == 1
    old, new = ImageNet(src, "test"), ImageNet(tmp_path / "dst", "test")
    assert new.files == old.files and np.array_equal(new.labels, old.labels)  # labels read from the csv
    lines = (tmp_path / "dst" / "LOC_val_solution.csv").read_text().splitlines()
    assert lines[0] == "ImageId,PredictionString" and len(lines) == len(IMAGENET_VAL) + 1
    wnid = IMAGENET_VAL[0]
    assert f"ILSVRC2012_val_00000001,{wnid} 0 1 5 6 {wnid} 2 2 4 4" in lines  # 1 2 10 11, 3 4 8 9 halved


VOC = """<annotation>
	<folder>{folder}</folder>
	<filename>{name}</filename>
	<size>
		<width>{width}</width>
		<height>{height}</height>
		<depth>3</depth>
	</size>
	<object>
		<name>{folder}</name>
		<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>11</ymax></bndbox>
	</object>
	<object>
		<name>{folder}</name>
		<bndbox><xmin>3</xmin><ymin>4</ymin><xmax>oops</xmax><ymax>9</ymax></bndbox>
	</object>
</annotation>
"""


def _voc(path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(VOC.format(folder=path.parent.name, name=path.stem, width=width, height=height))


def _voc_numbers(path) -> tuple[list[str], list[list[str]]]:
    """The <size> (width, height) and each object's box (xmin, ymin, xmax, ymax) as text."""
    root = ElementTree.parse(path).getroot()
    size = [root.findtext(f"size/{tag}") for tag in ("width", "height")]
    boxes = [[box.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")] for box in root.iter("bndbox")]
    return size, boxes


def test_imagenet_voc_xml_boxes_follow_their_images(tmp_path) -> None:
    from tests.data.layouts import write_imagenet

    src = write_imagenet(tmp_path / "src", val="kaggle")
    xml = src / "ILSVRC" / "Annotations" / "CLS-LOC"
    _voc(xml / "val" / "ILSVRC2012_val_00000001.xml", 12, 16)  # val: 12 x 16 -> 6 x 8
    _voc(xml / "train" / "n01440764" / "n01440764_1000.xml", 16, 12)  # train: 16 x 12 -> 8 x 6
    _voc(xml / "val" / "ILSVRC2012_val_00000099.xml", 12, 16)  # no such image: copied as it is
    (xml / "val" / "broken.xml").write_text("<annotation><size>")  # does not parse: copied
    dst = tmp_path / "dst"
    report = resize_dataset(src, dst, 6)
    assert report.annotations == 1 + 4  # the csv, and every XML file (two of them as they were)
    out = dst / "ILSVRC" / "Annotations" / "CLS-LOC"
    # 1 2 10 11 halved and rounded like the Kaggle csv; the unreadable xmax is left alone
    assert _voc_numbers(out / "val" / "ILSVRC2012_val_00000001.xml") == (
        ["6", "8"],
        [["0", "1", "5", "6"], ["2", "2", "oops", "4"]],
    )
    assert _voc_numbers(out / "train" / "n01440764" / "n01440764_1000.xml")[0] == ["8", "6"]
    for name in ("ILSVRC2012_val_00000099.xml", "broken.xml"):
        assert (out / "val" / name).read_bytes() == (xml / "val" / name).read_bytes()
    kept = (out / "val" / "ILSVRC2012_val_00000001.xml").read_text()
    assert "<folder>val</folder>" in kept and "<depth>3</depth>" in kept  # the rest as read
    csv_line = next(
        line for line in (dst / "LOC_val_solution.csv").read_text().splitlines() if "_00000001," in line
    )
    assert csv_line.split(",")[1].split()[1:5] == ["0", "1", "5", "6"]  # both files of the copy agree


def test_a_second_run_keeps_the_xml_files_until_their_image_changes(tmp_path) -> None:
    from tests.data.layouts import write_imagenet

    src = write_imagenet(tmp_path / "src", val="kaggle")
    xml = src / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    for n in (1, 2):
        _voc(xml / f"ILSVRC2012_val_0000000{n}.xml", 12, 16)
    dst = tmp_path / "dst"
    resize_dataset(src, dst, 6)
    again = resize_dataset(src, dst, 6)
    assert again.resized == 0 and again.annotations == 1  # the csv only: both XML files kept
    assert _voc_numbers(dst / "ILSVRC/Annotations/CLS-LOC/val/ILSVRC2012_val_00000001.xml")[1][0] == [
        "0", "1", "5", "6",
    ]  # fmt: skip  # not halved twice
    image = src / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000002.JPEG"
    Image.new("RGB", (24, 32)).save(image)  # the original changes: its copy and its XML are redone
    later = image.stat().st_mtime_ns + 10**9
    os.utime(image, ns=(later, later))
    third = resize_dataset(src, dst, 6)
    assert third.resized == 1 and third.annotations == 1 + 1
    assert _voc_numbers(dst / "ILSVRC/Annotations/CLS-LOC/val/ILSVRC2012_val_00000002.xml") == (
        ["6", "8"],
        [["0", "0", "2", "3"], ["1", "1", "oops", "2"]],  # scaled by 6 / 24 and 8 / 32
    )
