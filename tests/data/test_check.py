"""`data check`: the report's shape, counts, and every bad-input case reported, never raised."""

from __future__ import annotations

import json
from pathlib import Path

import scipy.io

from protoquant.config import DataConfig
from protoquant.data.check import check_dataset, format_check
from tests.data.layouts import (
    cars_struct,
    write_cars,
    write_cub,
    write_funnybirds,
    write_image_folder,
    write_pool,
)

KEYS = ["dataset", "num_classes", "splits", "has_parts", "has_boxes", "problems"]


def cub_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(dataset="cub", root=str(root), val_fraction=0.25, **kwargs)


def test_clean_cub_copy(tmp_path: Path) -> None:
    report = check_dataset(cub_config(write_cub(tmp_path)))
    assert list(report) == KEYS
    # train per class 2, 1, 1 images: a quarter of 2 rounds to 0 but every class of >= 2 gives one to val
    assert report == {
        "dataset": "cub",
        "num_classes": 3,
        "splits": {"train": 3, "val": 1, "test": 3},
        "has_parts": True,
        "has_boxes": True,
        "problems": [],
    }
    json.dumps(report)  # the --json output
    assert format_check(report) == (
        "dataset cub: 3 classes, parts yes, boxes yes\nimages: train 3, val 1, test 3\nno problems found"
    )


def test_bad_images_and_boxes_are_reported_not_raised(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    truncated = root / "images/002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"
    truncated.write_bytes(truncated.read_bytes()[:150])
    missing = root / "images/003.Sooty_Albatross/Sooty_Albatross_0008_796.jpg"
    missing.unlink()
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = "1 50.0 5.0 30.0 20.0"
    (root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    report = check_dataset(cub_config(root, crop_to_box=True))
    assert report["splits"] == {"train": 3, "val": 1, "test": 3}
    problems = report["problems"]
    assert len(problems) == 3
    assert problems[0].startswith("train: ") and "bounding_boxes.txt:1: box" in problems[0]
    assert problems[1].startswith("train: cannot read image ") and truncated.name in problems[1]
    assert problems[2] == f"test: image file {missing} not found"
    assert "3 problem(s):\n  - train: " in format_check(report)


def test_without_decoding_only_missing_files_are_found(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    truncated = root / "images/002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"
    truncated.write_bytes(truncated.read_bytes()[:150])
    missing = root / "images/003.Sooty_Albatross/Sooty_Albatross_0008_796.jpg"
    missing.unlink()
    report = check_dataset(cub_config(root), verify_images=False)
    assert report["problems"] == [f"test: image file {missing} not found"]


def test_missing_annotation_file_is_a_problem(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    (root / "parts" / "part_locs.txt").unlink()
    report = check_dataset(cub_config(root))
    assert report["num_classes"] == 0 and report["splits"] == {"train": 0, "val": 0, "test": 0}
    path = root / "parts" / "part_locs.txt"
    assert report["problems"] == [f"{s}: annotation file {path} not found" for s in ("train", "test")]


def test_unknown_dataset_and_left_out_files(tmp_path: Path) -> None:
    report = check_dataset(DataConfig(dataset="mnist"))
    assert report["problems"][0].startswith("train: unknown dataset 'mnist'; valid: auto, cars, cub")
    folder = write_image_folder(tmp_path)
    report = check_dataset(DataConfig(dataset="image-folder", root=str(folder), split_file="split.txt"))
    assert report["num_classes"] == 2 and not report["has_parts"] and not report["has_boxes"]
    assert "train: 1 images not listed in split.txt were left out (e.g. dog/g.png)" in report["problems"]


def test_cars_box_outside_image(tmp_path: Path) -> None:
    root = write_cars(tmp_path)
    entries = [("00001.jpg", 1, (5, 6, 49, 30)), ("00002.jpg", 2, (0, 0, 48, 32))]
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": cars_struct(entries)})
    report = check_dataset(DataConfig(dataset="cars", root=str(root), crop_to_box=True))
    assert report["has_boxes"] and not report["has_parts"] and report["num_classes"] == 3
    assert (
        len(report["problems"]) == 1
        and "annotation 1: box (x1, y1, x2, y2) = (5, 6, 49, 30)" in report["problems"][0]
    )


def test_funnybirds_and_synthetic_have_parts(tmp_path: Path) -> None:
    fb = check_dataset(
        DataConfig(dataset="funnybirds", root=str(write_funnybirds(tmp_path)), val_fraction=0.0)
    )
    assert fb["splits"] == {"train": 4, "val": 0, "test": 3} and fb["has_parts"] and not fb["has_boxes"]
    assert fb["problems"] == []
    config = DataConfig(synthetic_classes=2, synthetic_train_per_class=2, synthetic_test_per_class=1)
    synthetic = check_dataset(config)
    assert synthetic["splits"] == {"train": 2, "val": 2, "test": 2} and synthetic["problems"] == []
    assert synthetic["has_parts"] and synthetic["has_boxes"]


def test_auto_reports_the_layout_and_a_given_val_split(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    for split, count in (("train", 4), ("val", 2), ("test", 1)):
        write_pool(root, count, prefix=split)
    report = check_dataset(DataConfig(root=str(root), val_fraction=0.5))
    assert report["dataset"] == "image-folder" and report["num_classes"] == 3
    assert report["splits"] == {"train": 12, "val": 6, "test": 3} and report["problems"] == []
    missing = check_dataset(DataConfig(root=str(tmp_path / "absent")))
    assert missing["problems"] == [f"data.root: data.root {str(tmp_path / 'absent')!r} is not a folder"]
