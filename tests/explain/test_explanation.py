"""Explanations: contributions sum to the logit, boxes lie inside the image, patches come from the gallery."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from protoquant.explain.explanation import explain, high_activation_box
from protoquant.explain.gallery import build_gallery

IMAGES = 4  # test images checked


@pytest.fixture(scope="module")
def model(tiny_run):
    return tiny_run.result.model


@pytest.fixture(scope="module")
def gallery(tiny_run, model):
    return build_gallery(model, tiny_run.result.caches.train_plain, top_k=3)


@pytest.fixture(scope="module")
def images(tiny_run):
    return [tiny_run.result.splits.test.load_image(i) for i in range(IMAGES)]


def test_all_contributions_sum_to_the_logit(model, images):
    num_classes, num_prototypes = len(model.classes), model.head.num_prototypes
    for image in images:
        explanation = explain(
            model, image, top_classes=num_classes, top_prototypes=num_prototypes, gallery=False
        )
        logits = model.predict([image]).logits[0]
        assert len(explanation.classes) == num_classes
        for shown in explanation.classes:
            total = sum(item.contribution for item in shown.prototypes)
            assert total == pytest.approx(shown.logit, abs=1e-4)
            assert shown.logit == pytest.approx(float(logits[shown.class_index]), abs=1e-5)
            assert shown.rest == pytest.approx(0.0, abs=1e-4)
            for item in shown.prototypes:
                assert item.contribution == pytest.approx(item.score * item.weight, rel=1e-5, abs=1e-7)


def test_top_prototypes_plus_rest_is_the_logit_and_sorted(model, images):
    explanation = explain(model, images[0], top_classes=2, top_prototypes=3, gallery=False)
    probabilities = [c.probability for c in explanation.classes]
    assert probabilities == sorted(probabilities, reverse=True)
    assert explanation.predicted.class_index == int(model.predict([images[0]]).classes[0])
    for shown in explanation.classes:
        contributions = [item.contribution for item in shown.prototypes]
        assert len(contributions) == 3 and contributions == sorted(contributions, reverse=True)
        assert sum(contributions) + shown.rest == pytest.approx(shown.logit, abs=1e-4)
        assert shown.num_contributing >= sum(c > 0 for c in contributions)


def test_maps_and_boxes_lie_inside_the_image(model, images):
    size = model.config.backbone.image_size
    for image in images:
        explanation = explain(
            model, image, top_classes=2, top_prototypes=model.head.num_prototypes, gallery=False
        )
        assert explanation.image.shape == (size, size, 3) and explanation.image.dtype == np.uint8
        height, width = explanation.grid
        for item in (p for c in explanation.classes for p in c.prototypes):
            assert item.activation.shape == item.similarity.shape == (size, size)
            x1, y1, x2, y2 = item.box
            assert 0 <= x1 <= x2 < size and 0 <= y1 <= y2 < size
            peak_y, peak_x = np.unravel_index(np.argmax(item.activation), item.activation.shape)
            assert x1 <= peak_x <= x2 and y1 <= peak_y <= y2
            assert 0 <= item.location[0] < height and 0 <= item.location[1] < width


def test_score_is_the_activation_peak_at_location(model, images):
    prediction = model.predict([images[0]])
    for item in explain(model, images[0], top_prototypes=4, gallery=False).predicted.prototypes:
        h, w = item.location
        assert item.score == pytest.approx(float(prediction.activation[0, item.prototype, h, w]), abs=1e-6)
        assert item.score == pytest.approx(float(prediction.scores[0, item.prototype]), abs=1e-6)


def test_patches_come_from_the_gallery(model, gallery, images):
    bare = explain(model, images[0], top_prototypes=3, gallery=False)
    assert all(item.patches == () for item in bare.predicted.prototypes)
    explained = explain(model, images[0], top_prototypes=3, gallery=gallery)
    for item in explained.predicted.prototypes:
        assert item.patches == gallery.patches(item.prototype, 3)
        assert [ref.rank for ref in item.patches] == [0, 1, 2]


def test_model_method_delegates_and_tensor_input_works(model, images):
    by_function = explain(model, images[1], top_classes=2, gallery=False)
    by_method = model.explain(images[1], top_classes=2, gallery=False)
    assert [p.prototype for p in by_method.predicted.prototypes] == [
        p.prototype for p in by_function.predicted.prototypes
    ]
    tensor = torch.from_numpy(np.array(images[1].convert("RGB"))).permute(2, 0, 1).float() / 255
    from_tensor = explain(
        model, tensor, top_classes=2, gallery=False
    )  # resized differently from PIL: compare to itself
    prediction = model.predict(tensor[None])
    assert from_tensor.predicted.class_index == int(prediction.classes[0])
    assert from_tensor.predicted.logit == pytest.approx(float(prediction.logits.max()), abs=1e-5)


def test_gallery_of_another_model_is_refused(model, gallery, images):
    stale = replace(gallery, model_hash="0" * 64)
    with pytest.raises(ValueError, match="gallery"):
        explain(model, images[0], gallery=stale)


def test_bad_counts_are_refused(model, images):
    with pytest.raises(ValueError, match="top_prototypes"):
        explain(model, images[0], top_prototypes=0)


def test_box_covers_the_peak_region_only():
    heatmap = np.linspace(0.0, 0.1, 40 * 40, dtype=np.float32).reshape(40, 40)  # a faint ramp
    heatmap[2:12, 26:36] = 1.0  # the peak's region
    heatmap[6, 30] = 2.0
    heatmap[26:36, 2:12] = 0.9  # a second region, also above the 0.9 quantile
    assert np.quantile(heatmap, 0.9) <= 0.9
    assert high_activation_box(heatmap, quantile=0.9) == (26, 2, 35, 11)
    assert high_activation_box(np.ones((10, 12), dtype=np.float32)) == (0, 0, 11, 9)
