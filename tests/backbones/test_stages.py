"""backbone.stage: earlier feature maps (B, D, H, W) with the expected stride, and an unchanged default."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from protoquant.backbones.frozen import create_backbone, state_hash
from protoquant.backbones.stages import cut_torchvision, receptive_field_counter
from protoquant.cache.build import cache_key
from protoquant.config import (
    BackboneConfig,
    CacheConfig,
    CodebookConfig,
    DataConfig,
    HeadConfig,
    ProbeConfig,
    RunConfig,
)
from protoquant.data.transforms import ViewTransform
from protoquant.model import ProtoQuant
from protoquant.pipeline import run

SIZE = 64  # input side of every test backbone


def _backbone(name: str, stage: int = -1, seed: int = 0, *, stages: tuple[int, ...] = ()):
    return create_backbone(
        BackboneConfig(name=name, weights="none", image_size=SIZE, init_seed=seed, stage=stage, stages=stages)
    )


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


# (name, stage) -> (channels, stride) of the architecture's published stage outputs
EXPECTED = {
    ("torchvision/resnet18", 0): (64, 2),
    ("torchvision/resnet18", 1): (64, 4),
    ("torchvision/resnet18", 3): (256, 16),
    ("torchvision/resnet18", 4): (512, 32),
    ("torchvision/mobilenet_v2", 1): (24, 4),
    ("torchvision/mobilenet_v2", 2): (32, 8),
    ("torchvision/mobilenet_v2", 3): (96, 16),
    ("torchvision/efficientnet_b0", 2): (40, 8),
    ("torchvision/efficientnet_b0", 3): (112, 16),
    ("timm/test_convnext", 1): (32, 8),
    ("timm/test_convnext", 2): (48, 16),
    ("timm/test_mambaout", 1): (32, 8),  # a channels-last model: permuted to (B, D, H, W)
    ("timm/test_vit", 0): (64, 16),  # a ViT lists every block, all at the patch stride
    ("timm/test_vit", 2): (64, 16),
}


@pytest.mark.parametrize(("name", "stage"), list(EXPECTED))
def test_stage_returns_bdhw_with_the_expected_stride(name, stage) -> None:
    channels, stride = EXPECTED[(name, stage)]
    backbone = _backbone(name, stage)
    features = backbone(_images(3))
    assert features.shape == (3, channels, SIZE // stride, SIZE // stride)
    info = backbone.info
    assert (info.stage, info.stride, info.channels, info.grid) == (
        stage,
        stride,
        channels,
        features.shape[2:],
    )
    assert all(not p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_torchvision_stage_is_the_full_models_intermediate_map() -> None:
    full, cut = _backbone("torchvision/resnet18"), _backbone("torchvision/resnet18", stage=2)
    model, images = full.model, _images()
    with torch.no_grad():
        expected = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(images))))))
    torch.testing.assert_close(cut(images), expected, rtol=0, atol=0)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(("layer3", "layer4", "fc"))}
    assert len(shared) == len(cut.model.state_dict())  # the cut touched no BatchNorm statistics
    assert all(torch.equal(a, b) for a, b in zip(shared.values(), cut.model.state_dict().values()))


def test_timm_stage_is_the_full_models_intermediate_map() -> None:
    full, cut = _backbone("timm/test_convnext"), _backbone("timm/test_convnext", stage=1)
    images = _images()
    with torch.no_grad():
        expected = full.model.forward_intermediates(images, indices=(1,), intermediates_only=True)[0]
    torch.testing.assert_close(cut(images), expected, rtol=0, atol=0)


def test_torchvision_convnext_stages_follow_its_downsampling() -> None:
    torch.manual_seed(0)
    settings = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 24, 1), CNBlockConfig(24, None, 1)]
    model = ConvNeXt(settings).eval()  # a tiny torchvision ConvNeXt: stem /4, then /8, /16
    for stage, (channels, stride) in enumerate([(8, 4), (16, 8), (24, 16)]):
        cut = cut_torchvision("convnext_tiny", model, stage, SIZE)
        assert cut(_images()).shape == (2, channels, SIZE // stride, SIZE // stride)
    with torch.no_grad():
        torch.testing.assert_close(cut(_images()), model.features(_images()), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["torchvision/resnet18", "timm/test_convnext"])
def test_default_stage_keeps_the_models_weights_hash_and_features(name) -> None:
    default = _backbone(name)
    library, _, model_name = name.partition("/")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if library == "timm":
            plain = timm.create_model(model_name, pretrained=False)
        else:
            plain = torchvision.models.get_model(model_name, weights=None)
    plain.eval()
    assert default.info.stage == -1 and default.info.weights_hash == state_hash(plain)
    images = _images()
    with torch.no_grad():
        if library == "timm":
            expected = plain.forward_features(images)
        else:
            expected = nn.Sequential(*list(plain.children())[:-2])(images)  # everything before pooling
    torch.testing.assert_close(default(images), expected, rtol=0, atol=0)


def test_every_stage_has_its_own_weights_hash_and_cache_key(tiny_synthetic) -> None:
    backbones = [_backbone("timm/test_convnext", stage) for stage in (-1, 0, 1, 3)]
    assert len({b.info.weights_hash for b in backbones}) == len(backbones)
    transform = ViewTransform(SIZE, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    keys = [cache_key(tiny_synthetic, b, transform, 1, CacheConfig()) for b in backbones]
    assert len({str(sorted(k.items())) for k in keys}) == len(keys)
    twin = _backbone("timm/test_convnext", 1)
    assert twin.info.weights_hash == backbones[2].info.weights_hash  # deterministic


def test_receptive_field_of_resnet18_stages() -> None:
    # conv1 7x7/2: 7; + maxpool 3x3 at jump 2: 11; + four 3x3 convs at jump 4: 43; layer4 output: 435
    fields = [_backbone("torchvision/resnet18", stage).info.receptive_field for stage in (0, 1, -1)]
    assert fields == [7, 43, 435]


def test_receptive_field_of_attention_is_the_whole_input() -> None:
    model = timm.create_model("test_vit", pretrained=False, img_size=SIZE).eval()
    with receptive_field_counter(model, SIZE) as field, torch.no_grad():
        model.forward_features(_images(1))
    assert field[0] == SIZE


@pytest.mark.parametrize(
    ("name", "stage", "message"),
    [
        ("torchvision/resnet18", 5, "stages 0..4"),
        ("timm/test_convnext", 4, "stages 0..3"),
    ],
)
def test_a_stage_that_does_not_exist_names_the_field(name, stage, message) -> None:
    with pytest.raises(ValueError, match=f"backbone.stage.*{message}"):
        _backbone(name, stage)


def test_a_torchvision_family_without_stages_names_the_field() -> None:
    with pytest.raises(ValueError, match="backbone.stage.*vit_b_16.*has no stages"):
        cut_torchvision("vit_b_16", nn.Identity(), 0, SIZE)
    with pytest.raises(ValueError, match="backbone.stage.*vit_b_16.*has no stages"):
        _backbone("torchvision/vit_b_16", 1)  # refused before the model is built


def test_stage_below_minus_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="backbone.stage"):
        BackboneConfig(stage=-2)


def test_a_model_on_an_earlier_stage_saves_and_loads(tmp_path, tiny_synthetic) -> None:
    config = RunConfig(
        out=str(tmp_path / "out"),
        cache=CacheConfig(root=str(tmp_path / "cache"), train_views=1),
        backbone=BackboneConfig(name="timm/test_convnext", weights="none", image_size=SIZE, stage=1),
        data=DataConfig(synthetic_classes=3, synthetic_train_per_class=4, synthetic_test_per_class=2),
        codebook=CodebookConfig(num_prototypes=8, epochs=1, kmeans_patches=300),
        probe=ProbeConfig(epochs=2),
        head=HeadConfig(epochs=2),
        device="cpu",
    )
    result = run(config)
    assert result.caches.test.store.grid == (SIZE // 8, SIZE // 8)  # stage 1 of test_convnext: stride 8
    loaded = ProtoQuant.load(result.out / "model")
    assert loaded.backbone.info.weights_hash == result.model.backbone.info.weights_hash
    images = [tiny_synthetic.load_image(i) for i in range(2)]
    torch.testing.assert_close(loaded.predict(images).logits, result.model.predict(images).logits)
