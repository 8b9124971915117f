"""Pictures of every accepted form become the same RGB PIL images; bad ones fail naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from protoquant.data.inputs import is_batch, to_rgb_images


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)  # (H, W, 3)


def _same(images: list[Image.Image], expected: np.ndarray) -> bool:
    return all(image.mode == "RGB" and np.array_equal(np.array(image), expected) for image in images)


def test_every_form_gives_the_same_rgb_pixels(pixels) -> None:
    chw = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)
    forms = (Image.fromarray(pixels), pixels, chw, chw / 255, chw.half() / 255, [pixels, chw])
    for form in forms:
        converted = to_rgb_images(form)
        assert len(converted) == (2 if isinstance(form, list) else 1)
        assert _same(converted, pixels)


def test_grey_and_rgba_pictures(pixels) -> None:
    grey = pixels[..., 0]  # (H, W)
    as_rgb = np.repeat(grey[..., None], 3, axis=2)  # (H, W, 3)
    for form in (grey, grey[..., None], torch.from_numpy(grey)[None], Image.fromarray(grey)):
        assert _same(to_rgb_images(form), as_rgb)
    rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 7, np.uint8)], axis=2)  # (H, W, 4)
    assert _same(to_rgb_images(rgba), pixels)  # alpha dropped, as PIL's convert("RGB") does
    assert _same(to_rgb_images(torch.from_numpy(rgba).permute(2, 0, 1)), pixels)


def test_batches_split_into_pictures(pixels) -> None:
    stacked = np.stack([pixels, 255 - pixels])  # (2, H, W, 3)
    images = to_rgb_images(torch.from_numpy(stacked).permute(0, 3, 1, 2))  # (2, 3, H, W)
    assert _same(images[:1], pixels) and _same(images[1:], 255 - pixels)
    assert [np.array(i).tolist() for i in to_rgb_images(stacked)] == [np.array(i).tolist() for i in images]


def test_is_batch_tells_one_picture_from_many(pixels) -> None:
    assert not is_batch(pixels) and not is_batch(Image.fromarray(pixels))
    assert not is_batch(torch.zeros(3, 4, 4)) and is_batch(torch.zeros(1, 3, 4, 4))
    assert is_batch([pixels]) and is_batch((pixels,)) and is_batch(pixels[None])


@pytest.mark.parametrize("bad", [torch.tensor(float("nan")).expand(3, 2, 2), torch.full((3, 2, 2), 1.5)])
def test_float_tensors_must_lie_in_the_unit_range(bad) -> None:
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        to_rgb_images(bad)


def test_empty_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="no pixels"):
        to_rgb_images(torch.zeros(0, 3, 4, 4))
