"""Benchmark 1: training from the feature cache vs re-running the frozen backbone every epoch.

Same data, same initial codebook, same stage-1 loss and number of epochs. (a) pays for one
caching pass plus epochs that read the cache; (b) runs the backbone on every image in
every epoch, as the reference implementation does. Both load images the same way (a
DataLoader with the cache's automatic workers) and run on the same device. Prints both
times and (b)/(a). The epochs of (a) are timed twice, with the maps streamed from the shards
(cache.resident = 'stream', prefetched on a side stream on CUDA) and loaded once into device
memory ('device'); (a) itself reports the streamed epochs, as before.

    python benchmarks/training_cost.py [--images 200] [--epochs 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import machine, sync
from torch import nn
from torch.utils.data import DataLoader, Dataset

from protoquant.backbones.frozen import create_backbone
from protoquant.cache.build import ImageViews, build_cache, loader_workers
from protoquant.cache.resident import BatchSource, choose
from protoquant.cache.view import CacheView
from protoquant.codebook import VectorQuantizer
from protoquant.config import BackboneConfig, CacheConfig, CodebookConfig
from protoquant.data import SyntheticParts
from protoquant.data.transforms import ViewTransform
from protoquant.train.codebook import Stage1Loss, init_codebook


class Labelled(Dataset):
    """(uint8 pixels, label) of every image: what a training loop over images reads."""

    def __init__(self, views: ImageViews, labels: np.ndarray) -> None:
        self.views, self.labels = views, labels

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.views[index], int(self.labels[index])


def _step(loss_fn: Stage1Loss, optimizer, features: torch.Tensor, labels: torch.Tensor) -> None:
    loss = loss_fn(features, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def epochs_from_cache(source: BatchSource, loss_fn: Stage1Loss, epochs: int, batch: int, device) -> None:
    optimizer = torch.optim.Adam(loss_fn.quantizer.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        for features, labels in source.batches(rng.permutation(source.view.entries), batch):
            _step(loss_fn, optimizer, features, labels)
    sync(device)


def time_resident_modes(subset: CacheView, codes, probe, args, device) -> dict[str, tuple[float, float]]:
    """{mode: (seconds to set up the batch source, seconds of the epochs)} for 'stream' and 'device'."""
    times = {}
    for mode in ("stream", "device"):
        loss_fn = Stage1Loss(VectorQuantizer(codes), probe, 1.0).to(device)
        start = time.perf_counter()
        source = choose(subset, mode, CacheConfig().resident_margin, device)
        sync(device)
        loaded = time.perf_counter()
        epochs_from_cache(source, loss_fn, args.epochs, args.batch, device)
        times[mode] = (loaded - start, time.perf_counter() - loaded)
        del source
    return times


def epochs_with_backbone(dataset, backbone, transform, loss_fn, epochs: int, batch: int, device) -> None:
    optimizer = torch.optim.Adam(loss_fn.quantizer.parameters(), lr=1e-3)
    workers = loader_workers(CacheConfig(batch_size=batch), len(dataset))
    loader = DataLoader(
        Labelled(ImageViews(dataset, transform, 1), dataset.labels),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    for _ in range(epochs):
        for pixels, labels in loader:
            with torch.no_grad():
                images = transform.normalise(pixels.to(device, non_blocking=True))
                features = backbone(images.contiguous(memory_format=torch.channels_last))  # (B, D, H, W)
            _step(loss_fn, optimizer, features, labels.to(device))
    sync(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dataset = SyntheticParts("train", num_classes=10, images_per_class=args.images // 10)
    backbone = create_backbone(BackboneConfig()).to(device).to(memory_format=torch.channels_last)
    info = backbone.info
    transform = ViewTransform(224, 1.0, info.mean, info.std)
    with torch.no_grad():  # warm-up (CUDA context, kernel selection) outside both timings
        backbone(
            torch.randn(args.batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = CacheConfig(root=tmp, batch_size=args.batch)
        store = build_cache(dataset, backbone, transform, views=1, config=config, device=device)
        cache_seconds = time.perf_counter() - start
        subset = CacheView(store, store.entries())
        codes = init_codebook(subset, CodebookConfig(num_prototypes=args.codes, kmeans_patches=5000), seed=0)
        probe = nn.Linear(info.channels, dataset.num_classes).requires_grad_(False)
        resident = time_resident_modes(subset, codes, probe, args, device)
    cached_epochs = resident["stream"][1]
    loss_fn = Stage1Loss(VectorQuantizer(codes), probe, 1.0).to(device)
    start = time.perf_counter()
    epochs_with_backbone(dataset, backbone, transform, loss_fn, args.epochs, args.batch, device)
    rerun = time.perf_counter() - start
    cached = cache_seconds + cached_epochs
    print(f"machine: {machine()}; device {device}")
    print(
        f"{len(dataset)} images, MobileNetV2 224 px, K={args.codes}, {args.epochs} stage-1 epochs, batch {args.batch}"
    )
    print(
        f"(a) cache once + epochs from cache: {cached:.1f} s  (caching {cache_seconds:.1f} s, epochs {cached_epochs:.1f} s)"
    )
    print(f"(b) backbone re-run every epoch:    {rerun:.1f} s")
    print(f"ratio (b)/(a): {rerun / cached:.1f}x  (target >= 10)")
    print_resident(resident, cache_seconds, rerun, args.epochs)


def print_resident(resident: dict[str, tuple[float, float]], cache_seconds: float, rerun: float, epochs: int):
    """The stage-1 epochs of (a) by cache.resident, and (b) against caching + device-resident epochs."""
    print("stage-1 epochs from cache by cache.resident (setup = loading the maps, or nothing):")
    for mode, (setup, seconds) in resident.items():
        print(
            f"  {mode:<6}  setup {setup:6.2f} s  epochs {seconds:6.2f} s  ({1000 * seconds / epochs:.0f} ms/epoch)"
        )
    stream, device = resident["stream"][1], resident["device"][1]
    print(f"epochs stream/device: {stream / device:.2f}x")
    with_device = cache_seconds + sum(resident["device"])
    print(f"ratio (b)/(cache once + load + device-resident epochs): {rerun / with_device:.1f}x")


if __name__ == "__main__":
    main()
