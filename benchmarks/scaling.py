"""Benchmark 4: head training time vs dataset size (1x, 4x, 16x cached feature maps).

Stage 1 (codebook, fixed epochs) and stage 2 (scores + class layer) run on synthetic
feature caches written in the real cache format (random non-negative fp16 maps, the
shape of MobileNetV2's 7 x 7 x 1280), so only the amount of data changes.

    python benchmarks/scaling.py [--base 500]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine
from torch import nn

from protoquant.cache.store import FeatureStore
from protoquant.cache.synthetic import write_cache
from protoquant.cache.view import CacheView
from protoquant.config import CodebookConfig, HeadConfig
from protoquant.train.codebook import train_codebook
from protoquant.train.head import train_head

GRID, CHANNELS, CLASSES, SHARD = (7, 7), 1280, 10, 512


def fake_cache(folder: Path, entries: int, seed: int) -> FeatureStore:
    """A complete cache folder of `entries` random maps (the library's own cache format)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, entries)

    def maps(first: int, count: int) -> np.ndarray:
        out = np.maximum(rng.normal(0, 1, (count, *GRID, CHANNELS)), 0).astype(np.float16)  # (n, H, W, D)
        out[np.arange(count), 0, 0, labels[first : first + count]] += 4  # a learnable signal
        return out

    return write_cache(folder, labels, maps, grid=GRID, channels=CHANNELS, shard_size=SHARD)


def train_time(store: FeatureStore, val: CacheView) -> float:
    device = torch.device("cpu")
    train = CacheView(store, store.entries())
    probe = nn.Linear(CHANNELS, CLASSES).requires_grad_(False)
    start = time.perf_counter()
    config = CodebookConfig(num_prototypes=256, epochs=2, kmeans_patches=5000, kmeans_iters=5)
    quantizer, _ = train_codebook(train, val, probe, config, seed=0, device=device)
    train_head(
        quantizer.codebook.detach(),
        quantizer.usage,
        train,
        val,
        CLASSES,
        HeadConfig(epochs=20),
        seed=0,
        device=device,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=int, default=500)
    args = parser.parse_args()
    print(f"machine: {machine()}; stage 1 (K=256, 2 epochs) + stage 2 (20 epochs) on 7x7x1280 maps")
    print("| cached maps | seconds | x of 1x time | seconds per 1k maps |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        val_store = fake_cache(Path(tmp) / "val", 200, seed=99)
        val = CacheView(val_store, val_store.entries())
        base = None
        for factor in (1, 4, 16):
            entries = args.base * factor
            seconds = train_time(fake_cache(Path(tmp) / f"x{factor}", entries, seed=factor), val)
            base = base or seconds
            print(
                f"| {entries} ({factor}x) | {seconds:.1f} | {seconds / base:.2f} | {1000 * seconds / entries:.2f} |"
            )


if __name__ == "__main__":
    main()
