"""Benchmark 3: caching throughput vs the bare backbone forward pass; bf16 autocast vs fp32.

Caching = decode + transform + backbone + fp16 shard writes (the real `build_cache`).
Bare = the backbone alone on a ready tensor batch of the same size. Also reports bf16
autocast speed and how close its features are to fp32 (mean patch cosine, and the
linear-probe accuracy trained on each).

    python benchmarks/caching.py [--images 256] [--workers 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import machine

from protoquant.backbones import create_backbone
from protoquant.config import BackboneConfig, CacheConfig, ProbeConfig
from protoquant.data import SyntheticParts
from protoquant.data.splits import stratified_split
from protoquant.data.transforms import ViewTransform
from protoquant.features import build_cache
from protoquant.train import Subset, evaluate_probe, train_probe


def bare_throughput(backbone, count: int, batch: int, bf16: bool) -> float:
    images = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(count // batch):
            backbone(images)
    return (count // batch) * batch / (time.perf_counter() - start)


def cache(dataset, backbone, transform, root: str, bf16: bool, workers: int):
    config = CacheConfig(root=root, autocast_bf16=bf16, num_workers=workers)
    start = time.perf_counter()
    store = build_cache(dataset, backbone, transform, views=1, config=config)
    return store, len(dataset) / (time.perf_counter() - start)


def probe_accuracy(store) -> float:
    train, held = stratified_split(store.labels, 0.3, seed=0)
    val, test = np.array_split(held, 2)
    probe = train_probe(
        Subset(store, train),
        Subset(store, val),
        10,
        ProbeConfig(epochs=60),
        seed=0,
        device=torch.device("cpu"),
    )
    return evaluate_probe(probe, Subset(store, test), torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    dataset = SyntheticParts("test", num_classes=10, images_per_class=args.images // 10, seed=3)
    backbone = create_backbone(BackboneConfig()).to(memory_format=torch.channels_last)
    transform = ViewTransform(224, 1.0, backbone.info.mean, backbone.info.std)
    print(
        f"machine: {machine()}; {len(dataset)} synthetic images, MobileNetV2 224 px, batch 32, workers {args.workers}"
    )
    rows, stores = [], {}
    for bf16 in (False, True):
        bare = bare_throughput(backbone, len(dataset), 32, bf16)
        with tempfile.TemporaryDirectory() as tmp:
            store, rate = cache(dataset, backbone, transform, tmp, bf16, args.workers)
            stores[bf16] = (store.get(store.entries()), probe_accuracy(store))
        rows.append((("bf16" if bf16 else "fp32"), bare, rate))
    for precision, bare, rate in rows:
        print(
            f"{precision}: bare forward {bare:.1f} img/s, caching {rate:.1f} img/s, ratio {rate / bare:.2f} (target >= 0.9)"
        )
    (fp32, acc32), (bf16, acc16) = stores[False], stores[True]
    cosine = F.cosine_similarity(fp32, bf16, dim=1).mean()
    print(
        f"bf16 vs fp32 features: mean patch cosine {cosine:.4f}; probe test accuracy fp32 {acc32:.3f}, bf16 {acc16:.3f}"
    )
    print(f"bf16 caching speed-up: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
