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
only CUDA uses them; on GPUs with TF32 as split TF32 products, which keep float32's accuracy
(`products_for`, `PRODUCTS`).

Shapes: n views of side S; a chunk's buffer is (n, Hp, 3, Wp), Hp and Wp its largest image's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from protoquant.data.transforms import ViewGeometry

CHUNK_BYTES = 256 * 2**20  # float32 image buffer per matrix product (a larger single image goes alone)
PRODUCTS = ("float32", "tf32-split", "tf32")  # how the products run (`resample_views`)
TF32_MASK = ~((1 << 13) - 1)  # keeps a float32's sign, exponent and the top 10 of its 23 mantissa bits


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


def products_for(device: torch.device) -> str:
    """How the products run on `device`: "tf32-split" where the GPU has TF32 (compute capability
    8.0 and up; estimated about 3x faster than float32 there, BENCHMARKS.md), else "float32"."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32-split"
    return "float32"


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
    products: str = "float32",
) -> torch.Tensor:
    """(n, 3, S, S) uint8 views of (3, h, w) uint8 images, as `apply_geometry` makes them one by one.

    Every geometry has the same side S, and the images are on one device. `products` (PRODUCTS):
    "float32" runs the products in full float32 whatever the caller set; "tf32" lets them use
    TF32 where the GPU has it (taps rounded to 11 significant bits); "tf32-split" uses TF32 on
    operands split into a part TF32 holds exactly and the rest (pixels are exact already), which
    keeps float32's accuracy in five TF32 products instead of two float32 ones.
    `benchmarks/view_geometry.py` times all three.
    """
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    side = geometries[0].size
    device = images[0].device
    views = torch.empty(len(images), 3, side, side, dtype=torch.uint8, device=device)
    for rows in _chunks([tuple(image.shape[1:]) for image in images]):
        chunk = [images[i] for i in rows], [geometries[i] for i in rows]
        views[rows] = _resample_chunk(*chunk, interpolation, products)
    return views


def _chunks(sizes: Sequence[tuple[int, int]]) -> Iterator[list[int]]:
    """Rows of images of `sizes` (h, w) grouped so that each group's padded float32 buffer stays
    within CHUNK_BYTES (an image larger than that alone). Landscape and portrait images go to
    separate groups, each in order of area: padding a mix of both to its largest height and width
    would cost up to a third more products."""

    def portrait(i: int) -> bool:
        return sizes[i][0] > sizes[i][1]

    order = sorted(range(len(sizes)), key=lambda i: (portrait(i), sizes[i][0] * sizes[i][1]))
    rows: list[int] = []
    height = width = 0
    for i in order:
        grown = (max(height, sizes[i][0]), max(width, sizes[i][1]))
        too_big = (len(rows) + 1) * 3 * grown[0] * grown[1] * 4 > CHUNK_BYTES
        if rows and (too_big or portrait(i) != portrait(rows[0])):
            yield rows
            rows, grown = [], sizes[i]
        rows.append(i)
        height, width = grown
    if rows:
        yield rows


def _resample_chunk(
    images: Sequence[torch.Tensor], geometries: Sequence[ViewGeometry], interpolation: str, products: str
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
    with _matmul_precision("highest" if products == "float32" else "high"):
        rows = _bmm(wy, padded.reshape(n, heights, 3 * widths), products, exact_right=True)  # (n, S, 3 * Wp)
        views = _bmm(rows.reshape(n, side * 3, widths), wx.transpose(1, 2), products)  # (n, S * 3, S)
    views = views.reshape(n, side, 3, side).permute(0, 2, 1, 3)  # (n, 3, S, S)
    return views.clamp_(0.0, 255.0).round_().to(torch.uint8)


def tf32_parts(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) float32 with high + low == values exactly and high held exactly by TF32 (its
    mantissa cut to TF32's 10 bits); low is at most 2**-10 of the value."""
    high = (values.contiguous().view(torch.int32) & TF32_MASK).view(torch.float32)
    return high, values - high


def _bmm(
    left: torch.Tensor, right: torch.Tensor, products: str, *, exact_right: bool = False
) -> torch.Tensor:
    """left @ right, batched. With "tf32-split", to about float32 accuracy from TF32 products
    however the hardware rounds: high @ high is exact, the cross terms lose at most 2**-20 of the
    result, and low @ low (2**-20) is left out. `exact_right`: TF32 holds `right` exactly (uint8
    pixels), so its low part is zero and two products do."""
    if products != "tf32-split":
        return torch.bmm(left, right)
    left_high, left_low = tf32_parts(left)
    if exact_right:
        return torch.bmm(left_high, right) + torch.bmm(left_low, right)
    right_high, right_low = tf32_parts(right)
    return (
        torch.bmm(left_high, right_high) + torch.bmm(left_high, right_low) + torch.bmm(left_low, right_high)
    )


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
