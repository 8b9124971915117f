"""Stage 1: the codebook by vector quantization through the frozen probe.

Only the prototypes train: cross-entropy of the frozen probe on the quantized map plus the
commitment MSE. k-means on sampled training patches initialises them by default.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protoquant import distributed, progress
from protoquant.cache.augment import feature_cutmix
from protoquant.cache.resident import BatchSource, as_source, choose
from protoquant.cache.view import CacheView
from protoquant.codebook import VectorQuantizer, kmeans_init, nearest_prototypes, orthogonal_init, to_patches
from protoquant.config import CacheConfig, CodebookConfig
from protoquant.train.common import warmup_cosine, wrap_ddp

logger = logging.getLogger(__name__)


def sample_patches(subset: CacheView, count: int, generator: np.random.Generator) -> torch.Tensor:
    """(min(count, N*H*W), D) patch features drawn uniformly without replacement from the subset.

    The patches come in entry order (then row, then column), and only they are read from the
    cache (`FeatureStore.cells`). The draw takes O(count) memory: `Generator.choice` without
    replacement uses Floyd's algorithm, or shuffles all N*H*W ints only when N*H*W < 50 * count.
    """
    height, width = subset.store.grid
    total = len(subset.entries) * height * width
    picks = np.sort(generator.choice(total, size=min(count, total), replace=False))
    entry_pos, cell = np.divmod(picks, height * width)
    row, col = np.divmod(cell, width)
    return subset.store.cells(subset.entries[entry_pos], row, col)


def init_codebook(
    train: CacheView, config: CodebookConfig, *, seed: int, device: torch.device | None = None
) -> torch.Tensor:
    """(K, D) initial codebook on `device` (default CPU), where k-means also runs.

    k-means on sampled training patches (default) or orthogonal rows. Raises ValueError for an
    unknown codebook.init, or fewer sampled patches than K.
    """
    device = torch.device("cpu") if device is None else device
    generator = torch.Generator().manual_seed(seed)
    if config.init == "orthogonal":
        return orthogonal_init(config.num_prototypes, train.store.channels, generator).to(device)
    if config.init != "kmeans":
        raise ValueError(f"codebook.init must be 'kmeans' or 'orthogonal', got '{config.init}'")
    patches = sample_patches(train, config.kmeans_patches, np.random.default_rng(seed)).to(device)
    return kmeans_init(patches, config.num_prototypes, config.kmeans_iters, generator)


def quantized_logits(
    quantizer: VectorQuantizer, probe: nn.Linear, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the frozen probe on the quantized map, and the quantized map (B, D, H, W)."""
    quantized = quantizer(features).quantized
    return probe(quantized.mean(dim=(2, 3))), quantized


def evaluate_quantized(
    quantizer: VectorQuantizer,
    probe: nn.Linear,
    subset: CacheView | BatchSource,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> float:
    """Accuracy of the frozen probe on quantized maps; each rank scores its share.

    `subset` is a cache view (streamed) or a batch source over one (`protoquant.cache.resident`).
    """
    return quantized_fit(quantizer, probe, subset, batch_size, device, ctx)[0]


def quantized_fit(
    quantizer: VectorQuantizer,
    probe: nn.Linear,
    subset: CacheView | BatchSource,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the frozen probe on quantized maps, over all ranks."""
    quantizer.eval()
    source = as_source(subset, device)
    entries = distributed.shard_for_rank(source.view.entries, ctx or distributed.context())
    correct = torch.zeros((), dtype=torch.int64, device=source.device)
    loss = torch.zeros((), dtype=torch.float64, device=source.device)
    with torch.no_grad():
        for features, labels in source.batches(entries, batch_size):
            logits, _ = quantized_logits(quantizer, probe, features)
            correct += (logits.argmax(1) == labels).sum()
            loss += F.cross_entropy(logits.float(), labels, reduction="sum").double()
    sums = torch.stack(
        [correct.double(), loss, torch.tensor(len(entries), dtype=torch.float64, device=loss.device)]
    )
    correct_all, loss_all, count = distributed.all_reduce_sum(sums.cpu()).tolist()
    return (correct_all / count, loss_all / count) if count else (float("nan"), float("nan"))


def better_fit(fit: tuple[float, float], best: tuple[float, float]) -> bool:
    """Higher validation accuracy, or the same with a lower validation loss: on a small validation
    split many epochs tie in accuracy, and the loss still tells them apart."""
    return fit[0] > best[0] or (fit[0] == best[0] and fit[1] < best[1])


def _reset_dead(
    quantizer: VectorQuantizer, epoch_usage: torch.Tensor, train: CacheView, rng: np.random.Generator
) -> int:
    dead = torch.nonzero(epoch_usage == 0).flatten()
    if len(dead):
        fresh = sample_patches(train, len(dead), rng).to(quantizer.codebook.device)
        with torch.no_grad():
            quantizer.codebook[dead[: len(fresh)]] = (
                fresh  # fewer patches than dead prototypes: refill what can be
            )
    return int(len(dead))


class Stage1Loss(nn.Module):
    """Cross-entropy of the frozen probe on the quantized map + commitment MSE; only the prototypes train."""

    def __init__(self, quantizer: VectorQuantizer, probe: nn.Linear, commitment_weight: float) -> None:
        super().__init__()
        self.quantizer, self.probe, self.commitment_weight = quantizer, probe, commitment_weight

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        partner: torch.Tensor | None = None,
        keep: float = 1.0,
    ) -> torch.Tensor:
        logits, quantized = quantized_logits(self.quantizer, self.probe, features)
        ce = F.cross_entropy(logits, labels)
        if partner is not None:  # CutMix: labels weighted by the share of own cells
            ce = keep * ce + (1 - keep) * F.cross_entropy(logits, labels[partner])
        return ce + self.commitment_weight * F.mse_loss(quantized, features)


def _stage1_step(
    loss_fn: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    config: CodebookConfig,
    rng: np.random.Generator,
) -> torch.Tensor:
    if config.cutmix_prob and rng.uniform() < config.cutmix_prob:
        mix = feature_cutmix(features, rng)
        return loss_fn(mix.features, labels, mix.partner, mix.keep)
    return loss_fn(features, labels)


def _epoch(
    loss_fn: nn.Module, optimizer, scheduler, batches, source: BatchSource, config, rng
) -> torch.Tensor:
    """One stage-1 pass over `batches` (this rank's share of the epoch); returns the last loss."""
    for features, labels in source.iterate(batches):
        loss = _stage1_step(loss_fn, features, labels, config, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return loss


def train_codebook(
    train: CacheView,
    val: CacheView,
    probe: nn.Linear,
    config: CodebookConfig,
    *,
    seed: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
    cache: CacheConfig | None = None,
) -> tuple[VectorQuantizer, list[dict]]:
    """Stage 1: learn K prototypes so the frozen probe still classifies the quantized maps.

    Under torchrun the prototypes train with DDP; every rank sees its share of each epoch's
    shuffled entries, and usage counts are summed over ranks (so dead-prototype resets,
    drawn from a shared seed, are identical everywhere). The train and validation maps are
    read as `cache.resident` says (device memory or streamed; the same results either way).
    Returns the best-on-validation codebook and a per-epoch history.
    """
    ctx, cache = ctx or distributed.context(), cache or CacheConfig()
    train_source = choose(train, cache.resident, cache.resident_margin, device)
    val_source = choose(val, cache.resident, cache.resident_margin, device)
    quantizer = VectorQuantizer(init_codebook(train, config, seed=seed, device=device)).to(device)
    loss_fn = wrap_ddp(Stage1Loss(quantizer, probe, config.commitment_weight), device, ctx)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=config.lr)
    steps_per_epoch = len(distributed.rank_batches(train.entries, config.batch_size, seed, 0, ctx))
    total, warmup = config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    shared_rng, local_rng = np.random.default_rng(seed), np.random.default_rng((seed, ctx.rank))
    history, best = [], ((-1.0, float("inf")), None)
    epochs = progress.bar(range(config.epochs), desc="stage 1: codebook", unit="epoch")
    for epoch in epochs:
        quantizer.train()
        usage_before = quantizer.usage.clone()
        batches = distributed.rank_batches(train.entries, config.batch_size, seed, epoch, ctx)
        loss = _epoch(loss_fn, optimizer, scheduler, batches, train_source, config, local_rng)
        epoch_usage = distributed.all_reduce_sum(quantizer.usage - usage_before)
        quantizer.usage.copy_(usage_before + epoch_usage)
        dead = int((epoch_usage == 0).sum())
        if config.reset_dead_prototypes:
            _reset_dead(quantizer, epoch_usage, train, shared_rng)
        fit = quantized_fit(quantizer, probe, val_source, config.batch_size, device, ctx)
        history.append(
            {
                "epoch": epoch,
                "loss": loss.item(),
                "dead_prototypes": dead,
                "val_accuracy": fit[0],
                "val_loss": fit[1],
            }
        )
        logger.info("stage 1 epoch %d: loss %.4f dead %d val %.4f", epoch, loss.item(), dead, fit[0])
        epochs.set_postfix(val=fit[0], dead=dead)
        if best[1] is None or better_fit(fit, best[0]):
            best = (fit, copy.deepcopy(quantizer.state_dict()))
    quantizer.load_state_dict(best[1])
    quantizer.requires_grad_(False).eval()
    return quantizer, history


def prototype_usage(
    codebook: torch.Tensor,
    subset: CacheView | BatchSource,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> torch.Tensor:
    """(K,) number of patches of the subset whose nearest prototype is k (summed over ranks).

    `subset` is a cache view (streamed) or a batch source over one (`protoquant.cache.resident`).
    """
    source = as_source(subset, device)
    entries = distributed.shard_for_rank(source.view.entries, ctx or distributed.context())
    codebook = codebook.to(source.device)
    counts = torch.zeros(codebook.shape[0], dtype=torch.int64, device=source.device)
    for features, _ in source.batches(entries, batch_size):
        counts += torch.bincount(nearest_prototypes(to_patches(features), codebook), minlength=len(counts))
    return distributed.all_reduce_sum(counts.cpu().double()).float()
