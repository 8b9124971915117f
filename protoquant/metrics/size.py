"""Explanation size and sparsity (PIP-Net's definitions), thresholds applied once.

PIP-Net's evaluation subtracts 1e-3 from the class weights on every batch, so its sizes depend on
the number of batches; here the weights are read, compared with the thresholds and never changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protoquant.config import WEIGHT_THRESHOLD
from protoquant.metrics.settings import PER_CLASS_THRESHOLD


@dataclass(frozen=True)
class ExplanationSize:
    global_size: int  # #{p : max_c w[c, p] > threshold}
    sparsity: float  # fraction of class weights <= threshold
    local_size: float  # mean over images of #{p : score_p * w[y_hat, p] > threshold}
    per_class_size: float  # mean over classes of #{p : w[c, p] > per_class_threshold}
    per_class_sizes: tuple[int, ...]  # (C,) the per-class counts
    num_prototypes: int  # K
    threshold: float
    per_class_threshold: float


def global_size(class_weights: torch.Tensor, threshold: float = WEIGHT_THRESHOLD) -> int:
    """Number of prototypes used by any class: #{p : max_c w[c, p] > threshold}; weights (C, K)."""
    return int((class_weights.amax(dim=0) > threshold).sum())


def sparsity(class_weights: torch.Tensor, threshold: float = WEIGHT_THRESHOLD) -> float:
    """Fraction of the (C, K) class weights that are <= threshold."""
    return float((class_weights <= threshold).float().mean())


def local_sizes(
    scores: torch.Tensor,
    class_weights: torch.Tensor,
    predicted: torch.Tensor,
    threshold: float = WEIGHT_THRESHOLD,
) -> torch.Tensor:
    """Prototypes that explain each image's predicted class.

    Args:
        scores: (B, K) pooled presence. class_weights: (C, K). predicted: (B,) class per image.

    Returns:
        (B,) int64 #{p : |score_p * w[y_hat, p]| > threshold}.
    """
    contributions = scores * class_weights[predicted]  # (B, K)
    return (contributions.abs() > threshold).sum(dim=1)


def per_class_sizes(class_weights: torch.Tensor, threshold: float = PER_CLASS_THRESHOLD) -> torch.Tensor:
    """(C,) #{p : w[c, p] > threshold} for every class."""
    return (class_weights > threshold).sum(dim=1)


def explanation_size(
    class_weights: torch.Tensor,
    local: torch.Tensor,
    *,
    threshold: float = WEIGHT_THRESHOLD,
    per_class_threshold: float = PER_CLASS_THRESHOLD,
) -> ExplanationSize:
    """All sizes from the (C, K) weights and the (N,) local sizes of the evaluated images."""
    counts = per_class_sizes(class_weights, per_class_threshold)
    return ExplanationSize(
        global_size=global_size(class_weights, threshold),
        sparsity=sparsity(class_weights, threshold),
        local_size=float(local.float().mean()) if len(local) else float("nan"),
        per_class_size=float(counts.float().mean()),
        per_class_sizes=tuple(int(v) for v in counts),
        num_prototypes=int(class_weights.shape[1]),
        threshold=threshold,
        per_class_threshold=per_class_threshold,
    )


def top_shares(
    scores: torch.Tensor, class_weights: torch.Tensor, predicted: torch.Tensor, top: int
) -> torch.Tensor:
    """Share of each image's class-specific logit that its `top` largest contributions carry.

    The class-specific logit drops the class-agnostic part sum_k score_k * min_c w[c, k] (added to
    every class alike); this is `ClassExplanation.shown_share` with `top_prototypes=top`.

    Args:
        scores: (B, K) pooled presence. class_weights: (C, K). predicted: (B,) class per image.

    Returns:
        (B,) float shares, nan where the class-specific logit is not positive.
    """
    weights = class_weights[predicted]  # (B, K)
    specific = scores * (weights - class_weights.amin(dim=0))  # (B, K)
    order = (scores * weights).argsort(dim=1, descending=True)[:, :top]  # (B, top) by contribution
    total = specific.sum(dim=1)  # (B,)
    shown = specific.gather(1, order).sum(dim=1)
    return torch.where(total > 0, shown / total.clamp(min=torch.finfo(total.dtype).tiny), float("nan"))
