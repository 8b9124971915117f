"""Consistency and stability (Huang et al.): inclusive boxes, clipping, invisible parts, empty classes."""

import numpy as np
import pytest
import torch

from protoquant.metrics.consistency import (
    box_part_hits,
    consistency,
    input_noise,
    part_frequencies,
    slot_hits,
    stability,
)

S = 224


def one_peak(y: int, x: int) -> torch.Tensor:
    maps = torch.zeros(1, S, S)
    maps[0, y, x] = 1.0
    return maps


def test_box_is_inclusive_at_plus_minus_36():
    keypoints = torch.tensor([[[100 + 36, 100], [100 + 37, 100], [100 - 36, 100 - 36], [100 - 37, 100]]])
    visible = torch.ones(1, 4, dtype=torch.bool)
    assert box_part_hits(one_peak(100, 100), keypoints, visible).tolist() == [[True, False, True, False]]


def test_box_is_clipped_to_zero_and_size_and_the_border_counts():
    keypoints = torch.tensor([[[0, 0], [224, 224], [223, 180], [0, 37]]])
    visible = torch.ones(1, 4, dtype=torch.bool)
    assert box_part_hits(one_peak(0, 0), keypoints, visible)[0].tolist() == [True, False, False, False]
    # box rows/cols [188, min(224, 260)] = [188, 224]: a keypoint mapped to 224 is inside
    assert box_part_hits(one_peak(223, 223), keypoints, visible)[0].tolist() == [False, True, False, False]


def test_invisible_parts_never_hit_and_ties_take_the_first_pixel():
    maps = torch.zeros(1, S, S)
    maps[0, 10, 10] = maps[0, 200, 200] = 1.0  # tie: row-major first is (10, 10)
    keypoints = torch.tensor([[[10, 10], [200, 200], [12, 12]]])
    visible = torch.tensor([[True, True, False]])
    assert box_part_hits(maps, keypoints, visible).tolist() == [[True, False, False]]
    constant = torch.zeros(1, S, S)  # argmax of a constant map is (0, 0)
    assert box_part_hits(constant, torch.tensor([[[36, 36]]]), torch.tensor([[True]])).tolist() == [[True]]


def test_slot_hits_upsamples_each_prototype():
    activation = torch.zeros(2, 7, 7)
    activation[0, 0, 0] = 1.0  # prototype 0 peaks top-left
    activation[1, 6, 6] = 1.0  # prototype 1 peaks bottom-right
    keypoints = torch.tensor([[5, 5], [220, 220]])
    hits = slot_hits(activation, torch.tensor([0, 1]), keypoints, torch.tensor([True, True]), size=S)
    assert hits.tolist() == [[True, False], [False, True]]


def test_frequencies_and_threshold_boundary():
    hits = np.array([[4, 1], [3, 0], [0, 0]])  # (slots, parts)
    visible = np.array([[5, 2], [4, 0], [0, 0]])  # third slot: a class with no test images
    np.testing.assert_allclose(part_frequencies(hits, visible), [[0.8, 0.5], [0.75, 0.0], [0.0, 0.0]])
    result = consistency(hits, visible)
    assert result.consistent.tolist() == [True, False, False]  # 0.8 >= 0.8 exactly; empty class inconsistent
    assert result.score == pytest.approx(100 / 3)
    assert result.best_part.tolist() == [0, 0, 0]


def test_stability_whole_vector_and_empty_class():
    same, images = np.array([3, 1, 0]), np.array([4, 2, 0])  # third slot's class has no images
    assert stability(same, images) == pytest.approx(100 * (0.75 + 0.5 + 0.0) / 3)


def test_noise_is_seeded_and_clipped():
    a = input_noise((2, 3, 8, 8), torch.Generator().manual_seed(0))
    b = input_noise((2, 3, 8, 8), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.abs().max() <= 0.25 and (a.abs() == 0.25).any()
