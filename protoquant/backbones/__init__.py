"""Frozen timm / torchvision backbones returning (B, D, H, W), their input configs, and weights resolution."""

from protoquant.backbones.frozen import BackboneInfo, FrozenBackbone, create_backbone, state_hash
from protoquant.backbones.input import InputConfig, resolve_input, resolved_config
from protoquant.backbones.weights import WeightsSource

__all__ = [
    "BackboneInfo",
    "FrozenBackbone",
    "InputConfig",
    "WeightsSource",
    "create_backbone",
    "resolve_input",
    "resolved_config",
    "state_hash",
]
