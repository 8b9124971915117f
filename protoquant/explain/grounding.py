"""Where each prototype lives among real training patches.

For every prototype: the cosine similarity to its nearest cached training patch, and which
entry and cell that patch is. Computed in batches straight from the feature cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protoquant.cache.view import CacheView


@dataclass(frozen=True)
class NearestPatches:
    cosine: torch.Tensor  # (K,) similarity of each prototype to its nearest training patch
    entry: torch.Tensor  # (K,) cache entry holding that patch
    cell: torch.Tensor  # (K,) flat cell index h * W + w of that patch


def nearest_patches(
    codebook: torch.Tensor, subset: CacheView, batch_size: int, device: torch.device
) -> NearestPatches:
    """Nearest training patch (cosine) of every prototype, over every entry of `subset`."""
    unit_prototypes = F.normalize(codebook.to(device), dim=1)  # (K, D)
    num_prototypes = codebook.shape[0]
    best = torch.full((num_prototypes,), -2.0)
    best_entry = torch.zeros(num_prototypes, dtype=torch.long)
    best_cell = torch.zeros(num_prototypes, dtype=torch.long)
    position = 0
    with torch.no_grad():
        for features, _ in subset.store.batches(subset.entries, batch_size):
            batch, dim, height, width = features.shape
            patches = F.normalize(features.to(device), dim=1).flatten(2)  # (B, D, H*W)
            sims = (
                torch.einsum("kd,bdn->kbn", unit_prototypes, patches).reshape(num_prototypes, -1).cpu()
            )  # (K, B*H*W)
            value, flat = sims.max(dim=1)
            better = value > best
            best[better] = value[better]
            rows = torch.from_numpy(subset.entries[position : position + batch])
            best_entry[better] = rows[flat[better] // (height * width)]
            best_cell[better] = flat[better] % (height * width)
            position += batch
    return NearestPatches(best, best_entry, best_cell)


SNAP_CHUNK = 256  # prototypes whose patches are gathered at once


def snap_to_patches(
    codebook: torch.Tensor, subset: CacheView, batch_size: int, device: torch.device
) -> torch.Tensor:
    """(K, D) codebook with every prototype replaced by its nearest training patch feature: exact grounding."""
    nearest = nearest_patches(codebook, subset, batch_size, device)
    width = subset.store.grid[1]
    snapped = []
    for start in range(0, len(codebook), SNAP_CHUNK):
        entry = nearest.entry[start : start + SNAP_CHUNK].numpy()
        cell = nearest.cell[start : start + SNAP_CHUNK]
        maps = subset.store.get(entry)  # (k, D, H, W)
        rows, cols = cell // width, cell % width
        snapped.append(maps[torch.arange(len(entry)), :, rows, cols])  # (k, D)
    return torch.cat(snapped).to(codebook)
