"""Views of a whole decoded batch as matrix products (`resample_views`, used on CUDA) against
`apply_geometry` one image at a time: the same filter taps, so the same pixels up to float
rounding (the sums run in another order)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protoquant.cache import decode, resample
from protoquant.cache.decode import apply_geometry
from protoquant.cache.resample import centre_offset, resample_views
from protoquant.data.transforms import ViewGeometry, ViewTransform
from tests.cache.test_device_decode import (
    DEVICES,
    _assert_close_views,
    _both_paths,
    _levels,
    _transform,
    write_folder,
)

SIDE = 32
# Measured over `_batch` (240 views, both interpolations, both crop ratios): at most 1 level, in
# 0.002-0.003 % of the values; the bound below leaves room for other BLAS summation orders.
MOST_DIFFERENT = 1e-3  # fraction of values allowed one level off


def _batch(interpolation: str, crop_ratio: float, seed: int = 0) -> tuple[list, list]:
    """Smooth random images from 9 to 240 pixels a side (down- and upscaled), three views each."""
    rng = np.random.default_rng(seed)
    transform = ViewTransform(
        SIDE, crop_ratio, (0.5,) * 3, (0.5,) * 3, min_crop_scale=0.08, seed=seed, interpolation=interpolation
    )
    images, geometries = [], []
    for index in range(20):
        height, width = (int(v) for v in rng.integers(9, 240, size=2))
        noise = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, height, width)).astype(np.float32))
        image = F.avg_pool2d(noise, 3, 1, 1)[0].round().to(torch.uint8)  # (3, h, w)
        for view in range(3):
            images.append(image)
            geometries.append(transform.geometry(width, height, index, view))
    return images, geometries


def _one_by_one(images: list, geometries: list, interpolation: str) -> torch.Tensor:
    mode = ViewTransform(SIDE, 1.0, (0.5,) * 3, (0.5,) * 3, interpolation=interpolation).mode
    return torch.stack([apply_geometry(i, g, mode) for i, g in zip(images, geometries)])


def _assert_float_close(a: torch.Tensor, b: torch.Tensor) -> None:
    levels = _levels(a, b)
    assert levels.max() <= 1 and (levels > 0).float().mean() <= MOST_DIFFERENT


@pytest.mark.parametrize("on", DEVICES, ids=str)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop_ratio", [1.0, 0.875])
def test_batched_views_are_the_per_image_views(interpolation, crop_ratio, on) -> None:
    images, geometries = _batch(interpolation, crop_ratio)
    images = [image.to(on) for image in images]
    assert any(g.flip for g in geometries) and any(g.height < SIDE for g in geometries)  # flips, upscaling
    centre_crops = any(g.resize[0] > SIDE or g.resize[1] > SIDE for g in geometries)
    assert centre_crops == (crop_ratio < 1.0)  # view 0 is centre-cropped only below ratio 1
    expected = _one_by_one(images, geometries, interpolation)
    for products in ("float32", "tf32-split"):
        _assert_float_close(resample_views(images, geometries, interpolation, products=products), expected)
    assert _levels(resample_views(images, geometries, interpolation, products="tf32"), expected).max() <= 1


def test_a_flip_reverses_the_columns_exactly() -> None:
    images, geometries = _batch("bilinear", 0.875, seed=3)
    plain = resample_views(images, geometries, "bilinear")
    flipped = resample_views(images, [replace(g, flip=not g.flip) for g in geometries], "bilinear")
    assert torch.equal(flipped, plain.flip(-1))


def test_small_chunks_give_the_same_views(monkeypatch) -> None:
    images, geometries = _batch("bicubic", 1.0, seed=1)
    whole = resample_views(images, geometries, "bicubic")
    limit = 3 * 160 * 160 * 4  # a few views per chunk; the largest images go alone
    monkeypatch.setattr(resample, "CHUNK_BYTES", limit)
    sizes = [tuple(image.shape[1:]) for image in images]
    chunks = list(resample._chunks(sizes))
    assert sorted(i for rows in chunks for i in rows) == list(range(len(images)))
    for rows in chunks:
        height, width = max(sizes[i][0] for i in rows), max(sizes[i][1] for i in rows)
        assert len(rows) == 1 or len(rows) * 3 * height * width * 4 <= limit
    assert len(chunks) > 5 and any(len(rows) == 1 for rows in chunks)
    for rows in chunks:
        assert len({sizes[i][0] > sizes[i][1] for i in rows}) == 1  # landscape and portrait apart
    _assert_float_close(resample_views(images, geometries, "bicubic"), whole)


def test_centre_offsets_round_as_center_crop_does() -> None:
    columns = torch.arange(67, dtype=torch.float32) * 3  # 3 levels a column: an offset off by one shows
    image = columns.expand(3, 5, 67).round().to(torch.uint8)  # (3, 5, 67); 67 - 32 = 35: half a pixel
    geometry = ViewGeometry(0, 0, 5, 67, (SIDE, 67), SIDE, False)
    assert centre_offset(67, SIDE) == 18  # round(17.5), half to even
    _assert_float_close(
        resample_views([image], [geometry], "bilinear"), _one_by_one([image], [geometry], "bilinear")
    )


@pytest.mark.parametrize("caller", ["highest", "high"])
def test_the_products_run_at_their_own_precision_and_the_callers_is_kept(monkeypatch, caller) -> None:
    seen = []
    bmm = torch.bmm

    def watched(a, b):
        seen.append(torch.get_float32_matmul_precision())
        return bmm(a, b)

    images, geometries = _batch("bilinear", 1.0, seed=2)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(caller)  # "high": TF32 where the hardware has it
    try:
        monkeypatch.setattr(torch, "bmm", watched)
        resample_views(images[:3], geometries[:3], "bilinear")
        assert seen == ["highest"] * 2 and torch.get_float32_matmul_precision() == caller
        resample_views(images[:3], geometries[:3], "bilinear", products="tf32")
        assert seen[2:] == ["high"] * 2 and torch.get_float32_matmul_precision() == caller
    finally:
        torch.set_float32_matmul_precision(before)


def _truncating_tf32_bmm(monkeypatch) -> None:
    """torch.bmm, where TF32 is allowed, as TF32 hardware that truncates its operands to 10
    mantissa bits (the worse of the two roundings), on the CPU."""
    bmm = torch.bmm

    def truncated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if torch.get_float32_matmul_precision() == "highest":  # TF32 not allowed
            return bmm(a, b)
        return bmm(resample.tf32_parts(a)[0], resample.tf32_parts(b)[0])  # the part TF32 holds

    monkeypatch.setattr(torch, "bmm", truncated)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_split_tf32_products_keep_float32_accuracy_on_truncating_hardware(monkeypatch, interpolation) -> None:
    images, geometries = _batch(interpolation, 0.875, seed=4)
    expected = _one_by_one(images, geometries, interpolation)
    _truncating_tf32_bmm(monkeypatch)
    plain = _levels(resample_views(images, geometries, interpolation, products="tf32"), expected)
    assert (plain > 0).float().mean() > 10 * MOST_DIFFERENT  # the emulation bites: plain TF32 is off
    for products in ("tf32-split", "float32"):  # float32 does not allow TF32
        _assert_float_close(resample_views(images, geometries, interpolation, products=products), expected)


def test_tf32_parts_add_up_exactly_and_the_high_part_fits_tf32() -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 300
    high, low = resample.tf32_parts(values)
    assert torch.equal(high + low, values)
    assert torch.all(high.view(torch.int32) & ~resample.TF32_MASK == 0)
    assert torch.all(low.abs() <= values.abs() * 2**-10)


def test_products_must_be_known() -> None:
    images, geometries = _batch("bilinear", 1.0)
    with pytest.raises(ValueError, match="products must be one of"):
        resample_views(images[:1], geometries[:1], "bilinear", products="bf16")
    assert resample.products_for(torch.device("cpu")) == "float32"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_decoding_with_batched_views_stays_within_the_pil_bounds(
    tmp_path, convnext, monkeypatch, interpolation
) -> None:
    folder = write_folder(tmp_path / "images")
    transform = _transform(convnext, interpolation=interpolation)
    workers, one_by_one, items = _both_paths(folder, transform, 4)
    monkeypatch.setattr(decode, "batched_views", lambda device: True)  # as on CUDA
    _, batched, _ = _both_paths(folder, transform, 4)
    _assert_close_views(workers, batched, items, interpolation)
    _assert_float_close(batched, one_by_one)


def test_landscape_and_portrait_images_are_padded_apart() -> None:
    sizes = [(10, 20), (20, 10), (12, 22), (30, 30)]  # (h, w): square counts as landscape
    assert list(resample._chunks(sizes)) == [[0, 2, 3], [1]]
