"""The fine-tuning recipe: AdamW groups, warm-up + cosine per step, Mixup / CutMix targets, precision.

Norm weights and biases (every parameter with fewer than 2 dimensions) get no weight decay; the
new linear layer learns at `finetune.head_lr`, the backbone at `finetune.lr`. Mixing uses timm's
`Mixup` (batch mode: one lambda per batch) with soft targets and `SoftTargetCrossEntropy`;
without mixing the loss is cross-entropy with label smoothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from protoquant.config import FinetuneConfig

MIXUP_SWITCH_PROB = 0.5  # with both alphas set: share of mixed batches that take CutMix (timm default)
LR_KEY = "base_lr"  # the group's learning rate before the schedule factor


def param_groups(net: nn.Module, config: FinetuneConfig) -> list[dict]:
    """AdamW parameter groups of `net` (a FinetuneNet): backbone / classifier x decay / no decay.

    Frozen parameters (requires_grad False) are left out; empty groups are dropped.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in net.named_parameters():
        if not parameter.requires_grad:
            continue
        head = name.startswith("classifier.")
        decay = parameter.ndim >= 2  # norms and biases are 1-d
        groups.setdefault((head, decay), []).append(parameter)
    return [
        {
            "params": params,
            LR_KEY: config.head_lr if head else config.lr,
            "lr": config.head_lr if head else config.lr,
            "weight_decay": config.weight_decay if decay else 0.0,
        }
        for (head, decay), params in sorted(groups.items())
    ]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Schedule factor of optimizer step `step` (0-based): linear warm-up to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's learning rate = its base rate x `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group[LR_KEY] * factor


def mixing_enabled(config: FinetuneConfig) -> bool:
    """Whether batches are mixed (an alpha > 0 and a mix probability > 0)."""
    return config.mix_prob > 0 and (config.mixup_alpha > 0 or config.cutmix_alpha > 0)


def make_mixing(config: FinetuneConfig, num_classes: int) -> Callable | None:
    """timm's Mixup (images, labels) -> (mixed images, soft targets (B, C)); None without mixing."""
    if not mixing_enabled(config):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        prob=config.mix_prob,
        switch_prob=MIXUP_SWITCH_PROB,
        mode="batch",
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )


def make_loss(config: FinetuneConfig) -> nn.Module:
    """Soft-target cross-entropy for mixed targets, else cross-entropy with label smoothing."""
    if mixing_enabled(config):
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16; None (fp32) on other devices or with amp off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
