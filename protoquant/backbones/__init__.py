"""Frozen timm / torchvision backbones returning (B, D, H, W), and offline-first weights resolution."""

from protoquant.backbones.frozen import BackboneInfo, FrozenBackbone, create_backbone, state_hash
from protoquant.backbones.weights import WeightsSource

__all__ = ["BackboneInfo", "FrozenBackbone", "WeightsSource", "create_backbone", "state_hash"]
