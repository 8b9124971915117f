"""Measuring and recording edits: validation accuracy and explanation size before and after each.

Also the one edit that needs data, `refit`: the class layer trained again on the training cache's
pooled scores (prototypes, temperature and mask untouched), kept at its best validation epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from protoquant.cache.view import CacheView
from protoquant.config import RunConfig
from protoquant.explain.edit import copy_head
from protoquant.head import ProtoQuantHead
from protoquant.history import EditRecord, ModelState, utc_now
from protoquant.model_card import weights_size
from protoquant.train.head import compute_scores, fit_class_layer, scores_dtype

logger = logging.getLogger(__name__)

Step = tuple[
    str, dict, Callable[[ProtoQuantHead], tuple[ProtoQuantHead, dict]]
]  # (operation, parameters, apply)


@dataclass(frozen=True)
class EditContext:
    """The run an edit is measured in: its config, classes and cached splits."""

    config: RunConfig
    classes: tuple[str, ...]
    val: CacheView  # view 0 of the validation images: every measurement and selection
    train: CacheView | None  # every view of the training images (re-fit only)
    batch_size: int
    device: torch.device


def _val_logits(head: ProtoQuantHead, context: EditContext) -> torch.Tensor:
    """(N_val, C) logits of the head on the validation cache, on the CPU."""
    scores = compute_scores(head, context.val, context.batch_size, context.device)
    with torch.no_grad():
        return head.class_layer(scores.to(context.device)).cpu()


def measure(head: ProtoQuantHead, context: EditContext) -> tuple[ModelState, torch.Tensor]:
    """The head's state (validation accuracy, explanation size, K) and its validation logits."""
    logits = _val_logits(head, context)
    accuracy = float((logits.argmax(dim=1) == context.val.labels).float().mean())
    global_size, per_class = weights_size(head.class_weights)
    return ModelState(accuracy, global_size, per_class, head.num_prototypes), logits


def apply_and_record(
    head: ProtoQuantHead, steps: Sequence[Step], context: EditContext
) -> tuple[ProtoQuantHead, list[EditRecord]]:
    """Apply `steps` in order; one record each, with how far the validation logits moved."""
    state, logits = measure(head, context)
    records = []
    for operation, parameters, apply in steps:
        edited, details = apply(head)
        after, new_logits = measure(edited, context)
        moved = {
            "val_max_logit_change": float((new_logits - logits).abs().max()),
            "val_prediction_agreement": float(
                (new_logits.argmax(dim=1) == logits.argmax(dim=1)).float().mean()
            ),
        }
        records.append(EditRecord(operation, parameters, utc_now(), state, after, {**details, **moved}))
        logger.info(
            "edit %s %s: val %.4f -> %.4f", operation, parameters, state.val_accuracy, after.val_accuracy
        )
        head, state, logits = edited, after, new_logits
    return head, records


def refit(head: ProtoQuantHead, context: EditContext, *, epochs: int, lr: float) -> ProtoQuantHead:
    """A copy of `head` whose class layer is trained again on the training cache's scores.

    The mask stays (top-k and disabled entries remain zero); the best epoch on the validation
    cache is kept, as in stage 2.
    """
    if context.train is None:
        raise ValueError("re-fitting needs the training cache; the edit was planned without it")
    config = context.config.head
    out = copy_head(head)
    dtype = scores_dtype(config)
    train = (
        compute_scores(out, context.train, config.batch_size, context.device, dtype),
        context.train.labels,
    )
    val = (compute_scores(out, context.val, config.batch_size, context.device, dtype), context.val.labels)
    layer = out.class_layer
    layer.weight.requires_grad_(True)
    fit_class_layer(layer, train, val, lr=lr, epochs=epochs, config=config, seed=context.config.seed)
    return out.requires_grad_(False).eval()
