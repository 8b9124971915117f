"""Invariants of the synthetic parts dataset: determinism, ground truth, interventions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from protoquant.data.synthetic import (
    PART_NAMES,
    PART_SLOTS,
    SyntheticParts,
    _place_boxes,
    make_classes,
    minimal_sufficient_sets,
    sample_layout,
)
from protoquant.data.synthetic_draw import render_background

SIZE = 128  # small images keep the tests fast
INDICES = (0, 1, 7, 13)  # images checked in the per-image tests


@pytest.fixture(scope="module")
def dataset() -> SyntheticParts:
    return SyntheticParts("train", num_classes=6, images_per_class=4, image_size=SIZE, seed=3)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def _changed(a, b) -> np.ndarray:
    """(H, W) bool pixels where two images differ in any channel."""
    return (_pixels(a) != _pixels(b)).any(axis=2)


def test_images_are_rgb_of_the_requested_size(dataset: SyntheticParts) -> None:
    image = dataset.load_image(0)
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_same_arguments_give_identical_pixels(dataset: SyntheticParts) -> None:
    twin = SyntheticParts("train", num_classes=6, images_per_class=4, image_size=SIZE, seed=3)
    for i in INDICES:
        assert np.array_equal(_pixels(dataset.load_image(i)), _pixels(twin.load_image(i)))


def test_splits_and_seeds_give_different_images(dataset: SyntheticParts) -> None:
    test = SyntheticParts("test", num_classes=6, images_per_class=4, image_size=SIZE, seed=3)
    other = SyntheticParts("train", num_classes=6, images_per_class=4, image_size=SIZE, seed=4)
    for i in INDICES:
        assert not np.array_equal(_pixels(dataset.load_image(i)), _pixels(test.load_image(i)))
        assert not np.array_equal(_pixels(dataset.load_image(i)), _pixels(other.load_image(i)))
    assert np.array_equal(test.class_parts, dataset.class_parts)  # classes depend on seed only


def test_labels_are_balanced(dataset: SyntheticParts) -> None:
    assert dataset.labels.dtype == np.int64 and len(dataset) == 6 * 4
    assert np.bincount(dataset.labels, minlength=6).tolist() == [4] * 6


def test_classes_are_unique_and_distinct(dataset: SyntheticParts) -> None:
    assert len(set(dataset.classes)) == dataset.num_classes == 6
    assert dataset.class_parts.shape == (6, len(PART_SLOTS))
    assert len({tuple(row) for row in dataset.class_parts.tolist()}) == 6
    assert dataset.part_names == PART_NAMES and dataset.has_parts


@pytest.mark.parametrize(("num_classes", "seed"), [(2, 0), (10, 0), (10, 5), (30, 1), (81, 2)])
def test_every_class_has_a_single_part_sibling(num_classes: int, seed: int) -> None:
    parts = make_classes(num_classes, seed)
    assert len({tuple(row) for row in parts.tolist()}) == num_classes
    differences = (parts[:, None, :] != parts[None, :, :]).sum(axis=2)  # (C, C)
    assert ((differences == 1).any(axis=1)).all()


def test_make_classes_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        make_classes(0, 0)
    with pytest.raises(ValueError):
        make_classes(3**4 + 1, 0)


@pytest.mark.parametrize("index", INDICES)
def test_part_ground_truth_is_consistent(dataset: SyntheticParts, index: int) -> None:
    ann = dataset.annotations(index)
    masks = ann.masks
    assert masks.shape == (len(PART_NAMES), SIZE, SIZE) and masks.dtype == bool
    assert ann.visible.all() and masks.any(axis=(1, 2)).all()
    assert masks.sum(axis=0).max() == 1  # pairwise disjoint
    assert ann.keypoints.dtype == np.float32 and ann.box.dtype == np.float32
    for mask, (x, y) in zip(masks, ann.keypoints):
        rows, cols = np.nonzero(mask)
        assert cols.min() <= x <= cols.max() and rows.min() <= y <= rows.max()
    rows, cols = np.nonzero(masks.any(axis=0))
    assert ann.box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


@pytest.mark.parametrize("index", INDICES)
def test_render_without_removals_is_load_image(dataset: SyntheticParts, index: int) -> None:
    assert np.array_equal(_pixels(dataset.render(index)), _pixels(dataset.load_image(index)))


@pytest.mark.parametrize("index", INDICES)
def test_removing_a_part_changes_only_its_pixels(dataset: SyntheticParts, index: int) -> None:
    image, masks = dataset.load_image(index), dataset.annotations(index).masks
    for p, mask in enumerate(masks):
        changed = _changed(image, dataset.render(index, remove_parts=[p]))
        assert not (changed & ~mask).any()
        assert changed[mask].mean() > 0.9  # a saturated part differs from what lies below


@pytest.mark.parametrize("index", INDICES)
def test_removing_a_background_object_changes_only_its_pixels(dataset: SyntheticParts, index: int) -> None:
    image, parts = dataset.load_image(index), dataset.annotations(index).masks.any(axis=0)
    objects = dataset.background_masks(index)
    assert objects.shape[0] == dataset.num_background_objects(index)
    assert 2 <= objects.shape[0] <= 4 and not (objects.any(axis=0) & parts).any()
    assert objects.sum(axis=0).max() <= 1  # visible pixels belong to one object at most
    for m, mask in enumerate(objects):
        changed = _changed(image, dataset.render(index, remove_background=[m]))
        assert not (changed & ~mask).any()
        assert not changed[parts].any()
        assert not mask.any() or changed[mask].mean() > 0.5


def test_removing_everything_leaves_the_background(dataset: SyntheticParts) -> None:
    layout = sample_layout(3, "train", 5, SIZE)
    bare = dataset.render(
        5, remove_parts=range(len(PART_NAMES)), remove_background=range(len(layout.objects))
    )
    assert np.array_equal(_pixels(bare), render_background(layout.background_seed, SIZE))


def test_bad_indices_raise(dataset: SyntheticParts) -> None:
    with pytest.raises(IndexError):
        dataset.load_image(len(dataset))
    with pytest.raises(IndexError):
        dataset.render(0, remove_parts=[len(PART_NAMES)])
    with pytest.raises(IndexError):
        dataset.render(0, remove_background=[dataset.num_background_objects(0)])
    with pytest.raises(ValueError):
        SyntheticParts("val")


def test_placement_falls_back_to_a_valid_grid() -> None:
    rng = np.random.default_rng(0)
    boxes = _place_boxes(rng, [112] * 4, 224, 4)  # 2 x (112 + gap) > 224: rejection must fail
    for (x, y, s), (bx, by, bs) in itertools.combinations(boxes, 2):
        assert x + s <= bx or bx + bs <= x or y + s <= by or by + bs <= y
    assert all(0 <= x and 0 <= y and x + s <= 224 and y + s <= 224 for x, y, s in boxes)


def _sufficient(parts: np.ndarray, c: int, subset: tuple[int, ...]) -> bool:
    cols = list(subset)
    others = [o for o in range(len(parts)) if o != c]
    return not any((parts[o, cols] == parts[c, cols]).all() for o in others)


def test_minimal_sufficient_sets_by_hand() -> None:
    parts = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 2, 2]])
    assert minimal_sufficient_sets(parts, 0) == [(0, 1)]
    assert minimal_sufficient_sets(parts, 1) == [(0, 1), (0, 2), (0, 3)]
    assert minimal_sufficient_sets(parts, 2) == [(0, 1), (1, 2), (1, 3)]
    assert minimal_sufficient_sets(parts, 3) == [(2,), (3,), (0, 1)]  # the last class too
    assert minimal_sufficient_sets(parts[:1], 0) == [()]


@pytest.mark.parametrize(("num_classes", "seed"), [(6, 3), (10, 0), (25, 7)])
def test_minimal_sufficient_parts_match_brute_force(num_classes: int, seed: int) -> None:
    data = SyntheticParts(num_classes=num_classes, images_per_class=1, image_size=SIZE, seed=seed)
    slots = range(len(PART_NAMES))
    all_sets = [s for k in range(len(slots) + 1) for s in itertools.combinations(slots, k)]
    for c in range(num_classes):
        parts = data.class_parts
        expected = [
            s
            for s in all_sets
            if _sufficient(parts, c, s)
            and not any(_sufficient(parts, c, t) for t in all_sets if set(t) < set(s))
        ]
        found = data.minimal_sufficient_parts(c)
        assert found and sorted(found) == sorted(expected)


def test_fingerprint_is_stable_and_sensitive() -> None:
    kwargs = {"num_classes": 4, "images_per_class": 2, "image_size": SIZE, "seed": 1}
    base = SyntheticParts("train", **kwargs).fingerprint()
    assert base == SyntheticParts("train", **kwargs).fingerprint()
    changes = [
        {"seed": 2},
        {"num_classes": 5},
        {"images_per_class": 3},
        {"image_size": SIZE + 32},
    ]
    prints = {SyntheticParts("train", **{**kwargs, **c}).fingerprint() for c in changes}
    prints.add(SyntheticParts("test", **kwargs).fingerprint())
    assert base not in prints and len(prints) == len(changes) + 1


def test_subset_keeps_annotations(dataset: SyntheticParts) -> None:
    view = dataset.subset([5, 2])
    assert view.has_parts and view.labels.tolist() == dataset.labels[[5, 2]].tolist()
    assert np.array_equal(view.annotations(1).masks, dataset.annotations(2).masks)
