"""Earlier feature maps (`backbone.stage`) and the receptive field of a backbone's feature map.

Stage n is entry n of the model's feature pyramid, finest first; -1 (the default) keeps the
model's last feature map exactly as before. timm models list their pyramid in `feature_info`;
they are pruned after entry n (`prune_intermediate_layers`) and read through
`forward_intermediates`. A torchvision model is written as
its chain of top-level layers (`TORCHVISION_LAYERS`); stage n ends at the last layer of the n-th
output resolution (ResNet: stem at /2, layer1 .. layer4; ConvNeXt: stages 1 .. 4; MobileNetV2 and
EfficientNet: the last block at /2, /4, /8, /16, /32), and the model is cut there, so its state
dict, and with it the weights hash and the cache key, names exactly the layers that run.

The receptive field is counted over the convolutions and pools that run, in call order:
rf = 1 + sum (k - 1) * dilation * jump, jump = input side / the layer's input side. That is exact
for chains and residual blocks; global gates (squeeze-excitation) are left out, and a model with
attention layers mixes every position, so its receptive field is the whole input.
`describe_scale` says grid, stride and receptive field in one line for model facts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

LAST_STAGE = -1  # backbone.stage value for the model's own last feature map
GLOBAL_MIXING = "Attention"  # a module class named like this mixes all positions (ViT, Swin)


def _resnet_layers(model: nn.Module) -> list[nn.Module]:
    return [
        model.conv1,
        model.bn1,
        model.relu,
        model.maxpool,
        model.layer1,
        model.layer2,
        model.layer3,
        model.layer4,
    ]


# torchvision family (name prefix) -> its top-level layers in forward order (families absent: no stages)
TORCHVISION_LAYERS: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
    "mobilenet": lambda model: list(model.features),
    "efficientnet": lambda model: list(model.features),
    "convnext": lambda model: list(model.features),
    "vgg": lambda model: list(model.features),
    "densenet": lambda model: list(model.features),
    "resnet": _resnet_layers,
    "resnext": _resnet_layers,
    "wide_resnet": _resnet_layers,
    "regnet": lambda model: [model.stem, *model.trunk_output],
}


def check_torchvision_family(model_name: str, field: str = "backbone.stage") -> None:
    """Raise (naming `field`) unless the torchvision model's family can be cut into stages."""
    if not any(model_name.startswith(prefix) for prefix in TORCHVISION_LAYERS):
        raise ValueError(
            f"config field '{field}': torchvision model '{model_name}' has no stages here; "
            f"use the model's last map or one of the families {', '.join(TORCHVISION_LAYERS)} (or a timm model)"
        )


def torchvision_layers(model_name: str, model: nn.Module, field: str = "backbone.stage") -> list[nn.Module]:
    """The top-level layers of a torchvision model whose chain computes its feature map."""
    check_torchvision_family(model_name, field)
    prefix = next(prefix for prefix in TORCHVISION_LAYERS if model_name.startswith(prefix))
    return TORCHVISION_LAYERS[prefix](model)


def stage_ends(layers: list[nn.Module], image_size: int) -> list[int]:
    """Index of the last layer at each output resolution of the chain, for an S x S input."""
    sides = []
    with torch.no_grad():
        x = torch.zeros(1, 3, image_size, image_size)
        for layer in layers:
            x = layer(x)  # (1, D_i, H_i, W_i)
            sides.append(int(x.shape[-2]))
    return [i for i in range(len(sides)) if i == len(sides) - 1 or sides[i + 1] < sides[i]]


def check_stage(stage: int, count: int, where: str, field: str = "backbone.stage") -> None:
    """Raise (naming `field`) unless 0 <= stage < count."""
    if not 0 <= stage < count:
        last = " (or -1 for the last)" if field == "backbone.stage" else ""
        raise ValueError(f"config field '{field}' = {stage}: {where} has stages 0..{count - 1}{last}")


def cut_torchvision(model_name: str, model: nn.Module, stage: int, image_size: int) -> nn.Sequential:
    """The chain of `model`'s layers up to the end of stage `stage` (its state dict keys renumbered).

    `model` is put in eval mode first: the probe that finds the stages must not move BatchNorm statistics.
    """
    layers = torchvision_layers(model_name, model.eval())
    ends = stage_ends(layers, image_size)
    check_stage(stage, len(ends), f"torchvision/{model_name} at {image_size} px")
    return nn.Sequential(*layers[: ends[stage] + 1])


def sequential_extract(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, D, H, W) through a cut torchvision chain."""
    return model(x)


def cut_timm(model: nn.Module, stage: int, name: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Prune `model` in place after stage `stage` of its feature_info; returns the extract function.

    Raises:
        ValueError: the model lists no feature_info or cannot return intermediates, or stage is out of range.
    """
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"config field 'backbone.stage': timm model {name} has no feature_info / forward_intermediates; use -1"
        )
    check_stage(stage, len(info), name)
    model.prune_intermediate_layers(indices=(stage,), prune_norm=True, prune_head=True)
    return functools.partial(timm_stage_extract, stage=stage)


def timm_stage_extract(model: nn.Module, x: torch.Tensor, *, stage: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, D, H, W): feature_info entry `stage` of a timm model."""
    return model.forward_intermediates(x, indices=(stage,), intermediates_only=True, output_fmt="NCHW")[0]


def _span(module: nn.Module) -> int | None:
    """(k - 1) * dilation of a convolution or local pool, None for any other module."""
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return None
    kernel = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
    dilation = getattr(module, "dilation", 1)
    dilation = dilation if isinstance(dilation, int) else dilation[0]
    return (kernel - 1) * dilation


@contextlib.contextmanager
def receptive_field_counter(model: nn.Module, image_size: int) -> Iterator[list[float]]:
    """Count the receptive field of the forward passes run inside; yields [rf] (in input pixels)."""
    total = [1.0]
    if any(GLOBAL_MIXING in type(m).__name__ for m in model.modules()):
        yield [float(image_size)]
        return

    def hook(module: nn.Module, inputs: tuple, _output) -> None:
        jump = image_size / inputs[0].shape[-2]  # input pixels per step of this layer's input
        total[0] += _span(module) * jump

    handles = [m.register_forward_hook(hook) for m in model.modules() if _span(m) is not None]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def describe_scale(
    grid: Sequence[int],
    stride: int,
    receptive_field: int,
    image_size: int,
    *,
    pool: int = 1,
    times: str = "×",
) -> str:
    """One line on the scale of a feature map, for model facts and summaries.

    `pool` > 1 describes the map after a pool x pool average pool (ceil mode, `cache.grid_pool`):
    (H, W) -> ceil((H, W) / pool), stride * pool, receptive field + (pool - 1) * stride.
    Example: "feature grid 14 × 14: one cell = 16 px, sees 427 px of the 224 px input".
    """
    height, width = (-(-int(side) // pool) for side in grid)
    field = receptive_field + (pool - 1) * stride
    return (
        f"feature grid {height} {times} {width}: one cell = {stride * pool} px, "
        f"sees {field} px of the {image_size} px input"
    )
