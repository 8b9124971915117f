"""Part purity (PIP-Net): patch rule per grid, inclusive hits, merged parts, ties, strict thresholds."""

import numpy as np
import pytest

from protoquant.metrics.common import part_groups
from protoquant.metrics.purity import (
    group_hits,
    images_above,
    patch_boxes,
    patch_interval,
    prototype_purity,
    summarise,
    top_k_images,
)


def test_patch_intervals_of_the_reference_grids():
    assert [patch_interval(h, 7) for h in (0, 1, 6)] == [(0, 32), (32, 64), (192, 224)]
    # W = 14: skip round(192 / 13) = 15; the last cell snaps to [192, 224]
    assert [patch_interval(h, 14) for h in (0, 12, 13)] == [(0, 32), (180, 212), (192, 224)]
    # W = 26: skip 8, lower bound max(0, (h - 1) * 8 + 4)
    assert [patch_interval(h, 26) for h in (0, 1, 2, 25)] == [(0, 32), (4, 36), (12, 44), (192, 224)]


def test_patch_boxes_scale_to_the_original_image():
    boxes = patch_boxes(np.array([[0, 6]]), (7, 7), np.array([[448.0, 112.0]]))  # (H, W) = (448, 112)
    np.testing.assert_allclose(boxes, [[0, 64, 96, 112]])


def test_group_hits_inclusive_merged_and_invisible():
    names, group_of = part_groups(("beak", "left eye", "right eye", "tail"), merge_left_right=True)
    assert names == ("beak", "eye", "tail")
    boxes = np.array([[10.0, 20.0, 10.0, 20.0]])
    keypoints = np.array([[[20.0, 20.0], [50.0, 50.0], [10.0, 15.0], [15.0, 15.0]]])
    visible = np.array([[True, True, True, False]])
    hits, seen = group_hits(boxes, keypoints, visible, group_of, len(names))
    assert hits.tolist() == [[True, True, False]]  # beak on the corner; right eye hits; tail invisible
    assert seen.tolist() == [[True, True, False]]


def test_prototype_purity_lists_only_visible_images_and_ties_prefer_more_hits():
    hits = np.array([[1, 1], [0, 1], [0, 0], [0, 0]], bool)
    visible = np.array([[1, 1], [0, 1], [0, 1], [0, 1]], bool)
    # part 0: visible in 1 image, hit 1 -> 1.0; part 1: 2 / 4 -> 0.5
    assert prototype_purity(hits, visible) == (1.0, 0)
    tied = np.array([[1, 1], [0, 1]], bool)
    tied_visible = np.array([[1, 1], [0, 1]], bool)
    hits2 = np.array([[1, 1], [1, 1]], bool)
    assert prototype_purity(hits2 & tied, tied_visible)[0] == 1.0
    assert prototype_purity(hits2 & tied, tied_visible)[1] == 1  # both 100 %, part 1 has more hits
    assert prototype_purity(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (0.0, -1)


def test_image_selection_ties_and_strict_threshold():
    scores = np.array([0.5, 0.9, 0.9, 0.2, 0.51])
    assert top_k_images(scores, 3).tolist() == [1, 2, 4]  # tie 0.9: lower index first
    assert top_k_images(scores, 10).tolist() == [1, 2, 4, 0, 3]  # fewer than k: all
    assert images_above(scores).tolist() == [1, 2, 4]  # 0.5 itself is not > 0.5


def test_summary_ddof0_headline_over_prototypes_with_images():
    summary = summarise(np.array([1.0, 0.0, 0.25]), np.array([0, -1, 1]), np.array([3, 0, 1]))
    # headline over prototypes 0 and 2 (prototype 1 has no image): mean 0.625, std 0.375
    assert summary.mean == pytest.approx(0.625) and summary.std == pytest.approx(0.375)
    assert summary.mean_all == pytest.approx(1.25 / 3) and summary.std_all == pytest.approx(
        np.std([1, 0, 0.25])
    )
    assert summary.num_pure == 1 and summary.num_with_images == 2 and summary.num_prototypes == 3


def test_all_above_prototype_that_never_passes_half_is_left_out_of_the_headline():
    scores = np.array([[0.9, 0.5], [0.7, 0.3], [0.2, 0.1]])  # (N, K): prototype 1 never exceeds 0.5
    hits = np.array([[True], [False], [True]])  # (N, G): the one part is hit in images 0 and 2
    visible = np.ones((3, 1), bool)
    values, counts = [], []
    for p in range(2):
        chosen = images_above(scores[:, p])  # p0: images 0, 1; p1: none
        values.append(prototype_purity(hits[chosen], visible[chosen])[0])
        counts.append(len(chosen))
    assert values == [0.5, 0.0] and counts == [2, 0]
    summary = summarise(np.array(values), np.array([0, -1]), np.array(counts))
    assert (summary.mean, summary.std) == (0.5, 0.0)  # the reference: rows only for prototype 0
    assert (summary.mean_all, summary.std_all) == (0.25, 0.25)  # prototype 1 scored 0 and kept
    assert summary.num_pure == 0  # 0.5 is not > 0.5
