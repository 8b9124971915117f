"""A tiny training run, launched by tests/test_distributed.py as 1 process or under torchrun."""

import sys

from protoquant.config import (
    BackboneConfig,
    CacheConfig,
    CodebookConfig,
    DataConfig,
    HeadConfig,
    ProbeConfig,
    RunConfig,
)
from protoquant.pipeline import run


def tiny_config(out: str, cache: str) -> RunConfig:
    return RunConfig(
        out=out,
        device="cpu",
        cache=CacheConfig(root=cache, train_views=2, shard_size=8),
        backbone=BackboneConfig(name="timm/test_convnext", weights="none", image_size=64),
        data=DataConfig(synthetic_classes=3, synthetic_train_per_class=10, synthetic_test_per_class=4),
        codebook=CodebookConfig(num_prototypes=8, epochs=3, kmeans_patches=500, batch_size=8),
        probe=ProbeConfig(epochs=5, batch_size=16),
        head=HeadConfig(epochs=5, batch_size=16),
    )


if __name__ == "__main__":
    run(tiny_config(sys.argv[1], sys.argv[2]))
