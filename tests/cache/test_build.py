"""Feature cache: layout, equality with the backbone, reuse, invalidation and resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import protoquant.cache.build as cache_module
from protoquant.backbones.frozen import FrozenBackbone
from protoquant.cache import shards
from protoquant.cache.build import FeatureStore, build_cache, cache_key
from protoquant.config import CacheConfig
from protoquant.data.base import ImageDataset
from protoquant.data.transforms import ViewTransform

FP16_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}  # features are stored as float16


class CountingBackbone(FrozenBackbone):
    """The same frozen model, counting how many images go through it."""

    def __init__(self, base: FrozenBackbone) -> None:
        super().__init__(base.model, self._count)
        self._base_extract = base._extract
        self.info = base.info
        self.images = 0

    def _count(self, model, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return self._base_extract(model, images)


@pytest.fixture
def counting(convnext) -> CountingBackbone:
    return CountingBackbone(convnext)


def _transform(backbone: FrozenBackbone, **changes) -> ViewTransform:
    info = backbone.info
    return replace(ViewTransform(64, 1.0, info.mean, info.std, min_crop_scale=0.5, seed=0), **changes)


def _folders(config: CacheConfig) -> list[Path]:
    return sorted(p.parent for p in Path(config.root).glob("*/manifest.json"))


def _all_features(store: FeatureStore) -> torch.Tensor:
    return store.get(np.arange(len(store)))


# --- layout ----------------------------------------------------------------------------------


def test_entries_are_image_major_and_equal_the_backbone_output(counting, noise_images, cache_config) -> None:
    dataset, views = noise_images(5, num_classes=2), 3
    transform = _transform(counting)
    store = build_cache(dataset, counting, transform, views=views, config=cache_config)
    assert len(store) == 15 and store.views == views
    assert store.channels == counting.info.channels and store.grid == counting.info.grid
    assert np.array_equal(store.image_index, np.arange(15) // views)
    assert np.array_equal(store.view_index, np.arange(15) % views)
    assert np.array_equal(store.labels, np.repeat(dataset.labels, views))
    for entry in range(len(store)):
        index, view = divmod(entry, views)
        expected = counting(transform(dataset.load_image(index), index, view)[None])  # (1, D, H, W)
        torch.testing.assert_close(store.get([entry]), expected, **FP16_TOLERANCE)
    plain = counting(torch.stack([transform(dataset.load_image(i), i, 0) for i in range(5)]))
    torch.testing.assert_close(store.get(store.entries(first_view_only=True)), plain, **FP16_TOLERANCE)


def test_shards_are_float16_and_views_differ(counting, tiny_synthetic, cache_config) -> None:
    store = build_cache(tiny_synthetic, counting, _transform(counting), views=2, config=cache_config)
    assert all(shard.dtype == np.float16 for shard in store._shards)
    assert len(store._shards) == -(-len(store) // cache_config.shard_size)
    features = _all_features(store)
    assert not torch.equal(features[0::2], features[1::2])  # augmented views are not the plain view


def test_get_in_any_order_with_duplicates_across_shards(counting, tiny_synthetic, cache_config) -> None:
    store = build_cache(tiny_synthetic, counting, _transform(counting), views=2, config=cache_config)
    everything = _all_features(store)
    entries = np.array([35, 0, 9, 9, 17, 8, 7, 35, 24])
    assert torch.equal(store.get(entries), everything[entries])
    assert store.get(np.array([], dtype=np.int64)).shape == (0, store.channels, *store.grid)


def test_pooled_is_the_spatial_mean_of_the_features(counting, tiny_synthetic, cache_config) -> None:
    store = build_cache(tiny_synthetic, counting, _transform(counting), views=2, config=cache_config)
    pooled = store.pooled()
    assert pooled.shape == (len(store), store.channels) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, _all_features(store).mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_batches_cover_entries_once_with_matching_labels(counting, tiny_synthetic, cache_config) -> None:
    store = build_cache(tiny_synthetic, counting, _transform(counting), views=2, config=cache_config)
    entries = np.arange(3, 30)
    seen = []
    everything = _all_features(store)
    for features, labels in store.batches(entries, 5, shuffle=True, generator=np.random.default_rng(0)):
        assert len(features) == len(labels) <= 5
        rows = [
            int(np.flatnonzero(torch.all(everything.flatten(1) == f.flatten(), dim=1).numpy())[0])
            for f in features
        ]
        assert np.array_equal(store.labels[rows], labels.numpy())
        seen += rows
    assert sorted(seen) == list(entries)


# --- reuse and invalidation ------------------------------------------------------------------


def test_second_build_reuses_the_cache_without_running_the_backbone(
    counting, tiny_synthetic, cache_config
) -> None:
    transform = _transform(counting)
    first = build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config)
    assert counting.images == len(tiny_synthetic) * 2
    counting.images = 0
    second = build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config)
    assert counting.images == 0
    assert second.folder == first.folder and len(_folders(cache_config)) == 1
    assert torch.equal(_all_features(second), _all_features(first))


@pytest.mark.parametrize(
    "change",
    [{"image_size": 96}, {"min_crop_scale": 0.3}, {"crop_ratio": 0.875}, {"seed": 1}],
    ids=lambda change: next(iter(change)),
)
def test_changed_transform_gives_a_new_cache(counting, noise_images, cache_config, change) -> None:
    dataset = noise_images(4)
    first = build_cache(dataset, counting, _transform(counting), views=2, config=cache_config)
    counting.images = 0
    changed = _transform(counting, **change)
    second = build_cache(dataset, counting, changed, views=2, config=cache_config)
    assert second.folder != first.folder and len(_folders(cache_config)) == 2
    probe = 1 if "image_size" in change else 0  # one zero image gives the grid at another size
    assert counting.images == 8 + probe
    assert second.grid == tuple(counting(changed(dataset.load_image(0), 0, 0)[None]).shape[-2:])


def test_changed_dataset_views_or_backbone_give_new_caches(
    counting, backbone_factory, synthetic_factory, cache_config
) -> None:
    transform = _transform(counting)
    dataset = synthetic_factory(images_per_class=2)
    folders = {build_cache(dataset, counting, transform, views=1, config=cache_config).folder}
    counting.images = 0
    other_seed = synthetic_factory(images_per_class=2, seed=1)
    folders.add(build_cache(other_seed, counting, transform, views=1, config=cache_config).folder)
    assert counting.images == 6
    folders.add(
        build_cache(dataset.subset([0, 1, 2, 3]), counting, transform, views=1, config=cache_config).folder
    )
    folders.add(build_cache(dataset, counting, transform, views=2, config=cache_config).folder)
    other_weights = backbone_factory("timm/test_convnext", seed=1)
    folders.add(build_cache(dataset, other_weights, transform, views=1, config=cache_config).folder)
    bf16 = replace(cache_config, autocast_bf16=True)
    assert cache_key(dataset, counting, transform, 1, bf16) != cache_key(
        dataset, counting, transform, 1, cache_config
    )
    assert len(folders) == 5


def test_cache_folder_does_not_depend_on_batch_size(counting, noise_images, cache_config) -> None:
    dataset = noise_images(4)
    first = build_cache(dataset, counting, _transform(counting), views=1, config=cache_config)
    counting.images = 0
    second = build_cache(
        dataset, counting, _transform(counting), views=1, config=replace(cache_config, batch_size=3)
    )
    assert second.folder == first.folder and counting.images == 0


# --- resume ----------------------------------------------------------------------------------


def _shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.npy"))


def test_interrupted_build_resumes_with_only_the_missing_shards(
    counting, convnext, tiny_synthetic, cache_config, tmp_path
) -> None:
    transform = _transform(counting)
    partial = build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config, shards=[0, 2])
    assert partial is None
    assert counting.images == 2 * cache_config.shard_size
    (folder,) = _folders(cache_config)
    assert _shard_files(folder) == [
        "features-00000.npy",
        "features-00002.npy",
        "pooled-00000.npy",
        "pooled-00002.npy",
    ]
    assert json.loads((folder / "manifest.json").read_text())["complete"] is False
    with pytest.raises(RuntimeError, match="incomplete"):
        FeatureStore(folder)

    counting.images = 0
    store = build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config)
    assert counting.images == 36 - 2 * cache_config.shard_size
    assert store.folder == folder and store.manifest["complete"] and len(store) == 36
    assert len(_shard_files(folder)) == 2 * 5

    reference = build_cache(
        tiny_synthetic, convnext, transform, views=2, config=replace(cache_config, root=str(tmp_path / "ref"))
    )
    assert torch.equal(_all_features(store), _all_features(reference))
    assert torch.equal(store.pooled(), reference.pooled())


@pytest.mark.parametrize("lost", [["features-00004.npy", "pooled-00004.npy"], ["pooled-00001.npy"]])
def test_missing_shard_of_an_unfinished_cache_is_recomputed_alone(
    counting, tiny_synthetic, cache_config, lost
) -> None:
    """A run killed before marking the cache complete: only the shards without both files are redone."""
    transform = _transform(counting)
    store = build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config)
    before, pooled_before = _all_features(store), store.pooled().clone()
    manifest_path = store.folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["complete"] = False
    manifest_path.write_text(json.dumps(manifest))
    for name in lost:
        (store.folder / name).unlink()
    counting.images = 0
    resumed = build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config)
    shard = int(lost[0][-9:-4])
    assert counting.images == min(cache_config.shard_size, 36 - shard * cache_config.shard_size)
    assert resumed.manifest["complete"]
    assert torch.equal(_all_features(resumed), before) and torch.equal(resumed.pooled(), pooled_before)


def test_store_needs_a_manifest(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest"):
        FeatureStore(tmp_path)


def test_no_temporary_files_are_left_behind(counting, tiny_synthetic, cache_config) -> None:
    store = build_cache(tiny_synthetic, counting, _transform(counting), views=2, config=cache_config)
    names = sorted(p.name for p in store.folder.iterdir())
    assert not [n for n in names if n.startswith(".")]
    assert names.count("manifest.json") == 1
    assert (
        len([n for n in names if n.startswith("features-")])
        == len([n for n in names if n.startswith("pooled-")])
        == 5
    )


# --- the data path: workers, writer thread, failures -----------------------------------------


def test_dataloader_workers_give_the_same_cache(counting, tiny_synthetic, cache_config, tmp_path) -> None:
    transform = _transform(counting)
    alone = build_cache(
        tiny_synthetic, counting, transform, views=2, config=replace(cache_config, num_workers=0)
    )
    workers = replace(cache_config, root=str(tmp_path / "workers"), num_workers=2)
    shared = build_cache(tiny_synthetic, counting, transform, views=2, config=workers)
    assert torch.equal(_all_features(shared), _all_features(alone))
    assert torch.equal(shared.pooled(), alone.pooled())


def test_automatic_workers_share_the_cpus_between_local_ranks(monkeypatch) -> None:
    monkeypatch.setattr(cache_module.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    config = CacheConfig(batch_size=8)  # num_workers -1: automatic
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cache_module.loader_workers(config, 1000) == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cache_module.loader_workers(config, 1000) == 3
    assert cache_module.loader_workers(config, cache_module.AUTO_MIN_BATCHES * 8 - 1) == 0  # too few batches
    assert cache_module.loader_workers(replace(config, num_workers=5), 10) == 5  # explicit wins
    monkeypatch.setattr(cache_module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cache_module.loader_workers(config, 1000) == cache_module.MAX_AUTO_WORKERS


class FailingAt(ImageDataset):
    """tiny_synthetic whose image `bad` cannot be read (a crash in the middle of caching)."""

    def __init__(self, base, bad: int) -> None:
        self.base, self.bad = base, bad
        self.name, self.split, self.classes, self.labels = base.name, base.split, base.classes, base.labels

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def load_image(self, index: int):
        if index == self.bad:
            raise OSError(f"image {index} unreadable")
        return self.base.load_image(index)


def test_a_crash_keeps_every_finished_shard_and_resume_does_the_rest(
    counting, tiny_synthetic, cache_config
) -> None:
    transform, config = _transform(counting), replace(cache_config, num_workers=0)
    with pytest.raises(OSError, match="image 9 unreadable"):  # entries 18, 19 (views=2): shard 2
        build_cache(FailingAt(tiny_synthetic, 9), counting, transform, views=2, config=config)
    (folder,) = _folders(config)
    assert _shard_files(folder) == sorted(
        f"{kind}-{s:05d}.npy" for kind in ("features", "pooled") for s in (0, 1)
    )
    counting.images = 0
    store = build_cache(tiny_synthetic, counting, transform, views=2, config=config)
    assert counting.images == 36 - 2 * config.shard_size and store.manifest["complete"]


def test_a_failed_shard_write_is_raised(counting, tiny_synthetic, cache_config, monkeypatch) -> None:
    def disk_full(path, blocks):
        raise OSError(f"{path}: no space left on device")

    monkeypatch.setattr(shards, "atomic_save_npy", disk_full)
    with pytest.raises(OSError, match="no space left"):
        build_cache(tiny_synthetic, counting, _transform(counting), views=2, config=cache_config)
    (folder,) = _folders(cache_config)
    assert _shard_files(folder) == []
