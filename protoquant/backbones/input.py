"""What a backbone expects as input: its pretrained data config, and a run's resolved choice of it.

timm models carry a pretrained config (input size, interpolation, crop_pct, mean, std), read
through `timm.data.resolve_data_config`; a torchvision weights enum member carries the same
facts in its `transforms()` preset (crop size, resize size, interpolation, mean, std; its
crop_pct is crop / resize). `InputConfig` holds them, and `resolve_input` applies a
`BackboneConfig`'s overrides, whose sentinels mean "the model's": image_size 0, crop_ratio 0,
interpolation '', mean / std empty. A run writes the resolved values into its saved config and
its cache key, so a checkpoint never depends on a sentinel.

Crop: the default crop_ratio 1 is *not* the model's crop_pct. The part-prototype protocols (and
every interpretability metric here, which maps image pixels and part locations onto the input)
take the whole image resized to S x S; a centre crop would cut parts off the edges of the image
and out of the explanation. `crop_ratio 0` asks for the model's own crop_pct (shorter side to
floor(S / crop_pct), centre crop S, as timm's and torchvision's evaluation presets do), which
is the usual choice when only the accuracy on ImageNet-like photos matters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from torch import nn

from protoquant.config import BackboneConfig

logger = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 16  # smallest input side any supported backbone accepts
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # what both the PIL and the tensor resize offer
FALLBACK_INTERPOLATION = "bicubic"  # for a pretrained config naming another one (none in timm 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS = 3  # RGB: mean and std have one value each


@dataclass(frozen=True)
class InputConfig:
    """How images are prepared for a backbone: square side, crop, resize interpolation, normalisation."""

    image_size: int  # S
    crop_ratio: float  # 1: whole image to S x S; < 1: shorter side to floor(S / ratio), centre crop S
    interpolation: str  # one of INTERPOLATIONS
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _interpolation(name: str, where: str) -> str:
    if name in INTERPOLATIONS:
        return name
    logger.warning("%s: interpolation %r is not supported; using %s", where, name, FALLBACK_INTERPOLATION)
    return FALLBACK_INTERPOLATION


def timm_input(model: nn.Module, where: str) -> InputConfig:
    """The pretrained data config of a timm model (its `pretrained_cfg`, timm's defaults filled in)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    if height != width:
        logger.warning("%s: pretrained input %dx%d is not square; using %d", where, height, width, height)
    return InputConfig(
        int(height),
        float(cfg.get("crop_pct") or 1.0),
        _interpolation(str(cfg["interpolation"]), where),
        tuple(float(v) for v in cfg["mean"]),
        tuple(float(v) for v in cfg["std"]),
    )


def crop_for(image_size: int, resize: int) -> float:
    """The largest crop ratio r with floor(image_size / r) == resize (S / R rounded down can miss R)."""
    ratio = image_size / resize
    while math.floor(image_size / ratio) < resize:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def torchvision_input(weights) -> InputConfig:
    """The evaluation preset of a torchvision weights enum member (`weights.transforms()`)."""
    preset = weights.transforms()
    size, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
    return InputConfig(
        size,
        crop_for(size, resize),
        _interpolation(preset.interpolation.value, str(weights)),
        tuple(float(v) for v in preset.mean),
        tuple(float(v) for v in preset.std),
    )


def _triple(values: tuple[float, ...], name: str) -> tuple[float, float, float] | None:
    if not values:
        return None
    if len(values) != CHANNELS:
        raise ValueError(f"config field 'backbone.{name}' needs {CHANNELS} values (R, G, B), got {values}")
    return tuple(float(v) for v in values)


def resolve_input(config: BackboneConfig, pretrained: InputConfig) -> InputConfig:
    """`pretrained` with the config's explicit values put in place of it (see the module docstring).

    Raises:
        ValueError: image_size below MIN_IMAGE_SIZE, or a mean / std without 3 values.
    """
    size = config.image_size or pretrained.image_size
    if size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"config field 'backbone.image_size' must be 0 (the model's) or >= {MIN_IMAGE_SIZE}, got {size}"
        )
    return InputConfig(
        size,
        config.crop_ratio or pretrained.crop_ratio,
        config.interpolation or pretrained.interpolation,
        _triple(config.mean, "mean") or pretrained.mean,
        _triple(config.std, "std") or pretrained.std,
    )


def resolved_config(config: BackboneConfig, pretrained: InputConfig) -> BackboneConfig:
    """`config` with every input field concrete (what a run saves and its cache key records)."""
    chosen = resolve_input(config, pretrained)
    return dataclasses.replace(
        config,
        image_size=chosen.image_size,
        crop_ratio=chosen.crop_ratio,
        interpolation=chosen.interpolation,
        mean=chosen.mean,
        std=chosen.std,
    )
