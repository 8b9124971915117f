"""The cached view-0 features of a split, reusing the training cache where it already holds them.

Training caches its training split with `cache.train_views` views, and view 0 is exactly the
evaluation view (the model's own transform). So before building a 1-view cache of a split,
`split_store` looks the training cache up by its key (nothing is computed: the key is the
dataset's fingerprint, the backbone's weights hash and the transform) and, when it exists and is
complete, returns it. Readers must then use only its view-0 entries
(`store.entries(first_view_only=True)`) and map entries to images with `store.image_index`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

import protoquant
from protoquant.cache.build import FeatureStore, build_cache, cache_folder, cache_key
from protoquant.cache.manifest import read_manifest
from protoquant.cache.verify import CacheIntegrityError
from protoquant.data.base import ImageDataset
from protoquant.paths import cache_root

logger = logging.getLogger(__name__)

SITE_FIELDS = ("decode",)  # key fields naming where images were decoded, not what the features are


def _candidates(dataset: ImageDataset, key: dict, root: Path) -> list[Path]:
    """Folders that may hold `key`: the one named by it first, then the split's others (a cache
    whose images were decoded elsewhere, e.g. on the accelerator, has another digest)."""
    exact = cache_folder(dataset, key, root)
    others = sorted(p for p in root.glob(f"{dataset.name}-{dataset.split}-*") if p != exact)
    return [exact, *others]


def _same_features(stored: dict, expected: dict) -> bool:
    drop = lambda key: {k: v for k, v in key.items() if k not in SITE_FIELDS}  # noqa: E731
    return drop(stored) == drop(expected)


def _find_complete(dataset: ImageDataset, key: dict, root: Path) -> Path | None:
    """The first complete cache folder whose manifest holds `key` (decode site aside), read only."""
    expected = json.loads(json.dumps(key))  # tuples as lists, as the manifest stores them
    for folder in _candidates(dataset, key, root):
        try:
            manifest = read_manifest(folder)
        except (FileNotFoundError, ValueError):
            continue
        if manifest["complete"] and _same_features(manifest["key"], expected):
            return folder
    return None


def training_cache(
    model: protoquant.ProtoQuant, dataset: ImageDataset, device: torch.device
) -> FeatureStore | None:
    """The `cache.train_views`-view cache of `dataset` when it exists and is complete, else None.

    Only looked up (manifests read, shards verified as every store is); nothing is computed unless
    the complete cache fails verification, when `build_cache` repairs its bad shards alone.
    """
    config = model.config.cache
    if config.train_views <= 1:
        return None  # the 1-view cache is the one split_store builds anyway
    key = cache_key(dataset, model.backbone, model.transform, config.train_views, config)
    folder = _find_complete(dataset, key, cache_root(config))
    if folder is None:
        return None
    try:
        store = FeatureStore(folder, labels=dataset.labels)
    except CacheIntegrityError as err:
        logger.warning("%s; repairing the training cache %s", err, folder)
        return build_cache(
            dataset, model.backbone, model.transform, views=config.train_views, config=config, device=device
        )
    except ValueError as err:  # labels that differ from the dataset's: not this split's cache
        logger.warning("%s; not reusing it", err)
        return None
    logger.info("reusing view 0 of the training cache %s", folder)
    return store


def split_store(model: protoquant.ProtoQuant, dataset: ImageDataset, device: torch.device) -> FeatureStore:
    """Cached view-0 features of `dataset`: the training cache when complete (see the module
    docstring), else a 1-view cache (built on first use, then read from disk)."""
    reused = training_cache(model, dataset, device)
    if reused is not None:
        return reused
    return build_cache(
        dataset, model.backbone, model.transform, views=1, config=model.config.cache, device=device
    )
