"""Stage 2: the interpretable head on fixed pooled scores.

With frozen codes the pooled scores (N, K) of every cached entry are fixed, so they
are computed once per temperature and the class layer trains on them in seconds.
Temperature and learning rate are chosen on the validation split when grids are given.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from protoquant.config import HeadConfig
from protoquant.head import NonNegativeLinear, ProtoQuantHead
from protoquant.train import Subset, accuracy

logger = logging.getLogger(__name__)


def compute_scores(
    head: ProtoQuantHead, subset: Subset, batch_size: int, device: torch.device
) -> torch.Tensor:
    """(N, K) pooled prototype presence of every entry in the subset (on the CPU)."""
    out = []
    with torch.no_grad():
        for features, _ in subset.store.batches(subset.entries, batch_size):
            out.append(head.scores(features.to(device)).cpu())
    return torch.cat(out)


def fit_class_layer(
    layer: NonNegativeLinear,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    epochs: int,
    config: HeadConfig,
    seed: int,
) -> float:
    """Train `layer` in place on (scores, labels); keep the best-on-validation weights.

    Returns the best validation accuracy.
    """
    (x_train, y_train), (x_val, y_val) = train, val
    device = layer.weight.device
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    optimizer = torch.optim.Adam([layer.weight], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best_acc, best_state = -1.0, None
    for _ in range(epochs):
        for batch in torch.randperm(len(y_train), generator=generator).to(device).split(config.batch_size):
            loss = F.cross_entropy(layer(x_train[batch]), y_train[batch])
            if config.l1:
                loss = loss + config.l1 * layer.effective_weight.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_acc = accuracy(layer(x_val), y_val)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(layer.state_dict())
    layer.load_state_dict(best_state)
    return best_acc


def limit_top_k(layer: NonNegativeLinear, k: int) -> None:
    """Keep only the k largest effective weights of every class (sets the mask)."""
    weights = layer.effective_weight.detach()  # (C, K)
    top = weights.topk(min(k, weights.shape[1]), dim=1).indices  # (C, k)
    mask = torch.zeros_like(weights).scatter_(1, top, 1.0)
    layer.mask.copy_(mask)


def train_head(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    train: Subset,
    val: Subset,
    num_classes: int,
    config: HeadConfig,
    *,
    seed: int,
    device: torch.device,
) -> tuple[ProtoQuantHead, dict]:
    """Stage 2 with frozen codes; returns the head and the selection record (grid, choice, val accuracy)."""
    temperatures = config.temperature_grid or (config.temperature,)
    lrs = config.lr_grid or (config.lr,)
    y_train, y_val = train.labels, val.labels
    trials, best = [], None
    for temperature in temperatures:
        head = _new_head(codebook, usage, num_classes, config, temperature, seed).to(device)
        scores = (
            compute_scores(head, train, config.batch_size, device),
            compute_scores(head, val, config.batch_size, device),
        )
        for lr in tqdm(lrs, desc=f"stage 2: tau={temperature}", leave=False):
            candidate = _new_head(codebook, usage, num_classes, config, temperature, seed).to(device)
            val_acc = fit_class_layer(
                candidate.class_layer,
                (scores[0], y_train),
                (scores[1], y_val),
                lr=lr,
                epochs=config.epochs,
                config=config,
                seed=seed,
            )
            trials.append({"temperature": temperature, "lr": lr, "val_accuracy": val_acc})
            logger.info("stage 2: tau %.3g lr %.3g -> val %.4f", temperature, lr, val_acc)
            if best is None or val_acc > best[0]:
                best = (val_acc, candidate, scores, lr)
    val_acc, head, scores, lr = best
    if config.top_k_per_class:
        limit_top_k(head.class_layer, config.top_k_per_class)
        val_acc = fit_class_layer(
            head.class_layer,
            (scores[0], y_train),
            (scores[1], y_val),
            lr=lr,
            epochs=config.top_k_epochs,
            config=config,
            seed=seed,
        )
    head.requires_grad_(False).eval()
    selection = {"temperature": head.temperature, "lr": lr, "val_accuracy": val_acc, "trials": trials}
    return head, selection


def _new_head(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    num_classes: int,
    config: HeadConfig,
    temperature: float,
    seed: int,
) -> ProtoQuantHead:
    torch.manual_seed(seed)
    head = ProtoQuantHead(
        codebook,
        num_classes,
        temperature=temperature,
        init_mean=config.weight_init_mean,
        init_std=config.weight_init_std,
    )
    head.usage.copy_(usage)
    return head


def evaluate_head(head: ProtoQuantHead, subset: Subset, batch_size: int, device: torch.device) -> float:
    scores = compute_scores(head, subset, batch_size, device)
    with torch.no_grad():
        return accuracy(head.class_layer(scores.to(device)).cpu(), subset.labels)


def global_size(head: ProtoQuantHead, threshold: float) -> int:
    """Number of prototypes with max_c w[c, k] > threshold (global explanation size)."""
    return int((head.class_weights.amax(dim=0) > threshold).sum())
