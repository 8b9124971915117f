"""backbone.stages: several pyramid stages as one map of unit-norm slices at the finest grid."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from protoquant.backbones.combine import combine_maps
from protoquant.backbones.stages import describe_scale
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
from protoquant.explain.explanation import model_facts
from protoquant.model import ProtoQuant
from protoquant.model_card import model_card
from protoquant.pipeline import run
from tests.backbones.test_stages import SIZE, _backbone, _images


def _unit_at(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A single stage's map as its combined slice must read: (B, D, h, w) -> (B, D, H, W) unit cells."""
    unit = F.normalize(features, dim=1)
    if tuple(unit.shape[-2:]) == grid:
        return unit
    return F.normalize(F.interpolate(unit, size=grid, mode="bilinear", align_corners=False), dim=1)


# (name, stages) -> (channels per listed stage, stride of the finest listed stage)
EXPECTED = {
    ("timm/test_convnext", (1, 2)): ((32, 48), 8),
    ("timm/test_vit", (3, 1)): ((64, 64), 16),  # every block at the patch stride: no resize
    ("torchvision/resnet18", (3, 1)): ((256, 64), 4),  # listed order, not pyramid order
    ("torchvision/mobilenet_v2", (2, 3)): ((32, 96), 8),
}


@pytest.mark.parametrize(("name", "stages"), list(EXPECTED))
def test_combined_stages_are_unit_slices_of_the_single_stage_maps(name, stages) -> None:
    channels, stride = EXPECTED[(name, stages)]
    combined, images = _backbone(name, stages=stages), _images()
    features = combined(images)  # (B, sum D_i, H, W)
    grid = (SIZE // stride, SIZE // stride)
    assert features.shape == (2, sum(channels), *grid)
    start = 0
    for stage, width in zip(stages, channels):
        piece = features[:, start : start + width]  # (B, D_i, H, W)
        torch.testing.assert_close(piece.norm(dim=1), torch.ones(2, *grid))
        torch.testing.assert_close(piece, _unit_at(_backbone(name, stage=stage)(images), grid))
        start += width
    deepest = _backbone(name, stage=max(stages)).info
    info = combined.info
    assert (info.stages, info.stage, info.channels, info.grid) == (stages, -1, sum(channels), grid)
    assert (info.stride, info.receptive_field) == (stride, deepest.receptive_field)
    assert all(not p.requires_grad for p in combined.parameters()) and not combined.training


def test_cosine_of_combined_cells_is_the_mean_of_the_stage_cosines() -> None:
    generator = torch.Generator().manual_seed(1)
    fine, coarse = torch.randn(2, 5, 4, 4, generator=generator), torch.randn(2, 3, 2, 2, generator=generator)
    combined = combine_maps([fine, coarse])  # (2, 8, 4, 4)
    cells = combined.permute(0, 2, 3, 1).reshape(-1, 8)  # (B*H*W, D)
    first, other = cells[0], cells[1:]
    cosine = F.cosine_similarity(first[None], other, dim=1)
    per_stage = [
        F.cosine_similarity(first[None, part], other[:, part]) for part in (slice(0, 5), slice(5, 8))
    ]
    torch.testing.assert_close(cosine, (per_stage[0] + per_stage[1]) / 2)
    assert combine_maps([fine.double(), coarse]).dtype == torch.float64


def test_combined_stages_have_their_own_weights_hash_and_cache_key(tiny_synthetic) -> None:
    name = "timm/test_convnext"
    backbones = [
        _backbone(name, stage=1),
        _backbone(name, stage=2),
        _backbone(name, stages=(1, 2)),
        _backbone(name, stages=(2, 1)),
        _backbone(name),
    ]
    single, deepest, combined, _, _ = (b.info for b in backbones)
    assert combined.weights_hash != single.weights_hash
    assert combined.weights_hash == deepest.weights_hash  # the same layers run ...
    transform = ViewTransform(SIZE, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    keys = [cache_key(tiny_synthetic, b, transform, 1, CacheConfig()) for b in backbones]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == len(keys)  # ... but the maps differ
    assert "stages" not in keys[-1]  # a single map keeps the key it always had
    assert _backbone(name, stages=(1, 2)).info == combined  # deterministic


def test_combined_torchvision_chain_holds_only_the_layers_that_run() -> None:
    combined = _backbone("torchvision/resnet18", stages=(1, 2))
    keys = combined.model.state_dict().keys()
    assert len(combined.model) == 6 and not any(k.startswith(("6.", "7.")) for k in keys)  # up to layer2


@pytest.mark.parametrize(
    ("name", "stages", "message"),
    [
        ("torchvision/resnet18", (1, 5), "backbone.stages' = 5.*stages 0..4"),
        ("timm/test_convnext", (0, 4), "backbone.stages' = 4.*stages 0..3"),
        ("torchvision/vit_b_16", (0, 1), "backbone.stages.*vit_b_16.*has no stages"),
    ],
)
def test_a_stage_that_does_not_exist_names_the_stages_field(name, stages, message) -> None:
    with pytest.raises(ValueError, match=message):
        _backbone(name, stages=stages)


def test_describe_scale_follows_the_grid_pool() -> None:
    line = describe_scale((14, 14), 16, 427, 224)
    assert line == "feature grid 14 × 14: one cell = 16 px, sees 427 px of the 224 px input"
    # a 2 x 2 average pool: 7 x 7 cells of 32 px, each reading one more 16 px cell of the map
    assert describe_scale((14, 13), 16, 427, 224, pool=2, times="x").startswith(
        "feature grid 7 x 7: one cell = 32 px, sees 443 px"
    )


def test_a_model_on_combined_stages_saves_loads_and_states_its_scale(tmp_path, tiny_synthetic) -> None:
    config = RunConfig(
        out=str(tmp_path / "out"),
        cache=CacheConfig(root=str(tmp_path / "cache"), train_views=1),
        backbone=BackboneConfig(name="timm/test_convnext", weights="none", image_size=SIZE, stages=(1, 2)),
        data=DataConfig(synthetic_classes=3, synthetic_train_per_class=4, synthetic_test_per_class=2),
        codebook=CodebookConfig(num_prototypes=8, epochs=1, kmeans_patches=300),
        probe=ProbeConfig(epochs=2),
        head=HeadConfig(epochs=2),
        device="cpu",
    )
    result = run(config)
    info = result.model.backbone.info
    assert result.caches.test.store.grid == (SIZE // 8, SIZE // 8) and info.channels == 32 + 48
    loaded = ProtoQuant.load(result.out / "model")
    assert loaded.backbone.info == info
    images = [tiny_synthetic.load_image(i) for i in range(2)]
    torch.testing.assert_close(loaded.predict(images).logits, result.model.predict(images).logits)
    metrics = json.loads((result.out / "metrics.json").read_text())
    recorded = metrics["backbone"]
    assert {k: recorded[k] for k in ("image_size", "stage", "stages", "stride", "receptive_field")} == {
        "image_size": SIZE,
        "stage": -1,
        "stages": [1, 2],
        "stride": 8,
        "receptive_field": info.receptive_field,
    }
    line = f"feature grid 8 x 8: one cell = 8 px, sees {info.receptive_field} px of the {SIZE} px input"
    assert line in model_card(loaded, metrics)
    gallery = SimpleNamespace(grid=(8, 8), source=SimpleNamespace(num_images=12))
    assert ("features", line.replace(" x ", " × ")) in model_facts(loaded, gallery)
