"""The prototype gallery: really the nearest cached patches; stored with the model; no backbone run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protoquant.cli import main
from protoquant.explain.explanation import load_patches, to_uint8
from protoquant.explain.gallery import (
    GALLERY_META,
    GALLERY_TENSORS,
    TENSOR_FIELDS,
    build_gallery,
    ensure_gallery,
    load_gallery,
    save_gallery,
    training_images,
)
from protoquant.model import ProtoQuant

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
    assert sorted(p.name for p in checkpoint.iterdir() if "gallery" in p.name) == [
        GALLERY_META,
        GALLERY_TENSORS,
    ]
    loaded = load_gallery(checkpoint, model=run.model)
    for name in TENSOR_FIELDS:
        assert torch.equal(getattr(loaded, name), getattr(gallery, name))
    for name in ("classes", "grid", "image_size", "model_hash", "source"):
        assert getattr(loaded, name) == getattr(gallery, name)
    other = ProtoQuant.load(checkpoint)
    other.head.class_layer.weight.data[0, 0] += 1.0
    with pytest.raises(ValueError, match="another model"):
        load_gallery(checkpoint, model=other)
    (checkpoint / GALLERY_TENSORS).write_bytes(b"not a gallery")
    with pytest.raises(ValueError, match="rebuild"):
        load_gallery(checkpoint)
    with pytest.raises(FileNotFoundError, match="protoquant gallery"):
        load_gallery(tmp_path)


def test_patches_load_from_the_recorded_training_split(run, gallery):
    dataset = training_images(gallery)
    assert len(dataset) == len(run.splits.train)
    refs = gallery.patches(0)
    patches = load_patches(gallery, refs)
    transform = run.model.transform
    for ref in refs:
        patch = patches[ref.prototype, ref.rank]
        x1, y1, x2, y2 = patch.cell_box
        assert 0 <= x1 <= x2 < patch.crop.shape[1] and 0 <= y1 <= y2 < patch.crop.shape[0]
        view = transform(dataset.load_image(ref.image), ref.image, 0)  # (3, S, S)
        pixels = to_uint8(view, transform.mean, transform.std)  # (S, S, 3)
        bx1, by1, bx2, by2 = ref.box
        assert np.array_equal(patch.crop[y1 : y2 + 1, x1 : x2 + 1], pixels[by1 : by2 + 1, bx1 : bx2 + 1])


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
