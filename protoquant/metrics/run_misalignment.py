"""Runner of the spatial-misalignment benchmark: a masked PGD through the frozen backbone.

Every feature map comes from `ProtoQuant.features` (the cache's `patch_features`: autocast, grid
pooling and float16 rounding as configured). The attack asks it for `input_gradients` under
`torch.enable_grad()`: only the input receives gradients, the backbone's weights keep
requires_grad=False, and the differentiable path leaves out only the float16 rounding.

Attack rows (one per image for "top" and "class", one per class prototype for "class_each") run
through the PGD in chunks of at most `attack_batch_size` (default 16; 0 = `batch_size`) rows, so memory is
that of one batch whatever the target rule; chunking changes no record (the random starts are
drawn row by row from one generator, in row order). Before the rest of the attacks, the runner
counts them and prices them by the run's own first image batch and first attack chunk, timed
(`protoquant.metrics.cost`): a separate calibration, a few calls long, caught the backend's
warm-up and overestimated the attack up to 2.3x on 2 CPU cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import protoquant.metrics.misalignment as mis
from protoquant import progress
from protoquant.metrics.common import PrototypeSlots, class_prototypes
from protoquant.metrics.context import EvalContext
from protoquant.metrics.cost import CostEstimate, PassCount, announce, synchronise
from protoquant.metrics.maps import UPSAMPLING, resize_cubic
from protoquant.metrics.result import MetricResult
from protoquant.metrics.sample import ImageSample, choose_images
from protoquant.metrics.settings import scaled


def _activation_fn(ctx: EvalContext):
    model = ctx.model

    def activation(images: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            features = model.features(images, input_gradients=True)  # (B, D, H, W), differentiable
            return model.head(features).activation.clamp(min=0)  # (B, K, H, W)

    return activation


def _frozen(ctx: EvalContext, act: torch.Tensor, attacks: list[mis.Attack]) -> torch.Tensor:
    """(R, 1, S, S) float 1 where attack r may change a pixel: outside the union of its group's boxes."""
    size, grow = ctx.image_size, scaled(ctx.settings.mask_grow, ctx.image_size)
    frozen = []
    for attack in attacks:
        heat = resize_cubic(act[attack.row, list(attack.group)], (size, size)).numpy()  # (n, S, S)
        frozen.append(mis.union_box_mask(heat, grow=grow))
    return torch.from_numpy(~np.stack(frozen)).float()[:, None]


def _rows_per_pass(ctx: EvalContext) -> int:
    size = ctx.settings.attack_batch_size or ctx.settings.batch_size
    if size < 1:
        raise ValueError(f"metric setting 'attack_batch_size' must be >= 0 (0 = batch_size), got {size}")
    return size


@dataclass
class _Batch:
    """One batch of images ready to attack: clean outputs and the planned attack rows."""

    indices: np.ndarray
    labels: np.ndarray
    images: torch.Tensor  # (B, 3, S, S) on the device
    before: object  # HeadOutput of the clean images
    attacks: list
    seconds: tuple[float, float] = (0.0, 0.0)  # (loading, clean forward) per image


def _prepare(ctx, indices: np.ndarray, slots) -> _Batch:
    """Load and featurise `indices` and plan their attacks (loading and forward timed)."""
    start = time.perf_counter()
    images = ctx.preprocess([ctx.dataset.load_image(int(i)) for i in indices], indices).to(ctx.device)
    synchronise(ctx.device)
    loaded = time.perf_counter()
    with torch.no_grad():
        before = ctx.model.head(ctx.features(images))
    synchronise(ctx.device)
    seconds = ((loaded - start) / len(indices), (time.perf_counter() - loaded) / len(indices))
    labels = ctx.labels[indices]
    of_class = lambda c: slots.prototypes[slots.of_class(c)].tolist()  # noqa: E731
    attacks = mis.attack_plan(ctx.settings.attack_target, before.scores.cpu(), labels.tolist(), of_class)
    return _Batch(indices, labels, images, before, attacks, seconds)


def _attack_chunks(ctx, batch: _Batch, slots, generator: torch.Generator, *, first: int = 0, count=None):
    """Records of the attack rows of `batch`, `attack_batch_size` at a time: `count` chunks (all
    when None) from chunk `first`."""
    records, size = [], _rows_per_pass(ctx)
    act = batch.before.activation.clamp(min=0).cpu()  # (B, K, H, W)
    starts = list(range(0, len(batch.attacks), size))[first:]
    for start in starts if count is None else starts[:count]:
        chunk = batch.attacks[start : start + size]
        rows = torch.tensor([a.row for a in chunk], dtype=torch.long)
        after = _attack_rows(ctx, batch.images[rows.to(ctx.device)], act, chunk, generator)
        targets = torch.tensor([a.target for a in chunk], dtype=torch.long)
        records += _records(ctx, batch.indices, batch.labels, slots, (rows, targets), batch.before, after)
    return records


def _attack_rows(ctx, images: torch.Tensor, act: torch.Tensor, attacks: list[mis.Attack], generator):
    """Head output (R rows) on the adversarial images of `attacks` (images: (R, 3, S, S))."""
    settings, device = ctx.settings, ctx.device
    adversarial = mis.masked_pgd(
        _activation_fn(ctx),
        images,
        mis.objective_weights(attacks, act.shape[1], device),
        _frozen(ctx, act, attacks).to(device),
        generator=generator,
        epsilon=settings.attack_epsilon,
        step=settings.attack_step,
        iterations=settings.attack_iterations,
        random_start_only=settings.random_start_only,
        maximise=settings.attack_target in mis.MAXIMISED_TARGETS,
    )
    with torch.no_grad():
        return ctx.model.head(ctx.features(adversarial))


def _records(ctx, indices, labels, slots, pairs, before, after) -> list[dict]:
    rows, targets = pairs
    scores_before, scores_after = before.scores.cpu(), after.scores.cpu()
    act_before, act_after = before.activation.clamp(min=0).cpu(), after.activation.clamp(min=0).cpu()
    predicted_before = before.logits.argmax(dim=1).cpu()
    out = []
    for r, (b, t) in enumerate(zip(rows.tolist(), targets.tolist())):
        label = int(labels[b])
        class_protos = torch.from_numpy(slots.prototypes[slots.of_class(label)])
        out.append(
            {
                "index": int(indices[b]),
                "label": label,
                "target": t,
                "activation_before": float(scores_before[b, t]),
                "activation_after": float(scores_after[r, t]),
                "pac": mis.activation_change(float(scores_before[b, t]), float(scores_after[r, t])),
                "prc": mis.rank_change(scores_before[b], scores_after[r], t, class_protos),
                "plc": mis.location_change(act_before[b, t], act_after[r, t], ctx.image_size),
                "correct_before": bool(predicted_before[b] == label),
                "correct_after": bool(after.logits[r].argmax().cpu() == label),
            }
        )
    return out


TARGET_RULES = {
    "top": "the most activated prototype (first on ties); its own box frozen; its max activation minimised",
    "class": "one attack per image on the true class's prototypes (the reference's variant): the union of "
    "their boxes frozen, the mean of their max activations maximised, PAC / PRC / PLC of the most "
    "activated of them (PAC < 0 when it rises); images whose class has no prototype are skipped",
    "class_each": "deviation (ProtoQuant's variant): one attack and one record per (image, class "
    "prototype), each with its own box, its max activation minimised",
}


def _estimate(ctx: EvalContext, sample: ImageSample, slots: PrototypeSlots, generator: torch.Generator):
    """(estimate, head start): the attacks and backbone passes ahead, priced by the run's own first
    image batch (loading, clean forward) and its first attack chunk (the whole PGD, so warm-up is
    spread over its steps, as in the run); the batch and the chunk's records go to the run."""
    settings = ctx.settings
    labels = ctx.labels[sample.indices].tolist()
    of_class = lambda c: slots.prototypes[slots.of_class(c)].tolist()  # noqa: E731
    attacks = mis.attack_count(settings.attack_target, labels, of_class)
    steps = 0 if settings.random_start_only else settings.attack_iterations
    backward, loading, forward, head = 0.0, 0.0, 0.0, None
    if len(sample.indices):
        batch = _prepare(ctx, sample.indices[: settings.batch_size], slots)
        (loading, forward), rows = batch.seconds, min(_rows_per_pass(ctx), len(batch.attacks))
        start = time.perf_counter()
        records = _attack_chunks(ctx, batch, slots, generator, count=1)
        synchronise(ctx.device)
        if rows and steps:  # the chunk: rows x steps forward+backward, then rows forwards
            backward = max(0.0, time.perf_counter() - start - rows * forward) / (rows * steps)
        head = (batch, records)
    passes = (
        PassCount(attacks * steps, "forward+backward", backward),
        PassCount(len(sample.indices), "load+forward", loading + forward),  # clean images, before
        PassCount(attacks, "forward", forward),  # adversarial images, after
    )
    work = f"{attacks:,} attacks x {steps} PGD steps"
    calibrated = len(head[0].indices) if head else 0
    return CostEstimate("misalignment", len(sample.indices), work, passes, calibrated, 0.0), head


def run_misalignment(ctx: EvalContext) -> MetricResult:
    """PAC / PRC / PLC / AC over `misalignment_images` images (all when 0; else a recorded sample)."""
    started = time.perf_counter()
    settings = ctx.settings
    slots = class_prototypes(ctx.model.head.class_weights.detach().cpu(), settings.prototypes_per_class)
    sample = choose_images(
        ctx.labels, settings.misalignment_images, seed=settings.seed, rule=settings.sample_rule
    )
    indices = sample.indices
    generator = torch.Generator().manual_seed(settings.seed)
    estimate, head = _estimate(ctx, sample, slots, generator)
    records = []
    for start in progress.bar(
        range(0, len(indices), settings.batch_size),
        desc=f"metrics: misalignment ({announce(estimate)})",
        unit="batch",
    ):
        if start == 0 and head is not None:  # prepared, and its first chunk attacked, by the estimate
            records += head[1] + _attack_chunks(ctx, head[0], slots, generator, first=1)
            continue
        batch = _prepare(ctx, indices[start : start + settings.batch_size], slots)
        records += _attack_chunks(ctx, batch, slots, generator)
    column = lambda key: np.array([r[key] for r in records], dtype=float)  # noqa: E731
    summary = mis.summarise(
        column("pac"), column("prc"), column("plc"), column("correct_before"), column("correct_after")
    )
    protocol = {
        **_protocol(ctx, slots),
        "images": f"{sample.describe()}; {len({r['index'] for r in records})} attacked",
        "sample": sample.record(),
        "attack_rows_per_pass": _rows_per_pass(ctx),
        "cost": estimate.record(time.perf_counter() - started),
    }
    return MetricResult(summary, protocol, tuple(records))


def _protocol(ctx: EvalContext, slots: PrototypeSlots) -> dict:
    settings = ctx.settings
    return {
        "attack": "random start only (published protocol)"
        if settings.random_start_only
        else "PGD on the target's max activation",
        "random_start_only": settings.random_start_only,
        "epsilon": settings.attack_epsilon,
        "step": settings.attack_step,
        "iterations": 0 if settings.random_start_only else settings.attack_iterations,
        "space": "normalised input, no clamp to the image range",
        "target": settings.attack_target,
        "target_rule": TARGET_RULES[settings.attack_target],
        "upsampling": f"mask: {UPSAMPLING['bicubic']}; PLC: {UPSAMPLING['bilinear']}",
        "prototype_rule": slots.rule + " (non-class prototypes for PRC)",
        "mask": f"box of pixels >= 95th percentile (OpenCV bicubic), grown {scaled(settings.mask_grow, ctx.image_size)} px, clipped to [0, S-2]",
        "plc": "bilinear maps, region > 0.9 quantile, empty union -> PLC 0",
        "pac_undefined": "activation 0 before the attack: PAC left out (counted in num_undefined_pac)",
        "seed": settings.seed,
    }
