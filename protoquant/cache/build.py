"""The feature cache: the only place images meet the backbone during training.

A cache folder holds, for one (dataset split, backbone + weights, transform, views):
`manifest.json`, shards `features-NNNNN.npy` ((n, H, W, D) float16, memory-mapped on
read) and `pooled-NNNNN.npy` ((n, D) float32 spatial means for the linear probe).
Entries are image-major: entry e = image e // views, view e % views. Every file is
written to a temporary name and renamed, so a shard exists only once complete: an
interrupted run resumes with the missing shards, and a reader never sees half a shard.
Under torchrun each rank writes its own shards and rank 0 marks the cache complete.
`FeatureStore` (protoquant.cache.store) reads a finished cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from protoquant import distributed, progress
from protoquant.backbones.features import STORAGE_DTYPE, patch_features
from protoquant.backbones.frozen import FrozenBackbone
from protoquant.cache.shards import ShardWriter, atomic_write_bytes, shard_paths
from protoquant.cache.store import FeatureStore
from protoquant.config import CacheConfig
from protoquant.data.base import ImageDataset, stable_hash
from protoquant.data.transforms import ViewTransform

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the on-disk layout changes
MAX_AUTO_WORKERS = 16  # DataLoader workers chosen automatically, at most
AUTO_MIN_BATCHES = 4  # automatic workers only from this many batches per process


class ImageViews(Dataset):
    """Entry e of an ImageDataset (image e // views, view e % views) as uint8 pixels (3, S, S)."""

    def __init__(self, dataset: ImageDataset, transform: ViewTransform, views: int):
        self.dataset, self.transform, self.views = dataset, transform, views

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def __getitem__(self, entry: int) -> torch.Tensor:
        index, view = divmod(entry, self.views)
        return self.transform.pixels(self.dataset.load_image(index), index, view)


def _shard_batches(todo: list[int], size: int, total: int, batch_size: int) -> list[list[int]]:
    """Batches of entry ids that never straddle a shard, shard after shard."""
    batches = []
    for shard in todo:
        end = min((shard + 1) * size, total)
        batches += [list(range(i, min(i + batch_size, end))) for i in range(shard * size, end, batch_size)]
    return batches


def cache_key(
    dataset: ImageDataset, backbone: FrozenBackbone, transform: ViewTransform, views: int, config: CacheConfig
) -> dict:
    """Everything the cached features depend on; its hash names the cache folder."""
    info = backbone.info
    return {
        "format": CACHE_FORMAT,
        "dataset": dataset.name,
        "split": dataset.split,
        "dataset_fingerprint": dataset.fingerprint(),
        "num_images": len(dataset),
        "backbone": info.name,
        "weights_hash": info.weights_hash,
        "transform": transform.describe(),
        "views": views,
        "autocast_bf16": config.autocast_bf16,
        "grid_pool": config.grid_pool,
    }


@dataclass
class _Plan:
    folder: Path
    manifest: dict
    num_shards: int


def _plan(
    dataset: ImageDataset, backbone: FrozenBackbone, transform: ViewTransform, views: int, config: CacheConfig
) -> _Plan:
    key = cache_key(dataset, backbone, transform, views, config)
    digest = stable_hash(key)
    folder = Path(config.root) / f"{dataset.name}-{dataset.split}-{digest[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    num_entries = len(dataset) * views
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("digest") != digest:
            raise RuntimeError(
                f"{manifest_path}: manifest does not match its folder's key; delete the folder"
            )
    else:
        info = backbone.info
        manifest = {
            "key": key,
            "digest": digest,
            "num_entries": num_entries,
            "shard_size": config.shard_size,
            "channels": info.channels,
            "grid": [-(-side // config.grid_pool) for side in info.grid],
            "labels": dataset.labels.astype(int).tolist(),
            "classes": list(dataset.classes),
            "complete": False,
        }
    return _Plan(folder, manifest, -(-num_entries // manifest["shard_size"]))


def _write_manifest(plan: _Plan) -> None:
    atomic_write_bytes(plan.folder / "manifest.json", json.dumps(plan.manifest).encode())


def _launch(
    backbone: FrozenBackbone,
    pixels: torch.Tensor,
    transform: ViewTransform,
    device: torch.device,
    config: CacheConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
    """Start one batch: normalise on the device, run the backbone, start the copy back.

    Returns (B, H, W, D) float16 features, their (B, D) float32 spatial mean, and on CUDA the
    event after which both host tensors are filled (the copy runs while the next batch loads).
    """
    images = transform.normalise(pixels.to(device, non_blocking=True))
    features = patch_features(backbone, images, config, dtype=STORAGE_DTYPE)  # (B, D, H, W)
    stored = features.permute(0, 2, 3, 1).contiguous()  # (B, H, W, D) float16
    pooled = stored.float().mean(dim=(1, 2))  # (B, D): the mean of what is stored
    if device.type != "cuda":
        return stored, pooled, None
    host = stored.to("cpu", non_blocking=True), pooled.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return *host, event


def _finished(plan: _Plan) -> set[int]:
    """Shards whose two files exist (each is renamed into place only once fully written)."""
    return {s for s in range(plan.num_shards) if all(p.is_file() for p in shard_paths(plan.folder, s))}


class _Assembler:
    """Collects finished batches into shards, in order, and hands each full shard to the writer."""

    def __init__(self, plan: _Plan, todo: list[int], writer: ShardWriter, ctx: distributed.Context, progress):
        self.plan, self.writer, self.ctx, self.progress = plan, writer, ctx, progress
        self.remaining = list(todo)  # shards still to fill, in the order their batches arrive
        self.size, total = plan.manifest["shard_size"], plan.manifest["num_entries"]
        self.counts = {s: min(self.size, total - s * self.size) for s in todo}
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, features: torch.Tensor, pooled: torch.Tensor, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.synchronize()
        self.chunks.append((features.numpy(), pooled.numpy()))
        self.progress.update(len(features))  # per batch, once its features are on the host
        shard = self.remaining[0]
        count = self.counts[shard]
        if sum(len(f) for f, _ in self.chunks) == count:
            record = {"shard": shard, "first": shard * self.size, "count": count}
            record |= {"rank": self.ctx.rank, "world": self.ctx.world_size}  # who wrote it (audit trail)
            features = np.concatenate([f for f, _ in self.chunks])
            pooled = np.concatenate([p for _, p in self.chunks])
            self.writer.submit(self.plan.folder, shard, features, pooled, record)
            self.chunks, self.remaining = [], self.remaining[1:]


def loader_workers(config: CacheConfig, entries: int) -> int:
    """DataLoader workers for caching `entries` views: config.num_workers, or if < 0 (auto)
    every CPU this process may use (shared between the local ranks), up to MAX_AUTO_WORKERS,
    and none for fewer than AUTO_MIN_BATCHES batches (starting workers would cost more)."""
    if config.num_workers >= 0:
        return config.num_workers
    if entries < AUTO_MIN_BATCHES * config.batch_size:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cpus // local_ranks))


def _compute_shards(
    plan: _Plan,
    todo: list[int],
    views: ImageViews,
    backbone: FrozenBackbone,
    device: torch.device,
    config: CacheConfig,
    ctx: distributed.Context,
) -> None:
    """Run the backbone over the entries of shards `todo` and write each shard when complete.

    Three things overlap: DataLoader workers decode the next batches, the device computes
    this batch (its results are collected one batch later), and a thread writes full shards.
    """
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    size, total = plan.manifest["shard_size"], plan.manifest["num_entries"]
    batches = _shard_batches(todo, size, total, config.batch_size)
    entries = sum(len(b) for b in batches)
    workers = loader_workers(config, entries)
    desc = f"caching {views.dataset.name}/{views.dataset.split}"
    bar = progress.bar(total=entries, desc=desc, unit="img")  # one view = one image through the backbone
    # One DataLoader for every shard this process computes, so workers stay alive and busy.
    loader = DataLoader(views, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda")
    writer = ShardWriter()
    assembler = _Assembler(plan, todo, writer, ctx, bar)
    pending = None
    try:
        with torch.inference_mode():
            for pixels in loader:
                launched = _launch(backbone, pixels, views.transform, device, config)
                if pending is not None:
                    assembler.add(*pending)
                pending = launched
    finally:  # also after a failure: the last launched batch may complete a shard
        try:
            if pending is not None:
                assembler.add(*pending)
        finally:
            writer.close()
            bar.close()


def build_cache(
    dataset: ImageDataset,
    backbone: FrozenBackbone,
    transform: ViewTransform,
    *,
    views: int,
    config: CacheConfig,
    device: torch.device | str = "cpu",
    shards: list[int] | None = None,
) -> FeatureStore | None:
    """Cache features of every (image, view) of `dataset`, reusing any finished shards.

    Under torchrun each rank computes the shards s with s % world_size == rank, then
    all ranks meet and rank 0 marks the cache complete. `shards` overrides this
    process's share. Returns the store once every shard exists, else None.
    """
    device = torch.device(device)
    ctx = distributed.context()
    plan = _plan(dataset, backbone, transform, views, config)
    if plan.manifest["complete"]:
        logger.info("feature cache hit: %s", plan.folder)
        return FeatureStore(plan.folder)
    _write_manifest(plan)  # identical on every rank; written atomically
    mine = shards if shards is not None else range(ctx.rank, plan.num_shards, ctx.world_size)
    finished = _finished(plan)
    todo = [s for s in mine if s not in finished]
    _compute_shards(plan, todo, ImageViews(dataset, transform, views), backbone, device, config, ctx)
    distributed.barrier()
    if len(_finished(plan)) < plan.num_shards:
        return None
    if ctx.is_main:
        plan.manifest["complete"] = True
        _write_manifest(plan)
    distributed.barrier()
    return FeatureStore(plan.folder)
