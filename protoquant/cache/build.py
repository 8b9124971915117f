"""The feature cache: the only place images meet the backbone during training.

A cache folder holds, for one (dataset split, backbone + weights, transform, views):
`manifest.json`, shards `features-NNNNN.npy` ((n, H, W, D) float16, memory-mapped on
read) and `pooled-NNNNN.npy` ((n, D) float32 spatial means for the linear probe), and per
shard a record `shard-NNNNN.json` (sha256, size, shape of both files) written after them: a
shard is finished once its record matches its files, so an interrupted run resumes with the
unfinished shards. Entries are image-major: entry e = image e // views, view e % views.
Processes building one folder at once (two runs, torchrun ranks) claim shards with file locks
(`protoquant.cache.lock`), so none is computed twice; rank 0 then copies every record into
the manifest and marks it complete. A complete cache is verified when built again: bad shards
are recomputed alone. `FeatureStore` (protoquant.cache.store) reads and verifies a finished cache.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from protoquant import distributed
from protoquant.atomic import clean_leftovers
from protoquant.backbones.features import patch_features
from protoquant.backbones.frozen import FrozenBackbone
from protoquant.cache.decode import DeviceDecodeViews, decode_site
from protoquant.cache.extract import compute_shards
from protoquant.cache.files import MANIFEST_NAME
from protoquant.cache.lock import ShardLocks
from protoquant.cache.manifest import Plan, labels_problem, mark_complete, read_manifest, shard_state
from protoquant.cache.repair import repair
from protoquant.cache.store import FeatureStore
from protoquant.cache.verify import STAMP_NAME, CacheIntegrityError
from protoquant.config import CacheConfig
from protoquant.data.base import ImageDataset, stable_hash
from protoquant.data.transforms import ViewTransform
from protoquant.paths import cache_root

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the on-disk layout changes (2: shard records, checksums, locks)
MAX_AUTO_WORKERS = 16  # DataLoader workers chosen automatically, at most
AUTO_MIN_BATCHES = 4  # automatic workers only from this many batches per process
DIGEST_CHARS = 16  # digest characters in a cache folder's name
DERIVED_FIELDS = ("key", "digest", "num_entries", "channels", "grid", "classes")  # fixed by the key


class ImageViews(Dataset):
    """Entry e of an ImageDataset (image e // views, view e % views) as uint8 pixels (3, S, S)."""

    def __init__(self, dataset: ImageDataset, transform: ViewTransform, views: int):
        self.dataset, self.transform, self.views = dataset, transform, views

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def __getitem__(self, entry: int) -> torch.Tensor:
        index, view = divmod(entry, self.views)
        return self.transform.pixels(self.dataset.load_image(index), index, view)


def cache_key(
    dataset: ImageDataset,
    backbone: FrozenBackbone,
    transform: ViewTransform,
    views: int,
    config: CacheConfig,
    *,
    decode: str = "workers",
) -> dict:
    """Everything the cached features depend on; its hash names the cache folder.

    `decode` is the site that decodes the images (`protoquant.cache.decode.decode_site`); only
    'device' is recorded, so caches decoded in the workers keep the keys they always had.
    """
    info = backbone.info
    site = {"decode": "device"} if decode == "device" else {}
    if info.stages:  # combined stages run the same weights as the deepest of them alone
        site["stages"] = list(info.stages)
    return site | {
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


def _stored_grid(backbone: FrozenBackbone, transform: ViewTransform, config: CacheConfig) -> list[int]:
    """(H, W) of the stored maps: the backbone's grid at the transform's image size, pooled."""
    info = backbone.info
    if transform.image_size == info.image_size:
        return [-(-side // config.grid_pool) for side in info.grid]
    device = next(backbone.parameters()).device
    probe = torch.zeros(1, 3, transform.image_size, transform.image_size, device=device)
    with torch.inference_mode():
        return list(patch_features(backbone, probe, config).shape[-2:])  # (1, D, H, W) -> [H, W]


def _fresh_manifest(
    key: dict, dataset: ImageDataset, backbone: FrozenBackbone, grid: list[int], config
) -> dict:
    """The manifest of a new, empty cache, exactly as read back from JSON (lists, not tuples)."""
    manifest = {
        "key": key,
        "digest": stable_hash(key),
        "num_entries": len(dataset) * key["views"],
        "shard_size": config.shard_size,
        "channels": backbone.info.channels,
        "grid": grid,
        "labels": dataset.labels.astype(int).tolist(),
        "classes": list(dataset.classes),
        "complete": False,
    }
    return json.loads(json.dumps(manifest))


def _clear(folder: Path) -> None:
    """Remove every shard, record, stamp and audit log of `folder`."""
    for pattern in ("features-*.npy", "pooled-*.npy", "shard-*.json", STAMP_NAME, "written-rank*.jsonl"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def cache_folder(dataset: ImageDataset, key: dict, root: Path) -> Path:
    """The folder of the cache with `key` (or its manifest, which holds the key's digest) under
    `root`: <dataset>-<split>-<first 16 digest characters>."""
    digest = key["digest"] if "digest" in key else stable_hash(key)
    return root / f"{dataset.name}-{dataset.split}-{digest[:DIGEST_CHARS]}"


def _open_plan(expected: dict, dataset: ImageDataset, config: CacheConfig) -> Plan:
    """The folder named by the key, with its manifest; an unreadable manifest is replaced (its
    finished shards are kept), one that disagrees with the key or the labels (an edited manifest)
    is replaced and every shard recomputed, each after a warning."""
    folder = cache_folder(dataset, expected, cache_root(config))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return Plan(folder, expected)
    except ValueError as err:
        logger.warning("%s; writing a new manifest (finished shards are kept)", err)
        return Plan(folder, expected)
    differ = [f"field '{f}' differs from the key's" for f in DERIVED_FIELDS if manifest[f] != expected[f]]
    differ += [p] if (p := labels_problem(manifest, dataset.labels)) else []
    if differ:
        logger.warning("%s: %s; recomputing every shard of %s", folder / MANIFEST_NAME, differ[0], folder)
        _clear(folder)
        return Plan(folder, expected)
    return Plan(folder, manifest)


def _prepare(expected: dict, dataset: ImageDataset, config: CacheConfig) -> tuple[Plan, FeatureStore | None]:
    """Open the folder for building (rank 0): remove leftovers of dead processes, and verify a
    complete cache, whose bad shards are removed to be recomputed. Returns the plan and, when
    the cache is complete and sound, its store."""
    plan = _open_plan(expected, dataset, config)
    removed = clean_leftovers(plan.folder)
    if removed:
        logger.info("removed %d temporary files of dead processes from %s", len(removed), plan.folder)
    if plan.manifest["complete"]:
        try:
            store = FeatureStore(plan.folder, labels=dataset.labels)
        except CacheIntegrityError as err:
            repair(plan, err.problems, ShardLocks(plan.folder))
        else:
            repair(plan, [], ShardLocks(plan.folder))  # restores lost shard records
            return plan, store
    plan.write_manifest()
    return plan, None


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


def _compute(plan: Plan, todo: list[int], views: Dataset, backbone, device, config: CacheConfig) -> None:
    """Compute the unfinished shards of `todo`; wait for those another process held, and
    compute any it left unfinished (it died)."""
    locks = ShardLocks(plan.folder)
    try:
        while todo:
            entries = sum(plan.rows(s)[1] for s in todo if shard_state(plan, s) is not None)
            if entries == 0:
                return
            workers = loader_workers(config, entries)
            skipped = compute_shards(plan, todo, views, backbone, device, config, locks, workers)
            for shard in skipped:
                locks.wait(shard)
            todo = skipped
    finally:
        locks.release_all()


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
    Raises ValueError when the backbone gives non-finite features (nothing cached for that shard).
    """
    device, ctx = torch.device(device), distributed.context()
    site = decode_site(config.decode, device, dataset)
    key = cache_key(dataset, backbone, transform, views, config, decode=site)
    expected = _fresh_manifest(key, dataset, backbone, _stored_grid(backbone, transform, config), config)
    plan, store = _prepare(expected, dataset, config) if ctx.is_main else (None, None)
    distributed.barrier()  # rank 0 has checked, repaired and written the manifest
    if plan is None:
        plan = _open_plan(expected, dataset, config)
    if plan.manifest["complete"]:
        logger.info("feature cache hit: %s", plan.folder)
        return store or FeatureStore(plan.folder, labels=dataset.labels)
    mine = shards if shards is not None else range(ctx.rank, plan.num_shards, ctx.world_size)
    source = (DeviceDecodeViews if site == "device" else ImageViews)(dataset, transform, views)
    _compute(plan, list(mine), source, backbone, device, config)
    distributed.barrier()
    if any(shard_state(plan, s) is not None for s in range(plan.num_shards)):
        return None
    if ctx.is_main:
        mark_complete(plan)
    distributed.barrier()
    return FeatureStore(plan.folder, labels=dataset.labels)
