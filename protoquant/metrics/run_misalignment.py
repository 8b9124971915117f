"""Runner of the spatial-misalignment benchmark: a masked PGD through the frozen backbone.

Every feature map comes from `ProtoQuant.features` (the cache's `patch_features`: autocast, grid
pooling and float16 rounding as configured). The attack asks it for `input_gradients` under
`torch.enable_grad()`: only the input receives gradients, the backbone's weights keep
requires_grad=False, and the differentiable path leaves out only the float16 rounding.
"""

from __future__ import annotations

import numpy as np
import torch

import protoquant.metrics.misalignment as mis
from protoquant import progress
from protoquant.metrics.common import class_prototypes
from protoquant.metrics.context import EvalContext
from protoquant.metrics.maps import UPSAMPLING, resize_cubic
from protoquant.metrics.result import MetricResult
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


def _attack_batch(ctx, indices: np.ndarray, slots, generator: torch.Generator) -> list[dict]:
    settings, device = ctx.settings, ctx.device
    labels = ctx.labels[indices]
    images = ctx.preprocess([ctx.dataset.load_image(int(i)) for i in indices], indices)
    images = images.to(device)  # (B, 3, S, S)
    with torch.no_grad():
        before = ctx.model.head(ctx.features(images))
    of_class = lambda c: slots.prototypes[slots.of_class(c)].tolist()  # noqa: E731
    attacks = mis.attack_plan(settings.attack_target, before.scores.cpu(), labels.tolist(), of_class)
    if not attacks:
        return []
    act = before.activation.clamp(min=0).cpu()  # (B, K, H, W)
    rows = torch.tensor([a.row for a in attacks], dtype=torch.long)
    adversarial = mis.masked_pgd(
        _activation_fn(ctx),
        images[rows.to(device)],
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
        after = ctx.model.head(ctx.features(adversarial))
    targets = torch.tensor([a.target for a in attacks], dtype=torch.long)
    return _records(ctx, indices, labels, slots, (rows, targets), before, after)


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


def run_misalignment(ctx: EvalContext) -> MetricResult:
    """PAC / PRC / PLC / AC over the first `misalignment_images` images (all when 0)."""
    settings = ctx.settings
    slots = class_prototypes(ctx.model.head.class_weights.detach().cpu(), settings.prototypes_per_class)
    count = settings.misalignment_images or len(ctx.dataset)
    indices = np.arange(min(count, len(ctx.dataset)))
    generator = torch.Generator().manual_seed(settings.seed)
    records = []
    for start in progress.bar(
        range(0, len(indices), settings.batch_size), desc="metrics: misalignment", unit="batch"
    ):
        records += _attack_batch(ctx, indices[start : start + settings.batch_size], slots, generator)
    column = lambda key: np.array([r[key] for r in records], dtype=float)  # noqa: E731
    summary = mis.summarise(
        column("pac"), column("prc"), column("plc"), column("correct_before"), column("correct_after")
    )
    protocol = {
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
        "images": f"first {len(indices)} of {len(ctx.dataset)}; {len({r['index'] for r in records})} attacked",
    }
    return MetricResult(summary, protocol, tuple(records))
