"""Snapping codes to their nearest training patches makes every prototype a real patch."""

import dataclasses

import torch

from protoquant.codebook import to_patches
from protoquant.config import CodebookConfig
from protoquant.explain.grounding import nearest_patches
from protoquant.pipeline import run
from tests.distributed_job import tiny_config


def test_snapped_codes_are_cached_training_patches(tmp_path):
    config = tiny_config(str(tmp_path / "out"), str(tmp_path / "cache"))
    config = dataclasses.replace(config, codebook=dataclasses.replace(config.codebook, snap_to_patches=True))
    assert isinstance(config.codebook, CodebookConfig)
    result = run(config)
    plain = result.caches.train_plain
    patches = to_patches(plain.store.get(plain.entries))  # (N*H*W, D)
    codes = result.model.head.codebook  # (K, D)
    equal = (codes[:, None, :] == patches[None, :, :]).all(dim=2)  # (K, N*H*W)
    assert bool(equal.any(dim=1).all())  # every code is exactly some cached patch
    nearest = nearest_patches(codes, plain, 16, torch.device("cpu"))
    assert torch.allclose(nearest.cosine, torch.ones_like(nearest.cosine), atol=1e-5)
    assert result.metrics["grounding"]["min_nearest_cosine_used"] > 1 - 1e-5
