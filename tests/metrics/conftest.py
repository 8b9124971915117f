"""A tiny trained ProtoQuant (random-weight test ConvNeXt, 3 synthetic classes, 64 px) for runner tests."""

from __future__ import annotations

import pytest
import torch

from protoquant.config import (
    BackboneConfig,
    CacheConfig,
    CodebookConfig,
    DataConfig,
    HeadConfig,
    ProbeConfig,
    RunConfig,
)
from protoquant.pipeline import RunResult, run


@pytest.fixture(scope="session")
def tiny_metrics_run(tmp_path_factory) -> RunResult:
    root = tmp_path_factory.mktemp("metrics_run")
    config = RunConfig(
        out=str(root / "out"),
        cache=CacheConfig(root=str(root / "cache"), train_views=1),
        backbone=BackboneConfig(name="timm/test_convnext", weights="none", image_size=64),
        data=DataConfig(synthetic_classes=3, synthetic_train_per_class=6, synthetic_test_per_class=3),
        codebook=CodebookConfig(num_prototypes=8, epochs=2, kmeans_patches=500),
        probe=ProbeConfig(epochs=5),
        head=HeadConfig(epochs=5),
        device="cpu",
    )
    torch.manual_seed(0)  # the random backbone weights
    return run(config)
