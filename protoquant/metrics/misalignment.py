"""Spatial misalignment of prototypes under a masked attack (Sacha et al., AAAI 2024).

The target prototype's high-activation box (pixels >= its 95th percentile, OpenCV-bicubic map,
grown by 10 px) is frozen; an L-inf PGD changes only pixels outside it, minimising the target's
max activation. PAC: relative drop of that activation. PRC: change in the number of non-class
prototypes more activated than the target. PLC: 100 (1 - IoU) of the top-10 % regions of the
target's bilinear map before and after. The published attack steps on the gradient of a
cross-entropy over one logit, which is identically zero, so its numbers come from the random
start alone: `random_start_only=True` reproduces that; the default attack really descends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from protoquant.metrics.maps import quantile_box, resize_bilinear, top_region
from protoquant.metrics.settings import (
    ATTACK_EPSILON,
    ATTACK_ITERATIONS,
    ATTACK_STEP,
    LOCATION_QUANTILE,
    MASK_GROW,
    MASK_QUANTILE,
)

BOX_LIMIT_MARGIN = 2  # the reference clips the grown box to [0, S - 2] (222 at 224)


def frozen_box_mask(
    heatmap: np.ndarray, quantile: float = MASK_QUANTILE, grow: int = MASK_GROW
) -> np.ndarray:
    """(S, S) bool: the box of pixels >= the quantile, grown by `grow`, clipped to [0, S - 2].

    Args:
        heatmap: (S, S) the target's bicubic-upsampled activation map (clipped at 0).
    """
    size = heatmap.shape[0]
    limit = size - BOX_LIMIT_MARGIN
    y0, x0, y1, x1 = quantile_box(heatmap, quantile)
    y0, x0 = max(0, y0 - grow), max(0, x0 - grow)
    y1, x1 = min(limit, y1 + grow), min(limit, x1 + grow)
    mask = np.zeros(heatmap.shape, dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def activation_change(before: float, after: float) -> float:
    """PAC = 100 (1 - after / before); NaN (undefined) when the activation before is 0."""
    return float("nan") if before == 0 else 100.0 * (1.0 - after / before)


def rank_change(
    before: torch.Tensor, after: torch.Tensor, target: int, class_prototypes: torch.Tensor
) -> int:
    """PRC: change in #non-class prototypes strictly more activated than the target.

    Args:
        before, after: (K,) pooled activations. class_prototypes: (s,) prototypes of the true class.
    """
    other = torch.ones(len(before), dtype=torch.bool)
    other[class_prototypes] = False
    count_before = int(((before > before[target]) & other).sum())
    count_after = int(((after > after[target]) & other).sum())
    return count_after - count_before


def location_change(
    before: torch.Tensor, after: torch.Tensor, size: int, quantile: float = LOCATION_QUANTILE
) -> float:
    """PLC = 100 (1 - IoU) of the regions strictly above the quantile; an empty union gives 0.

    Args:
        before, after: (H, W) the target's activation maps (clipped at 0); upsampled bilinearly to S.
    """
    maps = resize_bilinear(torch.stack([before, after]), (size, size))  # (2, S, S)
    region_before, region_after = top_region(maps[0], quantile), top_region(maps[1], quantile)
    union = int((region_before | region_after).sum())
    if union == 0:
        return 0.0
    return 100.0 * (1.0 - int((region_before & region_after).sum()) / union)


def masked_pgd(
    activation_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    changeable: torch.Tensor,
    *,
    generator: torch.Generator,
    epsilon: float = ATTACK_EPSILON,
    step: float = ATTACK_STEP,
    iterations: int = ATTACK_ITERATIONS,
    random_start_only: bool = False,
) -> torch.Tensor:
    """L-inf PGD from a random start that lowers each target prototype's max activation.

    Args:
        activation_fn: differentiable map (B, 3, S, S) -> activation (B, K, H, W).
        images: (B, 3, S, S) normalised. targets: (B,) prototype per image.
        changeable: (B, 1, S, S) 1 where a pixel may change (outside the frozen box), else 0.
        random_start_only: stop after the uniform random start (the published protocol).

    Returns:
        (B, 3, S, S) adversarial images, |x_adv - x| <= epsilon, equal to x inside the box.
    """
    noise = torch.rand(images.shape, generator=generator).to(images) * 2 - 1  # U(-1, 1)
    adversarial = (images + epsilon * noise * changeable).detach()
    if random_start_only:
        return adversarial
    rows = torch.arange(len(targets), device=images.device)
    for _ in range(iterations):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            activation = activation_fn(adversarial)  # (B, K, H, W)
            loss = activation[rows, targets].flatten(1).amax(dim=1).sum()
            (grad,) = torch.autograd.grad(loss, adversarial)
        stepped = adversarial.detach() - step * grad.sign() * changeable
        adversarial = (images + (stepped - images).clamp(-epsilon, epsilon) * changeable).detach()
    return adversarial


@dataclass(frozen=True)
class MisalignmentSummary:
    pac: float  # mean PAC over images where it is defined, %
    prc: float  # mean PRC
    plc: float  # mean PLC, %
    ac: float  # accuracy before - after, percentage points
    accuracy_before: float
    accuracy_after: float
    num_images: int
    num_undefined_pac: int  # target activation 0 before the attack


def summarise(
    pac: np.ndarray, prc: np.ndarray, plc: np.ndarray, correct_before: np.ndarray, correct_after: np.ndarray
) -> MisalignmentSummary:
    """Dataset averages from per-image values (PAC NaN = undefined, left out of its mean)."""
    defined = ~np.isnan(pac)
    count = len(pac)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else float("nan")

    before, after = 100.0 * mean(correct_before.astype(float)), 100.0 * mean(correct_after.astype(float))
    return MisalignmentSummary(
        pac=mean(pac[defined]),
        prc=mean(prc.astype(float)),
        plc=mean(plc),
        ac=before - after,
        accuracy_before=before,
        accuracy_after=after,
        num_images=count,
        num_undefined_pac=int((~defined).sum()),
    )
