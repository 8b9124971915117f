"""Combined feature-pyramid stages (`backbone.stages`): several maps as one (B, sum D_i, H, W) map.

The backbone runs once, up to the deepest listed stage (timm: pruned after it and read through
`forward_intermediates`; torchvision: the chain of top-level layers cut at its end and read at
each listed stage's end), so its state dict names exactly the layers that run. Each stage's map
(B, D_i, H_i, W_i) is L2-normalised over its channels in every cell, resized to the finest listed
grid (bilinear, align_corners=False: cell centres map onto cell centres, so a coarse map is
neither shifted nor stretched against the fine one), normalised again, and the maps are
concatenated along channels in the listed order.

Why unit norm per stage: a combined cell is then n unit vectors side by side, its norm sqrt(n),
so the cosine similarity of two combined cells is the mean of the n per-stage cosines. Every
stage weighs the same, whatever its channel count or activation scale; without it the stage with
the largest activations would decide every similarity.

The map's stride is the finest listed grid's; its receptive field is the deepest stage's (the
counter of `protoquant.backbones.stages` runs over the whole pass, and every shallower stage is
a prefix of the deepest). The bilinear resize also reads the neighbouring coarse cell, one
coarse stride further; that is not counted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from protoquant.backbones.stages import (
    LAST_STAGE,
    check_stage,
    check_torchvision_family,
    cut_torchvision,
    sequential_extract,
    stage_ends,
    torchvision_layers,
)
from protoquant.config import BackboneConfig

NORM_EPS = 1e-6  # floor of a cell's norm before dividing (an all-zero cell stays zero)
RESIZE_MODE = "bilinear"  # how a coarser stage's map is brought to the finest listed grid

Extract = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def combine_maps(maps: Sequence[torch.Tensor], eps: float = NORM_EPS) -> torch.Tensor:
    """Per-stage maps [(B, D_i, H_i, W_i), ...] -> (B, sum D_i, H, W) at the finest (largest) grid.

    Each map is L2-normalised over channels per cell, resized to (H, W) and normalised again (a
    blend of unit vectors is shorter than 1: it blends directions, and every cell of every stage
    ends at unit norm), then the maps are concatenated in the given order. The result is float32
    (float64 when a map is float64), also under autocast.
    """
    dtype = functools.reduce(torch.promote_types, [m.dtype for m in maps], torch.float32)
    height, width = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    out = []
    for features in maps:
        unit = F.normalize(features.to(dtype), dim=1, eps=eps)  # (B, D_i, H_i, W_i), unit cells
        if unit.shape[-2:] != (height, width):
            unit = F.interpolate(unit, size=(height, width), mode=RESIZE_MODE, align_corners=False)
            unit = F.normalize(unit.to(dtype), dim=1, eps=eps)  # (B, D_i, H, W), unit cells again
        out.append(unit)
    return torch.cat(out, dim=1)  # (B, sum D_i, H, W)


def check_stages(stages: Sequence[int], count: int, where: str) -> None:
    """Every listed stage exists in a pyramid of `count` stages (the error names backbone.stages)."""
    for stage in stages:
        check_stage(stage, count, where, field="backbone.stages")


# --- timm: prune after the deepest stage, one forward_intermediates call ------------------------


def cut_timm_stages(model: nn.Module, stages: Sequence[int], name: str) -> Extract:
    """Prune `model` in place after the deepest of `stages`; returns the combined extract function.

    Raises:
        ValueError: the model lists no feature_info / forward_intermediates, or a stage is out of range.
    """
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"config field 'backbone.stages': timm model {name} has no feature_info / forward_intermediates"
        )
    check_stages(stages, len(info), name)
    model.prune_intermediate_layers(indices=tuple(stages), prune_norm=True, prune_head=True)
    return functools.partial(timm_stages_extract, stages=tuple(stages))


def timm_stages_extract(model: nn.Module, x: torch.Tensor, *, stages: tuple[int, ...]) -> torch.Tensor:
    """(B, 3, S, S) -> (B, sum D_i, H, W): the listed feature_info entries of a timm model, combined."""
    maps = model.forward_intermediates(x, indices=list(stages), intermediates_only=True, output_fmt="NCHW")
    by_stage = dict(zip(sorted(stages), maps))  # timm returns them in forward (ascending) order
    return combine_maps([by_stage[stage] for stage in stages])


# --- torchvision: one pass through the cut chain, read at each stage's end ----------------------


def cut_torchvision_stages(
    model_name: str, model: nn.Module, stages: Sequence[int], image_size: int
) -> tuple[nn.Sequential, Extract]:
    """The chain of `model`'s layers up to the end of the deepest of `stages`, and its extract function.

    `model` is put in eval mode first (the probe that finds the stages moves no BatchNorm statistics).
    """
    layers = torchvision_layers(model_name, model.eval(), field="backbone.stages")
    ends = stage_ends(layers, image_size)
    check_stages(stages, len(ends), f"torchvision/{model_name} at {image_size} px")
    taps = tuple(ends[stage] for stage in stages)
    return nn.Sequential(*layers[: max(taps) + 1]), functools.partial(sequential_stages_extract, taps=taps)


def sequential_stages_extract(model: nn.Module, x: torch.Tensor, *, taps: tuple[int, ...]) -> torch.Tensor:
    """(B, 3, S, S) -> (B, sum D_i, H, W): the outputs of layers `taps` of a cut chain, combined."""
    outputs = {}
    for index, layer in enumerate(model):
        x = layer(x)  # (B, D_i, H_i, W_i)
        if index in taps:
            outputs[index] = x
    return combine_maps([outputs[tap] for tap in taps])


def check_torchvision_cut(model_name: str, config: BackboneConfig) -> None:
    """Raise (naming the field) if `config` asks for stages of a torchvision family that has none."""
    if config.stages:
        check_torchvision_family(model_name, "backbone.stages")
    elif config.stage != LAST_STAGE:
        check_torchvision_family(model_name, "backbone.stage")


def cut_torchvision_as_configured(
    model_name: str, model: nn.Module, config: BackboneConfig, image_size: int, extract: Extract
) -> tuple[nn.Module, Extract]:
    """`model` and its extract function cut as `config.stages` / `config.stage` say (as given with neither)."""
    if config.stages:
        return cut_torchvision_stages(model_name, model, config.stages, image_size)
    if config.stage != LAST_STAGE:
        return cut_torchvision(model_name, model, config.stage, image_size), sequential_extract
    return model, extract
