"""Tiny fine-tuning configs: built-in synthetic data, random-weight backbones at 32-64 px, CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protoquant.config import BackboneConfig, CacheConfig, DataConfig, FinetuneConfig, RunConfig
from protoquant.finetuning import finetune

BACKBONES = {"torchvision/mobilenet_v3_small": 32, "timm/test_convnext": 64}  # name -> image size
IMAGE_SIZES = {**BACKBONES, "torchvision/resnet18": 32}


def tiny_config(
    root, name: str = "timm/test_convnext", *, per_class: int = 4, **finetune_fields
) -> RunConfig:
    """3 classes x `per_class` training images (one each carved for validation); by default
    2 epochs of 4 batches of 2."""
    fields = dict(epochs=2, batch_size=2, num_workers=0, patience=0, lr=1e-3, head_lr=1e-2, warmup_epochs=0.5)
    return RunConfig(
        data=DataConfig(synthetic_classes=3, synthetic_train_per_class=per_class, synthetic_test_per_class=1),
        backbone=BackboneConfig(name=name, weights="none", image_size=IMAGE_SIZES[name]),
        cache=CacheConfig(root=str(root / "cache")),
        finetune=FinetuneConfig(**{**fields, **finetune_fields}),
        device="cpu",
        seed=0,
        out=str(root / "out"),
    )


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """name -> (config, result) of one finished fine-tuning per backbone (mixing on)."""
    runs = {}
    for name in BACKBONES:
        config = tiny_config(tmp_path_factory.mktemp("finetune"), name)
        runs[name] = (config, finetune(config))
    return runs


@pytest.fixture
def with_out():
    """`with_out(config, folder)`: the same fine-tuning written to another folder."""
    return lambda config, folder: replace(config, finetune=replace(config.finetune, out=str(folder)))
