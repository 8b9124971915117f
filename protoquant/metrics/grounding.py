"""Grounding and drift audit: is every prototype a point where real training patches live?

For every prototype: the cosine similarity to its nearest training patch (and which image and
cell that is, via `protoquant.explain.grounding.nearest_patches`), its usage (training patches whose most
similar prototype it is), whether it is dead (usage 0) or a near-duplicate of a lower-index
prototype. Drift between two checkpoints: per-prototype cosine distance and whether the nearest
training patch changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from protoquant.metrics.settings import DUPLICATE_COSINE

MOVED_TOLERANCE = 1e-6  # cosine distances below this are float rounding, not drift


def duplicate_of(prototypes: torch.Tensor, threshold: float = DUPLICATE_COSINE) -> np.ndarray:
    """(K,) int64: for each prototype the lowest-index other prototype with cosine >= threshold, else -1.

    Args:
        prototypes: (K, D) prototype vectors.
    """
    unit = F.normalize(prototypes.float(), dim=1)
    similar = (unit @ unit.t()) >= threshold  # (K, K)
    similar.fill_diagonal_(False)
    first = similar.float().argmax(dim=1)  # first True per row
    return torch.where(similar.any(dim=1), first, torch.full_like(first, -1)).numpy().astype(np.int64)


def usage_from_similarity(similarity: torch.Tensor) -> torch.Tensor:
    """(K,) number of locations whose most similar prototype is k; similarity (B, K, H, W)."""
    winners = similarity.argmax(dim=1).flatten()  # (B*H*W,)
    return torch.bincount(winners, minlength=similarity.shape[1])


@dataclass(frozen=True)
class GroundingSummary:
    num_prototypes: int
    num_used: int  # usage > 0 on the training patches
    num_dead: int
    num_duplicates: int  # prototypes with a lower-index near-duplicate
    num_explaining: int  # prototypes in the global explanation (max_c w > threshold)
    mean_cosine_used: float  # nearest-patch cosine, mean over used prototypes
    min_cosine_used: float
    mean_cosine_explaining: float  # ... over prototypes in the global explanation
    min_cosine_explaining: float
    mean_cosine_all: float


def summarise(
    cosine: np.ndarray, usage: np.ndarray, duplicates: np.ndarray, explaining: np.ndarray
) -> GroundingSummary:
    """Counts and nearest-patch cosine statistics over all / used / explaining prototypes."""
    used = usage > 0

    def stat(mask: np.ndarray, fn) -> float:
        return float(fn(cosine[mask])) if mask.any() else float("nan")

    return GroundingSummary(
        num_prototypes=len(cosine),
        num_used=int(used.sum()),
        num_dead=int((~used).sum()),
        num_duplicates=int((duplicates >= 0).sum()),
        num_explaining=int(explaining.sum()),
        mean_cosine_used=stat(used, np.mean),
        min_cosine_used=stat(used, np.min),
        mean_cosine_explaining=stat(explaining, np.mean),
        min_cosine_explaining=stat(explaining, np.min),
        mean_cosine_all=stat(np.ones_like(used), np.mean),
    )


@dataclass(frozen=True)
class Drift:
    cosine_distance: np.ndarray  # (K,) 1 - cos(prototype_a, prototype_b)
    nearest_changed: np.ndarray  # (K,) bool: nearest training patch (entry, cell) differs
    mean_distance: float
    max_distance: float
    num_moved: int  # prototypes with distance > MOVED_TOLERANCE
    num_nearest_changed: int


def drift(
    prototypes_a: torch.Tensor,
    prototypes_b: torch.Tensor,
    nearest_a: tuple[np.ndarray, np.ndarray],
    nearest_b: tuple[np.ndarray, np.ndarray],
) -> Drift:
    """Per-prototype drift between two checkpoints with the same K.

    Args:
        prototypes_a, prototypes_b: (K, D). nearest_a, nearest_b: (entry (K,), cell (K,)) of each
            prototype's nearest training patch under a and b.
    """
    if prototypes_a.shape != prototypes_b.shape:
        raise ValueError(
            f"drift needs prototypes of one shape, got {tuple(prototypes_a.shape)} and {tuple(prototypes_b.shape)}"
        )
    cosine = F.cosine_similarity(prototypes_a.float(), prototypes_b.float(), dim=1)
    distance = (1.0 - cosine).clamp(min=0).numpy()
    changed = (nearest_a[0] != nearest_b[0]) | (nearest_a[1] != nearest_b[1])
    return Drift(
        cosine_distance=distance,
        nearest_changed=changed,
        mean_distance=float(distance.mean()),
        max_distance=float(distance.max()),
        num_moved=int((distance > MOVED_TOLERANCE).sum()),
        num_nearest_changed=int(changed.sum()),
    )
