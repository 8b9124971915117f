"""Part purity of prototypes (Nauta et al., PIP-Net, CVPR 2023).

For each counted prototype (max_c w[c, p] > 1e-5), a set of images (top-k by pooled score, or
every image with pooled score > 0.5) and, on each, the 32 px patch at the prototype's argmax
latent cell (ties column-first), mapped back to the original image. A part is hit if a visible
keypoint lies in the patch (inclusive). purity(p) = max over parts of the hit rate among the
images where that part is visible; left/right parts are merged (max hit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protoquant.metrics.settings import (
    PURE,
    PURITY_PATCH,
    PURITY_SCORE_THRESHOLD,
    PURITY_TOP_K,
    REFERENCE_SIZE,
)

WIDE_GRID = 26  # PIP-Net special-cases 26 x 26 latent grids (ConvNeXt with smaller strides)
WIDE_GRID_EDGE = 4  # ... whose outer cells have a smaller receptive field


def patch_skip(grid: int, image_size: int = REFERENCE_SIZE, patch: int = PURITY_PATCH) -> int:
    """PIP-Net's stride between patches: round((S - patch) / (grid - 1))."""
    return round((image_size - patch) / (grid - 1)) if grid > 1 else 0


def patch_interval(
    index: int, grid: int, image_size: int = REFERENCE_SIZE, patch: int = PURITY_PATCH
) -> tuple[int, int]:
    """Pixel interval [lo, hi] (model input) of latent cell `index` along one axis (PIP-Net's rule)."""
    skip = patch_skip(grid, image_size, patch)
    if grid == WIDE_GRID:
        lo = max(0, (index - 1) * skip + WIDE_GRID_EDGE)
        if index == grid - 1:
            lo -= WIDE_GRID_EDGE
        hi = lo + patch
    else:
        lo, hi = index * skip, min(image_size, index * skip + patch)
    if index == grid - 1:
        hi = image_size
    if hi == image_size:
        lo = image_size - patch
    return lo, hi


def patch_boxes(
    cells: np.ndarray,
    grid: tuple[int, int],
    image_hw: np.ndarray,
    image_size: int = REFERENCE_SIZE,
    patch: int = PURITY_PATCH,
) -> np.ndarray:
    """Patches of latent cells, scaled from the S x S input to each image's own pixels.

    Args:
        cells: (n, 2) int (row, col) latent cells. grid: (H, W). image_hw: (n, 2) (height, width).

    Returns:
        (n, 4) float (y0, y1, x0, x1) in image pixels.
    """
    rows = np.array([patch_interval(h, grid[0], image_size, patch) for h in range(grid[0])], float)  # (H, 2)
    cols = np.array([patch_interval(w, grid[1], image_size, patch) for w in range(grid[1])], float)  # (W, 2)
    sy, sx = image_hw[:, 0] / image_size, image_hw[:, 1] / image_size  # (n,)
    y, x = rows[cells[:, 0]] * sy[:, None], cols[cells[:, 1]] * sx[:, None]  # (n, 2) each
    return np.concatenate([y, x], axis=1)


def group_hits(
    boxes: np.ndarray, keypoints: np.ndarray, visible: np.ndarray, group_of: np.ndarray, num_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hits of merged parts in patches.

    Args:
        boxes: (n, 4) (y0, y1, x0, x1) image pixels, inclusive. keypoints: (n, P, 2) (x, y) image
            pixels. visible: (n, P) bool. group_of: (P,) merged-part index of each part.

    Returns:
        hits (n, G) bool (some visible member inside) and seen (n, G) bool (some member visible).
    """
    x, y = keypoints[..., 0], keypoints[..., 1]  # (n, P)
    inside = visible & (y >= boxes[:, :1]) & (y <= boxes[:, 1:2]) & (x >= boxes[:, 2:3]) & (x <= boxes[:, 3:])
    hits = np.zeros((len(boxes), num_groups), bool)
    seen = np.zeros((len(boxes), num_groups), bool)
    for g in range(num_groups):
        members = group_of == g
        hits[:, g], seen[:, g] = inside[:, members].any(axis=1), visible[:, members].any(axis=1)
    return hits, seen


def prototype_purity(hits: np.ndarray, visible: np.ndarray) -> tuple[float, int]:
    """Purity of one prototype over its n images.

    Args:
        hits: (n, G) bool. visible: (n, G) bool; part g's list holds only images where it is visible.

    Returns:
        (purity, part): max over parts of mean hits (ties -> the part with more hits, then the
        lower index); (0.0, -1) when no part is visible in any image.
    """
    counts = visible.sum(axis=0)  # (G,)
    if not counts.any():
        return 0.0, -1
    hit_counts = (hits & visible).sum(axis=0)
    rates = np.where(counts > 0, hit_counts / np.maximum(1, counts), -1.0)
    best = rates.max()
    candidates = np.flatnonzero(rates == best)
    part = int(candidates[np.argmax(hit_counts[candidates])])  # first among the most hits
    return float(best), part


def top_k_images(scores: np.ndarray, k: int = PURITY_TOP_K) -> np.ndarray:
    """Indices of the k highest scores (ties -> lower index first); all of them if fewer than k."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def images_above(scores: np.ndarray, threshold: float = PURITY_SCORE_THRESHOLD) -> np.ndarray:
    """Indices of the images whose pooled score is strictly above `threshold`."""
    return np.flatnonzero(scores > threshold)


@dataclass(frozen=True)
class PuritySummary:
    """Purity of the counted prototypes; the headline averages those with selected images.

    The reference writes a row only for (prototype, image) pairs it selects, so a prototype with
    no selected image (all@0.5: no pooled score above 0.5) is absent from its mean and std;
    `mean_all` / `std_all` score such a prototype as 0 and keep it (ProtoQuant's extra).
    """

    mean: float  # over prototypes with >= 1 selected image (the reference's)
    std: float  # ddof 0, same set
    mean_all: float  # over every counted prototype, 0 for one without images
    std_all: float  # ddof 0, same set
    num_pure: int  # prototypes with purity > 0.5
    num_prototypes: int  # prototypes counted (max_c w > 1e-5)
    num_with_images: int  # ... of which had at least one selected image
    purity: np.ndarray  # (n,) per counted prototype (0 without images)
    part: np.ndarray  # (n,) best merged part per counted prototype (-1: none)
    image_counts: np.ndarray  # (n,) images selected for each counted prototype


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return (float(values.mean()), float(values.std())) if len(values) else (float("nan"), float("nan"))


def summarise(purity: np.ndarray, part: np.ndarray, image_counts: np.ndarray) -> PuritySummary:
    """Mean +- std (ddof 0) of per-prototype purity, headline and all-counted, and the count above 0.5."""
    mean, std = _mean_std(purity[image_counts > 0])
    mean_all, std_all = _mean_std(purity)
    return PuritySummary(
        mean=mean,
        std=std,
        mean_all=mean_all,
        std_all=std_all,
        num_pure=int((purity > PURE).sum()),
        num_prototypes=len(purity),
        num_with_images=int((image_counts > 0).sum()),
        purity=purity,
        part=part,
        image_counts=image_counts,
    )
