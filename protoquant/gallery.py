"""The prototype gallery: each prototype's nearest training patches, computed from the feature cache.

For every prototype k: the top-T training images by the cosine similarity of their most
similar patch (at most one patch per image), which cell that patch is, how many training
patches have k as their nearest prototype (usage), and the class weights w[:, k]. It is
stored beside the checkpoint as `gallery.safetensors` + `gallery.json`, and it records the
data config, seed and cache folder its image indices refer to, so the training images can
be loaded back later with `load_splits(data, seed).train`. Building reads cached features; the
backbone runs only where `ensure_gallery` finds no training cache and has to build it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from protoquant.config import DataConfig, from_dict, to_dict
from protoquant.data import ImageDataset, load_splits
from protoquant.features import build_cache
from protoquant.head import cosine_similarity_map
from protoquant.model import ProtoQuant
from protoquant.pipeline import GLOBAL_SIZE_THRESHOLD
from protoquant.train import Subset

logger = logging.getLogger(__name__)

GALLERY_FORMAT = 1
GALLERY_TENSORS, GALLERY_META = "gallery.safetensors", "gallery.json"
TENSOR_FIELDS = ("similarity", "entry", "image", "cell", "usage", "class_weights")  # in gallery.safetensors
TOP_K = 5  # training images kept per prototype
WEIGHT_THRESHOLD = GLOBAL_SIZE_THRESHOLD  # a class weights prototype k if w[c, k] exceeds this


@dataclass(frozen=True)
class PatchRef:
    """One training patch a prototype stands for: cell `cell` of view 0 of training image `image`."""

    prototype: int  # k
    rank: int  # 0 = the most similar training image
    image: int  # index into the training split (load_splits(data, seed).train)
    entry: int  # feature-cache entry of that image's view 0
    cell: tuple[int, int]  # (h, w) on the feature grid
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the cell in the (S, S) view, inclusive
    similarity: float  # cosine similarity of prototype k to this patch


@dataclass(frozen=True)
class GallerySource:
    """Where the gallery's image indices point: the training split of `data` under `seed`."""

    data: dict  # DataConfig as a plain dict
    seed: int
    cache: str  # training feature cache folder the gallery was computed from
    dataset_fingerprint: str  # fingerprint of the training split when the cache was built
    num_images: int  # images in the training split
    transform: dict  # ViewTransform fields (view 0 shows what the cache saw)


@dataclass(frozen=True)
class Gallery:
    """Nearest training patches, usage and class weights of all K prototypes."""

    similarity: torch.Tensor  # (K, T) float32, descending along T
    entry: torch.Tensor  # (K, T) int64 cache entry
    image: torch.Tensor  # (K, T) int64 training image index
    cell: torch.Tensor  # (K, T) int64 flat cell h * W + w
    usage: torch.Tensor  # (K,) int64 training patches (view 0) whose nearest prototype is k
    class_weights: torch.Tensor  # (C, K) effective class weights, all >= 0
    classes: tuple[str, ...]
    grid: tuple[int, int]  # (H, W) feature grid
    image_size: int  # S, side of the model's input
    model_hash: str  # hash of the codebook and class weights it was built for
    source: GallerySource

    @property
    def num_prototypes(self) -> int:
        return int(self.similarity.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.similarity.shape[1])

    def patches(self, prototype: int, limit: int | None = None) -> tuple[PatchRef, ...]:
        """The nearest training patches of `prototype`, most similar first."""
        if not 0 <= prototype < self.num_prototypes:
            raise IndexError(f"prototype {prototype} outside the gallery's 0..{self.num_prototypes - 1}")
        return tuple(self._ref(prototype, t) for t in range(min(limit or self.top_k, self.top_k)))

    def _ref(self, k: int, t: int) -> PatchRef:
        row, col = divmod(int(self.cell[k, t]), self.grid[1])
        return PatchRef(
            k,
            t,
            int(self.image[k, t]),
            int(self.entry[k, t]),
            (row, col),
            cell_box((row, col), self.grid, self.image_size),
            float(self.similarity[k, t]),
        )

    def weighting_classes(self, prototype: int) -> tuple[tuple[int, float], ...]:
        """(class index, weight) of every class weighting `prototype` above WEIGHT_THRESHOLD, largest first."""
        column = self.class_weights[:, prototype]  # (C,)
        order = column.argsort(descending=True).tolist()
        return tuple((c, float(column[c])) for c in order if column[c] > WEIGHT_THRESHOLD)

    def weighted_prototypes(self) -> tuple[int, ...]:
        """Prototypes some class weights above WEIGHT_THRESHOLD, by their largest weight (descending)."""
        largest = self.class_weights.amax(dim=0)  # (K,)
        order = largest.argsort(descending=True).tolist()
        return tuple(k for k in order if largest[k] > WEIGHT_THRESHOLD)

    def check(self, model: ProtoQuant) -> None:
        """Raise if the gallery was built for another codebook or class layer."""
        if model_hash(model) != self.model_hash:
            raise ValueError(
                "the prototype gallery was built for another model (codebook or class weights differ); "
                "rebuild it with `protoquant gallery --model CHECKPOINT`"
            )


def cell_box(cell: tuple[int, int], grid: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x1, y1, x2, y2) of grid cell (h, w) in an (S, S) image."""
    (row, col), (height, width) = cell, grid
    x1, x2 = col * size // width, (col + 1) * size // width - 1
    y1, y2 = row * size // height, (row + 1) * size // height - 1
    return x1, y1, max(x1, x2), max(y1, y2)


def model_hash(model: ProtoQuant) -> str:
    """sha256 over the codebook and the effective class weights."""
    digest = hashlib.sha256()
    for tensor in (model.head.codebook, model.head.class_weights):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _scan(
    codebook: torch.Tensor, train: Subset, top_k: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One pass over the cache: top-T (similarity, entry, cell) per prototype, and usage."""
    num_codes = codebook.shape[0]
    codebook = codebook.to(device)
    best = torch.empty(num_codes, 0)
    best_entry = torch.empty(num_codes, 0, dtype=torch.long)
    best_cell = torch.empty(num_codes, 0, dtype=torch.long)
    usage = torch.zeros(num_codes, dtype=torch.long)
    position = 0
    for features, _ in train.store.batches(train.entries, batch_size):
        similarity = cosine_similarity_map(features.to(device), codebook).flatten(2).cpu()  # (B, K, H*W)
        usage += torch.bincount(similarity.argmax(dim=1).flatten(), minlength=num_codes)
        value, cell = similarity.max(dim=2)  # (B, K): each image's best patch for each prototype
        entries = torch.from_numpy(train.entries[position : position + len(value)]).long()
        position += len(value)
        best = torch.cat([best, value.t()], dim=1)  # (K, T + B)
        best_entry = torch.cat([best_entry, entries[None].expand(num_codes, -1)], dim=1)
        best_cell = torch.cat([best_cell, cell.t()], dim=1)
        best, order = best.topk(min(top_k, best.shape[1]), dim=1)  # (K, T)
        best_entry, best_cell = best_entry.gather(1, order), best_cell.gather(1, order)
    return best, best_entry, best_cell, usage


def build_gallery(
    model: ProtoQuant,
    train: Subset,
    *,
    top_k: int = TOP_K,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> Gallery:
    """Search the cached training features for each prototype's nearest patches (no backbone run).

    Args:
        train: cache entries of the training split of `model.config.data`; only view 0 of each
            image is used, so every patch is one a person can be shown.
    """
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
    key = store.manifest["key"]
    similarity, entry, cell, usage = _scan(
        model.head.codebook, Subset(store, plain), top_k, batch_size, torch.device(device)
    )
    source = GallerySource(
        to_dict(model.config.data),
        model.config.seed,
        str(store.folder),
        key["dataset_fingerprint"],
        int(key["num_images"]),
        json.loads(json.dumps(asdict(model.transform))),  # tuples as lists, as after a reload
    )
    return Gallery(
        similarity.float(),
        entry,
        torch.from_numpy(store.image_index)[entry],
        cell,
        usage,
        model.head.class_weights.detach().float().cpu(),
        model.classes,
        tuple(store.grid),
        model.config.backbone.image_size,
        model_hash(model),
        source,
    )


def save_gallery(gallery: Gallery, checkpoint: str | Path) -> Path:
    """Write `gallery.safetensors` and `gallery.json` into the checkpoint folder, each atomically."""
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
        "source": asdict(gallery.source),
    }
    tmp = folder / f".{GALLERY_META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / GALLERY_META)
    return folder / GALLERY_META


def has_gallery(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / GALLERY_META).is_file() and (Path(checkpoint) / GALLERY_TENSORS).is_file()


def load_gallery(checkpoint: str | Path, *, model: ProtoQuant | None = None) -> Gallery:
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
            f"{folder / GALLERY_META}: gallery format {meta.get('format')}, expected {GALLERY_FORMAT}"
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
    )
    if model is not None:
        gallery.check(model)
    return gallery


def training_images(gallery: Gallery) -> ImageDataset:
    """The training split the gallery's image indices refer to, checked against its fingerprint."""
    source = gallery.source
    train = load_splits(from_dict(DataConfig, source.data), source.seed).train
    if len(train) != source.num_images or train.fingerprint() != source.dataset_fingerprint:
        raise ValueError(
            f"the training split of dataset '{source.data.get('dataset')}' (root '{source.data.get('root')}') "
            f"no longer matches the one the gallery was built from (cache {source.cache})"
        )
    return train


def training_subset(model: ProtoQuant, device: str | torch.device = "cpu") -> Subset:
    """View 0 of every training image in the model's feature cache (read back; built only if missing)."""
    config = model.config
    train = load_splits(config.data, config.seed).train
    transform = model.transform  # the training cache's transform (view 0 = evaluation view)
    store = build_cache(
        train, model.backbone, transform, views=config.cache.train_views, config=config.cache, device=device
    )
    return Subset(store, store.entries(first_view_only=True))


def ensure_gallery(
    model: ProtoQuant,
    checkpoint: str | Path,
    *,
    top_k: int = TOP_K,
    rebuild: bool = False,
    device: str | torch.device = "cpu",
) -> Gallery:
    """The checkpoint's gallery; built from the training cache and saved when missing, stale or `rebuild`."""
    if has_gallery(checkpoint) and not rebuild:
        gallery = load_gallery(checkpoint)
        if gallery.model_hash == model_hash(model):
            return gallery
        logger.warning("%s: the stored gallery belongs to another model; rebuilding it", checkpoint)
    gallery = build_gallery(model, training_subset(model, device), top_k=top_k, device=device)
    save_gallery(gallery, checkpoint)
    return gallery
