"""Feature-space CutMix keeps every location a real patch and reports the right label weight."""

import numpy as np
import torch

from protoquant.cache.augment import feature_cutmix


def test_cutmix_pastes_partner_cells_inside_box_only():
    torch.manual_seed(0)
    features = torch.randn(6, 4, 5, 7)  # (B, D, H, W)
    for seed in range(20):
        mix = feature_cutmix(features, np.random.default_rng(seed))
        top, left, height, width = mix.box
        inside = torch.zeros(5, 7, dtype=torch.bool)
        inside[top : top + height, left : left + width] = True
        expected = torch.where(inside, features[mix.partner], features)
        assert torch.equal(mix.features, expected)
        assert mix.keep == 1.0 - height * width / 35
        assert sorted(mix.partner.tolist()) == list(range(6))


def test_cutmix_batch_of_one_changes_nothing():
    features = torch.randn(1, 3, 4, 4)
    mix = feature_cutmix(features, np.random.default_rng(1))
    assert torch.equal(mix.features, features)
