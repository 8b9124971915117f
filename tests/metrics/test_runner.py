"""Runners end to end on a tiny trained model: every metric runs, protocols are recorded, the model is untouched."""

import json
from dataclasses import replace

import pytest
import torch

from protoquant.cli import main
from protoquant.metrics import (
    METRICS,
    FeatureMemo,
    MetricSettings,
    evaluate_metrics,
    format_table,
    get_metric,
)
from protoquant.metrics.common import class_prototypes
from protoquant.metrics.sample import choose_images
from protoquant.train.baseline import PipNetStyleHead, baseline_model, train_baseline_head

FAST = MetricSettings(misalignment_images=3, attack_iterations=2, funnybirds_images=4, batch_size=4)


def state_bytes(model) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(ValueError, match="consistency"):
        get_metric("nope")
    with pytest.raises(ValueError, match="valid: all, accuracy"):
        evaluate_metrics(None, None, ["accuracy", "nope"])


def test_all_metrics_run_record_protocol_and_never_change_the_model(tiny_metrics_run):
    result = tiny_metrics_run
    model = result.model
    before = state_bytes(model)
    flags = {k: v.requires_grad for k, v in model.named_parameters()}
    report = evaluate_metrics(
        model,
        result.splits.test,
        "all",
        settings=FAST,
        store=result.caches.test.store,
        train=result.caches.train_plain,
    )
    assert state_bytes(model) == before
    assert {k: v.requires_grad for k, v in model.named_parameters()} == flags
    assert set(METRICS) <= set(report)
    assert report["accuracy"] == pytest.approx(result.metrics["protoquant"]["test_accuracy"])
    protocol = report["protocol"]
    for key in ("seed", "image_size", "crop_mode", "settings", "deviations"):
        assert key in protocol
    assert "top-10" in protocol["metrics"]["consistency"]["prototype_rule"]
    assert protocol["metrics"]["funnybirds"]["thresholds"].startswith("linspace(0.01, 0.5, 80)")
    assert len(report["rows"]["misalignment"]) == 3 and len(report["rows"]["grounding"]) == 8
    assert report["grounding"]["num_prototypes"] == 8
    assert len(report["funnybirds"]["per_threshold"]["csdc"]) == 80
    json.dumps(report)  # plain JSON
    assert "consistency" in format_table(report)


def test_baseline_head_same_stage2_path_and_metrics(tiny_metrics_run):
    result = tiny_metrics_run
    config = replace(result.model.config.head, epochs=3)
    head, selection = train_baseline_head(
        result.caches.train, result.caches.val, 3, config, seed=0, device=torch.device("cpu")
    )
    assert isinstance(head, PipNetStyleHead) and selection["trials"]
    features = result.caches.test.store.get(result.caches.test.entries[:2])
    out = head(features)
    channels = features.shape[1]
    assert out.activation.shape == (2, channels, *features.shape[2:])
    assert torch.allclose(out.activation.sum(dim=1), torch.ones(2, *features.shape[2:]), atol=1e-5)
    assert torch.allclose(out.scores, out.activation.flatten(2).amax(dim=2))
    assert torch.allclose(head.contributions(out.scores).sum(dim=2), out.logits, atol=1e-5)
    assert (head.class_weights >= 0).all()
    memo = FeatureMemo()
    kwargs = {"store": result.caches.test.store, "memo": memo, "settings": FAST}
    report = evaluate_metrics(
        baseline_model(result.model, head), result.splits.test, ["size", "stability"], **kwargs
    )
    assert report["size"]["num_prototypes"] == channels
    assert len(memo) == len(result.splits.test)  # the noisy features are kept for the next head


def test_cli_evaluate_metrics_and_audit(tiny_metrics_run, tmp_path, capsys):
    model = str(tiny_metrics_run.out / "model")
    out = tmp_path / "eval.json"
    command = ["evaluate", "--model", model, "--metrics", "accuracy,size,purity", "--out", str(out)]
    assert main([*command, "--set", "purity_top_k=3", "--set", "random_start_only=yes"]) == 0
    assert "purity" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["accuracy"] == pytest.approx(tiny_metrics_run.metrics["protoquant"]["test_accuracy"])
    assert report["num_images"] == 9 and "purity" in report and "rows" not in report
    assert (
        report["protocol"]["settings"]["purity_top_k"] == 3
        and report["protocol"]["settings"]["random_start_only"]
    )
    assert main(["evaluate", "--model", model, "--metrics", "size", "--set", "nope=1"]) == 2
    assert "purity_top_k" in capsys.readouterr().err
    assert main(["audit", "--model", model, "--against", model, "--out", str(tmp_path / "audit.json")]) == 0
    text = capsys.readouterr().out
    assert "mean_cosine_used" in text and "num_moved 0" in text
    assert (tmp_path / "audit.grounding.csv").is_file()


def test_a_class_without_test_images_counts_its_prototypes_as_failures(tiny_metrics_run):
    result = tiny_metrics_run
    test = result.splits.test
    without_last = test.subset([i for i in range(len(test)) if test.labels[i] != 2])
    report = evaluate_metrics(result.model, without_last, ["consistency", "stability"], settings=FAST)
    slots = class_prototypes(result.model.head.class_weights, 10)
    empty = int((slots.classes == 2).sum())
    assert empty > 0 and report["consistency"]["num_slots"] == len(slots.classes)
    assert report["consistency"]["num_consistent"] <= len(slots.classes) - empty
    assert report["stability"]["score"] <= 100 * (len(slots.classes) - empty) / len(slots.classes)


@pytest.mark.parametrize("attribution", ["activation", "box"])
def test_funnybirds_attribution_variants(tiny_metrics_run, attribution):
    result = tiny_metrics_run
    settings = replace(FAST, funnybirds_images=2, funnybirds_attribution=attribution)
    report = evaluate_metrics(
        result.model, result.splits.test, ["funnybirds"], settings=settings, store=result.caches.test.store
    )
    assert report["funnybirds"]["counts"]["images"] == 2
    assert attribution in report["protocol"]["metrics"]["funnybirds"]["attribution"]


def test_class_misalignment_is_one_joint_attack_per_image_and_class_each_one_per_prototype(tiny_metrics_run):
    result = tiny_metrics_run
    kwargs = {"store": result.caches.test.store}
    slots = class_prototypes(result.model.head.class_weights, FAST.prototypes_per_class)
    sample = choose_images(result.splits.test.labels, FAST.misalignment_images, seed=FAST.seed)
    labels = result.splits.test.labels[sample.indices]
    per_image = [len(slots.of_class(int(y))) for y in labels]
    assert min(per_image) >= 2  # every attacked class has several prototypes
    reports = {
        target: evaluate_metrics(
            result.model,
            result.splits.test,
            ["misalignment"],
            settings=replace(FAST, attack_target=target),
            **kwargs,
        )
        for target in ("class", "class_each")
    }
    joint = reports["class"]["rows"]["misalignment"]
    assert [row["index"] for row in joint] == sample.indices.tolist()
    for row in joint:  # the reported prototype is the most activated of the class's prototypes
        assert row["target"] in set(slots.prototypes[slots.of_class(row["label"])].tolist())
    assert len(reports["class_each"]["rows"]["misalignment"]) == sum(per_image)
    rules = [reports[t]["protocol"]["metrics"]["misalignment"]["target_rule"] for t in reports]
    assert "union of their boxes" in rules[0] and rules[1].startswith("deviation")


def test_funnybirds_upsampling_setting_is_recorded(tiny_metrics_run):
    result = tiny_metrics_run
    settings = replace(FAST, funnybirds_images=2, funnybirds_upsampling="bilinear")
    report = evaluate_metrics(
        result.model, result.splits.test, ["funnybirds"], settings=settings, store=result.caches.test.store
    )
    protocol = report["protocol"]
    assert protocol["settings"]["funnybirds_upsampling"] == "bilinear"
    assert protocol["metrics"]["funnybirds"]["upsampling"].startswith("bilinear")
    assert "bilinear(similarity_p)" in protocol["metrics"]["funnybirds"]["attribution_rule"]
    assert protocol["metrics"]["funnybirds"]["nothing_removed"].endswith("else the original image")
    with pytest.raises(
        ValueError, match=r"funnybirds_upsampling must be one of \[.bicubic., .bilinear.\], got .area."
    ):
        evaluate_metrics(
            result.model,
            result.splits.test,
            ["funnybirds"],
            settings=replace(settings, funnybirds_upsampling="area"),
            store=result.caches.test.store,
        )
