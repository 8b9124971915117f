"""What the runners share: the model, the evaluated split, its cached features, annotations.

Features of the unmodified images come from the feature cache (built with the model's own
view-0 transform, so they are exactly what the model sees). Images the protocols change (noise,
attacks, re-rendered interventions) go through `ProtoQuant.features`, the same
`patch_features` the cache was built with (bf16 autocast, grid pooling, float16 rounding), so
clean and changed inputs share one grid and one precision. `FeatureMemo` keeps those features so
that two heads on one backbone (ProtoQuant and the baseline) pay for them once; its keys hold the
digest of everything the features depend on (`cache_key`), so a memo shared between models with
different weights, transform or feature options never serves one model's features to another.
A memo is bounded by bytes and forgets the least recently used features first; a run given no
memo keeps none (nothing in one run reads a changed image's features twice).

The evaluated split's store may be the training cache with several views per image
(`protoquant.cache.split`): everything here reads its view-0 entries only and maps them to
images through `store.image_index`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from protoquant import progress
from protoquant.cache.build import FeatureStore, cache_key
from protoquant.cache.view import CacheView
from protoquant.data.base import ImageDataset, stable_hash
from protoquant.data.transforms import ViewTransform
from protoquant.errors import CacheError
from protoquant.head import HeadOutput
from protoquant.metrics.common import keypoints_to_input
from protoquant.metrics.settings import MetricSettings
from protoquant.model import ProtoQuant


def cache_transform(model: ProtoQuant) -> ViewTransform:
    """The transform the training pipeline caches with (view 0 is the evaluation view)."""
    return model.transform


MEMO_BYTES = 1 << 30  # default bound of a FeatureMemo shared between runs: 1 GiB of float16 features


class FeatureMemo:
    """Features of changed images, keyed by (features digest, change..., image), at most `max_bytes`.

    Least recently used features are evicted first; features larger than the bound are not kept.
    `FeatureMemo(0)` keeps nothing.
    """

    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"FeatureMemo max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0  # bytes held now
        self.evictions = 0  # features dropped to stay within max_bytes
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        features = self._items.get(key)
        if features is not None:
            self._items.move_to_end(key)  # recently used
        return features

    def put(self, key: tuple, features: torch.Tensor) -> None:
        features = features.to(torch.float16).cpu()  # (D, H, W)
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        if key in self._items:
            self.nbytes -= self._bytes(self._items.pop(key))
        self._items[key] = features
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= self._bytes(dropped)
            self.evictions += 1

    @staticmethod
    def _bytes(features: torch.Tensor) -> int:
        return features.numel() * features.element_size()

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class ImageParts:
    """Part ground truth of one image, without masks (kept for every image of a split)."""

    keypoints: np.ndarray  # (P, 2) float (x, y) in the image's pixels
    visible: np.ndarray  # (P,) bool
    image_hw: tuple[int, int]  # (height, width) of the image the keypoints refer to
    part_names: tuple[str, ...]


@dataclass
class EvalContext:
    """Model + evaluated split + cached features; runners read everything through it."""

    model: ProtoQuant
    dataset: ImageDataset
    settings: MetricSettings
    device: torch.device
    store: FeatureStore
    train: CacheView | None = None  # cached training features (grounding)
    memo: FeatureMemo = field(default_factory=FeatureMemo)
    _parts: dict[int, ImageParts] = field(default_factory=dict)
    _scope: str | None = None

    @property
    def image_size(self) -> int:
        return int(self.model.config.backbone.image_size)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset.labels, dtype=np.int64)

    def entries_of(self, indices: np.ndarray) -> np.ndarray:
        """(n,) view-0 cache entries of image indices (n,), in their order."""
        plain = self.store.entries(first_view_only=True)
        entry_of = np.full(len(self.dataset), -1, dtype=np.int64)
        entry_of[self.store.image_index[plain]] = plain
        entries = entry_of[np.asarray(indices, dtype=np.int64)]
        if (entries < 0).any():
            missing = np.asarray(indices)[np.argmax(entries < 0)]
            raise CacheError(f"{self.store.folder}: the cache holds no view-0 entry of image {missing}")
        return entries

    def head_batches(
        self, entries: np.ndarray | None = None, *, desc: str = "metrics: head outputs"
    ) -> Iterator[tuple[np.ndarray, HeadOutput]]:
        """Yield (image indices (B,), head output) over view-0 `entries` (all images by default), no gradients."""
        entries = self.store.entries(first_view_only=True) if entries is None else entries
        head = self.model.head
        starts = range(0, len(entries), self.settings.batch_size)
        for start in progress.bar(starts, desc=desc, unit="batch"):
            chunk = entries[start : start + self.settings.batch_size]
            with torch.no_grad():
                out = head(self.store.get(chunk).to(self.device))
            yield self.store.image_index[chunk], _cpu(out)

    def parts(self, index: int) -> ImageParts:
        """Keypoints, visibility and image size of image `index` (cached)."""
        if index not in self._parts:
            annotation = self.dataset.annotations(index)
            if annotation is None:
                raise ValueError(f"dataset {self.dataset.name} has no part annotations (image {index})")
            self._parts[index] = ImageParts(
                annotation.keypoints,
                annotation.visible,
                self._image_hw(index, annotation),
                annotation.part_names,
            )
        return self._parts[index]

    def input_keypoints(self, index: int) -> torch.Tensor:
        """(P, 2) int64 part centres in the model's S x S input pixels."""
        parts = self.parts(index)
        height, width = parts.image_hw
        crop = self.model.config.backbone.crop_ratio
        return torch.from_numpy(keypoints_to_input(parts.keypoints, (width, height), self.image_size, crop))

    def _image_hw(self, index: int, annotation) -> tuple[int, int]:
        if annotation.masks is not None:
            return tuple(int(v) for v in annotation.masks.shape[-2:])
        width, height = self.dataset.load_image(index).size
        return int(height), int(width)

    def preprocess(self, images: list[Image.Image], indices: np.ndarray) -> torch.Tensor:
        """(B, 3, S, S) normalised view-0 tensors, exactly the cache's transform."""
        transform = cache_transform(self.model)
        return torch.stack([transform(image.convert("RGB"), int(i), 0) for image, i in zip(images, indices)])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, D, H', W') float32 features, as the cache stores them."""
        with torch.no_grad():
            return self.model.features(images.to(self.device))

    def features_digest(self) -> str:
        """Digest of everything the model's features of this split depend on (the cache's key)."""
        if self._scope is None:
            model = self.model
            key = cache_key(self.dataset, model.backbone, cache_transform(model), 1, model.config.cache)
            self._scope = stable_hash(key)
        return self._scope

    def memo_features(
        self, keys: list[tuple], make_images: Callable[[list[tuple]], torch.Tensor]
    ) -> torch.Tensor:
        """(B, D, H, W) features for `keys`, computing only the ones the memo lacks via
        `make_images(missing)`, at most `settings.batch_size` images per backbone pass."""
        scope = self.features_digest()
        found = {k: f for k in dict.fromkeys(keys) if (f := self.memo.get((scope, *k))) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        for start in range(0, len(missing), self.settings.batch_size):
            chunk = missing[start : start + self.settings.batch_size]
            for key, features in zip(chunk, self.features(make_images(chunk))):
                found[key] = features.to(torch.float16).cpu()  # (D, H, W), as the cache stores it
                self.memo.put((scope, *key), found[key])
        return torch.stack([found[k].float() for k in keys])

    def missing_features(self, keys: list[tuple]) -> int:
        """How many distinct `keys` the memo lacks (the backbone passes `memo_features` would make)."""
        scope = self.features_digest()
        return sum(self.memo.get((scope, *k)) is None for k in dict.fromkeys(keys))

    def head_output(self, features: torch.Tensor) -> HeadOutput:
        with torch.no_grad():
            return _cpu(self.model.head(features.to(self.device)))


def _cpu(out: HeadOutput) -> HeadOutput:
    return HeadOutput(out.logits.cpu(), out.scores.cpu(), out.similarity.cpu(), out.activation.cpu())
