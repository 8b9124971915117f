"""Edits of a trained head, as pure functions: each returns a new head and leaves its input alone.

- `limit_top_k`: every class keeps its k largest weights (the mask), so at most k are positive.
- `disable`: prototype k contributes nothing, to every class or to one (mask entries set to 0).
  It still takes part in the softmax normaliser, so every other contribution is unchanged.
- `merge_duplicates`: prototypes whose cosine exceeds a threshold form a group; the most used
  one (ties: the lower index) keeps its vector and receives the sum of the group's weights, the
  others get weight 0. Their softmax share is untouched, so every score stays as it was and the
  logit of class c changes by sum_j w[c, j] (s_rep - s_j) over the absorbed j: small for
  near-duplicates, but not zero (measured and recorded by the edit).
- `remove_unused`: prototypes no class weighs (max_c w[c, k] = 0) leave the model. "exact" keeps
  their share of the softmax normaliser (`PrunedHead`), so every logit is unchanged; "drop" takes
  them out of the softmax too: the smallest model, whose logits change (re-fit afterwards).

Shapes: codebook (K, D), class_weights (C, K).
"""

from __future__ import annotations

import copy

import torch

from protoquant.head import ProtoQuantHead
from protoquant.pruned_head import PrunedHead
from protoquant.train.head import limit_top_k as limit_layer_top_k

MERGE_COSINE = 0.95  # default cosine above which two weighted prototypes count as near-duplicates
PRUNE_MODES = ("exact", "drop")  # remove_unused: keep the normaliser share, or drop it too


def copy_head(head: ProtoQuantHead) -> ProtoQuantHead:
    """A deep copy: the new head shares no tensor with `head`."""
    return copy.deepcopy(head)


def _check_prototype(head: ProtoQuantHead, prototype: int) -> None:
    if not 0 <= prototype < head.num_prototypes:
        raise ValueError(f"prototype {prototype} is outside 0..{head.num_prototypes - 1} (K of the head)")


def limit_top_k(head: ProtoQuantHead, k: int) -> ProtoQuantHead:
    """Every class keeps at most its k largest weights; entries already masked stay masked."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    out = copy_head(head)
    layer = out.class_layer
    previous = layer.mask.clone()  # (C, K)
    with torch.no_grad():
        limit_layer_top_k(layer, k)
        layer.mask.mul_(previous)  # a disabled entry never comes back through the top-k
    return out


def disable(head: ProtoQuantHead, prototype: int, class_index: int | None = None) -> ProtoQuantHead:
    """Prototype `prototype` contributes nothing to class `class_index` (None: to every class)."""
    _check_prototype(head, prototype)
    num_classes = head.class_layer.mask.shape[0]
    if class_index is not None and not 0 <= class_index < num_classes:
        raise ValueError(f"class {class_index} is outside 0..{num_classes - 1}")
    out = copy_head(head)
    rows = slice(None) if class_index is None else class_index
    with torch.no_grad():
        out.class_layer.mask[rows, prototype] = 0.0
    return out


def duplicate_groups(head: ProtoQuantHead, threshold: float) -> list[list[int]]:
    """Groups [representative, absorbed...] of weighted prototypes with cosine > threshold.

    Greedy and deterministic: prototypes in order of usage (descending, ties by index) each
    absorb every later, not yet absorbed prototype above the threshold. Only prototypes some
    class weighs take part; singletons are left out.
    """
    if not -1.0 < threshold < 1.0:
        raise ValueError(f"merge cosine threshold must be in (-1, 1), got {threshold}")
    weighted = head.class_weights.detach().amax(dim=0).cpu() > 0  # (K,)
    unit = head.unit_prototypes.detach().cpu()
    cosine = unit @ unit.t()  # (K, K)
    usage = head.usage.detach().cpu()
    order = sorted(torch.nonzero(weighted).flatten().tolist(), key=lambda k: (-float(usage[k]), k))
    absorbed: set[int] = set()
    groups = []
    for position, representative in enumerate(order):
        if representative in absorbed:
            continue
        group = [
            j for j in order[position + 1 :] if j not in absorbed and cosine[representative, j] > threshold
        ]
        if group:
            absorbed.update(group)
            groups.append([representative, *group])
    return groups


def merge_duplicates(
    head: ProtoQuantHead, threshold: float = MERGE_COSINE
) -> tuple[ProtoQuantHead, list[list[int]]]:
    """Merge near-duplicate prototypes (see the module docstring); returns the head and the groups."""
    groups = duplicate_groups(head, threshold)
    out = copy_head(head)
    layer = out.class_layer
    weights = layer.effective_weight.detach().clone()  # (C, K)
    with torch.no_grad():
        for representative, *absorbed in groups:
            total = weights[:, [representative, *absorbed]].sum(dim=1)  # (C,)
            layer.weight[:, representative] = total
            layer.mask[:, representative] = torch.where(total > 0, 1.0, layer.mask[:, representative])
            layer.weight[:, absorbed] = 0.0
            layer.mask[:, absorbed] = 0.0
    return out, groups


def remove_unused(head: ProtoQuantHead, mode: str = "exact") -> tuple[ProtoQuantHead, list[int]]:
    """Remove the prototypes no class weighs; returns the head and the kept indices (new k -> old).

    Args:
        mode: "exact" keeps their share of the softmax normaliser (every logit unchanged);
            "drop" removes them from the softmax as well, together with any normaliser-only
            prototypes an earlier exact removal kept.
    """
    if mode not in PRUNE_MODES:
        raise ValueError(f"prune mode must be one of {', '.join(PRUNE_MODES)}, got {mode!r}")
    weights = head.class_weights.detach()  # (C, K)
    used = weights.amax(dim=0) > 0  # (K,)
    if not used.any():
        raise ValueError("no class weighs any prototype: removing the unused ones would leave none")
    kept = torch.nonzero(used).flatten()
    codebook = head.codebook.detach()
    num_classes = weights.shape[0]
    removed = codebook[~used]  # (R, D)
    if isinstance(head, PrunedHead):
        removed = torch.cat([head.removed_codebook.detach(), removed])
    if mode == "exact" and len(removed):
        out = PrunedHead(codebook[kept], removed, num_classes, temperature=head.temperature)
    else:
        out = ProtoQuantHead(codebook[kept], num_classes, temperature=head.temperature)
    with torch.no_grad():
        out.usage.copy_(head.usage[kept])
        out.class_layer.weight.copy_(head.class_layer.weight[:, kept])
        out.class_layer.mask.copy_(head.class_layer.mask[:, kept])
    out.to(codebook.device).requires_grad_(False).eval()
    return out, kept.tolist()
