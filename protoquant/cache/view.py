"""The cache view the training stages read: a feature store restricted to some entries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protoquant.cache.store import FeatureStore


@dataclass(frozen=True)
class CacheView:
    """A feature store restricted to some entries (e.g. all train views, or view 0 of val)."""

    store: FeatureStore
    entries: np.ndarray

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.store.labels[self.entries])

    @property
    def maps_nbytes(self) -> int:
        """Bytes the view's maps take as stored (float16), e.g. when loaded into device memory."""
        return len(self.entries) * self.store.map_nbytes
