"""Image-in model: inputs of every accepted form, predictions, input gradients, explanations that
find their gallery, and the one checkpoint format (save / strict load)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file

from protoquant.backbones.frozen import create_backbone
from protoquant.config import BackboneConfig, RunConfig
from protoquant.explain.gallery import build_gallery, has_gallery, load_gallery, model_hash, save_gallery
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
    backbone_config = replace(model.config.backbone, weights=str(weights))  # same input settings
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


# --- inputs: one picture or a batch, in any accepted form -------------------------------------


def _forms(image: Image.Image) -> dict:
    pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8
    chw = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) uint8
    return {
        "pil": image,
        "numpy": pixels,
        "uint8 tensor": chw,
        "float tensor": chw.float() / 255,
        "list": [image],
        "numpy batch": pixels[None],
        "uint8 batch": chw[None],
        "float batch": chw[None].double() / 255,
    }


def test_same_picture_same_prediction_whatever_its_type(model, images) -> None:
    image = images[0].resize((80, 72))
    expected = model.predict([image])
    for name, form in _forms(image).items():
        assert torch.equal(model.predict(form).logits, expected.logits), name


def test_grey_pictures_alike_in_every_form(model, images) -> None:
    grey = images[1].convert("L")
    pixels = np.array(grey)  # (H, W)
    expected = model.predict(grey).logits
    for form in (
        pixels,
        pixels[..., None],
        torch.from_numpy(pixels)[None],
        torch.from_numpy(pixels)[None] / 255,
    ):
        assert torch.equal(model.predict(form).logits, expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io points to torchcodec
def test_read_image_tensor_is_read_as_0_to_255(model, images, tmp_path) -> None:
    path = tmp_path / "image.png"
    images[2].save(path)
    from_file = model.predict(torchvision.io.read_image(str(path)))  # (3, H, W) uint8
    assert torch.equal(from_file.logits, model.predict(Image.open(path)).logits)


def test_one_picture_is_a_batch_of_one_and_batches_keep_order(model, images) -> None:
    single = model.predict(images[0])
    assert single.logits.shape == (1, len(model.classes))
    batch = model.predict(images)
    torch.testing.assert_close(batch.logits[0], single.logits[0], atol=1e-5, rtol=0)
    mixed = model.predict([images[0], np.array(images[1]), TF.pil_to_tensor(images[2])])
    torch.testing.assert_close(mixed.logits, batch.logits[:3], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.linspace(-2, 2, 192).reshape(1, 3, 8, 8), ValueError, r"\[0, 1\].*normalised"),
        (torch.zeros(2, 2, 8, 8), ValueError, r"C in \(1, 3, 4\)"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, "channels first"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), TypeError, "int64"),
        (np.zeros((8, 8, 3)), TypeError, "float64.*uint8"),
        (np.zeros((3, 8, 8), dtype=np.uint8), ValueError, "channels last"),
        ("image.png", TypeError, "builtins.str"),
        ([], ValueError, "no images"),
        ([Image.new("RGB", (8, 8)), 3], TypeError, "list item.*int"),
    ],
)
def test_bad_inputs_say_what_was_given_and_what_is_accepted(model, bad, error, match) -> None:
    with pytest.raises(error, match=match):
        model.predict(bad)


def _framing_model(backbone, crop_ratio: float) -> ProtoQuant:
    config = RunConfig(
        backbone=BackboneConfig("timm/test_convnext", "none", image_size=64, crop_ratio=crop_ratio)
    )
    head = ProtoQuantHead(
        torch.randn(8, backbone.info.channels, generator=torch.Generator().manual_seed(0)), 3
    )
    return ProtoQuant(backbone, head, ("a", "b", "c"), config)


def test_crop_ratio_is_honoured_for_every_form(convnext, images) -> None:
    image = images[0].resize((96, 80))
    cropping = _framing_model(convnext, 0.875)
    from_pil = cropping.preprocess(image)
    assert torch.equal(cropping.preprocess(TF.to_tensor(image)), from_pil)
    assert torch.equal(cropping.preprocess(np.array(image)), from_pil)
    assert not torch.equal(_framing_model(convnext, 1.0).preprocess(image), from_pil)


# --- load: eval mode, on the requested device ---------------------------------------------------


def test_load_gives_an_eval_model_on_the_requested_device(checkpoint) -> None:
    loaded = ProtoQuant.load(checkpoint, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert {p.device.type for p in loaded.state_dict().values()} == {expected}
    assert loaded.checkpoint == checkpoint


# --- input gradients ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_double(backbone_factory) -> ProtoQuant:
    """A small float64 model (random backbone and head): finite differences are exact enough."""
    backbone = backbone_factory("timm/test_convnext")
    with torch.random.fork_rng(devices=[]):  # the class weights are drawn from the global RNG
        torch.manual_seed(1)
        head = ProtoQuantHead(torch.randn(8, backbone.info.channels), 3)
    config = RunConfig(backbone=BackboneConfig("timm/test_convnext", "none", image_size=64))
    return ProtoQuant(backbone, head, ("a", "b", "c"), config).double()


def test_input_gradients_match_finite_differences_and_spare_the_parameters(tiny_double) -> None:
    differentiable = tiny_double.differentiable()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 64, 64, generator=generator, dtype=torch.float64, requires_grad=True)
    logit = differentiable(images)[0, 1]
    logit.backward()
    grad = images.grad
    assert grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in differentiable.parameters())
    assert not differentiable.training and not tiny_double.backbone.training
    differentiable.train()
    assert not any(m.training for m in differentiable.modules())
    direction = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    step = 1e-5
    with torch.no_grad():
        ahead = differentiable(images + step * direction)[0, 1]
        behind = differentiable(images - step * direction)[0, 1]
    numeric = (ahead - behind) / (2 * step)
    assert float(numeric) == pytest.approx(float((grad * direction).sum()), rel=1e-4)
    # predict rounds the features to the cache's float16; the differentiable path does not
    exact = differentiable(images.detach())
    torch.testing.assert_close(exact, tiny_double(images.detach()).logits, rtol=2e-3, atol=2e-3)
    assert not torch.equal(exact, tiny_double(images.detach()).logits)


def test_default_path_builds_no_autograd_graph(tiny_double) -> None:
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    assert not tiny_double.features(images).requires_grad
    assert not tiny_double(images).logits.requires_grad


def test_integrated_gradients_from_captum(tiny_double) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    differentiable = tiny_double.differentiable()
    generator = torch.Generator().manual_seed(2)
    images, baseline = torch.randn(2, 1, 3, 64, 64, generator=generator, dtype=torch.float64)
    attribution, delta = captum_attr.IntegratedGradients(differentiable).attribute(
        images, baselines=baseline, target=0, n_steps=128, return_convergence_delta=True
    )
    assert attribution.shape == images.shape and attribution.abs().sum() > 0
    with torch.no_grad():  # completeness: the attributions sum to f(images) - f(baseline)
        gap = differentiable(images)[0, 0] - differentiable(baseline)[0, 0]
    assert abs(float(gap)) > 0 and abs(float(delta)) < 0.05 * abs(float(gap))


# --- explanations find the stored gallery -------------------------------------------------------


@pytest.fixture(scope="module")
def gallery_checkpoint(tiny_run, model, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with its gallery stored inside."""
    folder = model.save(tmp_path_factory.mktemp("with-gallery") / "model")
    save_gallery(build_gallery(model, tiny_run.result.caches.train_plain, top_k=2), folder)
    return folder


def test_explain_loads_the_stored_gallery(gallery_checkpoint, images) -> None:
    loaded = ProtoQuant.load(gallery_checkpoint)
    stored = load_gallery(gallery_checkpoint)
    explanation = loaded.explain(images[0], top_prototypes=3)
    for item in explanation.predicted.prototypes:
        assert item.patches and item.patches == stored.patches(item.prototype, 3)
    bare = loaded.explain(images[0], top_prototypes=3, gallery=False)
    assert all(item.patches == () for item in bare.predicted.prototypes)


def test_missing_gallery_is_an_error_with_the_fix(checkpoint, model, images) -> None:
    with pytest.raises(FileNotFoundError, match="protoquant gallery --model"):
        ProtoQuant.load(checkpoint).explain(images[0])
    with pytest.raises(FileNotFoundError, match="gallery=False"):
        model.explain(images[0])  # built in memory: no folder to look in


def test_explain_takes_a_batch(gallery_checkpoint, images) -> None:
    loaded = ProtoQuant.load(gallery_checkpoint)
    explained = loaded.explain(images[:3], top_prototypes=2)
    assert isinstance(explained, list) and len(explained) == 3
    for image, explanation in zip(images, explained):
        single = loaded.explain(image, top_prototypes=2)
        assert explanation.predicted.class_index == single.predicted.class_index
        assert [p.prototype for p in explanation.predicted.prototypes] == [
            p.prototype for p in single.predicted.prototypes
        ]


def test_save_carries_the_gallery_of_this_model_only(gallery_checkpoint, tmp_path) -> None:
    loaded = ProtoQuant.load(gallery_checkpoint)
    again = ProtoQuant.load(loaded.save(tmp_path / "again"))
    assert load_gallery(again.checkpoint, model=again).model_hash == model_hash(loaded)
    loaded.save(gallery_checkpoint)  # saving over its own folder keeps the gallery
    assert has_gallery(gallery_checkpoint)
    with torch.no_grad():
        loaded.head.class_layer.weight.mul_(2)  # now another model: its gallery is stale
    try:
        assert not has_gallery(loaded.save(tmp_path / "changed"))
    finally:
        with torch.no_grad():
            loaded.head.class_layer.weight.div_(2)
