"""The training stages as plain loops over cached features.

Stage 0: linear probe on pooled features. Stage 1: codebook by vector quantization
through the frozen probe. Stage 2: the interpretable head on fixed pooled scores.
Model selection uses the validation entries only.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from protoquant import distributed
from protoquant.augment import feature_cutmix
from protoquant.codebook import Codebook, kmeans_init, nearest_codes, orthogonal_init, to_patches
from protoquant.config import CodebookConfig, ProbeConfig
from protoquant.features import FeatureStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subset:
    """A feature store restricted to some entries (e.g. all train views, or view 0 of val)."""

    store: FeatureStore
    entries: np.ndarray

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.store.labels[self.entries])


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")


def reduced_accuracy(correct: int, total: int) -> float:
    """Accuracy from per-rank counts summed over ranks (plain ratio in one process)."""
    counts = distributed.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64))
    return float(counts[0] / counts[1]) if counts[1] else float("nan")


def wrap_ddp(module: nn.Module, device: torch.device, ctx: distributed.Context) -> nn.Module:
    """DistributedDataParallel around `module` under torchrun; the module itself otherwise.

    Buffers are not broadcast: usage counts are summed over ranks explicitly instead.
    """
    if not ctx.distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep buffers rank-local
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


# --- stage 0 ----------------------------------------------------------------------------------


def train_probe(
    train: Subset,
    val: Subset,
    num_classes: int,
    config: ProbeConfig,
    *,
    seed: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> nn.Linear:
    """Linear probe on spatially pooled features; returns the best-on-validation probe (frozen)."""
    ctx = ctx or distributed.context()
    x_train = train.store.pooled()[train.entries].to(device)  # (N, D)
    y_train = train.labels.to(device)
    torch.manual_seed(seed)
    probe = nn.Linear(x_train.shape[1], num_classes).to(device)
    model = wrap_ddp(probe, device, ctx)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_acc, best_state = -1.0, None
    for epoch in tqdm(
        range(config.epochs), desc="stage 0: linear probe", leave=False, disable=not ctx.is_main
    ):
        for rows in distributed.rank_batches(np.arange(len(y_train)), config.batch_size, seed, epoch, ctx):
            batch = torch.from_numpy(rows).to(device)
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_acc = evaluate_probe(probe, val, device, ctx)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(probe.state_dict())
    probe.load_state_dict(best_state)
    probe.requires_grad_(False).eval()
    logger.info("stage 0: best val accuracy %.4f", best_acc)
    return probe


def evaluate_probe(
    probe: nn.Linear, subset: Subset, device: torch.device, ctx: distributed.Context | None = None
) -> float:
    """Accuracy of the probe on pooled features; each rank scores its share."""
    entries = distributed.shard_for_rank(subset.entries, ctx or distributed.context())
    with torch.no_grad():
        logits = probe(subset.store.pooled()[entries].to(device))
    labels = torch.from_numpy(subset.store.labels[entries]).to(device)
    return reduced_accuracy(int((logits.argmax(1) == labels).sum()), len(entries))


# --- stage 1 ----------------------------------------------------------------------------------


def sample_patches(subset: Subset, count: int, generator: np.random.Generator) -> torch.Tensor:
    """(count, D) random patch features from the subset (all if fewer exist)."""
    cells = subset.store.grid[0] * subset.store.grid[1]
    total = len(subset.entries) * cells
    picks = np.sort(generator.choice(total, size=min(count, total), replace=False))
    entry_pos, cell = np.divmod(picks, cells)
    unique, inverse = np.unique(entry_pos, return_inverse=True)
    features = to_patches(subset.store.get(subset.entries[unique]))  # (U*H*W, D)
    return features[inverse * cells + cell]


def init_codebook(train: Subset, config: CodebookConfig, *, seed: int) -> torch.Tensor:
    """(K, D) initial codes: k-means on sampled training patches (default) or orthogonal."""
    generator = torch.Generator().manual_seed(seed)
    if config.init == "orthogonal":
        return orthogonal_init(config.num_codes, train.store.channels, generator)
    if config.init != "kmeans":
        raise ValueError(f"codebook.init must be 'kmeans' or 'orthogonal', got '{config.init}'")
    patches = sample_patches(train, config.kmeans_patches, np.random.default_rng(seed))
    return kmeans_init(patches, config.num_codes, config.kmeans_iters, generator)


def quantized_logits(
    codebook: Codebook, probe: nn.Linear, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the frozen probe on the quantized map, and the quantized map (B, D, H, W)."""
    quantized = codebook(features).quantized
    return probe(quantized.mean(dim=(2, 3))), quantized


def evaluate_quantized(
    codebook: Codebook,
    probe: nn.Linear,
    subset: Subset,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> float:
    """Accuracy of the frozen probe on quantized maps; each rank scores its share."""
    codebook.eval()
    entries = distributed.shard_for_rank(subset.entries, ctx or distributed.context())
    correct = 0
    with torch.no_grad():
        for features, labels in subset.store.batches(entries, batch_size):
            logits, _ = quantized_logits(codebook, probe, features.to(device))
            correct += int((logits.argmax(1).cpu() == labels).sum())
    return reduced_accuracy(correct, len(entries))


def _reset_dead(
    codebook: Codebook, epoch_usage: torch.Tensor, train: Subset, rng: np.random.Generator
) -> int:
    dead = torch.nonzero(epoch_usage == 0).flatten()
    if len(dead):
        fresh = sample_patches(train, len(dead), rng).to(codebook.codes.device)
        with torch.no_grad():
            codebook.codes[dead] = fresh[: len(dead)]
    return int(len(dead))


class Stage1Loss(nn.Module):
    """Cross-entropy of the frozen probe on the quantized map + commitment MSE; only codes train."""

    def __init__(self, codebook: Codebook, probe: nn.Linear, commitment_weight: float) -> None:
        super().__init__()
        self.codebook, self.probe, self.commitment_weight = codebook, probe, commitment_weight

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        partner: torch.Tensor | None = None,
        keep: float = 1.0,
    ) -> torch.Tensor:
        logits, quantized = quantized_logits(self.codebook, self.probe, features)
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


def train_codebook(
    train: Subset,
    val: Subset,
    probe: nn.Linear,
    config: CodebookConfig,
    *,
    seed: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> tuple[Codebook, list[dict]]:
    """Stage 1: learn K codes so the frozen probe still classifies the quantized maps.

    Under torchrun the codes train with DDP; every rank sees its share of each epoch's
    shuffled entries, and usage counts are summed over ranks (so dead-code resets,
    drawn from a shared seed, are identical everywhere). Returns the best-on-validation
    codebook and a per-epoch history.
    """
    ctx = ctx or distributed.context()
    codebook = Codebook(init_codebook(train, config, seed=seed)).to(device)
    loss_fn = wrap_ddp(Stage1Loss(codebook, probe, config.commitment_weight), device, ctx)
    optimizer = torch.optim.Adam(codebook.parameters(), lr=config.lr)
    steps_per_epoch = len(distributed.rank_batches(train.entries, config.batch_size, seed, 0, ctx))
    total, warmup = config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    shared_rng, local_rng = np.random.default_rng(seed), np.random.default_rng((seed, ctx.rank))
    history, best = [], (-1.0, None)
    for epoch in tqdm(range(config.epochs), desc="stage 1: codebook", leave=False, disable=not ctx.is_main):
        codebook.train()
        usage_before = codebook.usage.clone()
        for entries in distributed.rank_batches(train.entries, config.batch_size, seed, epoch, ctx):
            features, labels = train.store.get(entries), torch.from_numpy(train.store.labels[entries])
            loss = _stage1_step(loss_fn, features.to(device), labels.to(device), config, local_rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        epoch_usage = distributed.all_reduce_sum(codebook.usage - usage_before)
        codebook.usage.copy_(usage_before + epoch_usage)
        dead = int((epoch_usage == 0).sum())
        if config.reset_dead_codes:
            _reset_dead(codebook, epoch_usage, train, shared_rng)
        val_acc = evaluate_quantized(codebook, probe, val, config.batch_size, device, ctx)
        history.append({"epoch": epoch, "loss": loss.item(), "dead_codes": dead, "val_accuracy": val_acc})
        logger.info("stage 1 epoch %d: loss %.4f dead %d val %.4f", epoch, loss.item(), dead, val_acc)
        if val_acc > best[0]:
            best = (val_acc, copy.deepcopy(codebook.state_dict()))
    codebook.load_state_dict(best[1])
    codebook.requires_grad_(False).eval()
    return codebook, history


def code_usage(
    codes: torch.Tensor,
    subset: Subset,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> torch.Tensor:
    """(K,) number of patches of the subset whose nearest code is k (summed over ranks)."""
    entries = distributed.shard_for_rank(subset.entries, ctx or distributed.context())
    counts = torch.zeros(codes.shape[0], dtype=torch.float64)
    for features, _ in subset.store.batches(entries, batch_size):
        indices = nearest_codes(to_patches(features.to(device)), codes.to(device))
        counts += torch.bincount(indices.cpu(), minlength=codes.shape[0])
    return distributed.all_reduce_sum(counts).float()
