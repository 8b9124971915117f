"""Running the backbone over the shards of a cache that this process claims, and writing them.

Three things overlap: DataLoader workers decode the next batches, the device computes this
batch (its results are collected one batch later), and a thread writes full shards. The
batch sampler claims each shard (`ShardLocks`) just before producing its batches and the writer
releases the claim once the shard is written, so at most the shards in flight (DataLoader
prefetch, the one being assembled, the writer's queue) hold a lock file open. Where JPEG files
are decoded on the device (`cache.decode`), the workers only read their bytes and each batch is
decoded on the device just before the backbone runs on it (`protoquant.cache.decode`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from protoquant import distributed, progress
from protoquant.backbones.features import STORAGE_DTYPE, patch_features
from protoquant.backbones.frozen import FrozenBackbone
from protoquant.cache.decode import DeviceDecodeViews, collate_views
from protoquant.cache.lock import ShardLocks
from protoquant.cache.manifest import NOT_STARTED, Plan, shard_state
from protoquant.cache.shards import ShardWriter
from protoquant.config import CacheConfig
from protoquant.data.transforms import ViewTransform

logger = logging.getLogger(__name__)


class ClaimedBatches:
    """Batches of entry ids (never straddling a shard) of the shards this process claims.

    Finished shards are skipped; a shard locked by another process goes to `skipped`. Each
    claimed shard is appended to `claimed` before its first batch is produced.
    """

    def __init__(self, plan: Plan, shards: list[int], locks: ShardLocks, batch_size: int) -> None:
        self.plan, self.shards, self.locks, self.batch_size = plan, shards, locks, batch_size
        self.skipped: list[int] = []
        self.claimed: deque[int] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            if shard_state(self.plan, shard) is None:
                continue
            if not self.locks.claim(shard):
                self.skipped.append(shard)
                continue
            state = shard_state(self.plan, shard)  # another process may have finished it meanwhile
            if state is None:
                self.locks.release(shard)
                continue
            if state != NOT_STARTED:
                logger.warning("%s: shard %d: %s; recomputing it", self.plan.folder, shard, state)
            self.claimed.append(shard)
            first, rows = self.plan.rows(shard)
            for start in range(first, first + rows, self.batch_size):
                yield list(range(start, min(start + self.batch_size, first + rows)))


def _launch(
    backbone: FrozenBackbone,
    pixels: torch.Tensor,
    transform: ViewTransform,
    device: torch.device,
    config: CacheConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
    """Start one batch: normalise on the device, run the backbone, start the copy back.

    Returns (B, H, W, D) float16 features, their (B, D) float32 spatial mean, (B,) whether each
    entry's values are all finite (checked on the device, where it costs nothing next to the
    backbone, instead of by the shard writer), and on CUDA the event after which the host
    tensors are filled (the copy runs while the next batch loads).
    """
    images = transform.normalise(pixels.to(device, non_blocking=True))
    features = patch_features(backbone, images, config, dtype=STORAGE_DTYPE)  # (B, D, H, W)
    stored = features.permute(0, 2, 3, 1).contiguous()  # (B, H, W, D) float16
    pooled = stored.float().mean(dim=(1, 2))  # (B, D): the mean of what is stored
    finite = torch.isfinite(stored.flatten(1)).all(dim=1) & torch.isfinite(pooled).all(dim=1)  # (B,)
    if device.type != "cuda":
        return stored, pooled, finite, None
    host = tuple(t.to("cpu", non_blocking=True) for t in (stored, pooled, finite))
    event = torch.cuda.Event()
    event.record()
    return *host, event


class _Assembler:
    """Collects finished batches into shards, in order, and hands each full shard to the writer."""

    def __init__(self, plan: Plan, sampler: ClaimedBatches, writer: ShardWriter, split: str, bar) -> None:
        self.plan, self.sampler, self.writer, self.bar = plan, sampler, writer, bar
        ctx = distributed.context()
        self.who = {"split": split, "rank": ctx.rank, "world": ctx.world_size}
        self.who |= {"pid": os.getpid(), "host": socket.gethostname()}
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (features, pooled, finite)

    def add(
        self,
        features: torch.Tensor,
        pooled: torch.Tensor,
        finite: torch.Tensor,
        event: torch.cuda.Event | None,
    ) -> None:
        if event is not None:
            event.synchronize()
        self.chunks.append((features.numpy(), pooled.numpy(), finite.numpy()))
        self.bar.update(len(features))  # per batch, once its features are on the host
        shard = self.sampler.claimed[0]
        first, count = self.plan.rows(shard)
        if sum(len(chunk[0]) for chunk in self.chunks) == count:
            audit = {"shard": shard, "first": first, "count": count} | self.who  # who wrote it
            features, pooled, finite = (list(blocks) for blocks in zip(*self.chunks))  # row blocks, unjoined
            self.sampler.claimed.popleft()
            release = partial(self.sampler.locks.release, shard)
            self.writer.submit(self.plan.folder, shard, features, pooled, audit, finite, done=release)
            self.chunks = []


def compute_shards(
    plan: Plan,
    shards: list[int],
    views: Dataset,
    backbone: FrozenBackbone,
    device: torch.device,
    config: CacheConfig,
    locks: ShardLocks,
    workers: int,
) -> list[int]:
    """Run the backbone over the unfinished shards of `shards` this process can claim and write
    each when complete. `views` maps an entry to (3, S, S) uint8 pixels, or is a
    `DeviceDecodeViews` (batches decoded on the device), and has `dataset` and `transform`.
    Returns the shards skipped because another process held them."""
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    on_device = isinstance(views, DeviceDecodeViews)
    sampler = ClaimedBatches(plan, shards, locks, config.batch_size)
    entries = sum(plan.rows(s)[1] for s in shards if shard_state(plan, s) is not None)
    desc = f"caching {views.dataset.name}/{views.dataset.split}"
    bar = progress.bar(total=entries, desc=desc, unit="img")  # one view = one image through the backbone
    # One DataLoader for every shard this process computes, so workers stay alive and busy.
    loader = DataLoader(  # its own generator: worker seeds are not drawn from the caller's global RNG
        views,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
        collate_fn=collate_views if on_device else None,
    )
    writer = ShardWriter()
    assembler = _Assembler(plan, sampler, writer, f"{views.dataset.name}/{views.dataset.split}", bar)
    pending = None
    try:
        with torch.inference_mode():
            for batch in loader:
                pixels = views.device_pixels(batch, device) if on_device else batch  # (B, 3, S, S) uint8
                launched = _launch(backbone, pixels, views.transform, device, config)
                if pending is not None:
                    assembler.add(*pending)
                pending = launched
    finally:  # also after a failure to read or compute: the last launched batch may complete a shard
        try:
            if pending is not None and not writer.failed:
                assembler.add(*pending)
        finally:
            writer.close()
            bar.close()
    return sampler.skipped
