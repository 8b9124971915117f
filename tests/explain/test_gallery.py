"""The prototype gallery: really the nearest cached patches; stored with the model; no backbone run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import protoquant.explain.gallery as gallery_module
from protoquant.cli import main
from protoquant.data.base import SubsetDataset
from protoquant.data.synthetic import SyntheticParts
from protoquant.explain.explanation import build_report, explain, load_patches, to_uint8
from protoquant.explain.gallery import (
    TENSOR_FIELDS,
    build_gallery,
    ensure_gallery,
    load_gallery,
    save_gallery,
    training_images,
)
from protoquant.explain.types import window_crop
from protoquant.gallery_files import GALLERY_FILES, GALLERY_META
from protoquant.model import ProtoQuant
from protoquant.render import write_report

JPEG_ERROR = 12.0  # mean absolute error (0..255) the stored JPEG pictures may have

TOP_K = 3


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run.result


@pytest.fixture(scope="module")
def gallery(run):
    return build_gallery(run.model, run.caches.train, top_k=TOP_K)  # all views given: view 0 is kept


@pytest.fixture(scope="module")
def similarities(run):
    """Brute force: cosine of every prototype to every view-0 patch, (K, N, H*W), and those entries."""
    store = run.caches.train.store
    entries = store.entries(first_view_only=True)
    features = store.get(entries)  # (N, D, H, W)
    codes = F.normalize(run.model.head.codebook, dim=1)  # (K, D)
    patches = F.normalize(features, dim=1).flatten(2)  # (N, D, H*W)
    return torch.einsum("kd,ndp->knp", codes, patches), entries


def test_top_patch_is_the_most_similar_cached_patch(gallery, similarities):
    sims, entries = similarities
    num_prototypes, _, cells = sims.shape
    best, flat = sims.reshape(num_prototypes, -1).max(dim=1)  # over every patch of every image
    assert torch.allclose(gallery.similarity[:, 0], best, atol=1e-5)
    for k in range(num_prototypes):
        entry, cell = int(entries[int(flat[k]) // cells]), int(flat[k]) % cells
        if (sims[k].flatten() > best[k] - 1e-6).sum() == 1:  # skip exact ties
            assert (int(gallery.entry[k, 0]), int(gallery.cell[k, 0])) == (entry, cell)


def test_top_k_are_the_best_distinct_images_in_order(run, gallery, similarities):
    sims, entries = similarities
    per_image = sims.amax(dim=2)  # (K, N) each image's best patch
    store = run.caches.train.store
    assert gallery.top_k == TOP_K
    for k in range(gallery.num_prototypes):
        values = gallery.similarity[k]
        assert torch.all(values[:-1] >= values[1:])
        assert len(set(gallery.image[k].tolist())) == TOP_K
        assert torch.allclose(values, per_image[k].topk(TOP_K).values, atol=1e-5)
        assert np.all(store.view_index[gallery.entry[k].numpy()] == 0)
        assert torch.equal(gallery.image[k], torch.from_numpy(store.image_index[gallery.entry[k].numpy()]))


def test_usage_counts_every_view0_patch_once(run, gallery):
    store = run.caches.train.store
    patches = len(store.entries(first_view_only=True)) * store.grid[0] * store.grid[1]
    assert int(gallery.usage.sum()) == patches
    assert float((gallery.usage.float() - run.model.head.usage).abs().sum()) <= 2  # ties may differ


def test_weighting_classes_match_the_class_layer(run, gallery):
    weights = run.model.head.class_weights
    for k in gallery.weighted_prototypes():
        classes = gallery.weighting_classes(k)
        assert classes[0][0] == int(weights[:, k].argmax())
        assert [w for _, w in classes] == sorted((w for _, w in classes), reverse=True)


def test_save_load_round_trip_and_staleness(run, gallery, tmp_path):
    checkpoint = run.model.save(tmp_path / "model")
    save_gallery(gallery, checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir() if "gallery" in p.name) == sorted(GALLERY_FILES)
    loaded = load_gallery(checkpoint, model=run.model)
    for name in TENSOR_FIELDS:
        assert torch.equal(getattr(loaded, name), getattr(gallery, name))
    for name in ("classes", "grid", "image_size", "model_hash", "source", "files"):
        assert getattr(loaded, name) == getattr(gallery, name)
    for name in ("crops", "sources"):
        stored, cut = getattr(loaded.pictures, name), getattr(gallery.pictures, name)
        assert stored.shape == cut.shape and np.abs(stored.astype(float) - cut).mean() < JPEG_ERROR
    other = ProtoQuant.load(checkpoint)
    other.head.class_layer.weight.data[0, 0] += 1.0
    with pytest.raises(ValueError, match="another model"):
        load_gallery(checkpoint, model=other)
    (checkpoint / GALLERY_FILES[0]).write_bytes(b"not a gallery")
    with pytest.raises(ValueError, match="rebuild"):
        load_gallery(checkpoint)
    with pytest.raises(FileNotFoundError, match="protoquant gallery"):
        load_gallery(tmp_path)


def test_pictures_are_the_windows_of_the_recorded_training_images(run, gallery):
    dataset = training_images(gallery)
    assert len(dataset) == len(run.splits.train)
    transform = run.model.transform
    for k in range(gallery.num_prototypes):
        refs = gallery.patches(k)
        patches = load_patches(gallery, refs)
        for ref in refs:
            patch = patches[ref.prototype, ref.rank]
            x1, y1, x2, y2 = patch.cell_box
            assert 0 <= x1 <= x2 < patch.crop.shape[1] and 0 <= y1 <= y2 < patch.crop.shape[0]
            view = transform(dataset.load_image(ref.image), ref.image, 0)  # (3, S, S)
            crop, cell = window_crop(to_uint8(view, transform.mean, transform.std), ref.cell, gallery.grid)
            assert np.array_equal(patch.crop, crop) and patch.cell_box == cell  # cut from this very view
            assert ref.label == int(dataset.labels[ref.image]) and ref.file == ""  # generated: no file
        source = gallery.source_picture(k)
        assert source.ref == refs[0] and source.similarity.shape == gallery.grid
        assert float(source.similarity.max()) == pytest.approx(float(gallery.similarity[k, 0]), abs=1e-4)


def _no_training_data(monkeypatch):
    """Every read of a training image, and every reload of the recorded split, now fails."""

    def gone(*args, **kwargs):
        raise AssertionError("the training data was read")

    monkeypatch.setattr(SyntheticParts, "load_image", gone)
    monkeypatch.setattr(SubsetDataset, "load_image", gone)
    monkeypatch.setattr(gallery_module, "load_splits", gone)


def test_gallery_crops_load_without_the_training_data(run, gallery, tmp_path, monkeypatch):
    checkpoint = run.model.save(tmp_path / "model")
    save_gallery(gallery, checkpoint)
    image = run.splits.test.load_image(0)
    _no_training_data(monkeypatch)
    model = ProtoQuant.load(checkpoint)
    explanation = explain(model, image, top_prototypes=2)  # the stored gallery, with its pictures
    stored = load_gallery(checkpoint)
    refs = [ref for item in explanation.predicted.prototypes for ref in item.patches]
    assert refs
    for (k, rank), patch in load_patches(stored, refs).items():
        cut = gallery.patch(gallery.patches(k)[rank])  # as cut from the training image at build time
        assert patch.cell_box == cut.cell_box
        assert np.abs(patch.crop.astype(float) - cut.crop).mean() < JPEG_ERROR
    report = build_report(model, [("test #0", image)], top_prototypes=2)
    index = write_report(report, tmp_path / "report")
    strips = list((index.parent / "img").glob("strip-*.jpg"))
    assert len(strips) == len(stored.weighted_prototypes())


def test_old_gallery_is_refused_with_the_fix_and_rebuilt(run, gallery, tmp_path):
    checkpoint = run.model.save(tmp_path / "model")
    save_gallery(gallery, checkpoint)
    meta = json.loads((checkpoint / GALLERY_META).read_text())
    (checkpoint / GALLERY_META).write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(ValueError, match="protoquant gallery --model"):
        load_gallery(checkpoint)
    model = ProtoQuant.load(checkpoint)
    rebuilt = ensure_gallery(model, checkpoint, top_k=2)
    assert rebuilt.top_k == 2 and load_gallery(checkpoint).top_k == 2


def test_ensure_gallery_reads_the_cache_without_the_backbone(run, tmp_path, monkeypatch):
    checkpoint = run.model.save(tmp_path / "model")
    model = ProtoQuant.load(checkpoint)

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran")

    monkeypatch.setattr(model.backbone, "forward", forbidden)
    built = ensure_gallery(model, checkpoint, top_k=2)
    assert built.top_k == 2 and (checkpoint / GALLERY_META).is_file()
    again = ensure_gallery(model, checkpoint, top_k=4)  # fresh: loaded, not rebuilt
    assert again.top_k == 2


def test_gallery_command_refreshes(run, tmp_path, capsys):
    checkpoint = run.model.save(tmp_path / "model")
    assert main(["gallery", "--model", str(checkpoint), "--top-k", "2"]) == 0
    assert load_gallery(checkpoint).top_k == 2
    assert main(["gallery", "--model", str(checkpoint), "--top-k", "4"]) == 0
    assert load_gallery(checkpoint).top_k == 4
    assert GALLERY_META in capsys.readouterr().out
