"""Map utilities shared by the metrics: OpenCV-equivalent resizing, argmax cells, boxes, quantiles.

`resize_cubic` reproduces OpenCV's `cv2.resize(..., interpolation=INTER_CUBIC)` on float32 maps
(A = -0.75, half-pixel centres, replicated border) bit for bit, including its order of float32
operations: a horizontal pass summing taps left to right, then a vertical pass summing them in
reverse. It matches OpenCV's own C++ path exactly; builds that dispatch to Intel IPP
(`cv2.ipp.useIPP()`) differ from that path by up to ~6e-6.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

CUBIC_A = -0.75  # OpenCV's INTER_CUBIC kernel parameter


def _cubic_coefficients(fraction: np.ndarray) -> np.ndarray:
    """(n,) float32 fractional offsets -> (n, 4) float32 tap weights, as OpenCV's interpolateCubic."""
    x = fraction.astype(np.float32)
    a, one = np.float32(CUBIC_A), np.float32(1.0)
    c0 = ((a * (x + one) - np.float32(5) * a) * (x + one) + np.float32(8) * a) * (x + one) - np.float32(4) * a
    c1 = ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + one
    c2 = ((a + np.float32(2)) * (one - x) - (a + np.float32(3))) * (one - x) * (one - x) + one
    c3 = one - c0 - c1 - c2
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    scale = 1.0 / (dst / src)  # OpenCV: scale_x = 1. / inv_scale_x, in double
    position = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(position)
    fraction = (position - start).astype(np.float32)
    index = np.clip(start.astype(np.int64)[:, None] + np.arange(-1, 3)[None], 0, src - 1)  # replicate
    return index, _cubic_coefficients(fraction)


def cubic_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (dst, 4) int64 and weights (dst, 4) float32 of a src -> dst cubic resize."""
    index, weight = _taps(src, dst)
    return torch.from_numpy(index.copy()), torch.from_numpy(weight.copy())


def resize_cubic(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """OpenCV-equivalent bicubic resize of the last two dims (computed in float32 with numpy).

    Args:
        maps: (..., H, W) float tensor.
        size: output (height, width).

    Returns:
        (..., height, width) float32.
    """
    values = maps.detach().float().cpu().numpy()
    col_index, col_weight = _taps(values.shape[-1], size[1])  # (w, 4)
    row_index, row_weight = _taps(values.shape[-2], size[0])  # (h, 4)
    rows = np.take(values, col_index[:, 0], axis=-1) * col_weight[:, 0]  # (..., H, w)
    for tap in range(1, 4):  # horizontal pass: taps summed left to right
        rows = rows + np.take(values, col_index[:, tap], axis=-1) * col_weight[:, tap]
    terms = [np.take(rows, row_index[:, tap], axis=-2) * row_weight[:, tap, None] for tap in range(4)]
    return torch.from_numpy(((terms[3] + terms[2]) + terms[1]) + terms[0])  # vertical: OpenCV's SIMD order


def resize_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) -> (..., h, w) bilinear with half-pixel centres (OpenCV INTER_LINEAR geometry)."""
    lead = maps.shape[:-2]
    flat = maps.float().reshape(-1, 1, *maps.shape[-2:])  # (N, 1, H, W)
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


UPSAMPLING = {
    "bicubic": "bicubic, bit-exact OpenCV INTER_CUBIC on float32 (A = -0.75, half-pixel centres)",
    "bilinear": "bilinear, half-pixel centres (torch align_corners=False; OpenCV INTER_LINEAR geometry)",
}  # map upsampling modes the metrics offer, with the description their outputs record


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(..., H, W) -> (..., height, width) float32 with `mode` "bicubic" or "bilinear" (see UPSAMPLING)."""
    if mode == "bicubic":
        return resize_cubic(maps, size)
    if mode == "bilinear":
        return resize_bilinear(maps, size)
    raise ValueError(f"upsampling must be one of {sorted(UPSAMPLING)}, got {mode!r}")


def argmax_row_major(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each map's maximum, first in row-major order on ties.

    Args:
        maps: (N, H, W).

    Returns:
        rows (N,), cols (N,) int64. A constant map gives (0, 0).
    """
    flat = maps.flatten(1).argmax(dim=1)  # torch returns the first maximal index
    return flat // maps.shape[-1], flat % maps.shape[-1]


def argmax_column_major(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each map's maximum, ties broken column-first (PIP-Net's convention).

    Args:
        maps: (..., H, W).

    Returns:
        rows (...), cols (...) int64: the first column holding the maximum, then its first row.
    """
    flat = maps.transpose(-1, -2).flatten(-2).argmax(dim=-1)  # column-major order
    height = maps.shape[-2]
    return flat % height, flat // height


def quantile_box(heatmap: np.ndarray, quantile: float) -> tuple[int, int, int, int]:
    """Inclusive box (y1, x1, y2, x2) of the pixels >= the map's linearly interpolated `quantile`."""
    threshold = np.quantile(heatmap, quantile)
    ys, xs = np.nonzero(heatmap >= threshold)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def top_region(heatmap: torch.Tensor, quantile: float) -> torch.Tensor:
    """(H, W) bool pixels strictly above the map's linearly interpolated `quantile`."""
    values = heatmap.double().flatten()
    return heatmap.double() > torch.quantile(values, quantile)
