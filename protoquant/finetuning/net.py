"""The module stage -1 trains: the backbone at its last feature map, pooled, and a new linear layer.

The backbone is built exactly as `create_backbone` builds it (same builder, same seeded random
init, same weights resolution) but left trainable and always at its last map, so its state dict
keeps the original architecture: the fine-tuned weights load through `backbone.weights` like the
pretrained ones, and any later run may read any stage of them. Parameters the feature path never
reaches (the original ImageNet classifier) are frozen, so they are saved unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from protoquant.backbones.frozen import BUILDERS
from protoquant.backbones.input import InputConfig, resolve_input
from protoquant.backbones.stages import LAST_STAGE
from protoquant.backbones.weights import WeightsSource
from protoquant.config import BackboneConfig

PROBE_SIZE = 2  # images in the pass that finds the parameters the feature path uses


class FinetuneNet(nn.Module):
    """Images (B, 3, S, S) -> logits (B, C): backbone map (B, D, H, W), spatial mean (B, D), linear."""

    def __init__(self, model: nn.Module, extract: Callable, classifier: nn.Linear):
        super().__init__()
        self.model = model
        self.classifier = classifier
        self._extract = extract

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self._extract(self.model, images)  # (B, D, H, W)
        return self.classifier(features.mean(dim=(2, 3)))  # (B, D) -> (B, C)


@dataclass(frozen=True)
class BuiltNet:
    net: FinetuneNet
    source: WeightsSource  # where the starting weights came from
    pretrained: InputConfig  # the model's own input config (before the config's overrides)
    image_size: int  # S the net is trained at


def build_net(config: BackboneConfig, num_classes: int, seed: int) -> BuiltNet:
    """The trainable backbone named in `config` (at its last map) and a new (C, D) linear layer.

    The backbone's random init follows `config.init_seed` (as in `create_backbone`); the new
    layer's follows `seed`. Neither touches the global RNG.

    Raises:
        ValueError: unknown library or model (the builders' messages).
    """
    library, _, model_name = config.name.partition("/")
    if library not in BUILDERS or not model_name:
        raise ValueError(
            f"config field 'backbone.name' must be '<library>/<model>' with library in {list(BUILDERS)}, "
            f"got '{config.name}'"
        )
    last = replace(config, stage=LAST_STAGE, stages=())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(config.init_seed)
        model, source, extract, pretrained = BUILDERS[library](model_name, last)
    size = resolve_input(config, pretrained).image_size
    model.requires_grad_(True)
    with torch.no_grad():
        channels = extract(model.eval(), torch.zeros(1, 3, size, size)).shape[1]  # (1, D, H, W)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        classifier = nn.Linear(int(channels), num_classes)
    net = FinetuneNet(model, extract, classifier)
    freeze_unreached(net, size)
    return BuiltNet(net, source, pretrained, size)


def freeze_unreached(net: FinetuneNet, image_size: int) -> list[str]:
    """Freeze the parameters that get no gradient from the logits; returns their names.

    One backward pass in eval mode (running statistics untouched) on zero images finds them.
    """
    probe = torch.zeros(PROBE_SIZE, 3, image_size, image_size)
    net.eval()
    net.zero_grad(set_to_none=True)
    net(probe).sum().backward()
    unreached = [name for name, p in net.named_parameters() if p.grad is None]
    for name, parameter in net.named_parameters():
        parameter.grad = None
        if name in unreached:
            parameter.requires_grad_(False)
    return unreached
