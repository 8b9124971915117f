"""Sparsity for stage 2: which prototypes each class keeps, and which prototypes stage 2 sees.

Two levers, both decided on training data (counts and scores), never on the test split:

- `class_margin_priority` ranks, per class, how much each prototype separates that class from
  the others on the class's own training rows; the top-k limit keeps the k highest. It needs
  only the per-class mean scores (`margin_priority`), which stream through a table on disk. Ranking by
  the raw dense weight instead keeps prototypes that every class weights alike (background),
  whose evidence cancels between classes.
- `prune_by_usage` removes the least-used prototypes before stage 2 (the reference
  implementation prunes its least-used codes): the softmax over prototypes then runs over fewer
  prototypes, so each location's mass is spread less. Stage 2 trains on the pruned codebook, so
  the saved model computes exactly what its explanations show.
- `part_coverage` (data with part masks only) measures how much of each prototype's nearest
  training patches lies on a part; the top-k limit can leave out background prototypes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from protoquant.cache.view import CacheView
from protoquant.data.base import ImageDataset
from protoquant.head import similarity_to_unit_codes

logger = logging.getLogger(__name__)


def class_margin_priority(weights: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C, K) mean over class c's rows of score_k * (w[c, k] - mean_{c' != c} w[c', k]).

    Args:
        weights: (C, K) effective class weights of a fitted (dense) class layer.
        scores: (N, K) pooled presence of the training rows.
        labels: (N,) class of every row.

    A class without rows gets priority 0 for every prototype.
    """
    return margin_priority(weights, class_mean_scores(scores, labels, weights.shape[0]))


def class_mean_scores(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, K) mean of the (N, K) scores over each class's rows (0 for a class without rows)."""
    one_hot = F.one_hot(labels.long(), num_classes).to(scores.dtype)  # (N, C)
    counts = one_hot.sum(dim=0).clamp(min=1)[:, None]  # (C, 1)
    return (one_hot.t() @ scores) / counts  # (C, K) mean presence on each class's rows


def margin_priority(weights: torch.Tensor, mean_scores: torch.Tensor) -> torch.Tensor:
    """(C, K) `class_margin_priority` from the (C, K) per-class mean scores (`class_mean_scores`),
    which a table of scores too large for memory computes batch by batch."""
    num_classes = weights.shape[0]
    others = (weights.sum(dim=0, keepdim=True) - weights) / max(num_classes - 1, 1)  # (C, K)
    return mean_scores.to(weights.dtype) * (weights - others)


def usage_keep(usage: torch.Tensor, coverage: float) -> torch.Tensor:
    """(K',) sorted indices of the most-used prototypes that are nearest to `coverage` of the patches.

    Prototypes no patch uses are never kept; coverage 1.0 keeps exactly the used ones. At least one
    prototype is always kept.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"head.usage_coverage must be in (0, 1], got {coverage}")
    order = usage.argsort(descending=True, stable=True)
    share = usage[order].double().cumsum(dim=0) / usage.sum().clamp(min=1)  # (K,) covered so far
    count = int((share < coverage - 1e-12).sum()) + 1  # the first prototype reaching coverage
    count = min(max(count, 1), max(int((usage > 0).sum()), 1))
    return order[:count].sort().values


def prune_by_usage(
    codebook: torch.Tensor, usage: torch.Tensor, coverage: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K', D) codebook and (K',) usage of the prototypes `usage_keep` keeps (all at coverage 1)."""
    if coverage >= 1.0:
        return codebook, usage
    keep = usage_keep(usage, coverage)
    logger.info(
        "stage 2: %d of %d prototypes cover %.0f %% of the patches", len(keep), len(usage), 100 * coverage
    )
    return codebook[keep], usage[keep]


def part_coverage(
    codebook: torch.Tensor,
    subset: CacheView,
    dataset: ImageDataset,
    *,
    top: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(K,) mean share of part pixels in the grid cells of each prototype's `top` nearest patches.

    Args:
        codebook: (K, D) prototypes. subset: view 0 of the training images of `dataset`, whose
            `annotations(i).masks` (P, H_i, W_i) give the parts. Background prototypes score near 0.
    """
    values, flat = _nearest_cells(codebook, subset, top, batch_size, device)  # (K, T) each
    cells = subset.store.grid[0] * subset.store.grid[1]
    images = subset.store.image_index[subset.entries]  # (N,) training image of every row
    shares: dict[int, torch.Tensor] = {}
    coverage = torch.zeros(flat.shape)
    for k, t in torch.nonzero(values > -2.0).tolist():  # -2: fewer than `top` patches exist
        row, cell = divmod(int(flat[k, t]), cells)
        image = int(images[row])
        if image not in shares:
            shares[image] = _cell_part_shares(dataset, image, subset.store.grid)
        coverage[k, t] = shares[image][cell]
    return coverage.mean(dim=1)


def _nearest_cells(
    codebook: torch.Tensor, subset: CacheView, top: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, T) cosine and flat row * H*W + cell index of every prototype's T nearest patches."""
    unit = F.normalize(codebook.to(device), dim=1)  # (K, D)
    best = torch.full((len(codebook), top), -2.0)
    index = torch.zeros((len(codebook), top), dtype=torch.long)
    offset = 0
    with torch.no_grad():
        for features, _ in subset.store.batches(subset.entries, batch_size):
            sims = similarity_to_unit_codes(features.to(device), unit).flatten(2)  # (B, K, H*W)
            batch, _, cells = sims.shape
            sims = sims.permute(1, 0, 2).reshape(len(codebook), batch * cells).cpu()  # (K, B*H*W)
            joined = torch.cat([best, sims], dim=1)
            rows = torch.cat(
                [index, offset * cells + torch.arange(batch * cells).expand(len(codebook), -1)], 1
            )
            best, pick = joined.topk(min(top, joined.shape[1]), dim=1)
            index = rows.gather(1, pick)
            offset += batch
    return best, index


def _cell_part_shares(dataset: ImageDataset, image: int, grid: tuple[int, int]) -> torch.Tensor:
    """(H*W,) share of each grid cell's pixels that belong to some part of training image `image`."""
    masks = dataset.annotations(image).masks
    if masks is None:
        raise ValueError(
            f"head.min_part_coverage needs part masks; dataset '{dataset.name}' has none (image {image})"
        )
    union = torch.from_numpy(masks.any(axis=0)).float()[None, None]  # (1, 1, H_i, W_i)
    return F.adaptive_avg_pool2d(union, grid).flatten()  # (H*W,)
