"""A PIP-Net-style head on the same cached features, for side-by-side comparison.

PIP-Net's prototypes are the channels of its (add-on) feature map: a softmax over channels at
every location, max-pooled over locations, then a non-negative class layer. Here the channels are
the frozen backbone's own D channels (no add-on layer, no self-supervised pretraining), so the
baseline isolates what the quantized codebook adds. It speaks the head interface the metrics use:
forward -> `HeadOutput` with similarity (B, K=D, H, W) = the channel map before the softmax,
activation = the softmax over channels, scores = spatial max; `class_weights` (C, D); `scores()`.
Stage 2 is trained by the same code path as ProtoQuant's (`ScoresSource`, `fit_class_layer`,
`limit_sparse`) on the fixed pooled scores, in memory or on disk by `head.scores_memory_mb`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from protoquant import distributed
from protoquant.cache.view import CacheView
from protoquant.config import HeadConfig
from protoquant.head import HeadOutput, NonNegativeLinear, presence_scores
from protoquant.model import ProtoQuant
from protoquant.train.head import fit_class_layer, limit_sparse, validation_fit
from protoquant.train.scores import ScoresSource, compute_scores

logger = logging.getLogger(__name__)

PIPNET_TEMPERATURE = 1.0  # PIP-Net applies a plain softmax over prototype channels


class PipNetStyleHead(nn.Module):
    """Prototypes = backbone channels under a per-location softmax, max-pool, non-negative class layer."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        temperature: float = PIPNET_TEMPERATURE,
        init_mean: float = 1.0,
        init_std: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.channels = int(channels)
        self.temperature = float(temperature)
        self.class_layer = NonNegativeLinear(
            channels, num_classes, init_mean=init_mean, init_std=init_std, generator=generator
        )

    @property
    def num_prototypes(self) -> int:
        return self.channels

    @property
    def codebook(self) -> torch.Tensor:
        """(D, D) the prototype directions in feature space: one unit vector per channel."""
        return torch.eye(self.channels, device=self.class_layer.weight.device)

    @property
    def class_weights(self) -> torch.Tensor:
        """(C, D) effective, non-negative class weights."""
        return self.class_layer.effective_weight

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled channel presence for features (B, D, H, W)."""
        return presence_scores(features, self.temperature)[1]

    def forward(self, features: torch.Tensor) -> HeadOutput:
        activation, scores = presence_scores(features, self.temperature)  # (B, D, H, W), (B, D)
        return HeadOutput(self.class_layer(scores), scores, features, activation)

    def contributions(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, C, D) score x weight; summing over D gives the logits."""
        return scores[:, None, :] * self.class_weights[None]


def train_baseline_head(
    train: CacheView,
    val: CacheView,
    num_classes: int,
    config: HeadConfig,
    *,
    seed: int,
    device: torch.device,
    temperatures: tuple[float, ...] = (PIPNET_TEMPERATURE,),
) -> tuple[PipNetStyleHead, dict]:
    """Stage 2 of ProtoQuant's training, run on the channel head; tau and lr chosen on validation.

    Returns:
        The frozen head and the selection record (grid, choice, validation accuracy).
    """
    lrs = config.lr_grid or (config.lr,)
    trials, best = [], None
    one_process = distributed.Context()  # every process scores every training row, as it fits them all
    float32 = replace(config, scores_dtype="float32")  # the baseline's scores were always float32
    prototypes, tables = train.store.channels, len(temperatures)
    with ScoresSource(train, float32, one_process, prototypes=prototypes, tables=tables) as source:
        for temperature in temperatures:
            head = _new_head(train.store.channels, num_classes, config, temperature, seed).to(device)
            scores = (
                source.compute(head, device),
                (compute_scores(head, val, config.batch_size, device, source.dtype), val.labels),
            )
            for lr in lrs:
                candidate = _new_head(train.store.channels, num_classes, config, temperature, seed).to(device)
                val_acc = _fit(candidate, scores, lr, config.epochs, config, seed)
                trials.append({"temperature": temperature, "lr": lr, "val_accuracy": val_acc})
                logger.info("baseline stage 2: tau %.3g lr %.3g -> val %.4f", temperature, lr, val_acc)
                if best is None or val_acc > best[0]:
                    best = (val_acc, candidate, scores, lr)
            del scores
        val_acc, head, scores, lr = best
        if config.top_k_per_class:  # the same limit and fine-tuning as ProtoQuant's stage 2
            fit = dict(lr=lr, epochs=config.epochs, config=replace(config, lr=lr), seed=seed)
            limit_sparse(head.class_layer, config.top_k_per_class, *scores, config, fit)
            val_acc = validation_fit(head.class_layer, scores[1])[0]
    head.requires_grad_(False).eval()
    return head, {"temperature": head.temperature, "lr": lr, "val_accuracy": val_acc, "trials": trials}


def _fit(head, scores: tuple, lr: float, epochs: int, config: HeadConfig, seed: int) -> float:
    """Fit the class layer on (training table, (validation scores, labels)); the best val accuracy."""
    return fit_class_layer(
        head.class_layer, *scores, lr=lr, epochs=epochs, config=replace(config, lr=lr), seed=seed
    )


def _new_head(
    channels: int, num_classes: int, config: HeadConfig, temperature: float, seed: int
) -> PipNetStyleHead:
    return PipNetStyleHead(
        channels,
        num_classes,
        temperature=temperature,
        init_mean=config.weight_init_mean,
        init_std=config.weight_init_std,
        generator=torch.Generator().manual_seed(seed),
    )


def baseline_model(model: ProtoQuant, head: PipNetStyleHead) -> ProtoQuant:
    """The baseline head on `model`'s frozen backbone, as an image-in model the metrics accept.

    Evaluation only: `ProtoQuant.save`/`load` handle ProtoQuant heads, not this one.
    """
    return ProtoQuant(model.backbone, head, model.classes, model.config)
