"""Spatial misalignment of prototypes under a masked attack (Sacha et al., AAAI 2024).

The target prototype's high-activation box (pixels >= its 95th percentile, OpenCV-bicubic map,
grown by 10 px) is frozen; an L-inf PGD changes only pixels outside it, minimising the target's
max activation. PAC: relative drop of that activation. PRC: change in the number of non-class
prototypes more activated than the target. PLC: 100 (1 - IoU) of the top-10 % regions of the
target's bilinear map before and after. The published attack steps on the gradient of a
cross-entropy over one logit, which is identically zero, so its numbers come from the random
start alone: `random_start_only=True` reproduces that; the default attack really descends.

Targets (`attack_target`): "top", the most activated prototype; "class", the reference's
class-prototype variant: one attack per image, the union of all the true class's prototype boxes
frozen, the mean of their max activations maximised (so PAC is negative when they rise), and
PAC / PRC / PLC reported for the most activated of them; "class_each", ProtoQuant's variant (a
deviation): one attack and one record per (image, class prototype), each with its own box,
minimising that prototype's activation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
ATTACK_TARGETS = ("top", "class", "class_each")  # see the module docstring
MAXIMISED_TARGETS = ("class",)  # targets whose objective the attack raises (the reference's class variant)


@dataclass(frozen=True)
class Attack:
    """One attack: image row `row`, prototype `target` reported, prototypes `group` frozen and attacked."""

    row: int
    target: int
    group: tuple[int, ...]


def attack_plan(
    mode: str, scores: torch.Tensor, labels: Sequence[int], class_prototypes: Callable[[int], Sequence[int]]
) -> list[Attack]:
    """The attacks of a batch for target rule `mode` (one of ATTACK_TARGETS).

    Args:
        scores: (B, K) pooled activations before the attack. labels: (B,) true classes.
        class_prototypes: class -> its prototypes (the class-prototype rule).

    Returns:
        "top": one per image, the most activated prototype (first on ties). "class": one per image
        with class prototypes, group = all of them, target = the most activated (ties: lower
        index). "class_each": one per (image, class prototype).
    """
    if mode == "top":
        return [Attack(b, int(t), (int(t),)) for b, t in enumerate(scores.argmax(dim=1).tolist())]
    if mode not in ATTACK_TARGETS:
        raise ValueError(f"attack_target must be one of {list(ATTACK_TARGETS)}, got {mode!r}")
    attacks = []
    for b, label in enumerate(labels):
        group = tuple(sorted(int(p) for p in class_prototypes(int(label))))
        if mode == "class_each":
            attacks += [Attack(b, p, (p,)) for p in group]
        elif group:
            target = group[int(scores[b, list(group)].argmax())]  # first maximum = lower index
            attacks.append(Attack(b, target, group))
    return attacks


def attack_count(mode: str, labels: Sequence[int], class_prototypes: Callable[[int], Sequence[int]]) -> int:
    """How many attacks `attack_plan` makes for images with `labels` (known before any forward pass)."""
    if mode == "top":
        return len(labels)
    if mode not in ATTACK_TARGETS:
        raise ValueError(f"attack_target must be one of {list(ATTACK_TARGETS)}, got {mode!r}")
    sizes = [len(class_prototypes(int(label))) for label in labels]
    return sum(sizes) if mode == "class_each" else sum(1 for size in sizes if size)


def union_box_mask(
    heatmaps: np.ndarray, quantile: float = MASK_QUANTILE, grow: int = MASK_GROW
) -> np.ndarray:
    """(S, S) bool union of `frozen_box_mask` over (n, S, S) heatmaps (a class's prototypes)."""
    return np.logical_or.reduce([frozen_box_mask(h, quantile, grow) for h in heatmaps])


def objective_weights(attacks: Sequence[Attack], num_prototypes: int, device=None) -> torch.Tensor:
    """(R, K) float: 1 / |group| on each attack's group, so the objective is the group's mean max activation."""
    weights = torch.zeros(len(attacks), num_prototypes, device=device)
    for r, attack in enumerate(attacks):
        weights[r, list(attack.group)] = 1.0 / len(attack.group)
    return weights


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
    maximise: bool = False,
) -> torch.Tensor:
    """L-inf PGD from a random start that lowers (or raises) each target's max activation.

    Args:
        activation_fn: differentiable map (B, 3, S, S) -> activation (B, K, H, W).
        images: (B, 3, S, S) normalised. targets: (B,) prototype per image, or (B, K) weights of
            each prototype's max activation in the objective (see `objective_weights`).
        changeable: (B, 1, S, S) 1 where a pixel may change (outside the frozen box), else 0.
        random_start_only: stop after the uniform random start (the published protocol).
        maximise: ascend on the objective instead of descending.

    Returns:
        (B, 3, S, S) adversarial images, |x_adv - x| <= epsilon, equal to x inside the box.
    """
    noise = torch.rand(images.shape, generator=generator).to(images) * 2 - 1  # U(-1, 1)
    adversarial = (images + epsilon * noise * changeable).detach()
    if random_start_only:
        return adversarial
    rows = torch.arange(len(targets), device=images.device)
    direction = 1.0 if maximise else -1.0
    for _ in range(iterations):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            peaks = activation_fn(adversarial).flatten(2).amax(dim=2)  # (B, K) max activations
            loss = peaks[rows, targets].sum() if targets.dim() == 1 else (peaks * targets).sum()
            (grad,) = torch.autograd.grad(loss, adversarial)
        stepped = adversarial.detach() + direction * step * grad.sign() * changeable
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
