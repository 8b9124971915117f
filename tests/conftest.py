"""Shared fixtures: tiny random-weight backbones, tiny datasets and one tiny trained run.

Everything is CPU-only, seeded and offline. The session-scoped `tiny_run` trains the whole
pipeline once (a few seconds) and the pipeline, train and model tests reuse it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # timm / huggingface_hub never try the network

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import protoquant.pipeline as pipeline
from protoquant.backbones.frozen import FrozenBackbone, create_backbone
from protoquant.config import (
    BackboneConfig,
    CacheConfig,
    CodebookConfig,
    DataConfig,
    HeadConfig,
    ProbeConfig,
    RunConfig,
)
from protoquant.data.base import ImageDataset, stable_hash
from protoquant.data.synthetic import SyntheticParts

IMAGE_SIZE = 64  # test_convnext: 2x2 grid, test_vit (patch 16): 4x4 grid
NUM_CODES = 16  # K of the tiny run


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """Runs with cache.root '' cache their features here, never in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROTOQUANT_CACHE", str(tmp_path_factory.mktemp("feature_cache")))
        yield


def pytest_configure(config) -> None:
    # The models here are tiny: one intra-op thread is faster than two, and far faster when the
    # two cores are shared with other work (OpenMP threads then spin waiting for each other).
    torch.set_num_threads(1)


def make_backbone(name: str, *, seed: int = 0, image_size: int = IMAGE_SIZE) -> FrozenBackbone:
    """A frozen backbone with seeded random weights."""
    return create_backbone(BackboneConfig(name=name, weights="none", image_size=image_size, init_seed=seed))


@pytest.fixture(scope="session")
def convnext() -> FrozenBackbone:
    return make_backbone("timm/test_convnext")


@pytest.fixture(scope="session")
def vit() -> FrozenBackbone:
    return make_backbone("timm/test_vit")


def synthetic(split: str = "train", *, images_per_class: int = 6, seed: int = 0) -> SyntheticParts:
    return SyntheticParts(
        split, num_classes=3, images_per_class=images_per_class, image_size=IMAGE_SIZE, seed=seed
    )


@pytest.fixture(scope="session")
def tiny_synthetic() -> SyntheticParts:
    """3 classes x 6 images, 64 px."""
    return synthetic()


class NoiseImages(ImageDataset):
    """Seeded random RGB images of varying size (an in-test ImageDataset)."""

    name = "noise"

    def __init__(self, count: int = 5, *, seed: int = 0, split: str = "train", num_classes: int = 2):
        self.seed, self.split = seed, split
        self.classes = tuple(f"class{c}" for c in range(num_classes))
        self.labels = np.arange(count, dtype=np.int64) % num_classes
        rng = np.random.default_rng(seed)
        sizes = rng.integers(40, 90, size=(count, 2))
        self._pixels = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self._pixels[index])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"".join(p.tobytes() for p in self._pixels)).hexdigest()
        return stable_hash(
            {"name": self.name, "split": self.split, "pixels": digest, "labels": self.labels.tolist()}
        )


@pytest.fixture
def noise_images() -> type[NoiseImages]:
    return NoiseImages


def tiny_run_config(root) -> RunConfig:
    return RunConfig(
        data=DataConfig(synthetic_classes=3, synthetic_train_per_class=8, synthetic_test_per_class=4),
        backbone=BackboneConfig(name="timm/test_convnext", weights="none", image_size=IMAGE_SIZE),
        cache=CacheConfig(root=str(root / "cache"), train_views=2, shard_size=16, batch_size=16),
        probe=ProbeConfig(epochs=20),
        codebook=CodebookConfig(
            num_prototypes=NUM_CODES, kmeans_patches=200, kmeans_iters=5, epochs=2, batch_size=16
        ),
        head=HeadConfig(epochs=20),
        seed=0,
        device="cpu",
        out=str(root / "out"),
    )


@dataclass(frozen=True)
class TinyRun:
    config: RunConfig
    result: pipeline.RunResult
    stage1_codes: torch.Tensor  # (K, D) codes returned by stage 1, copied before stage 2 ran
    head_input_codes: torch.Tensor  # (K, D) codebook passed to stage 2


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """One end-to-end run of the pipeline on tiny synthetic data (stage 1 and 2 inputs recorded)."""
    config = tiny_run_config(tmp_path_factory.mktemp("tiny_run"))
    captured: dict[str, torch.Tensor] = {}

    def recording_train_codebook(*args, **kwargs):
        quantizer, history = train_codebook(*args, **kwargs)
        captured["stage1"] = quantizer.codebook.detach().clone()
        return quantizer, history

    def recording_train_head(codebook, *args, **kwargs):
        captured["head_input"] = codebook.detach().clone()
        return train_head(codebook, *args, **kwargs)

    train_codebook, train_head = pipeline.train_codebook, pipeline.train_head
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "train_codebook", recording_train_codebook)
        patch.setattr(pipeline, "train_head", recording_train_head)
        torch.manual_seed(0)  # the random backbone weights
        result = pipeline.run(config)
    return TinyRun(config, result, captured["stage1"], captured["head_input"])


@pytest.fixture
def cache_config(tmp_path) -> CacheConfig:
    """A fresh cache root per test; small shards so that tiny datasets span several."""
    return CacheConfig(root=str(tmp_path / "cache"), shard_size=8, batch_size=4)


@pytest.fixture(scope="session")
def backbone_factory():
    """`make_backbone(name, seed=0, image_size=64)`: seeded random-weight frozen backbones."""
    return make_backbone


@pytest.fixture(scope="session")
def synthetic_factory():
    """`synthetic(split="train", images_per_class=6, seed=0)`: 3-class 64 px SyntheticParts."""
    return synthetic
