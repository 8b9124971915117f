"""The training stages as plain loops over cached features.

Stage 0: linear probe on pooled features. Stage 1: codebook by vector quantization
through the frozen probe. Stage 2: the interpretable head on fixed pooled scores.
Model selection uses the validation entries only.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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


# --- stage 0 ----------------------------------------------------------------------------------


def train_probe(
    train: Subset, val: Subset, num_classes: int, config: ProbeConfig, *, seed: int, device: torch.device
) -> nn.Linear:
    """Linear probe on spatially pooled features; returns the best-on-validation probe (frozen)."""
    x_train = train.store.pooled()[train.entries].to(device)  # (N, D)
    y_train = train.labels.to(device)
    x_val, y_val = val.store.pooled()[val.entries].to(device), val.labels.to(device)
    torch.manual_seed(seed)
    probe = nn.Linear(x_train.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best_acc, best_state = -1.0, None
    for _epoch in tqdm(range(config.epochs), desc="stage 0: linear probe", leave=False):
        order = torch.randperm(len(y_train), generator=generator).to(device)
        for batch in order.split(config.batch_size):
            loss = F.cross_entropy(probe(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_acc = accuracy(probe(x_val), y_val)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(probe.state_dict())
    probe.load_state_dict(best_state)
    probe.requires_grad_(False).eval()
    logger.info("stage 0: best val accuracy %.4f", best_acc)
    return probe


def evaluate_probe(probe: nn.Linear, subset: Subset, device: torch.device) -> float:
    with torch.no_grad():
        return accuracy(probe(subset.store.pooled()[subset.entries].to(device)), subset.labels.to(device))


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
    codebook: Codebook, probe: nn.Linear, subset: Subset, batch_size: int, device: torch.device
) -> float:
    codebook.eval()
    correct = 0
    with torch.no_grad():
        for features, labels in subset.store.batches(subset.entries, batch_size):
            logits, _ = quantized_logits(codebook, probe, features.to(device))
            correct += int((logits.argmax(1).cpu() == labels).sum())
    return correct / max(1, len(subset.entries))


def _reset_dead(
    codebook: Codebook, epoch_usage: torch.Tensor, train: Subset, rng: np.random.Generator
) -> int:
    dead = torch.nonzero(epoch_usage == 0).flatten()
    if len(dead):
        fresh = sample_patches(train, len(dead), rng).to(codebook.codes.device)
        with torch.no_grad():
            codebook.codes[dead] = fresh[: len(dead)]
    return int(len(dead))


def _codebook_loss(
    codebook: Codebook,
    probe: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    config: CodebookConfig,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Cross-entropy of the frozen probe on the quantized map + commitment MSE (optionally CutMix)."""
    partner, keep = None, 1.0
    if config.cutmix_prob and rng.uniform() < config.cutmix_prob:
        mix = feature_cutmix(features, rng)
        features, partner, keep = mix.features, mix.partner, mix.keep
    logits, quantized = quantized_logits(codebook, probe, features)
    ce = F.cross_entropy(logits, labels)
    if partner is not None:
        ce = keep * ce + (1 - keep) * F.cross_entropy(logits, labels[partner])
    return ce + config.commitment_weight * F.mse_loss(quantized, features)


def train_codebook(
    train: Subset, val: Subset, probe: nn.Linear, config: CodebookConfig, *, seed: int, device: torch.device
) -> tuple[Codebook, list[dict]]:
    """Stage 1: learn K codes so the frozen probe still classifies the quantized maps.

    Loss = cross-entropy + commitment_weight * MSE(code, feature); only codes train.
    Returns the best-on-validation codebook and a per-epoch history.
    """
    codebook = Codebook(init_codebook(train, config, seed=seed)).to(device)
    optimizer = torch.optim.Adam(codebook.parameters(), lr=config.lr)
    steps_per_epoch = -(-len(train.entries) // config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    rng = np.random.default_rng(seed)
    history, best = [], (-1.0, None)
    for epoch in tqdm(range(config.epochs), desc="stage 1: codebook", leave=False):
        codebook.train()
        usage_before = codebook.usage.clone()
        for features, labels in train.store.batches(
            train.entries, config.batch_size, shuffle=True, generator=rng
        ):
            loss = _codebook_loss(codebook, probe, features.to(device), labels.to(device), config, rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        epoch_usage = codebook.usage - usage_before
        dead = (
            _reset_dead(codebook, epoch_usage, train, rng)
            if config.reset_dead_codes
            else int((epoch_usage == 0).sum())
        )
        val_acc = evaluate_quantized(codebook, probe, val, config.batch_size, device)
        history.append({"epoch": epoch, "loss": loss.item(), "dead_codes": dead, "val_accuracy": val_acc})
        logger.info("stage 1 epoch %d: loss %.4f dead %d val %.4f", epoch, loss.item(), dead, val_acc)
        if val_acc > best[0]:
            best = (val_acc, copy.deepcopy(codebook.state_dict()))
    codebook.load_state_dict(best[1])
    codebook.requires_grad_(False).eval()
    return codebook, history


def code_usage(codes: torch.Tensor, subset: Subset, batch_size: int, device: torch.device) -> torch.Tensor:
    """(K,) number of patches of the subset whose nearest code is k."""
    counts = torch.zeros(codes.shape[0], dtype=torch.long)
    for features, _ in subset.store.batches(subset.entries, batch_size):
        indices = nearest_codes(to_patches(features.to(device)), codes.to(device))
        counts += torch.bincount(indices.cpu(), minlength=codes.shape[0])
    return counts.float()
