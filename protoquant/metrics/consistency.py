"""Consistency and stability of part-prototypes (Huang et al., ICCV 2023).

For a (class c, prototype p) slot and each test image of class c: upsample p's activation map to
the input size (OpenCV bicubic), take its argmax pixel (first in row-major order), put a box of
+-36 px around it (both ends inclusive, clipped to [0, S]) and record which visible parts lie
inside. Consistency: p is consistent iff some part is hit in >= 80 % of the images where it is
visible. Stability: the fraction of images whose whole hit vector is unchanged under input noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protoquant.metrics.maps import argmax_row_major, resize_cubic
from protoquant.metrics.settings import BOX_HALF_SIZE, CONSISTENCY_THRESHOLD, NOISE_CLIP, NOISE_STD


def box_part_hits(
    maps: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor, half_size: int = BOX_HALF_SIZE
) -> torch.Tensor:
    """Which visible parts lie in the box around each map's argmax.

    Args:
        maps: (N, S, S) upsampled activation maps, one per (image, prototype) pair.
        keypoints: (N, P, 2) int (x, y) part centres in the same S x S pixels.
        visible: (N, P) bool.
        half_size: box = rows/cols [max(0, y - half), min(S, y + half)], inclusive.

    Returns:
        (N, P) bool o[i, k].
    """
    size = maps.shape[-1]
    rows, cols = argmax_row_major(maps)  # (N,), (N,)
    y0, y1 = (rows - half_size).clamp(min=0), (rows + half_size).clamp(max=size)
    x0, x1 = (cols - half_size).clamp(min=0), (cols + half_size).clamp(max=size)
    x, y = keypoints[..., 0], keypoints[..., 1]  # (N, P)
    inside = (x >= x0[:, None]) & (x <= x1[:, None]) & (y >= y0[:, None]) & (y <= y1[:, None])
    return inside & visible


def slot_hits(
    activation: torch.Tensor,
    prototypes: torch.Tensor,
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    *,
    size: int,
    half_size: int = BOX_HALF_SIZE,
) -> torch.Tensor:
    """Part hits of several prototypes on one image.

    Args:
        activation: (K, H, W) activation maps of one image.
        prototypes: (s,) prototype ids. keypoints: (P, 2) int pixels of the S x S input.
        visible: (P,) bool. size: S, the side the maps are upsampled to.

    Returns:
        (s, P) bool o[., k] of each prototype.
    """
    upsampled = resize_cubic(activation[prototypes], (size, size))  # (s, S, S)
    count = len(prototypes)
    return box_part_hits(
        upsampled, keypoints[None].expand(count, -1, -1), visible[None].expand(count, -1), half_size
    )


@dataclass(frozen=True)
class ConsistencyResult:
    score: float  # 100 x consistent slots / evaluated slots
    consistent: np.ndarray  # (S,) bool per slot
    best_frequency: np.ndarray  # (S,) max_k freq[k] per slot
    best_part: np.ndarray  # (S,) argmax_k freq[k] (first on ties)
    num_slots: int
    threshold: float


def part_frequencies(hit_counts: np.ndarray, visible_counts: np.ndarray) -> np.ndarray:
    """freq[s, k] = sum_i o[i, k] / max(1, sum_i m[i, k]); counts (S, P) -> (S, P) float."""
    return hit_counts / np.maximum(1, visible_counts)


def consistency(
    hit_counts: np.ndarray, visible_counts: np.ndarray, threshold: float = CONSISTENCY_THRESHOLD
) -> ConsistencyResult:
    """Consistency over slots from accumulated counts.

    Args:
        hit_counts: (S, P) sum over the slot's class images of o[i, k].
        visible_counts: (S, P) sum over the same images of m[i, k] (part k visible).
            A class without test images has all-zero rows: its slots count as inconsistent.
    """
    freq = part_frequencies(hit_counts.astype(np.float64), visible_counts)
    best = freq.max(axis=1) if freq.size else np.zeros(len(freq))
    consistent = best >= threshold
    score = 100.0 * consistent.sum() / len(consistent) if len(consistent) else float("nan")
    part = freq.argmax(axis=1) if freq.size else np.zeros(len(freq), np.int64)
    return ConsistencyResult(float(score), consistent, best, part, len(consistent), threshold)


def stability(same_counts: np.ndarray, image_counts: np.ndarray) -> float:
    """100 x mean over slots of s_p = (images whose hit vector is unchanged) / (images).

    Args:
        same_counts: (S,) images of the slot's class whose whole o vector matched under noise.
        image_counts: (S,) images of the slot's class; a slot without images scores s_p = 0
            (as consistency counts it inconsistent).
    """
    if not len(same_counts):
        return float("nan")
    per_slot = np.where(image_counts > 0, same_counts / np.maximum(1, image_counts), 0.0)
    return float(100.0 * per_slot.mean())


def input_noise(
    shape: tuple[int, ...], generator: torch.Generator, std: float = NOISE_STD, clip: float = NOISE_CLIP
) -> torch.Tensor:
    """Noise ~ N(0, std^2) clipped to [-clip, clip], drawn from `generator` (normalised input space)."""
    return (torch.randn(shape, generator=generator) * std).clamp(-clip, clip)
