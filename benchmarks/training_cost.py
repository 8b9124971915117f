"""Benchmark 1: training from the feature cache vs re-running the frozen backbone every epoch.

Same data, same initial codebook, same stage-1 loss and number of epochs. (a) pays for one
caching pass plus epochs that read the cache; (b) runs the backbone on every image in
every epoch, as the reference implementation does. Prints both times and (b)/(a).

    python benchmarks/training_cost.py [--images 200] [--epochs 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import machine
from torch import nn

from protoquant.backbones import create_backbone
from protoquant.codebook import Codebook
from protoquant.config import BackboneConfig, CacheConfig, CodebookConfig
from protoquant.data import SyntheticParts
from protoquant.data.transforms import ViewTransform
from protoquant.features import build_cache
from protoquant.train import Stage1Loss, Subset, init_codebook


def epochs_from_cache(subset: Subset, loss_fn: Stage1Loss, epochs: int, batch: int) -> None:
    optimizer = torch.optim.Adam(loss_fn.codebook.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        for features, labels in subset.store.batches(subset.entries, batch, shuffle=True, generator=rng):
            loss = loss_fn(features, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def epochs_with_backbone(dataset, backbone, transform, loss_fn: Stage1Loss, epochs: int, batch: int) -> None:
    optimizer = torch.optim.Adam(loss_fn.codebook.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(dataset))
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            images = torch.stack([transform(dataset.load_image(int(i)), int(i), 0) for i in rows])
            features = backbone(images.contiguous(memory_format=torch.channels_last))  # (B, D, H, W)
            loss = loss_fn(features, torch.from_numpy(dataset.labels[rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    dataset = SyntheticParts("train", num_classes=10, images_per_class=args.images // 10)
    backbone = create_backbone(BackboneConfig()).to(memory_format=torch.channels_last)
    info = backbone.info
    transform = ViewTransform(224, 1.0, info.mean, info.std)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = build_cache(dataset, backbone, transform, views=1, config=CacheConfig(root=tmp))
        cache_seconds = time.perf_counter() - start
        subset = Subset(store, store.entries())
        codes = init_codebook(subset, CodebookConfig(num_codes=args.codes, kmeans_patches=5000), seed=0)
        probe = nn.Linear(info.channels, dataset.num_classes).requires_grad_(False)
        start = time.perf_counter()
        epochs_from_cache(subset, Stage1Loss(Codebook(codes), probe, 1.0), args.epochs, args.batch)
        cached_epochs = time.perf_counter() - start
    start = time.perf_counter()
    epochs_with_backbone(
        dataset, backbone, transform, Stage1Loss(Codebook(codes), probe, 1.0), args.epochs, args.batch
    )
    rerun = time.perf_counter() - start
    cached = cache_seconds + cached_epochs
    print(f"machine: {machine()}")
    print(
        f"{len(dataset)} images, MobileNetV2 224 px, K={args.codes}, {args.epochs} stage-1 epochs, batch {args.batch}"
    )
    print(
        f"(a) cache once + epochs from cache: {cached:.1f} s  (caching {cache_seconds:.1f} s, epochs {cached_epochs:.1f} s)"
    )
    print(f"(b) backbone re-run every epoch:    {rerun:.1f} s")
    print(f"ratio (b)/(a): {rerun / cached:.1f}x  (target >= 10)")


if __name__ == "__main__":
    main()
