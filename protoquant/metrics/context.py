"""What the runners share: the model, the evaluated split, its cached features, annotations.

Features of the unmodified images come from the feature cache (built with the model's own
view-0 transform, so they are exactly what the model sees). Images the protocols change (noise,
attacks, re-rendered interventions) go through `ProtoQuant.features`, the same
`patch_features` the cache was built with (bf16 autocast, grid pooling, float16 rounding), so
clean and changed inputs share one grid and one precision. `FeatureMemo` keeps those features so
that two heads on one backbone (ProtoQuant and the baseline) pay for them once; its keys hold the
digest of everything the features depend on (`cache_key`), so a memo shared between models with
different weights, transform or feature options never serves one model's features to another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from protoquant import progress
from protoquant.cache.build import FeatureStore, build_cache, cache_key
from protoquant.cache.view import CacheView
from protoquant.data.base import ImageDataset, stable_hash
from protoquant.data.transforms import ViewTransform
from protoquant.head import HeadOutput
from protoquant.metrics.common import keypoints_to_input
from protoquant.metrics.settings import MetricSettings
from protoquant.model import ProtoQuant


def cache_transform(model: ProtoQuant) -> ViewTransform:
    """The transform the training pipeline caches with (view 0 is the evaluation view)."""
    return model.transform


def split_store(model: ProtoQuant, dataset: ImageDataset, device: torch.device) -> FeatureStore:
    """Cached view-0 features of `dataset` (built on first use, then read from disk)."""
    config = model.config
    return build_cache(
        dataset, model.backbone, cache_transform(model), views=1, config=config.cache, device=device
    )


class FeatureMemo:
    """Features of changed images, keyed by (features digest, change..., image)."""

    def __init__(self) -> None:
        self._items: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple) -> torch.Tensor | None:
        return self._items.get(key)

    def put(self, key: tuple, features: torch.Tensor) -> None:
        self._items[key] = features.to(torch.float16).cpu()  # (D, H, W)

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

    def head_batches(self, entries: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, HeadOutput]]:
        """Yield (image indices (B,), head output) over the cached split, no gradients."""
        entries = self.store.entries(first_view_only=True) if entries is None else entries
        head = self.model.head
        starts = range(0, len(entries), self.settings.batch_size)
        for start in progress.bar(starts, desc="metrics: head outputs", unit="batch"):
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
        """(B, D, H, W) features for `keys`, computing only the missing ones via `make_images(missing)`."""
        scope = self.features_digest()
        missing = [k for k in keys if self.memo.get((scope, *k)) is None]
        for start in range(0, len(missing), self.settings.batch_size):
            chunk = missing[start : start + self.settings.batch_size]
            for key, features in zip(chunk, self.features(make_images(chunk))):
                self.memo.put((scope, *key), features)
        return torch.stack([self.memo.get((scope, *k)).float() for k in keys])

    def head_output(self, features: torch.Tensor) -> HeadOutput:
        with torch.no_grad():
            return _cpu(self.model.head(features.to(self.device)))


def _cpu(out: HeadOutput) -> HeadOutput:
    return HeadOutput(out.logits.cpu(), out.scores.cpu(), out.similarity.cpu(), out.activation.cpu())
