"""Spatial misalignment: mask box, PAC / PRC / PLC edge cases, and a PGD that really descends."""

import math

import numpy as np
import pytest
import torch

from protoquant.metrics.misalignment import (
    activation_change,
    frozen_box_mask,
    location_change,
    masked_pgd,
    rank_change,
    summarise,
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
