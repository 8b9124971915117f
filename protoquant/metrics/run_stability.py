"""Runner of stability (Huang et al., ICCV 2023): consistency's part hits under input noise."""

from __future__ import annotations

import numpy as np
import torch

import protoquant.metrics.consistency as cons
from protoquant.metrics.context import EvalContext
from protoquant.metrics.maps import argmax_row_major
from protoquant.metrics.result import MetricResult
from protoquant.metrics.run_consistency import _image_hits, _protocol, _slots


def _noisy_features(ctx: EvalContext, indices: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Features of the images plus seeded noise; the noise is drawn even when memoised (same stream)."""
    settings, size = ctx.settings, ctx.image_size
    noise = cons.input_noise(
        (len(indices), 3, size, size), generator, settings.noise_std, settings.noise_clip
    )
    position = {int(i): row for row, i in enumerate(indices)}

    def make(keys: list[tuple]) -> torch.Tensor:
        wanted = [key[-1] for key in keys]
        images = ctx.preprocess([ctx.dataset.load_image(i) for i in wanted], np.asarray(wanted))
        return images + noise[[position[i] for i in wanted]]

    tag = ("noise", settings.seed, settings.noise_std, settings.noise_clip, settings.batch_size)
    return ctx.memo_features([(*tag, int(i)) for i in indices], make)


def _stability_image(ctx, slots, slot_ids, index, outputs, with_parts: bool) -> tuple:
    """(hit vectors unchanged (s,) or None, |score change| (s,), argmax cell unchanged (s,))."""
    (clean, noisy), row = outputs
    prototypes = torch.from_numpy(slots.prototypes[slot_ids])
    unchanged = None
    if with_parts:
        hits = [_image_hits(ctx, o.activation[row], index, slot_ids, slots) for o in (clean, noisy)]
        unchanged = (hits[0] == hits[1]).all(dim=1).numpy()
    change = (noisy.scores[row, prototypes] - clean.scores[row, prototypes]).abs()
    cells = [argmax_row_major(o.activation[row, prototypes]) for o in (clean, noisy)]
    return unchanged, change, (cells[0][0] == cells[1][0]) & (cells[0][1] == cells[1][1])


def run_stability(ctx: EvalContext) -> MetricResult:
    """Stability of the part hits under input noise, plus the pooled scores' and argmax cells' stability.

    On a dataset without part annotations only the score and argmax-cell stability is reported.
    """
    slots, with_parts = _slots(ctx), ctx.dataset.has_parts
    same, seen = np.zeros(len(slots.classes)), np.zeros(len(slots.classes))
    score_change, cell_same = [], []
    generator = torch.Generator().manual_seed(ctx.settings.seed)
    for indices, clean in ctx.head_batches():
        noisy = ctx.head_output(_noisy_features(ctx, indices, generator))
        for row, index in enumerate(indices.tolist()):
            slot_ids = slots.of_class(int(ctx.labels[index]))
            if not len(slot_ids):
                continue
            unchanged, change, cell = _stability_image(
                ctx, slots, slot_ids, index, ((clean, noisy), row), with_parts
            )
            if unchanged is not None:
                same[slot_ids] += unchanged
            seen[slot_ids] += 1
            score_change.append(change)
            cell_same.append(cell)
    value = {
        "score": cons.stability(same, seen) if with_parts else float("nan"),
        "num_slots": len(slots.classes),
        "score_abs_change": float(torch.cat(score_change).mean()) if score_change else float("nan"),
        "argmax_cell_unchanged": float(torch.cat(cell_same).float().mean()) if cell_same else float("nan"),
    }
    protocol = {
        **_protocol(ctx, slots),
        "noise": f"N(0, {ctx.settings.noise_std}^2) clipped to +-{ctx.settings.noise_clip}, "
        "normalised input space, drawn per batch",
        "seed": ctx.settings.seed,
        "empty_class": "a slot whose class has no test images scores s_p = 0",
        "clean_features": "feature cache (float16); noisy features rounded to float16 as well",
        "extra": "score_abs_change / argmax_cell_unchanged: pooled scores and argmax latent cells "
        "of the same slots (grounding audit's noise check)",
        "parts": "all annotated parts" if with_parts else "none: the dataset has no parts, score not defined",
    }
    return MetricResult(value, protocol)
