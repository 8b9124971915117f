"""Seeded, stratified splits; validation is carved from train and never touches test."""

from __future__ import annotations

import numpy as np
import pytest

from protoquant.config import DataConfig
from protoquant.data import load_splits
from protoquant.data.base import SubsetDataset
from protoquant.data.splits import stratified_split, stratified_subset


def _labels(seed: int = 0) -> np.ndarray:
    counts = [10, 7, 2, 1, 25]  # unequal classes, one with a single image
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_split_is_a_disjoint_cover(fraction) -> None:
    labels = _labels()
    kept, held = stratified_split(labels, fraction, seed=0)
    assert len(np.intersect1d(kept, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
    assert np.array_equal(kept, np.sort(kept)) and np.array_equal(held, np.sort(held))
    if fraction == 0.0:
        assert len(held) == 0


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9])
def test_split_is_stratified(fraction) -> None:
    labels = _labels()
    kept, held = stratified_split(labels, fraction, seed=1)
    for label in np.unique(labels):
        members = int((labels == label).sum())
        n_held = int((labels[held] == label).sum())
        if members >= 2:  # every class with >= 2 images is in both parts
            assert 1 <= n_held <= members - 1
            assert n_held == max(1, min(members - 1, round(fraction * members)))
        elif fraction < 0.5:
            assert n_held == 0  # a single image stays in train
        assert n_held + int((labels[kept] == label).sum()) == members


def test_split_is_deterministic_per_seed() -> None:
    labels = _labels()
    first = stratified_split(labels, 0.3, seed=5)
    again = stratified_split(labels, 0.3, seed=5)
    other = stratified_split(labels, 0.3, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fractions(fraction) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(_labels(), fraction, seed=0)


def test_stratified_subset_caps_each_class() -> None:
    labels = _labels()
    chosen = stratified_subset(labels, 3, seed=0)
    assert np.array_equal(chosen, np.unique(chosen))
    for label, members in zip(*np.unique(labels, return_counts=True)):
        assert int((labels[chosen] == label).sum()) == min(3, members)
    assert np.array_equal(chosen, stratified_subset(labels, 3, seed=0))


def _root_indices(dataset) -> np.ndarray:
    """Indices into the root dataset, through any chain of subsets."""
    indices = np.arange(len(dataset))
    while isinstance(dataset, SubsetDataset):
        indices = dataset.indices[indices]
        dataset = dataset.parent
    return indices


def _root(dataset):
    while isinstance(dataset, SubsetDataset):
        dataset = dataset.parent
    return dataset


@pytest.mark.parametrize("max_train_per_class", [0, 5])
def test_load_splits_val_from_train_and_test_separate(max_train_per_class) -> None:
    config = DataConfig(
        synthetic_classes=3, synthetic_train_per_class=8, synthetic_test_per_class=3,
        val_fraction=0.25, max_train_per_class=max_train_per_class,
    )  # fmt: skip
    splits = load_splits(config, seed=0)
    assert (splits.train.split, splits.val.split, splits.test.split) == ("train", "val", "test")
    train_root, val_root = _root(splits.train), _root(splits.val)
    assert train_root is val_root and train_root.split == "train"
    assert _root(splits.test).split == "test" and _root(splits.test) is not train_root
    train_idx, val_idx = _root_indices(splits.train), _root_indices(splits.val)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    per_class = max_train_per_class or 8
    assert len(train_idx) + len(val_idx) == 3 * per_class
    assert set(splits.val.labels.tolist()) == {0, 1, 2} and set(splits.train.labels.tolist()) == {0, 1, 2}
    assert np.array_equal(splits.train.labels, train_root.labels[train_idx])
    assert len(splits.test) == 9
    # val and test are different images (the test split is a different official split)
    val_pixels = {np.asarray(splits.val.load_image(i)).tobytes() for i in range(len(splits.val))}
    assert not any(
        np.asarray(splits.test.load_image(i)).tobytes() in val_pixels for i in range(len(splits.test))
    )
    assert splits.val.fingerprint() != splits.train.fingerprint() != splits.test.fingerprint()


def test_load_splits_is_deterministic_per_seed() -> None:
    config = DataConfig(
        synthetic_classes=3, synthetic_train_per_class=8, synthetic_test_per_class=2, val_fraction=0.25
    )
    first, again, other = load_splits(config, 0), load_splits(config, 0), load_splits(config, 1)
    assert np.array_equal(_root_indices(first.val), _root_indices(again.val))
    assert first.val.fingerprint() == again.val.fingerprint()
    assert not np.array_equal(_root_indices(first.val), _root_indices(other.val))


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="synthetic"):
        load_splits(DataConfig(dataset="imagenet-21k"), seed=0)
