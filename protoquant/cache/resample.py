"""The views of a whole decoded batch at once: crop, antialiased resize, centre crop and flip as
two matrix products, for `DeviceDecodeViews` on CUDA.

Per image, `apply_geometry` takes about a dozen tensor operations; at a batch of 128 that is over
a thousand kernel launches and their Python work on the one main-process thread that also
drives the backbone. Here the images of a batch are concatenated and gathered into one
zero-padded float buffer, and the rest is a fixed number of operations: each axis of each view is
resampled by an (S, P) matrix of the same antialiasing filter taps that PIL's and torch's
antialiased resize use (a triangle for bilinear, Keys' cubic with a = -0.5 for bicubic,
stretched by the downscale factor and normalised per output pixel), with the crop box, the
centre crop and the flip folded into the matrix rows and columns. The result agrees with
`apply_geometry` to float rounding (the sums run in another order): at most one uint8 level
apart, tested. On the CPU the products cost more than the direct resize (BENCHMARKS.md), so
only CUDA uses them.

Shapes: n views of side S; a chunk's buffer is (n, Hp, 3, Wp), Hp and Wp its largest image's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from protoquant.data.transforms import ViewGeometry

CHUNK_BYTES = 256 * 2**20  # float32 image buffer per matrix product (a larger single image goes alone)


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_(min=0.0)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| < 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a  # 1 <= |x| < 2
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


# interpolation -> (the filter's support at scale 1, the filter)
FILTERS: dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor]]] = {
    "bilinear": (1.0, _triangle),
    "bicubic": (2.0, _cubic),
}


def axis_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    resized: torch.Tensor,
    offset: torch.Tensor,
    flip: torch.Tensor,
    side: int,
    padded: int,
    interpolation: str,
) -> torch.Tensor:
    """(n, side, padded) float32 matrices: row o of view i holds the taps of output pixel o.

    View i resizes the crop of `length[i]` pixels from `start[i]` on to `resized[i]`, keeps the
    `side` pixels from `offset[i]` on (the centre crop) and reverses them where `flip[i]`.
    Columns outside the crop are zero. Tap positions follow PIL's and torch's antialiased resize:
    the output pixel r of a resize by `scale` = length / resized is centred at (r + 0.5) * scale
    in the crop, and its taps are the crop's pixels in [int(centre - support + 0.5),
    int(centre + support + 0.5)), support = the filter's support times max(scale, 1). All inputs
    are (n,) float64.
    """
    support, kernel = FILTERS[interpolation]
    device = length.device
    out = torch.arange(side, device=device, dtype=torch.float64)  # (S,)
    position = torch.where(flip[:, None], side - 1 - out, out) + offset[:, None]  # (n, S) resized pixel
    scale = (length / resized)[:, None]  # (n, 1)
    stretch = scale.clamp(min=1.0)
    centre = scale * (position + 0.5)  # (n, S)
    low = torch.floor(centre - support * stretch + 0.5).clamp_(min=0.0)
    high = torch.minimum(torch.floor(centre + support * stretch + 0.5), length[:, None])
    column = (
        torch.arange(padded, device=device, dtype=torch.float64) - start[:, None, None]
    )  # (n, 1, P) in the crop
    inside = (column >= low[..., None]) & (column < high[..., None])  # (n, S, P)
    distance = column.float() - (centre - 0.5).float()[..., None]  # (n, S, P): float32 is enough here
    taps = kernel(distance / stretch.float()[..., None]) * inside
    return taps / taps.sum(dim=2, keepdim=True)  # every output pixel has at least one tap


def centre_offset(resized: int, side: int) -> int:
    """Where `TF.center_crop` starts a `side` crop of `resized` pixels (its rounding, half to even)."""
    return int(round((resized - side) / 2.0))


def resample_views(
    images: Sequence[torch.Tensor],
    geometries: Sequence[ViewGeometry],
    interpolation: str,
    *,
    exact: bool = True,
) -> torch.Tensor:
    """(n, 3, S, S) uint8 views of (3, h, w) uint8 images, as `apply_geometry` makes them one by one.

    Every geometry has the same side S, and the images are on one device. `exact` runs the
    products in full float32 whatever the caller set; False lets them use TF32 where the GPU has
    it (faster; taps rounded to 11 significant bits: `benchmarks/view_geometry.py` measures both).
    """
    side = geometries[0].size
    device = images[0].device
    views = torch.empty(len(images), 3, side, side, dtype=torch.uint8, device=device)
    for rows in _chunks([tuple(image.shape[1:]) for image in images]):
        chunk = [images[i] for i in rows], [geometries[i] for i in rows]
        views[rows] = _resample_chunk(*chunk, interpolation, exact)
    return views


def _chunks(sizes: Sequence[tuple[int, int]]) -> Iterator[list[int]]:
    """Rows of images of `sizes` (h, w) grouped, in order of area, so that each group's padded
    float32 buffer stays within CHUNK_BYTES (an image larger than that alone)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1])
    rows: list[int] = []
    height = width = 0
    for i in order:
        grown = (max(height, sizes[i][0]), max(width, sizes[i][1]))
        if rows and (len(rows) + 1) * 3 * grown[0] * grown[1] * 4 > CHUNK_BYTES:
            yield rows
            rows, grown = [], sizes[i]
        rows.append(i)
        height, width = grown
    if rows:
        yield rows


def _resample_chunk(
    images: Sequence[torch.Tensor], geometries: Sequence[ViewGeometry], interpolation: str, exact: bool
) -> torch.Tensor:
    side, device = geometries[0].size, images[0].device
    heights, widths = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    padded = _padded(images, heights, widths)  # (n, Hp, 3, Wp) float32
    described = [
        (g.top, g.left, g.height, g.width, *g.resize, centre_offset(g.resize[0], side),
         centre_offset(g.resize[1], side), g.flip)
        for g in geometries
    ]  # fmt: skip
    table = torch.tensor(described, dtype=torch.float64).t().to(device)  # (9, n): one copy
    top, left, height, width, resize_h, resize_w, offset_h, offset_w, flip = table
    no_flip = torch.zeros_like(flip, dtype=torch.bool)
    wy = axis_weights(top, height, resize_h, offset_h, no_flip, side, heights, interpolation)  # (n, S, Hp)
    wx = axis_weights(left, width, resize_w, offset_w, flip.bool(), side, widths, interpolation)  # (n, S, Wp)
    n = len(images)
    with _matmul_precision("highest" if exact else "high"):
        rows = torch.bmm(wy, padded.reshape(n, heights, 3 * widths))  # (n, S, 3 * Wp)
        views = torch.bmm(rows.reshape(n, side * 3, widths), wx.transpose(1, 2))  # (n, S * 3, S)
    views = views.reshape(n, side, 3, side).permute(0, 2, 1, 3)  # (n, 3, S, S)
    return views.clamp_(0.0, 255.0).round_().to(torch.uint8)


def _padded(images: Sequence[torch.Tensor], heights: int, widths: int) -> torch.Tensor:
    """(n, heights, 3, widths) float32: each (3, h, w) image at the top left, zeros around it;
    rows first, so that one product resamples the rows of all three channels.

    One concatenation and one gather, whatever n (a copy per image would be a launch per image).
    """
    device = images[0].device
    zero = torch.zeros(1, dtype=torch.uint8, device=device)
    flat = torch.cat([*(image.reshape(-1) for image in images), zero])  # the pixels one after another, then 0
    dtype = torch.int32 if len(flat) < 2**31 else torch.int64
    sizes = torch.tensor([image.shape[1:] for image in images], dtype=dtype).to(device)  # (n, 2)
    h, w = sizes[:, 0, None, None, None], sizes[:, 1, None, None, None]  # (n, 1, 1, 1)
    first = torch.cumsum(3 * h * w, dim=0, dtype=dtype) - 3 * h * w  # where each image starts in `flat`
    y = torch.arange(heights, device=device, dtype=dtype)[:, None, None]
    channel = torch.arange(3, device=device, dtype=dtype)[:, None]
    x = torch.arange(widths, device=device, dtype=dtype)
    index = first + (channel * h + y) * w + x  # (n, Hp, 3, Wp)
    index.masked_fill_((y >= h) | (x >= w), len(flat) - 1)  # outside an image: the 0 at the end
    return flat[index].float()


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """Float32 products at `precision` ("highest": full float32; "high": TF32 allowed), then the caller's."""
    before = torch.get_float32_matmul_precision()
    if before != precision:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        if before != precision:
            torch.set_float32_matmul_precision(before)
