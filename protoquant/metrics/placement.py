"""Placement: where the leading prototypes of a decision fire, relative to the annotated parts.

For one image and its predicted class c, the leaders are the prototypes with the largest
class-specific contribution score_k * (w[c, k] - min_c' w[c', k]) (the class-agnostic part moves
no probability, so it does not choose leaders). A leader's peak is the argmax pixel of its
activation map, resized (OpenCV-equivalent bicubic) to the S x S input. The peak is

- ON a part: it lies on a pixel of some part mask (distance 0),
- NEXT TO a part: not on one, but within `near` input pixels (Euclidean) of a part pixel,
- BACKGROUND: farther from every part.

Part masks are mapped from image pixels to the model input by the same resize (and centre crop)
the model's input transform applies, nearest-neighbour at pixel centres. `area_places` gives the
same three shares for the pixels of the input, the level a peak placed at random would reach.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from protoquant.metrics.maps import argmax_row_major, resize_cubic

ON_PART, NEXT_TO_PART, BACKGROUND = 0, 1, 2  # place codes
PLACES = ("on_part", "next_to_part", "background")  # names of the place codes, in code order


def _source_index(size: int, resized: int, offset: int, source: int) -> np.ndarray:
    """(size,) source pixel under each input pixel centre: resize source -> resized, skip offset."""
    centres = (np.arange(size) + offset + 0.5) * source / resized
    return np.clip(np.floor(centres).astype(np.int64), 0, source - 1)


def masks_to_input(masks: np.ndarray, image_size: int, crop_ratio: float = 1.0) -> np.ndarray:
    """Part masks in image pixels -> the model's S x S input, nearest at pixel centres.

    Args:
        masks: (P, H, W) bool.
        image_size: S.
        crop_ratio: 1 resizes the whole image to S x S; below 1 the shorter side goes to
            floor(S / ratio) and the centre S x S is kept (as `keypoints_to_input`).

    Returns:
        (P, S, S) bool.
    """
    height, width = masks.shape[-2:]
    if crop_ratio >= 1.0:
        new_w, new_h = image_size, image_size
    else:
        short = int(math.floor(image_size / crop_ratio))
        new_w, new_h = (
            (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        )
    off_x, off_y = int(round((new_w - image_size) / 2.0)), int(round((new_h - image_size) / 2.0))
    rows = _source_index(image_size, new_h, off_y, height)  # (S,)
    cols = _source_index(image_size, new_w, off_x, width)  # (S,)
    return np.asarray(masks, dtype=bool)[:, rows][:, :, cols]


def part_distance(masks: np.ndarray) -> np.ndarray:
    """(H, W) Euclidean distance in pixels from each pixel to the nearest part pixel (0 on a part).

    Args:
        masks: (P, H, W) bool part masks. With no part pixel at all every distance is inf.
    """
    union = np.asarray(masks, dtype=bool).any(axis=0)  # (H, W)
    if not union.any():
        return np.full(union.shape, np.inf)
    return distance_transform_edt(~union)


def classify(distance: np.ndarray, near: float) -> np.ndarray:
    """Place codes (ON_PART, NEXT_TO_PART, BACKGROUND) of distances to the nearest part pixel."""
    distance = np.asarray(distance, dtype=np.float64)
    return np.where(distance <= 0, ON_PART, np.where(distance <= near, NEXT_TO_PART, BACKGROUND))


def peak_pixels(activation: torch.Tensor, image_size: int) -> np.ndarray:
    """(n, 2) int64 (row, col) argmax pixels of (n, h, w) maps resized bicubically to S x S."""
    if not len(activation):
        return np.zeros((0, 2), dtype=np.int64)
    upsampled = resize_cubic(activation, (image_size, image_size))  # (n, S, S)
    rows, cols = argmax_row_major(upsampled)
    return torch.stack([rows, cols], dim=1).numpy()


def specific_contributions(
    scores: torch.Tensor, class_weights: torch.Tensor, class_index: int
) -> torch.Tensor:
    """(K,) score_k * (w[c, k] - min_c' w[c', k]) for one image's scores (K,) and weights (C, K)."""
    agnostic = class_weights.amin(dim=0)  # (K,) the part every class receives alike
    return scores * (class_weights[class_index] - agnostic)


def leaders(specific: torch.Tensor, count: int) -> np.ndarray:
    """Prototype indices of the `count` largest positive contributions, largest first (ties: lower k)."""
    order = torch.sort(specific, descending=True, stable=True).indices[:count]
    return order[specific[order] > 0].numpy()


def shares(places: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """{place: share} of place codes, each counted once or with `weights`; nan for no entries."""
    places = np.asarray(places, dtype=np.int64).ravel()
    weights = np.ones(len(places)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    total = float(weights.sum())
    if total <= 0:
        return {name: float("nan") for name in PLACES}
    return {name: float(weights[places == code].sum() / total) for code, name in enumerate(PLACES)}


def area_places(distance: np.ndarray, near: float) -> np.ndarray:
    """(3,) pixel counts of the input on / next to a part / background: the random-peak level."""
    places = classify(distance, near)
    return np.bincount(places.ravel(), minlength=len(PLACES)).astype(np.int64)
