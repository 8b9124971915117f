"""One picture or a batch, in any form people hold pictures in, as RGB PIL images.

Everything becomes 8-bit RGB first and then takes the same path as an image file (the path the
feature cache took), so one picture gives the same model input whatever its type. Accepted:

- a PIL image (any mode; converted to RGB);
- a uint8 numpy array (H, W) (grey), (H, W, C), or a batch (B, H, W, C);
- a uint8 torch tensor (C, H, W) or (B, C, H, W) with values 0-255 (`torchvision.io.read_image`);
- a float torch tensor (C, H, W) or (B, C, H, W) with values in [0, 1] (`to_tensor`), rounded to
  8 bits like any image file;
- a list or tuple of any of these.

C is 1 (grey), 3 (RGB) or 4 (RGBA; the alpha channel is dropped, as PIL's convert("RGB") does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

ImageInput = Image.Image | np.ndarray | torch.Tensor  # one picture, or a stacked batch
Images = ImageInput | Sequence[ImageInput]

CHANNELS = (1, 3, 4)  # grey, RGB, RGBA
MAX_PIXEL = 255  # uint8 white
ACCEPTED = (
    "a PIL image; a uint8 numpy array (H, W), (H, W, C) or (B, H, W, C); a uint8 torch tensor "
    "(C, H, W) or (B, C, H, W) with values 0-255; a float torch tensor (C, H, W) or (B, C, H, W) "
    "with values in [0, 1]; or a list of these (C = 1, 3 or 4)"
)


def is_batch(images: Images) -> bool:
    """True for a list/tuple or a stacked 4-d array/tensor, False for one picture."""
    if isinstance(images, (list, tuple)):
        return True
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def to_rgb_images(images: Images) -> list[Image.Image]:
    """Every picture in `images` (one or a batch) as an RGB PIL image.

    Raises:
        TypeError: an unsupported type or dtype (the message names what was given and what is accepted).
        ValueError: a wrong shape or channel count, a float tensor outside [0, 1], or no images.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"no images given (an empty {type(images).__name__}); expected {ACCEPTED}")
        return [rgb for item in images for rgb in _one_input(item, nested=True)]
    return _one_input(images, nested=False)


def _one_input(item: object, *, nested: bool) -> list[Image.Image]:
    if isinstance(item, Image.Image):
        return [item.convert("RGB")]
    if isinstance(item, np.ndarray):
        return _from_numpy(item)
    if isinstance(item, torch.Tensor):
        return _from_tensor(item)
    where = "a list item of type" if nested else "type"
    name = f"{type(item).__module__}.{type(item).__name__}"
    raise TypeError(f"cannot read an image from {where} {name}; expected {ACCEPTED}")


def _from_numpy(array: np.ndarray) -> list[Image.Image]:
    if array.dtype != np.uint8:
        raise TypeError(
            f"numpy image of dtype {array.dtype}: expected uint8 (0-255); for floats in [0, 1] "
            f"use (array * 255).round().astype(np.uint8). Accepted: {ACCEPTED}"
        )
    if array.ndim == 2:
        array = array[..., None]  # (H, W) -> (H, W, 1)
    if array.ndim not in (3, 4) or array.shape[-1] not in CHANNELS:
        raise ValueError(
            f"numpy image of shape {array.shape}: expected (H, W), (H, W, C) or (B, H, W, C), channels "
            f"last with C in {CHANNELS} (for channels first use array.transpose(1, 2, 0))"
        )
    batch = array if array.ndim == 4 else array[None]  # (B, H, W, C)
    return [_pil(pixels) for pixels in batch]


def _from_tensor(tensor: torch.Tensor) -> list[Image.Image]:
    if tensor.ndim not in (3, 4) or tensor.shape[-3] not in CHANNELS:
        raise ValueError(
            f"image tensor of shape {tuple(tensor.shape)}: expected (C, H, W) or (B, C, H, W), channels "
            f"first with C in {CHANNELS} (for channels last use tensor.permute(2, 0, 1))"
        )
    if tensor.numel() == 0:
        raise ValueError(f"image tensor of shape {tuple(tensor.shape)} holds no pixels")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = _float_to_uint8(tensor)
    elif tensor.dtype != torch.uint8:
        raise TypeError(
            f"image tensor of dtype {tensor.dtype}: expected torch.uint8 (0-255) or a float dtype "
            f"with values in [0, 1]. Accepted: {ACCEPTED}"
        )
    batch = tensor if tensor.ndim == 4 else tensor[None]  # (B, C, H, W)
    return [_pil(pixels.permute(1, 2, 0).numpy()) for pixels in batch]  # (H, W, C) each


def _float_to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.float()
    low, high = float(tensor.min()), float(tensor.max())
    if not (0.0 <= low and high <= 1.0):  # also catches NaN
        raise ValueError(
            f"float image tensor with values in [{low:.3g}, {high:.3g}]: expected [0, 1]. Values "
            "outside usually mean the tensor is normalised already: pass the image before "
            "normalisation, or call predict_normalised with a normalised (B, 3, S, S) batch"
        )
    return (tensor * MAX_PIXEL).round().to(torch.uint8)


def _pil(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> RGB PIL image."""
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]  # (H, W): PIL's mode "L"
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")  # L, RGB or RGBA by shape
