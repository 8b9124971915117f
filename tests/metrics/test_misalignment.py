"""Spatial misalignment: mask box, PAC / PRC / PLC edge cases, and a PGD that really descends."""

import math

import numpy as np
import pytest
import torch

from protoquant.metrics.misalignment import (
    Attack,
    activation_change,
    attack_plan,
    frozen_box_mask,
    location_change,
    masked_pgd,
    objective_weights,
    rank_change,
    summarise,
    union_box_mask,
)


def test_frozen_box_is_grown_and_clipped_to_size_minus_two():
    heat = np.zeros((224, 224))
    heat[100:110, 200:224] = 1.0  # top 5 % includes all of these (240 px > 5 % of 50176? no: 2508 px)
    heat[100:110, 200:224] += np.linspace(0, 1, 24)[None]  # a strict top region
    mask = frozen_box_mask(heat, quantile=0.999, grow=10)
    rows, cols = np.nonzero(mask)
    assert rows.min() >= 90 and rows.max() <= 119
    assert cols.max() == 222  # 223 + 10 clipped to S - 2


def test_pac_undefined_at_zero_and_summary_skips_it():
    assert activation_change(0.8, 0.2) == pytest.approx(75.0)
    assert math.isnan(activation_change(0.0, 0.0))
    summary = summarise(
        np.array([50.0, np.nan]), np.array([1, 3]), np.array([0.0, 100.0]), np.array([1, 1]), np.array([1, 0])
    )
    assert summary.pac == 50.0 and summary.num_undefined_pac == 1
    assert summary.prc == 2.0 and summary.plc == 50.0 and summary.ac == 50.0


def test_prc_counts_non_class_prototypes_strictly_above_the_target():
    before = torch.tensor([0.5, 0.5, 0.9, 0.1])
    after = torch.tensor([0.2, 0.2, 0.9, 0.3])
    # target 0, class prototypes {0, 2}: before none of {1, 3} is > 0.5 (1 ties); after 3 (0.3 > 0.2)
    assert rank_change(before, after, 0, torch.tensor([0, 2])) == 1


def test_plc_identical_disjoint_and_empty_union():
    a = torch.zeros(7, 7)
    a[1, 1] = 1.0
    b = torch.zeros(7, 7)
    b[5, 5] = 1.0
    assert location_change(a, a, 224) == 0.0
    assert location_change(a, b, 224) == 100.0
    assert location_change(torch.zeros(7, 7), torch.zeros(7, 7), 224) == 0.0  # empty union -> 0


def toy_activation(images: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2, 2): prototype 0 responds to the mean of the left half, prototype 1 to the right."""
    left, right = images[..., :2].mean(dim=(1, 2, 3)), images[..., 2:].mean(dim=(1, 2, 3))
    maps = torch.stack([left, right], dim=1)[..., None, None].expand(-1, -1, 2, 2)
    return torch.sigmoid(maps)


def test_pgd_lowers_the_target_inside_budget_and_mask():
    images = torch.zeros(1, 3, 4, 4)
    changeable = torch.zeros(1, 1, 4, 4)
    changeable[..., :2] = 1.0  # only the left half may change
    generator = torch.Generator().manual_seed(0)
    adversarial = masked_pgd(
        toy_activation,
        images,
        torch.tensor([0]),
        changeable,
        generator=generator,
        epsilon=0.4,
        step=0.1,
        iterations=10,
    )
    assert (adversarial - images).abs().max() <= 0.4 + 1e-6
    assert torch.equal(adversarial[..., 2:], images[..., 2:])
    assert toy_activation(adversarial)[0, 0].max() < toy_activation(images)[0, 0].max() - 0.05
    start = masked_pgd(
        toy_activation,
        images,
        torch.tensor([0]),
        changeable,
        generator=torch.Generator().manual_seed(0),
        random_start_only=True,
    )
    assert torch.equal(start[..., 2:], images[..., 2:]) and start.abs().max() > 0  # random start, no steps


def test_two_prototype_class_is_one_joint_attack_reporting_the_most_activated():
    scores = torch.tensor([[0.1, 0.6, 0.2, 0.6], [0.9, 0.1, 0.3, 0.2]])  # (B, K)
    of_class = {0: [3, 1], 1: [2], 2: []}.__getitem__  # class 0 has prototypes 1 and 3 (tie 0.6)
    joint = attack_plan("class", scores, [0, 1, 2], of_class)
    assert joint == [Attack(0, 1, (1, 3)), Attack(1, 2, (2,))]  # tie -> lower index; class 2 skipped
    each = attack_plan("class_each", scores, [0, 1], of_class)
    assert each == [Attack(0, 1, (1,)), Attack(0, 3, (3,)), Attack(1, 2, (2,))]
    assert attack_plan("top", scores, [0, 1], of_class) == [Attack(0, 1, (1,)), Attack(1, 0, (0,))]
    with pytest.raises(ValueError, match="attack_target must be one of"):
        attack_plan("all", scores, [0], of_class)
    weights = objective_weights(joint, 4)
    assert weights.tolist() == [[0, 0.5, 0, 0.5], [0, 0, 1, 0]]


def test_joint_mask_is_the_union_of_both_boxes():
    heat = np.zeros((2, 40, 40))
    heat[0, 5, 5] = 1.0  # the 99.99th percentile of 1,600 values interpolates to 0.84: this pixel only
    heat[1, 30, 20] = 1.0
    mask = union_box_mask(heat, quantile=0.9999, grow=2)
    expected = np.zeros((40, 40), bool)
    expected[3:8, 3:8] = True  # rows / cols 5 +- 2
    expected[28:33, 18:23] = True  # row 30 +- 2, col 20 +- 2
    np.testing.assert_array_equal(mask, expected)


def test_joint_attack_raises_the_mean_of_both_max_activations():
    images = torch.zeros(1, 3, 4, 4)
    changeable = torch.ones(1, 1, 4, 4)
    changeable[..., 3] = 0.0  # column 3 frozen (part of prototype 1's half)
    weights = objective_weights([Attack(0, 0, (0, 1))], 2)
    adversarial = masked_pgd(
        toy_activation,
        images,
        weights,
        changeable,
        generator=torch.Generator().manual_seed(0),
        step=0.1,
        iterations=10,
        maximise=True,
    )
    after = toy_activation(adversarial)[0, :, 0, 0]
    # every changeable pixel climbs to +0.4: left mean 0.4, right mean (0.4 + 0) / 2 = 0.2 (from 0)
    assert after.tolist() == pytest.approx([1 / (1 + math.exp(-0.4)), 1 / (1 + math.exp(-0.2))])
    assert torch.allclose(adversarial[..., :3], torch.full_like(adversarial[..., :3], 0.4))
    assert torch.equal(adversarial[..., 3], images[..., 3])
