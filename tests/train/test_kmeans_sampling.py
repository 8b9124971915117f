"""k-means initialisation reads only the sampled cells of a written cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import protoquant.cache.store as store_module
from protoquant.cache.store import FeatureStore
from protoquant.cache.synthetic import write_cache
from protoquant.cache.view import CacheView
from protoquant.codebook import kmeans_init, to_patches
from protoquant.config import CodebookConfig
from protoquant.train.codebook import init_codebook, sample_patches

GRID, CHANNELS, SHARD_SIZE, ENTRIES = (3, 4), 5, 7, 20  # 3 shards, the last one partial


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    maps = np.random.default_rng(0).standard_normal((ENTRIES, *GRID, CHANNELS)).astype(np.float16)
    labels = np.arange(ENTRIES) % 3
    folder = tmp_path_factory.mktemp("cells_cache")
    return write_cache(
        folder,
        labels,
        lambda first, count: maps[first : first + count],
        grid=GRID,
        channels=CHANNELS,
        shard_size=SHARD_SIZE,
    )


@pytest.fixture(scope="module")
def subset(store) -> CacheView:
    """An unsorted subset spanning all shards."""
    return CacheView(store, np.random.default_rng(1).permutation(ENTRIES)[:15])


def test_cells_are_the_cells_of_the_full_maps(store) -> None:
    rng = np.random.default_rng(2)
    entries, rows, cols = (
        rng.integers(0, ENTRIES, 40),
        rng.integers(0, GRID[0], 40),
        rng.integers(0, GRID[1], 40),
    )
    expected = store.get(entries)[np.arange(40), :, rows, cols]  # (40, D)
    cells = store.cells(entries, rows, cols)
    assert cells.dtype == torch.float32 and torch.equal(cells, expected)
    assert store.cells([], [], []).shape == (0, CHANNELS)


def test_cells_reject_bad_indices(store) -> None:
    with pytest.raises(IndexError, match=f"entry {ENTRIES} is out of range 0..{ENTRIES - 1}"):
        store.cells([0, ENTRIES], [0, 0], [0, 0])
    with pytest.raises(IndexError, match="col 4 is out of range 0..3"):
        store.cells([0], [0], [GRID[1]])
    with pytest.raises(ValueError, match="equally long entries, rows and cols, got 2, 1 and 1"):
        store.cells([0, 1], [0], [0])


def test_sampled_patches_are_the_drawn_cells_of_the_full_maps(subset) -> None:
    cells = GRID[0] * GRID[1]
    picks = np.sort(np.random.default_rng(3).choice(len(subset.entries) * cells, size=50, replace=False))
    expected = to_patches(subset.store.get(subset.entries))[picks]  # (50, D), the full-map gather
    assert torch.equal(sample_patches(subset, 50, np.random.default_rng(3)), expected)


def test_sampling_is_deterministic_per_seed(subset) -> None:
    first = sample_patches(subset, 60, np.random.default_rng(4))
    assert torch.equal(first, sample_patches(subset, 60, np.random.default_rng(4)))
    assert not torch.equal(first, sample_patches(subset, 60, np.random.default_rng(5)))
    assert len(torch.unique(first, dim=0)) == 60  # without replacement


def test_more_patches_than_exist_returns_all_of_them(subset) -> None:
    everything = sample_patches(subset, 10**6, np.random.default_rng(6))
    assert torch.equal(everything, to_patches(subset.store.get(subset.entries)))


def test_kmeans_init_reads_only_the_sampled_cells(subset, monkeypatch) -> None:
    config = CodebookConfig(num_prototypes=4, kmeans_patches=37, kmeans_iters=3)
    expected = kmeans_init(
        sample_patches(subset, 37, np.random.default_rng(7)), 4, 3, torch.Generator().manual_seed(7)
    )
    reads, requested, real_preadv, real_cells = [], [], store_module.os.preadv, FeatureStore.cells

    def refuse_get(self, entries):
        raise AssertionError("k-means init read whole maps")

    def counting_preadv(fd, buffers, offset):
        reads.append(sum(memoryview(b).nbytes for b in buffers))
        return real_preadv(fd, buffers, offset)

    def counting_cells(self, entries, rows, cols):
        requested.append(len(entries))
        return real_cells(self, entries, rows, cols)

    monkeypatch.setattr(FeatureStore, "get", refuse_get)
    monkeypatch.setattr(FeatureStore, "cells", counting_cells)
    monkeypatch.setattr(store_module.os, "preadv", counting_preadv)
    codebook = init_codebook(subset, config, seed=7, device=torch.device("cpu"))
    assert requested == [37] and reads == [CHANNELS * 2] * 37  # one float16 D-vector per cell
    assert codebook.device.type == "cpu" and torch.equal(codebook, expected)  # CPU result unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_kmeans_init_runs_on_the_given_device(subset) -> None:
    config = CodebookConfig(num_prototypes=4, kmeans_patches=100, kmeans_iters=3)
    on_gpu = init_codebook(subset, config, seed=8, device=torch.device("cuda"))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), init_codebook(subset, config, seed=8), rtol=1e-4, atol=1e-5)
