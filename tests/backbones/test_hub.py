"""`timm/hf-hub:<org>/<name>` from a local Hugging Face hub cache, offline; downloads only when allowed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from protoquant.backbones.frozen import create_backbone, state_hash
from protoquant.backbones.input import InputConfig
from protoquant.config import BackboneConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NUM_CLASSES = 5
EXPORTED = InputConfig(48, 0.9, "bilinear", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # unlike any timm default
FAIL_FAST_SECONDS = 5.0


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty hub cache that both HF_HUB_CACHE and HF_HOME point at."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def publish(cache: Path, repo: str, architecture: str, *, weights: bool = True) -> torch.nn.Module:
    """Write a timm export (config.json + model.safetensors) into the cache as the hub lays it out."""
    model = timm.create_model(architecture, num_classes=NUM_CLASSES).eval()
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    pretrained_cfg = {
        "input_size": [3, EXPORTED.image_size, EXPORTED.image_size],
        "interpolation": EXPORTED.interpolation,
        "crop_pct": EXPORTED.crop_ratio,
        "mean": list(EXPORTED.mean),
        "std": list(EXPORTED.std),
        "num_classes": NUM_CLASSES,
        "first_conv": "stem.0",
    }
    config = {"architecture": architecture, "num_classes": NUM_CLASSES, "pretrained_cfg": pretrained_cfg}
    (snapshot / "config.json").write_text(json.dumps(config))
    if weights:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors")
        )
    return model


def test_a_cached_hub_model_loads_offline_with_its_own_input_config(hub_cache: Path) -> None:
    exported = publish(hub_cache, "someone/tiny-convnext", "test_convnext")
    backbone = create_backbone(BackboneConfig(name="timm/hf-hub:someone/tiny-convnext"))
    info = backbone.info
    assert info.weights_hash == state_hash(exported) and str(hub_cache) in info.weights
    assert info.pretrained_input == EXPORTED and info.image_size == EXPORTED.image_size
    assert (info.mean, info.std) == (EXPORTED.mean, EXPORTED.std)
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(backbone(images), exported.forward_features(images))
    pinned = create_backbone(BackboneConfig(name=f"timm/hf-hub:someone/tiny-convnext@{COMMIT}"))
    assert pinned.info.weights_hash == info.weights_hash


def test_a_hub_vit_follows_the_configured_image_size(hub_cache: Path) -> None:
    publish(hub_cache, "someone/tiny-vit", "test_vit")
    backbone = create_backbone(BackboneConfig(name="timm/hf-hub:someone/tiny-vit", image_size=64))
    assert backbone.info.grid == (4, 4) and backbone.info.pretrained_input.image_size == 48


def test_missing_hub_files_fail_at_once_naming_the_cache_folder(hub_cache: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)config\.json is not in the Hugging Face cache.*models--someone--absent.*backbone\.download=true",
    ):
        create_backbone(BackboneConfig(name="timm/hf-hub:someone/absent"))
    publish(hub_cache, "someone/no-weights", "test_convnext", weights=False)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)model\.safetensors or pytorch_model\.bin.*models--someone--no-weights"
    ):
        create_backbone(BackboneConfig(name="timm/hf-hub:someone/no-weights"))
    assert time.perf_counter() - start < FAIL_FAST_SECONDS
    random = create_backbone(BackboneConfig(name="timm/hf-hub:someone/no-weights", weights="none"))
    assert random.info.weights == "random" and random.info.pretrained_input == EXPORTED


def test_download_is_asked_of_the_hub_only_when_allowed(hub_cache: Path, monkeypatch) -> None:
    import huggingface_hub

    asked = []

    def fake_download(repo, filename, *, revision=None, cache_dir=None):
        asked.append((repo, filename))
        raise FileNotFoundError(f"offline test: {repo}/{filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(FileNotFoundError):
        create_backbone(BackboneConfig(name="timm/hf-hub:someone/remote"))
    assert asked == []
    with pytest.raises(FileNotFoundError, match="offline test: someone/remote/config.json"):
        create_backbone(BackboneConfig(name="timm/hf-hub:someone/remote", download=True))
    assert asked == [("someone/remote", "config.json")]


@pytest.mark.parametrize("name", ["timm/hf-hub:nobody", "timm/hf-hub:a/b/c", "timm/hf-hub:/x"])
def test_malformed_hub_names_are_errors(name: str) -> None:
    with pytest.raises(ValueError, match=r"expected 'timm/hf-hub:<org>/<name>\[@revision\]'"):
        create_backbone(BackboneConfig(name=name))
