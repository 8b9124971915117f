"""`edit_checkpoint`: apply a plan of edits to a checkpoint, measure each one, write a new checkpoint.

Every operation is measured on the run's validation cache before and after (accuracy and
explanation size) and recorded in the new checkpoint's edit history. The operations run in a
fixed order, so that prototype numbers given by the user refer to the input checkpoint:
disable -> merge -> top-k -> remove unused (renumbers) -> re-fit.

The gallery of the input belongs to the input's model hash. When the codebook is unchanged
(disable, merge, top-k, re-fit) every nearest training patch and usage count is still right, so
it is carried over with the new class weights and hash; when prototypes were removed (or the
input's gallery is stale or in an older format) it is rebuilt from the training cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from protoquant.cache.build import build_cache
from protoquant.cache.view import CacheView
from protoquant.data import load_splits
from protoquant.distributed import resolve_device
from protoquant.explain import edit
from protoquant.explain.edit_measure import EditContext, Step, apply_and_record, refit
from protoquant.explain.gallery import (
    TOP_K,
    ensure_gallery,
    has_gallery,
    load_gallery,
    model_hash,
    save_gallery,
)
from protoquant.history import EditRecord
from protoquant.model import ProtoQuant

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 64  # cached maps per batch when scoring


@dataclass(frozen=True)
class EditPlan:
    """Which edits to make (all off by default). Prototype numbers refer to the input checkpoint."""

    disable: tuple[tuple[int, int | None], ...] = ()  # (prototype, class index or None = every class)
    merge_cosine: float | None = None  # merge weighted prototypes with cosine above this
    top_k: int = 0  # 0 = no limit; else every class keeps its k largest weights
    remove_unused: bool = False
    prune_mode: str = "exact"  # see protoquant.explain.edit.remove_unused
    refit: bool = False  # re-fit the class layer on the training cache (prototypes untouched)
    refit_epochs: int = 0  # 0 = the run's head.top_k_epochs
    refit_lr: float = 0.0  # 0 = the run's head.lr

    def is_empty(self) -> bool:
        return not (
            self.disable or self.merge_cosine is not None or self.top_k or self.remove_unused or self.refit
        )


@dataclass(frozen=True)
class EditResult:
    model: ProtoQuant  # the edited model (its `checkpoint` is the written folder)
    records: tuple[EditRecord, ...]  # the edits made now (the model's history ends with them)
    out: Path
    gallery: str  # "carried over", "rebuilt" or "none" (the input had no gallery)
    seconds: float


def _caches(model: ProtoQuant, device: torch.device, *, train: bool) -> tuple[CacheView, CacheView | None]:
    """View 0 of the validation cache, and (when `train`) every view of the training cache."""
    config = model.config
    splits = load_splits(config.data, config.seed)
    if len(splits.val) == 0:
        raise ValueError("the run has no validation split: edits are measured on it (data.val_fraction > 0)")

    def store(dataset, views: int) -> CacheView:
        built = build_cache(
            dataset, model.backbone, model.transform, views=views, config=config.cache, device=device
        )
        return CacheView(built, built.entries())

    val = store(splits.val, 1)
    return val, (store(splits.train, config.cache.train_views) if train else None)


def _steps(plan: EditPlan, context: EditContext) -> list[Step]:
    """(operation, parameters, head -> (head, details)) for every edit in the plan, in order."""
    steps: list[Step] = []
    for prototype, class_index in plan.disable:
        if class_index is not None and not 0 <= class_index < len(context.classes):
            raise ValueError(f"disable: class {class_index} is outside 0..{len(context.classes) - 1}")
        where = "all" if class_index is None else context.classes[class_index]
        steps.append(
            (
                "disable",
                {"prototype": prototype, "class": where},
                lambda h, p=prototype, c=class_index: (edit.disable(h, p, c), {}),
            )
        )
    if plan.merge_cosine is not None:

        def merge(head):
            merged, groups = edit.merge_duplicates(head, plan.merge_cosine)
            return merged, {"groups": groups}

        steps.append(("merge", {"cosine": plan.merge_cosine}, merge))
    if plan.top_k:
        steps.append(("top_k", {"k": plan.top_k}, lambda h: (edit.limit_top_k(h, plan.top_k), {})))
    if plan.remove_unused:

        def remove(head):
            pruned, kept = edit.remove_unused(head, plan.prune_mode)
            return pruned, {"kept": kept, "removed": head.num_prototypes - len(kept)}

        steps.append(("remove_unused", {"mode": plan.prune_mode}, remove))
    if plan.refit:
        config = context.config.head
        parameters = {"epochs": plan.refit_epochs or config.top_k_epochs, "lr": plan.refit_lr or config.lr}
        steps.append(("refit", parameters, lambda h: (refit(h, context, **parameters), {})))
    return steps


def _same_codebook(before: ProtoQuant, after: ProtoQuant) -> bool:
    a, b = before.head.codebook.cpu(), after.head.codebook.cpu()
    return a.shape == b.shape and torch.equal(a, b)


def _gallery_writer(source: Path, before: ProtoQuant, after: ProtoQuant, device: torch.device):
    """out -> what happened to the gallery; the input's gallery is read now (before `out` is written,
    which may replace the input folder)."""
    if not has_gallery(source):
        return lambda out: "none"
    try:
        stored = load_gallery(source)
    except ValueError as err:  # an older gallery format or damaged files: the edited model gets a new one
        logger.warning("%s: the input's gallery cannot be carried over (%s); rebuilding it", source, err)
        stored = None
    carry = stored is not None and stored.model_hash == model_hash(before) and _same_codebook(before, after)
    top_k = TOP_K if stored is None else stored.top_k

    def write(out: Path) -> str:
        if carry:  # same prototypes: nearest patches and usage stand; only the weights changed
            weights = after.head.class_weights.detach().float().cpu()
            save_gallery(replace(stored, class_weights=weights, model_hash=model_hash(after)), out)
            return "carried over"
        ensure_gallery(after, out, top_k=top_k, rebuild=True, device=device)
        return "rebuilt"

    return write


def edit_checkpoint(
    path: str | Path,
    out: str | Path,
    plan: EditPlan,
    *,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH,
) -> EditResult:
    """Apply `plan` to checkpoint `path` and write the edited checkpoint to `out`.

    Raises:
        ValueError: an empty plan, `out` exists (or is `path`) without `overwrite`, or a bad edit.
    """
    start = time.perf_counter()
    path, out = Path(path), Path(out)
    if plan.is_empty():
        raise ValueError(
            "no edit asked for: give at least one of disable, merge, top-k, remove unused, re-fit"
        )
    if out.exists() and not overwrite:
        same = out.resolve() == path.resolve()
        raise ValueError(
            f"--out '{out}' {'is the input checkpoint' if same else 'exists'}; pass --overwrite to replace it"
        )
    model = ProtoQuant.load(path)
    device = resolve_device(model.config.device)
    model = model.to(device)
    val, train = _caches(model, device, train=plan.refit)
    context = EditContext(model.config, model.classes, val, train, batch_size, device)
    head, records = apply_and_record(model.head, _steps(plan, context), context)
    edited = ProtoQuant(model.backbone, head, model.classes, model.config, edits=(*model.edits, *records))
    write_gallery = _gallery_writer(path, model, edited, device)
    edited.save(out)
    gallery = write_gallery(out)
    edited.checkpoint = out
    return EditResult(edited, tuple(records), out, gallery, time.perf_counter() - start)
