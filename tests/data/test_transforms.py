"""View transform: plain view 0, seeded augmented views, output shape and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from protoquant.data.transforms import ViewTransform, _crop_box

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(50, 80, 3), dtype=np.uint8))


def _transform(**changes) -> ViewTransform:
    return ViewTransform(**{"image_size": 32, "crop_ratio": 1.0, "mean": MEAN, "std": STD, **changes})


@pytest.mark.parametrize("crop_ratio", [1.0, 0.875])
@pytest.mark.parametrize("view", [0, 1, 3])
def test_output_shape_and_dtype(image, crop_ratio, view) -> None:
    out = _transform(crop_ratio=crop_ratio)(image, 4, view)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_view_zero_is_deterministic_and_independent_of_index_and_seed(image) -> None:
    base = _transform()(image, 0, 0)
    assert torch.equal(base, _transform()(image, 0, 0))
    assert torch.equal(base, _transform()(image, 17, 0))
    assert torch.equal(base, _transform(seed=9, min_crop_scale=0.2)(image, 3, 0))


def test_view_zero_is_the_normalised_resize(image) -> None:
    out = _transform()(image, 0, 0)
    resized = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255  # (S, S, 3)
    expected = (
        torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]
    ) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(
        out, expected, atol=0.05 / min(STD), rtol=0
    )  # resampling filters differ slightly


def test_view_zero_with_crop_ratio_is_a_centre_crop() -> None:
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, :32] = 255  # a white band on the left, outside the centre crop
    out = _transform(crop_ratio=0.5, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(pixels), 0, 0)
    assert out.shape == (3, 32, 32)
    assert out.max() < 0.05  # only black survives the centre crop


@pytest.mark.parametrize("view", [1, 2, 5])
def test_augmented_views_are_deterministic_per_seed_index_view(image, view) -> None:
    transform = _transform()
    out = transform(image, 7, view)
    assert torch.equal(out, transform(image, 7, view))
    assert torch.equal(out, _transform()(image, 7, view))  # a fresh but equal transform
    assert not torch.equal(out, transform(image, 7, view + 1))
    assert not torch.equal(out, transform(image, 8, view))
    assert not torch.equal(out, _transform(seed=1)(image, 7, view))
    assert not torch.equal(out, transform(image, 7, 0))


def test_normalisation_uses_mean_and_std() -> None:
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    out = _transform()(white, 0, 0)
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected)
    for view in (1, 2):
        torch.testing.assert_close(_transform()(white, 0, view), out)  # any crop or flip of a flat image


def test_describe_records_every_field() -> None:
    description = _transform(min_crop_scale=0.3, seed=4).describe()
    assert (
        description["image_size"] == 32 and description["min_crop_scale"] == 0.3 and description["seed"] == 4
    )
    assert description["crop_ratio"] == 1.0 and tuple(description["mean"]) == MEAN
    assert _transform().describe() != _transform(seed=1).describe()


@pytest.mark.parametrize(("width", "height"), [(80, 50), (50, 80), (64, 64), (200, 10), (3, 3)])
@pytest.mark.parametrize("min_scale", [0.08, 0.5, 1.0])
def test_crop_boxes_lie_inside_the_image(width, height, min_scale) -> None:
    for seed in range(20):
        top, left, h, w = _crop_box(width, height, min_scale, np.random.default_rng(seed))
        assert 0 <= top and 0 <= left and 0 < h and 0 < w
        assert top + h <= height and left + w <= width
        fallback = (h, w) == (min(width, height),) * 2
        rounding = h + w  # side lengths are rounded to whole pixels
        assert fallback or h * w >= min_scale * width * height - rounding


@pytest.mark.parametrize("size", [(200, 10), (3, 3)])
def test_extreme_images_still_give_the_output_shape(size) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    for view in (0, 1, 2):
        assert _transform()(image, 0, view).shape == (3, 32, 32)


def test_interpolation_is_used_for_every_view_and_recorded(image) -> None:
    import torchvision.transforms.functional as TF

    bilinear, bicubic = _transform(), _transform(interpolation="bicubic")
    expected = TF.pil_to_tensor(TF.resize(image, [32, 32], interpolation=TF.InterpolationMode.BICUBIC))
    assert torch.equal(bicubic.pixels(image, 0, 0), expected)
    for view in (0, 2):
        assert not torch.equal(bicubic.pixels(image, 3, view), bilinear.pixels(image, 3, view))
    batch = TF.pil_to_tensor(image).float().div(255)[None]  # (1, 3, h, w)
    assert not torch.equal(bicubic.plain(batch), bilinear.plain(batch))
    assert bicubic.describe()["interpolation"] == "bicubic"


def test_bilinear_keeps_the_cache_key_of_transforms_before_interpolation_existed() -> None:
    old_keys = {"kind", "image_size", "crop_ratio", "mean", "std", "min_crop_scale", "seed"}
    assert set(_transform().describe()) == old_keys


def test_unresolved_sentinels_and_a_legacy_config_are_handled() -> None:
    from protoquant.config import BackboneConfig, RunConfig
    from protoquant.data.transforms import view_transform

    with pytest.raises(ValueError, match="resolve the backbone config first"):
        _transform(image_size=0)
    with pytest.raises(ValueError, match="resolve the backbone config first"):
        _transform(crop_ratio=0.0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        _transform(interpolation="lanczos")
    legacy = RunConfig(backbone=BackboneConfig(image_size=32))  # interpolation '' as saved before the field
    assert view_transform(legacy, MEAN, STD).interpolation == "bilinear"
