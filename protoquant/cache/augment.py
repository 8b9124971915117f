"""Feature-space augmentation for training from the cache.

CutMix on feature maps pastes a rectangle of cells from another map of the batch, so
every location still holds a real patch feature (prototypes learned on it stay grounded).
Mixup (blending features) and grid flips are not offered: blended features are not
real patches, and a flip changes nothing for heads that pool over all locations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CutMixBatch:
    features: torch.Tensor  # (B, D, H, W) with a rectangle taken from features[partner]
    partner: torch.Tensor  # (B,) index of the map each rectangle came from
    keep: float  # share of each map's cells that are its own (the label weight)
    box: tuple[int, int, int, int]  # (top, left, height, width) of the pasted rectangle, in cells


def feature_cutmix(features: torch.Tensor, rng: np.random.Generator) -> CutMixBatch:
    """Swap one random rectangle of cells between maps of a batch (features (B, D, H, W))."""
    batch, _, height, width = features.shape
    partner = torch.from_numpy(rng.permutation(batch)).to(features.device)
    share = float(rng.uniform())  # area share of the pasted rectangle
    cut_h, cut_w = int(round(height * np.sqrt(share))), int(round(width * np.sqrt(share)))
    top, left = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    mixed = features.clone()
    mixed[:, :, top : top + cut_h, left : left + cut_w] = features[
        partner, :, top : top + cut_h, left : left + cut_w
    ]
    return CutMixBatch(mixed, partner, 1.0 - cut_h * cut_w / (height * width), (top, left, cut_h, cut_w))
