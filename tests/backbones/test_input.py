"""The model's pretrained input config decides size, crop, interpolation and normalisation by default."""

from __future__ import annotations

import math

import pytest
import timm
import torchvision

from protoquant.backbones.frozen import create_backbone
from protoquant.backbones.input import (
    InputConfig,
    crop_for,
    resolve_input,
    resolved_config,
    torchvision_input,
)
from protoquant.config import BackboneConfig, RunConfig
from protoquant.data.transforms import view_transform

PRETRAINED = InputConfig(160, 0.95, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_timm_defaults_come_from_the_pretrained_config() -> None:
    backbone = create_backbone(BackboneConfig(name="timm/test_convnext", weights="none"))
    cfg = timm.get_pretrained_cfg("test_convnext")  # read independently of the code under test
    info = backbone.info
    assert info.pretrained_input == InputConfig(
        cfg.input_size[1], cfg.crop_pct, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std)
    )
    assert info.image_size == cfg.input_size[1] and (info.mean, info.std) == (tuple(cfg.mean), tuple(cfg.std))
    assert info.grid == (cfg.input_size[1] // 32, cfg.input_size[2] // 32)  # ConvNeXt: stride 32


def test_torchvision_defaults_come_from_the_weights_preset() -> None:
    backbone = create_backbone(BackboneConfig(name="torchvision/resnet18", weights="none"))
    preset = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    chosen = backbone.info.pretrained_input
    assert chosen.image_size == preset.crop_size[0] == backbone.info.image_size
    assert math.floor(chosen.image_size / chosen.crop_ratio) == preset.resize_size[0]
    assert chosen.interpolation == preset.interpolation.value
    assert list(chosen.mean) == preset.mean and list(chosen.std) == preset.std


@pytest.mark.parametrize(("size", "resize"), [(224, 232), (224, 256), (384, 384), (518, 518), (17, 25)])
def test_crop_ratio_reproduces_the_resize_side_exactly(size: int, resize: int) -> None:
    assert math.floor(size / crop_for(size, resize)) == resize
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2  # resize 232, crop 224
    assert math.floor(224 / torchvision_input(weights).crop_ratio) == 232


def test_config_values_override_and_zero_crop_is_the_models() -> None:
    config = BackboneConfig(image_size=64, crop_ratio=0.5, interpolation="nearest", mean=(0.1, 0.2, 0.3))
    assert resolve_input(config, PRETRAINED) == InputConfig(
        64, 0.5, "nearest", (0.1, 0.2, 0.3), PRETRAINED.std
    )
    whole = resolve_input(BackboneConfig(), PRETRAINED)
    assert whole == InputConfig(
        160, 1.0, "bicubic", PRETRAINED.mean, PRETRAINED.std
    )  # whole image by default
    assert resolve_input(BackboneConfig(crop_ratio=0.0), PRETRAINED).crop_ratio == 0.95


def test_resolved_config_has_no_sentinel_and_gives_that_transform() -> None:
    resolved = resolved_config(BackboneConfig(crop_ratio=0.0), PRETRAINED)
    assert (resolved.image_size, resolved.crop_ratio, resolved.interpolation) == (160, 0.95, "bicubic")
    assert resolved.mean == PRETRAINED.mean and resolved.std == PRETRAINED.std
    transform = view_transform(RunConfig(backbone=resolved), resolved.mean, resolved.std)
    assert (transform.image_size, transform.crop_ratio, transform.interpolation) == (160, 0.95, "bicubic")
    assert resolved_config(resolved, InputConfig(32, 1.0, "nearest", (0, 0, 0), (1, 1, 1))) == resolved


def test_bad_input_fields_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"backbone\.image_size' must be 0 \(the model's\) or >= 16, got 8"):
        resolve_input(BackboneConfig(image_size=8), PRETRAINED)
    with pytest.raises(ValueError, match=r"backbone\.mean' needs 3 values"):
        resolve_input(BackboneConfig(mean=(0.5, 0.5)), PRETRAINED)
    with pytest.raises(ValueError, match=r"backbone\.interpolation' must be one of"):
        BackboneConfig(interpolation="lanczos")
