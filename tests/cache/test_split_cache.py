"""evaluate --split train, audit and the gallery read view 0 of the training cache instead of building a 1-view copy."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from protoquant.cache.build import build_cache
from protoquant.cache.split import split_store, training_cache
from protoquant.cache.view import CacheView
from protoquant.data import load_splits
from protoquant.explain.gallery import build_gallery, training_subset
from protoquant.metrics import MetricSettings, evaluate_metrics
from protoquant.metrics.context import EvalContext
from protoquant.metrics.evaluate import audit_checkpoint, evaluate_checkpoint
from protoquant.model import ProtoQuant

METRICS = ["accuracy", "size", "grounding", "purity"]


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """(checkpoint, model, training split, a forced 1-view cache of it in a separate root,
    the run's cache folders before any test here ran)."""
    checkpoint = Path(tiny_run.config.out) / "model"
    existing = folders(tiny_run.result.caches.train.store.folder.parent)
    model = ProtoQuant.load(checkpoint)
    train = load_splits(model.config.data, model.config.seed).train
    root = tmp_path_factory.mktemp("one_view")
    forced = build_cache(
        train, model.backbone, model.transform, views=1, config=replace(model.config.cache, root=str(root))
    )
    return checkpoint, model, train, forced, existing


def folders(root: Path) -> set[Path]:
    return set(root.iterdir())


def test_the_lookup_finds_the_training_cache_by_its_key(tiny_run, trained):
    _, model, train, _, _ = trained
    store = training_cache(model, train, torch.device("cpu"))
    assert store is not None and store.views == 2
    assert store.folder == tiny_run.result.caches.train.store.folder
    test = load_splits(model.config.data, model.config.seed).test
    assert training_cache(model, test, torch.device("cpu")) is None  # the test split has no 2-view cache


def test_view_zero_of_the_training_cache_is_the_one_view_cache(trained):
    _, model, train, forced, _ = trained
    store = split_store(model, train, torch.device("cpu"))
    assert store.views == 2
    plain = store.entries(first_view_only=True)
    assert np.array_equal(store.image_index[plain], np.arange(len(train)))
    assert torch.equal(store.get(plain), forced.get(forced.entries()))


def test_entries_of_maps_images_to_view_zero_entries(trained):
    _, model, train, _, _ = trained
    store = split_store(model, train, torch.device("cpu"))
    ctx = EvalContext(model, train, MetricSettings(), torch.device("cpu"), store)
    assert ctx.entries_of(np.array([0, 3, 1])).tolist() == [0, 6, 2]  # image i -> entry 2 i


def test_evaluate_train_split_builds_no_cache_and_matches_a_one_view_cache(tiny_run, trained):
    checkpoint, model, train, forced, before = trained
    root = tiny_run.result.caches.train.store.folder.parent
    report = evaluate_checkpoint(checkpoint, split="train", metrics=METRICS, batch_size=8)
    assert folders(root) == before  # nothing built, nothing new
    settings = MetricSettings(seed=model.config.seed, batch_size=8)
    train_view = CacheView(forced, forced.entries())
    expected = evaluate_metrics(model, train, METRICS, settings=settings, store=forced, train=train_view)
    assert report["num_images"] == len(train)
    for name in METRICS:
        assert report[name] == expected[name], name
    assert report["rows"]["grounding"] == expected["rows"]["grounding"]
    assert report["accuracy"] == pytest.approx(expected["accuracy"])


def test_audit_builds_no_cache_and_matches_a_one_view_cache(tiny_run, trained):
    checkpoint, model, train, forced, before = trained
    root = tiny_run.result.caches.train.store.folder.parent
    report = audit_checkpoint(checkpoint, against=checkpoint, batch_size=8)
    assert folders(root) == before
    settings = MetricSettings(seed=model.config.seed, batch_size=8)
    expected = evaluate_metrics(
        model,
        train,
        ["grounding"],
        settings=settings,
        store=forced,
        train=CacheView(forced, forced.entries()),
    )
    assert report["grounding"] == expected["grounding"]
    assert report["rows"]["grounding"] == expected["rows"]["grounding"]  # nearest image, cell, usage
    assert report["drift"]["num_nearest_changed"] == 0 and "noise" in report


def test_the_gallery_reads_view_zero_of_the_training_cache(tiny_run, trained):
    _, model, train, forced, before = trained
    view = training_subset(model)
    assert folders(tiny_run.result.caches.train.store.folder.parent) == before
    assert view.store.folder == tiny_run.result.caches.train.store.folder and view.store.views == 2
    assert torch.equal(view.store.get(view.entries), forced.get(forced.entries()))


def test_without_a_training_cache_the_gallery_builds_one_view_only(trained, tmp_path):
    checkpoint, _, train, forced, _ = trained
    model = ProtoQuant.load(checkpoint)
    model.config = replace(model.config, cache=replace(model.config.cache, root=str(tmp_path)))
    view = training_subset(model)
    assert view.store.views == 1 and view.store.folder.parent == tmp_path
    assert [p.name for p in folders(tmp_path) if p.is_dir()] == [view.store.folder.name]
    assert np.array_equal(view.store.image_index[view.entries], np.arange(len(train)))
    from_one_view = build_gallery(model, view, top_k=3)
    reference = build_gallery(model, CacheView(forced, forced.entries()), top_k=3)
    assert torch.equal(from_one_view.image, reference.image) and torch.equal(
        from_one_view.cell, reference.cell
    )
    assert torch.equal(from_one_view.similarity, reference.similarity)
