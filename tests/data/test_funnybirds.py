"""FunnyBirds on a miniature copy of the official layout: images, part maps, interventions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoquant.data.funnybirds import FunnyBirds
from tests.data.layouts import FB_BACKGROUND, FB_BEAK, FB_SIZE, write_funnybirds


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_funnybirds(tmp_path_factory.mktemp("funnybirds"))


@pytest.fixture
def fb_root(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (tests edit it); writing 256 px PNGs once keeps the module fast."""
    return Path(shutil.copytree(pristine, tmp_path / "FunnyBirds"))


def rgba(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_classes_labels_and_reference_file_names(fb_root: Path) -> None:
    test = FunnyBirds(fb_root, "test")
    assert test.part_slots == ("beak", "eye", "foot", "tail", "wing")
    assert test.classes == (
        "beak0-eye0-foot0-tail0-wing0",
        "beak1-eye0-foot0-tail0-wing0",
        "beak1-eye2-foot0-tail0-wing5",
    )
    assert test.labels.tolist() == [1, 0, 2]
    assert test.files == ("test/1/000000.png", "test/0/000001.png", "test/2/000002.png")
    assert FunnyBirds(fb_root.parent, "train").labels.tolist() == [0, 1, 2, 0]  # parent folder accepted


def test_images_drop_alpha(fb_root: Path) -> None:
    image = FunnyBirds(fb_root, "test").load_image(0)
    assert image.mode == "RGB" and image.size == (FB_SIZE, FB_SIZE)
    np.testing.assert_array_equal(np.asarray(image), rgba(fb_root / "test/1/000000.png")[..., :3])


def test_part_masks_from_the_part_map(fb_root: Path) -> None:
    test = FunnyBirds(fb_root, "test")
    assert test.has_parts and not FunnyBirds(fb_root, "train").has_parts
    parts = test.annotations(0)
    assert parts.part_names == ("eye01", "eye02", "beak", "foot01", "foot02", "wing01", "wing02", "tail")
    assert parts.masks.shape == (8, FB_SIZE, FB_SIZE) and parts.box is None
    expected = np.zeros((FB_SIZE, FB_SIZE), dtype=bool)
    expected[FB_BEAK] = True
    np.testing.assert_array_equal(parts.masks[2], expected)
    assert parts.visible.tolist() == [True, False, True, False, False, False, False, False]
    assert parts.keypoints[2].tolist() == [14.5, 31.5]  # cols 10..19, rows 30..33
    assert parts.keypoints[0].tolist() == [100.0, 50.0]  # the single eye01 pixel (row 50, col 100)
    assert test.part_groups["eye"] == ("eye01", "eye02") and test.part_groups["beak"] == ("beak",)
    assert FunnyBirds(fb_root, "train").annotations(0) is None


def test_background_masks_follow_bg_objects(fb_root: Path) -> None:
    test = FunnyBirds(fb_root, "test")
    masks = test.background_masks(0)  # bg_objects "3,0," -> two objects, colours (204, 204, 204 + j)
    assert masks.shape == (2, FB_SIZE, FB_SIZE) and test.num_background_objects(0) == 2
    for j, region in enumerate(FB_BACKGROUND):
        expected = np.zeros((FB_SIZE, FB_SIZE), dtype=bool)
        expected[region] = True
        np.testing.assert_array_equal(masks[j], expected)
    assert test.background_masks(1).shape == (0, FB_SIZE, FB_SIZE)


def test_interventions_use_the_reference_file_names(fb_root: Path) -> None:
    test = FunnyBirds(fb_root, "test")
    folder = fb_root / "test_interventions/1/000000"
    no_beak = rgba(folder / "body_eye_foot_tail_wing.png")[..., :3]
    np.testing.assert_array_equal(np.asarray(test.intervention(0, ["beak"])), no_beak)
    np.testing.assert_array_equal(np.asarray(test.render(0, remove_parts=[0])), no_beak)
    bare = np.asarray(test.intervention(0, list(test.part_slots)))
    np.testing.assert_array_equal(bare, rgba(folder / "body_.png")[..., :3])
    second = rgba(folder / "background_interventions/1.png")[..., :3]
    np.testing.assert_array_equal(np.asarray(test.render(0, remove_background=[1])), second)
    with pytest.raises(ValueError, match="not both"):
        test.render(0, remove_parts=[0], remove_background=[0])
    with pytest.raises(ValueError, match=r"unknown FunnyBirds part\(s\) \['crest'\]"):
        test.intervention(0, ["crest"])
    with pytest.raises(IndexError, match=r"background object 2 out of range \[0, 2\)"):
        test.background_intervention(0, 2)
    with pytest.raises(FileNotFoundError, match=r"body_beak_eye_foot_tail\.png"):
        test.intervention(0, ["wing"])


def test_minimal_sufficient_parts_include_the_last_class(fb_root: Path) -> None:
    test = FunnyBirds(fb_root, "test")
    assert test.minimal_sufficient_parts(0) == [(0,)]  # only class 0 has beak 0
    assert test.minimal_sufficient_parts(1) == [(0, 1), (0, 4)]  # beak 1 + eye 0, or beak 1 + wing 0
    assert test.minimal_sufficient_parts(2) == [(1,), (4,)]  # the reference never records the last class


@pytest.mark.parametrize(
    ("name", "edit", "error", "message"),
    [
        ("classes.json", None, FileNotFoundError, r"classes\.json not found"),
        (
            "dataset_test.json",
            lambda d: d[1].update(class_idx=7),
            ValueError,
            r"dataset_test\.json: entry 1: class_idx",
        ),
        (
            "classes.json",
            lambda d: d[2].update(class_idx=0),
            ValueError,
            r"classes\.json: entry 2: class_idx",
        ),
        (
            "classes.json",
            lambda d: d[0]["parts"].pop("tail"),
            ValueError,
            r"classes\.json: entry 0: parts must name",
        ),
        (
            "classes.json",
            lambda d: d[0]["parts"].update(eye=3),
            ValueError,
            r"entry 0: eye variant 3 outside 0\.\.2",
        ),
        ("parts.json", "{broken", ValueError, r"parts\.json: not valid JSON"),
    ],
)
def test_bad_json_names_file_and_entry(fb_root: Path, name, edit, error, message) -> None:
    path = fb_root / name
    if edit is None:
        path.unlink()
    elif isinstance(edit, str):
        path.write_text(edit)
    else:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    with pytest.raises(error, match=message):
        FunnyBirds(fb_root, "test")


def test_missing_part_map_is_named(fb_root: Path) -> None:
    (fb_root / "test_part_map/0/000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_part_map/0/000001\.png"):
        FunnyBirds(fb_root, "test").annotations(1)


def test_full_re_render_is_the_intervention_without_removals(fb_root: Path) -> None:
    test = FunnyBirds(fb_root, "test")
    path = fb_root / "test_interventions/1/000000/body_beak_eye_foot_tail_wing.png"
    assert test.intervention_path(0, []) == path and not test.has_full_render(0)
    Image.fromarray(np.full((FB_SIZE, FB_SIZE, 4), 7, np.uint8), "RGBA").save(path)
    assert test.has_full_render(0) and not test.has_full_render(1)  # image 1 has no interventions
    np.testing.assert_array_equal(np.asarray(test.intervention(0, ())), np.full((FB_SIZE, FB_SIZE, 3), 7))
