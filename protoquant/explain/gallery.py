"""The prototype gallery: each prototype's nearest training patches, computed from the feature cache.

For every prototype k: the top-T training images by the cosine similarity of their most
similar patch (at most one patch per image), which cell that patch is, its class and file,
how many training patches have k as their nearest prototype (usage), the class weights w[:, k],
k's cosine map on its nearest image, and small pictures of all of these (`pictures`). It is
stored beside the checkpoint as `gallery.safetensors` + `gallery_pictures.npz` + `gallery.json`
(written last, with the hashes of the other two), so explanations show the training patches
without the training data. It records the data config, seed and cache folder its image indices
refer to (`load_splits(data, seed).train`). Building reads cached features and the training
images once; the backbone runs only where `ensure_gallery` finds no training cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import protoquant
from protoquant import progress
from protoquant.cache.split import split_store
from protoquant.cache.view import CacheView
from protoquant.config import DataConfig, from_dict, to_dict
from protoquant.data import ImageDataset, load_splits
from protoquant.data.transforms import ViewTransform
from protoquant.explain.pictures import (
    cut_pictures,
    image_file,
    load_pictures,
    save_pictures,
)
from protoquant.explain.types import Gallery, GallerySource
from protoquant.gallery_files import GALLERY_META, GALLERY_TENSORS, has_gallery, model_hash
from protoquant.head import cosine_similarity_map

logger = logging.getLogger(__name__)

GALLERY_FORMAT = 2  # 2: labels, files, source maps and pictures stored; 1 (older) is rebuilt
TENSOR_FIELDS = (  # in gallery.safetensors
    "similarity",
    "entry",
    "image",
    "cell",
    "usage",
    "class_weights",
    "label",
    "source_similarity",
)
TOP_K = 5  # training images kept per prototype


@torch.no_grad()
def _scan(
    codebook: torch.Tensor, train: CacheView, top_k: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One pass over the cache: top-T (similarity, entry, cell) per prototype, and usage."""
    num_prototypes = codebook.shape[0]
    codebook = codebook.to(device)
    best = torch.empty(num_prototypes, 0)
    best_entry = torch.empty(num_prototypes, 0, dtype=torch.long)
    best_cell = torch.empty(num_prototypes, 0, dtype=torch.long)
    usage = torch.zeros(num_prototypes, dtype=torch.long)
    position = 0
    batches = train.store.batches(train.entries, batch_size)
    steps = -(-len(train.entries) // batch_size)
    for features, _ in progress.bar(batches, total=steps, desc="gallery: nearest patches", unit="batch"):
        similarity = cosine_similarity_map(features.to(device), codebook).flatten(2).cpu()  # (B, K, H*W)
        usage += torch.bincount(similarity.argmax(dim=1).flatten(), minlength=num_prototypes)
        value, cell = similarity.max(dim=2)  # (B, K): each image's best patch for each prototype
        entries = torch.from_numpy(train.entries[position : position + len(value)]).long()
        position += len(value)
        best = torch.cat([best, value.t()], dim=1)  # (K, T + B)
        best_entry = torch.cat([best_entry, entries[None].expand(num_prototypes, -1)], dim=1)
        best_cell = torch.cat([best_cell, cell.t()], dim=1)
        best, order = best.topk(min(top_k, best.shape[1]), dim=1)  # (K, T)
        best_entry, best_cell = best_entry.gather(1, order), best_cell.gather(1, order)
    return best, best_entry, best_cell, usage


@torch.no_grad()
def _source_maps(codebook: torch.Tensor, store, entry: torch.Tensor) -> torch.Tensor:
    """(K,) cache entries -> (K, H, W) cosine map of prototype k on entry k's features."""
    features = F.normalize(store.get(entry.numpy()), dim=1)  # (K, D, H, W)
    codes = F.normalize(codebook.detach().float().cpu(), dim=1)  # (K, D)
    return torch.einsum("kdhw,kd->khw", features, codes).contiguous()  # (K, H, W)


def _source(model: protoquant.ProtoQuant, store) -> GallerySource:
    """What the gallery's image indices refer to: the model's data config and the cache's key."""
    key = store.manifest["key"]
    return GallerySource(
        to_dict(model.config.data),
        model.config.seed,
        str(store.folder),
        key["dataset_fingerprint"],
        int(key["num_images"]),
        json.loads(json.dumps(asdict(model.transform))),  # tuples as lists, as after a reload
    )


def _plain_entries(model: protoquant.ProtoQuant, train: CacheView, top_k: int) -> tuple:
    """(store, view-0 entries, grid) of the cache a gallery is built from, checked against the model."""
    if top_k < 1:
        raise ValueError(f"gallery top_k must be >= 1, got {top_k}")
    store = train.store
    plain = train.entries[store.view_index[train.entries] == 0]
    if len(plain) == 0:
        raise ValueError(f"{store.folder}: the subset holds no view-0 entries to build a gallery from")
    pool = model.config.cache.grid_pool
    grid = tuple(-(-side // pool) for side in model.backbone.info.grid)  # as the cache pooled it
    if tuple(store.grid) != grid:
        raise ValueError(f"{store.folder}: cache grid {store.grid} differs from the model's {grid}")
    return store, plain, grid


def build_gallery(
    model: protoquant.ProtoQuant,
    train: CacheView,
    *,
    top_k: int = TOP_K,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dataset: ImageDataset | None = None,
) -> Gallery:
    """Search the cached training features for each prototype's nearest patches (no backbone run),
    and cut their pictures from the training images.

    Args:
        train: cache entries of the training split of `model.config.data`; only view 0 of each
            image is used, so every patch is one a person can be shown.
        dataset: that training split (checked against the cache's fingerprint); by default loaded
            from the model's data config.
    """
    store, plain, grid = _plain_entries(model, train, top_k)
    similarity, entry, cell, usage = _scan(
        model.head.codebook, CacheView(store, plain), top_k, batch_size, torch.device(device)
    )
    source = _source(model, store)
    dataset = checked_split(source, dataset)
    image = torch.from_numpy(store.image_index)[entry]  # (K, T)
    pictures = cut_pictures(dataset, image, cell, grid, ViewTransform(**source.transform))
    files = {i: image_file(dataset, i) for i in sorted(set(image.flatten().tolist()))}
    return Gallery(
        similarity.float(),
        entry,
        image,
        cell,
        usage,
        model.head.class_weights.detach().float().cpu(),
        torch.from_numpy(dataset.labels)[image],
        _source_maps(model.head.codebook, store, entry[:, 0]),
        model.classes,
        tuple(store.grid),
        model.config.backbone.image_size,
        model_hash(model),
        source,
        {i: name for i, name in files.items() if name},
        pictures,
    )


def save_gallery(gallery: Gallery, checkpoint: str | Path) -> Path:
    """Write the gallery files (GALLERY_FILES) into the checkpoint folder, each atomically."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    tensors = {name: getattr(gallery, name).contiguous() for name in TENSOR_FIELDS}
    tmp = folder / f".{GALLERY_TENSORS}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    tensor_hash = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, folder / GALLERY_TENSORS)
    meta = {
        "format": GALLERY_FORMAT,
        "classes": list(gallery.classes),
        "grid": list(gallery.grid),
        "image_size": gallery.image_size,
        "model_hash": gallery.model_hash,
        "tensors_sha256": tensor_hash,
        "pictures_sha256": save_pictures(gallery.pictures, folder),
        "source": asdict(gallery.source),
        "files": {str(index): name for index, name in gallery.files.items()},
    }
    tmp = folder / f".{GALLERY_META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / GALLERY_META)
    return folder / GALLERY_META


def load_gallery(checkpoint: str | Path, *, model: protoquant.ProtoQuant | None = None) -> Gallery:
    """Read the gallery stored in a checkpoint folder; with `model`, check it belongs to that model."""
    folder = Path(checkpoint)
    if not has_gallery(folder):
        raise FileNotFoundError(
            f"{folder} holds no prototype gallery ({GALLERY_META}, {GALLERY_TENSORS}); "
            "build it with `protoquant gallery --model CHECKPOINT`"
        )
    meta = json.loads((folder / GALLERY_META).read_text())
    if meta.get("format") != GALLERY_FORMAT:
        raise ValueError(
            f"{folder / GALLERY_META}: gallery format {meta.get('format')}, expected {GALLERY_FORMAT} "
            "(older galleries keep no pictures of their training patches); rebuild it with "
            f"`protoquant gallery --model {folder}` (needs the training data once)"
        )
    data = (folder / GALLERY_TENSORS).read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        raise ValueError(f"{folder / GALLERY_TENSORS} does not match {GALLERY_META}; rebuild the gallery")
    tensors = load_file(str(folder / GALLERY_TENSORS))
    gallery = Gallery(
        **{name: tensors[name] for name in TENSOR_FIELDS},
        classes=tuple(meta["classes"]),
        grid=tuple(meta["grid"]),
        image_size=int(meta["image_size"]),
        model_hash=meta["model_hash"],
        source=GallerySource(**meta["source"]),
        files={int(index): name for index, name in meta["files"].items()},
        pictures=load_pictures(folder, meta["pictures_sha256"], tuple(tensors["similarity"].shape)),
    )
    if model is not None:
        gallery.check(model_hash(model))
    return gallery


def training_images(gallery: Gallery) -> ImageDataset:
    """The training split the gallery's image indices refer to, checked against its fingerprint."""
    return checked_split(gallery.source)


def checked_split(source: GallerySource, train: ImageDataset | None = None) -> ImageDataset:
    """`train` (by default loaded from the recorded data config), checked against `source`."""
    if train is None:
        train = load_splits(from_dict(DataConfig, source.data), source.seed).train
    if len(train) != source.num_images or train.fingerprint() != source.dataset_fingerprint:
        raise ValueError(
            f"the training split of dataset '{source.data.get('dataset')}' (root '{source.data.get('root')}') "
            f"no longer matches the one the gallery was built from (cache {source.cache})"
        )
    return train


def training_subset(model: protoquant.ProtoQuant, device: str | torch.device = "cpu") -> CacheView:
    """View 0 of every training image: read from the complete training cache, else from a
    1-view cache of the split (built on first use; see `protoquant.cache.split`)."""
    train = load_splits(model.config.data, model.config.seed).train
    store = split_store(model, train, torch.device(device))
    return CacheView(store, store.entries(first_view_only=True))


def ensure_gallery(
    model: protoquant.ProtoQuant,
    checkpoint: str | Path,
    *,
    top_k: int = TOP_K,
    rebuild: bool = False,
    device: str | torch.device = "cpu",
) -> Gallery:
    """The checkpoint's gallery; built from the training cache and saved when missing, stale or `rebuild`."""
    if has_gallery(checkpoint) and not rebuild:
        stored = json.loads((Path(checkpoint) / GALLERY_META).read_text()).get("format")
        if stored != GALLERY_FORMAT:
            logger.warning(
                "%s: the stored gallery has format %s (no pictures of its training patches); "
                "rebuilding it as format %s from the training cache and images",
                checkpoint,
                stored,
                GALLERY_FORMAT,
            )
        else:
            gallery = load_gallery(checkpoint)
            if gallery.model_hash == model_hash(model):
                return gallery
            logger.warning("%s: the stored gallery belongs to another model; rebuilding it", checkpoint)
    gallery = build_gallery(model, training_subset(model, device), top_k=top_k, device=device)
    save_gallery(gallery, checkpoint)
    return gallery


def stored_gallery(model: protoquant.ProtoQuant) -> Gallery:
    """The gallery stored in the model's checkpoint folder, checked against the model.

    Raises:
        FileNotFoundError: the model has no folder (built in memory) or its folder no gallery;
            the message says how to build one and how to explain without it.
    """
    folder = model.checkpoint
    opt_out = "or pass gallery=False to explain without training patches"
    if folder is None:
        raise FileNotFoundError(
            "this model was built in memory, not loaded from a checkpoint folder, so it has no stored "
            "prototype gallery: save it and pass gallery=protoquant.ensure_gallery(model, FOLDER) (or "
            f"build_gallery(model, train_cache) from protoquant.explain.gallery), {opt_out}"
        )
    if not has_gallery(folder):
        raise FileNotFoundError(
            f"{folder} holds no prototype gallery: build it with `protoquant gallery --model {folder}` "
            f"(or protoquant.explain.ensure_gallery(model, '{folder}')), {opt_out}"
        )
    return load_gallery(folder, model=model)


def resolve_gallery(model: protoquant.ProtoQuant, gallery: Gallery | bool | None) -> Gallery | None:
    """The gallery an explanation uses: None for `gallery=False`, the stored one for None or True,
    else `gallery` itself after checking that it was built for `model`."""
    if gallery is False:
        return None
    if gallery is None or gallery is True:
        return stored_gallery(model)
    if not isinstance(gallery, Gallery):
        raise TypeError(
            f"gallery must be a Gallery, None (the stored one) or False, got {type(gallery).__name__}"
        )
    gallery.check(model_hash(model))
    return gallery
