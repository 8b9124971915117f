"""Every metric sees the features the cache stores: one feature function, one grid, one precision.

Two tiny runs shape their features differently (grid pooling with a ceil-mode edge; bf16
autocast). While each registered metric runs, the frozen backbone may only be reached through
`patch_features`, every feature map the head receives has the cache's pooled grid, and the
features computed for an unchanged test image equal its cached features bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import protoquant.model as model_module
import protoquant.pipeline as pipeline
from protoquant.backbones.frozen import FrozenBackbone
from protoquant.head import ProtoQuantHead
from protoquant.metrics import METRICS, MetricSettings, evaluate_metrics
from tests.conftest import tiny_run_config

FAST = MetricSettings(
    misalignment_images=3, attack_iterations=1, funnybirds_images=2, batch_size=4, noise_std=0.0
)
VARIANTS = {
    "grid_pool": {"grid_pool": 2},  # 96 px test ConvNeXt: 3 x 3 map -> 2 x 2 cells (ceil mode)
    "bf16": {"autocast_bf16": True},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def shaped_run(request, tmp_path_factory) -> pipeline.RunResult:
    config = tiny_run_config(tmp_path_factory.mktemp(f"features_{request.param}"))
    config = replace(
        config,
        backbone=replace(config.backbone, image_size=96),
        cache=replace(config.cache, train_views=1, **VARIANTS[request.param]),
    )
    torch.manual_seed(0)  # the random backbone weights
    return pipeline.run(config)


class Spy:
    """Records the feature function's calls and every backbone or head call, with where it came from."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (images, features, gradients)
        self.head_grids: set[tuple[int, int]] = set()
        self.outside = 0  # backbone calls that bypassed patch_features
        self._depth = 0
        feature_fn, backbone_forward = model_module.patch_features, FrozenBackbone.forward
        head_forward = ProtoQuantHead.forward

        def features(backbone, images, config, **kwargs):
            self._depth += 1
            try:
                out = feature_fn(backbone, images, config, **kwargs)
            finally:
                self._depth -= 1
            gradients = kwargs.get("input_gradients", False)
            self.calls.append((images.detach().clone(), out.detach().clone(), gradients))
            return out

        def forward(backbone, images, **kwargs):
            self.outside += self._depth == 0
            return backbone_forward(backbone, images, **kwargs)

        def head(module, features):
            self.head_grids.add(tuple(features.shape[-2:]))
            return head_forward(module, features)

        patch.setattr(model_module, "patch_features", features)
        patch.setattr(FrozenBackbone, "forward", forward)
        patch.setattr(ProtoQuantHead, "forward", head)


def _clean_inputs(result: pipeline.RunResult) -> torch.Tensor:
    """(N, 3, S, S) view-0 inputs of every test image, as the metrics preprocess them."""
    test, transform = result.splits.test, result.model.transform
    return torch.stack([transform(test.load_image(i).convert("RGB"), i, 0) for i in range(len(test))])


def _matches(spy: Spy, clean: torch.Tensor, cached: torch.Tensor) -> int:
    """Rows of rounded feature calls whose input is an unchanged test image; each must equal the cache."""
    found = 0
    for images, features, gradients in spy.calls:
        for row in range(len(images)):
            same = [i for i in range(len(clean)) if torch.equal(images[row].cpu(), clean[i])]
            if gradients or not same:
                continue
            assert torch.equal(features[row].cpu(), cached[same[0]]), (
                f"image {same[0]} differs from its cache"
            )
            found += 1
    return found


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_sees_the_cached_features(shaped_run, name) -> None:
    store = shaped_run.caches.test.store
    entries = store.entries(first_view_only=True)
    cached = store.get(entries).float()  # (N, D, H', W')
    assert np.array_equal(store.image_index[entries], np.arange(len(entries)))
    with pytest.MonkeyPatch.context() as patch:
        spy = Spy(patch)
        evaluate_metrics(
            shaped_run.model,
            shaped_run.splits.test,
            [name],
            settings=FAST,
            store=store,
            train=shaped_run.caches.train_plain,
        )
    assert spy.outside == 0
    assert spy.head_grids <= {tuple(store.grid)}, spy.head_grids
    for _, features, _ in spy.calls:
        assert tuple(features.shape[-2:]) == tuple(store.grid)
    found = _matches(spy, _clean_inputs(shaped_run), cached)
    if name in ("stability", "misalignment"):  # both featurise unchanged images (noise 0; before the attack)
        assert found > 0


def test_the_pooled_grid_is_the_ceiling_of_the_backbone_grid(shaped_run) -> None:
    config, info = shaped_run.model.config.cache, shaped_run.model.backbone.info
    expected = tuple(-(-side // config.grid_pool) for side in info.grid)
    assert tuple(shaped_run.caches.test.store.grid) == expected
    if config.grid_pool > 1:
        assert info.grid == (3, 3) and expected == (2, 2)
