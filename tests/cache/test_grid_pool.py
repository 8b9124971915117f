"""Grid pooling in the cache (an ImageNet-scale disk saver) is applied identically at inference."""

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
from protoquant.pipeline import run


def test_grid_pool_halves_grid_and_model_matches_cache(tmp_path):
    config = RunConfig(
        out=str(tmp_path / "out"),
        device="cpu",
        cache=CacheConfig(root=str(tmp_path / "cache"), train_views=1, grid_pool=2),
        backbone=BackboneConfig(name="timm/test_vit", weights="none", image_size=64),  # 4x4 grid
        data=DataConfig(synthetic_classes=2, synthetic_train_per_class=5, synthetic_test_per_class=2),
        codebook=CodebookConfig(num_prototypes=4, epochs=1, kmeans_patches=100),
        probe=ProbeConfig(epochs=2),
        head=HeadConfig(epochs=2),
    )
    result = run(config)
    store = result.caches.test.store
    assert store.grid == (2, 2)
    cached = store.get(store.entries())  # (B, D, 2, 2)
    images = torch.stack(
        [
            result.model.transform(result.splits.test.load_image(i), i, 0)
            for i in range(len(result.splits.test))
        ]
    )
    live = result.model.features(images)
    assert live.shape == cached.shape
    assert torch.allclose(live, cached, atol=1e-2, rtol=1e-2)  # fp16 storage
