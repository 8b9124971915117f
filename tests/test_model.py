"""Image-in model: predictions, and the one checkpoint format (save / strict load)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from safetensors.torch import load_file, save_file

from protoquant.backbones.frozen import create_backbone
from protoquant.config import BackboneConfig, RunConfig
from protoquant.head import ProtoQuantHead
from protoquant.model import ProtoQuant

FIELDS = ("classes", "probabilities", "logits", "scores", "similarity", "activation")


@pytest.fixture(scope="module")
def model(tiny_run) -> ProtoQuant:
    return tiny_run.result.model


@pytest.fixture(scope="module")
def checkpoint(tiny_run) -> Path:
    return Path(tiny_run.config.out) / "model"


@pytest.fixture(scope="module")
def loaded(checkpoint) -> ProtoQuant:
    return ProtoQuant.load(checkpoint)


@pytest.fixture(scope="module")
def images(tiny_run) -> list:
    test = tiny_run.result.splits.test
    return [test.load_image(i) for i in range(4)]


@pytest.fixture(scope="module")
def image_tensor() -> torch.Tensor:
    return torch.rand(3, 3, 80, 72, generator=torch.Generator().manual_seed(0))


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(checkpoint, target)
    return target


def _assert_identical(first, second) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_prediction_shapes_probabilities_and_classes(model, images) -> None:
    prediction = model.predict(images)
    num_classes, num_prototypes = len(model.classes), model.head.num_prototypes
    grid = model.backbone.info.grid
    assert prediction.logits.shape == prediction.probabilities.shape == (4, num_classes)
    assert prediction.scores.shape == (4, num_prototypes)
    assert prediction.similarity.shape == prediction.activation.shape == (4, num_prototypes, *grid)
    torch.testing.assert_close(prediction.probabilities.sum(dim=1), torch.ones(4))
    assert (prediction.probabilities >= 0).all()
    assert torch.equal(prediction.classes, prediction.logits.argmax(dim=1))
    assert torch.equal(prediction.classes, prediction.probabilities.argmax(dim=1))
    assert torch.equal(prediction.scores, prediction.activation.amax(dim=(2, 3)))
    torch.testing.assert_close(prediction.logits, model.head.contributions(prediction.scores).sum(dim=2))


def test_prediction_matches_the_head_on_cached_features(tiny_run, model, images) -> None:
    """The image path (transform + backbone) and the cache path agree, up to float16 storage."""
    test_cache = tiny_run.result.caches.test
    features = test_cache.store.get(test_cache.entries[:4])  # (4, D, H, W) view 0
    cached = model.head(features)
    prediction = model.predict(images)
    torch.testing.assert_close(prediction.similarity, cached.similarity, atol=2e-3, rtol=0)
    torch.testing.assert_close(prediction.scores, cached.scores, atol=2e-2, rtol=0)


def test_save_load_round_trip_gives_identical_predictions(model, loaded, images, image_tensor) -> None:
    assert loaded.classes == model.classes and loaded.config == model.config
    assert loaded.head.temperature == model.head.temperature
    assert loaded.backbone.info.weights_hash == model.backbone.info.weights_hash
    _assert_identical(loaded.predict(images), model.predict(images))
    _assert_identical(loaded.predict(image_tensor), model.predict(image_tensor))
    state, loaded_state = model.head.state_dict(), loaded.head.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_loaded_model_is_frozen(loaded) -> None:
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.backbone.training and not any(m.training for m in loaded.backbone.modules())
    loaded.eval()


def test_resave_round_trips(loaded, images, tmp_path) -> None:
    path = loaded.save(tmp_path / "again")
    assert path == tmp_path / "again"
    loaded.save(path)  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary folder left
    _assert_identical(ProtoQuant.load(path).predict(images), loaded.predict(images))


def test_tensor_input_must_be_b3hw(model) -> None:
    for bad in (torch.rand(3, 32, 32), torch.rand(2, 1, 32, 32)):
        with pytest.raises(ValueError, match="B, 3, H, W"):
            model.predict(bad)


@pytest.mark.parametrize("missing", [None, "class_layer.mask", "usage", "codebook"])
def test_load_is_strict_about_head_tensors(checkpoint, tmp_path, missing) -> None:
    """An extra tensor (missing=None) or a missing one makes loading fail."""
    path = _copy(checkpoint, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    if missing is None:
        tensors["class_layer.bias"] = torch.zeros(3)
    else:
        del tensors[missing]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        ProtoQuant.load(path)


def test_load_is_strict_about_a_stored_random_backbone(checkpoint, tmp_path) -> None:
    path = _copy(checkpoint, tmp_path)
    tensors = load_file(str(path / "backbone.safetensors"))
    tensors["unexpected.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "backbone.safetensors"))
    with pytest.raises(ValueError, match=r"(?is)backbone\.safetensors.*unexpected"):
        ProtoQuant.load(path)


def test_mismatched_backbone_weights_raise(checkpoint, backbone_factory, tmp_path) -> None:
    other = backbone_factory("timm/test_convnext", seed=7)
    with pytest.raises(ValueError, match="hash"):
        ProtoQuant.load(checkpoint, backbone=other)
    path = _copy(checkpoint, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["backbone"]["weights_hash"] = "0" * 64
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hash"):
        ProtoQuant.load(path)


def test_load_with_the_matching_backbone_object(checkpoint, model, images) -> None:
    again = ProtoQuant.load(checkpoint, backbone=model.backbone)
    _assert_identical(again.predict(images), model.predict(images))


def test_not_a_checkpoint_or_wrong_format(checkpoint, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        ProtoQuant.load(tmp_path)
    path = _copy(checkpoint, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["format"] = 999
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        ProtoQuant.load(path)


def test_named_backbone_is_referenced_not_copied(model, tmp_path, images) -> None:
    """With weights from a file, the checkpoint records name + hash only, and rebuilds the backbone."""
    weights = tmp_path / "backbone.pth"
    torch.save(model.backbone.model.state_dict(), weights)
    backbone_config = BackboneConfig(name="timm/test_convnext", weights=str(weights), image_size=64)
    backbone = create_backbone(backbone_config)
    assert backbone.info.weights_hash == model.backbone.info.weights_hash
    config = replace(model.config, backbone=backbone_config)
    named = ProtoQuant(backbone, model.head, model.classes, config)
    path = named.save(tmp_path / "named")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    _assert_identical(ProtoQuant.load(path).predict(images), model.predict(images))
    other = model.backbone.model.state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in other.items()}
    torch.save(other, weights)  # the referenced file changed since training
    with pytest.raises(ValueError, match="hash"):
        ProtoQuant.load(path)


def _preprocess_pil_and_tensor(convnext, crop_ratio: float, image) -> tuple[torch.Tensor, torch.Tensor]:
    config = RunConfig(
        backbone=BackboneConfig("timm/test_convnext", "none", image_size=64, crop_ratio=crop_ratio)
    )
    head = ProtoQuantHead(
        torch.randn(8, convnext.info.channels, generator=torch.Generator().manual_seed(0)), 3
    )
    model = ProtoQuant(convnext, head, ("a", "b", "c"), config)
    return model.preprocess([image]), model.preprocess(TF.to_tensor(image)[None])


def test_tensor_and_pil_inputs_are_preprocessed_alike(convnext, synthetic_factory) -> None:
    image = synthetic_factory("test", images_per_class=1).load_image(0).resize((96, 80))
    from_pil, from_tensor = _preprocess_pil_and_tensor(convnext, 1.0, image)
    torch.testing.assert_close(from_tensor, from_pil, atol=0.02, rtol=0)  # resampling filters differ slightly


def test_tensor_input_honours_crop_ratio(convnext, synthetic_factory) -> None:
    image = synthetic_factory("test", images_per_class=1).load_image(0).resize((96, 80))
    from_pil, from_tensor = _preprocess_pil_and_tensor(convnext, 0.875, image)
    torch.testing.assert_close(from_tensor, from_pil, atol=0.02, rtol=0)
