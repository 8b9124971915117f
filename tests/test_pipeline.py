"""One tiny end-to-end run: outputs on disk, metrics, frozen prototypes, no test-set selection."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from protoquant.config import WEIGHT_THRESHOLD, DataConfig, load_yaml
from protoquant.data.synthetic import SyntheticParts
from protoquant.data.transforms import ViewTransform
from protoquant.distributed import resolve_device
from protoquant.errors import ConfigError
from protoquant.explain.gallery import training_subset
from protoquant.model import ProtoQuant
from protoquant.paths import cache_root
from protoquant.pipeline import run, stage1_fit
from protoquant.train.codebook import prototype_usage

METRIC_KEYS = [
    ("linear_probe", "train_accuracy"),
    ("quantized", "train_accuracy"),
    ("linear_probe", "val_accuracy"),
    ("linear_probe", "test_accuracy"),
    ("quantized", "val_accuracy"),
    ("quantized", "test_accuracy"),
    ("protoquant", "val_accuracy"),
    ("protoquant", "test_accuracy"),
]


def test_metrics_have_every_key_with_sane_values(tiny_run) -> None:
    metrics, config = tiny_run.result.metrics, tiny_run.config
    for section, key in METRIC_KEYS:
        assert 0.0 <= metrics[section][key] <= 1.0, (section, key)
    assert isinstance(metrics["protoquant"]["num_prototypes"], int)
    assert 0 <= metrics["protoquant"]["num_prototypes"] <= config.codebook.num_prototypes
    assert metrics["quantized"]["num_prototypes"] == config.codebook.num_prototypes
    assert 0 <= metrics["quantized"]["used_prototypes"] <= config.codebook.num_prototypes
    timing = metrics["timing"]
    assert timing["cache_seconds"] > 0 and timing["train_seconds"] > 0
    assert timing["total_seconds"] >= timing["cache_seconds"] + timing["train_seconds"]
    assert metrics["data"] == {
        "dataset": "synthetic",
        "train": 21,
        "val": 3,
        "test": 12,
        "val_split": "carved",
        "classes": 3,
        "train_views": 2,
    }
    assert metrics["backbone"]["weights_hash"] == tiny_run.result.model.backbone.info.weights_hash
    grounding = metrics["grounding"]
    assert -1.0 <= grounding["min_nearest_cosine_used"] <= grounding["mean_nearest_cosine_used"] <= 1.0 + 1e-6


def test_outputs_on_disk(tiny_run) -> None:
    out = Path(tiny_run.config.out)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(tiny_run.result.metrics))
    saved = load_yaml(out / "config.yaml")
    assert saved == tiny_run.result.model.config  # the resolved config: no "decide for me" value left
    assert saved.data.dataset == "synthetic" and saved.cache.root == tiny_run.config.cache.root
    backbone = saved.backbone  # test_convnext's pretrained interpolation and normalisation
    assert (backbone.image_size, backbone.crop_ratio, backbone.interpolation) == (64, 1.0, "bicubic")
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)
    assert replace(saved, data=tiny_run.config.data, backbone=tiny_run.config.backbone) == tiny_run.config
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == list(range(tiny_run.config.codebook.epochs))
    assert all(row["stage"] == 1 and math.isfinite(row["loss"]) for row in history)
    model_dir = out / "model"
    assert {p.name for p in model_dir.iterdir()} == {
        "model.safetensors",
        "config.json",
        "backbone.safetensors",
    }
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_codebook_stays_frozen_in_stage_two(tiny_run) -> None:
    head = tiny_run.result.model.head
    assert torch.equal(tiny_run.head_input_codes, tiny_run.stage1_codes)
    assert torch.equal(head.codebook, tiny_run.stage1_codes)
    assert not isinstance(head.codebook, nn.Parameter)
    assert "codebook" in dict(head.named_buffers())
    assert all(param is not head.codebook for param in head.parameters())


def test_trained_model_has_no_trainable_parameters(tiny_run) -> None:
    model = tiny_run.result.model
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.head.training and not model.backbone.training


def test_usage_and_global_size_are_consistent(tiny_run) -> None:
    result = tiny_run.result
    head, caches = result.model.head, result.caches
    grid = caches.train.store.grid
    assert head.usage.sum() == len(caches.train_plain.entries) * grid[0] * grid[1]
    assert torch.equal(
        head.usage, prototype_usage(head.codebook, caches.train_plain, 16, torch.device("cpu"))
    )
    assert result.metrics["quantized"]["used_prototypes"] == int((head.usage > 0).sum())
    expected_size = int((head.class_weights.amax(dim=0) > WEIGHT_THRESHOLD).sum())
    assert result.metrics["protoquant"]["num_prototypes"] == expected_size


def test_caches_are_split_as_documented(tiny_run) -> None:
    caches, splits = tiny_run.result.caches, tiny_run.result.splits
    views = tiny_run.config.cache.train_views
    assert len(caches.train.entries) == len(splits.train) * views
    assert np.array_equal(caches.train_plain.entries, np.arange(len(splits.train)) * views)
    assert len(caches.val.entries) == len(splits.val) and len(caches.test.entries) == len(splits.test)
    assert np.array_equal(caches.val.labels.numpy(), splits.val.labels)
    assert np.array_equal(caches.test.labels.numpy(), splits.test.labels)
    folders = {caches.train.store.folder, caches.val.store.folder, caches.test.store.folder}
    assert len(folders) == 3


@pytest.fixture(scope="module")
def rerun(tiny_run, tmp_path_factory):
    """The same run with another test set, reusing the backbone and the feature cache."""
    config = replace(
        tiny_run.config,
        data=replace(tiny_run.config.data, synthetic_test_per_class=2),
        out=str(tmp_path_factory.mktemp("rerun") / "out"),
    )
    before = set(Path(config.cache.root).iterdir())
    result = run(config, backbone=tiny_run.result.model.backbone)
    return result, set(Path(config.cache.root).iterdir()) - before


def test_rerun_reuses_train_and_val_caches(tiny_run, rerun) -> None:
    result, new_folders = rerun
    assert result.caches.train.store.folder == tiny_run.result.caches.train.store.folder
    assert result.caches.val.store.folder == tiny_run.result.caches.val.store.folder
    assert new_folders == {result.caches.test.store.folder}
    assert result.metrics["data"]["test"] == 6


def test_training_is_seeded_and_never_looks_at_the_test_set(tiny_run, rerun) -> None:
    result, _ = rerun
    first, second = tiny_run.result.model.head.state_dict(), result.model.head.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for section in ("linear_probe", "quantized", "protoquant"):
        assert result.metrics[section]["val_accuracy"] == tiny_run.result.metrics[section]["val_accuracy"]


def test_device_auto_is_the_cpu_without_gpus(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("local_rank", "name", "expected"), [("1", "cuda", 1), ("1", "auto", 1), ("0", "cuda:1", 1)]
)
def test_each_torchrun_process_gets_its_own_gpu(monkeypatch, local_rank, name, expected) -> None:
    chosen = []
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device(name) == torch.device("cuda", expected)
    assert chosen == [torch.device("cuda", expected)]


def test_one_gpu_named_for_several_processes_on_a_node_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    with pytest.raises(ConfigError, match=r"this one, LOCAL_RANK 0, would compute on GPU 1\)"):
        resolve_device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda", 0)  # without an index: cuda:LOCAL_RANK
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # its own GPU, named


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="nproc_per_node 1"):
        resolve_device("cuda")


def write_own_images(root: Path, per_class: int = 5) -> Path:
    """root/<class>/<i>.png: tiny built-in images saved as a user's folder of photos."""
    source = SyntheticParts("train", num_classes=3, images_per_class=per_class, image_size=64, seed=5)
    for index in range(len(source)):
        folder = root / f"class_{'cba'[source.labels[index]]}"  # class names sort the other way round
        folder.mkdir(parents=True, exist_ok=True)
        source.load_image(index).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def own_run(tiny_run, tmp_path_factory):
    """A run on a plain `root/<class>/*` folder with data.dataset auto and cache.root ''."""
    base = tmp_path_factory.mktemp("own")
    config = replace(
        tiny_run.config,
        data=DataConfig(root=str(write_own_images(base / "my_images"))),
        cache=replace(tiny_run.config.cache, root=""),
        out=str(base / "runs" / "mine"),
    )
    return config, run(config, backbone=tiny_run.result.model.backbone)


def test_own_images_run_records_the_resolved_dataset_and_uses_the_shared_cache(own_run) -> None:
    config, result = own_run
    out = Path(config.out)
    saved = load_yaml(out / "config.yaml")
    assert saved.data.dataset == "image-folder" and saved.cache.root == ""  # the shared default cache
    assert result.metrics["data"]["dataset"] == "image-folder" and result.metrics["data"]["test"] == 3
    for view in (result.caches.train, result.caches.val, result.caches.test):
        assert view.store.folder.parent == cache_root(saved.cache) != out / "cache"
        assert view.store.manifest["key"]["dataset"] == "image-folder"
    assert result.model.classes == ("class_a", "class_b", "class_c")
    assert ProtoQuant.load(out / "model").config == saved


def test_a_checkpoint_finds_its_run_cache_again(own_run, tiny_run) -> None:
    for checkpoint, train in (
        (Path(own_run[0].out) / "model", own_run[1].caches.train),  # cache.root '': the default cache
        (Path(tiny_run.config.out) / "model", tiny_run.result.caches.train),  # an explicit cache.root
    ):
        model = ProtoQuant.load(checkpoint)
        before = set(train.store.folder.parent.iterdir())
        assert training_subset(model).store.folder == train.store.folder
        assert set(train.store.folder.parent.iterdir()) == before  # read back, nothing rebuilt


def test_checkpoint_saved_before_the_input_fields_predicts_as_before(tiny_run, tmp_path) -> None:
    old = tmp_path / "old-model"
    shutil.copytree(Path(tiny_run.config.out) / "model", old)
    meta = json.loads((old / "config.json").read_text())
    for name in ("interpolation", "mean", "std"):  # fields a checkpoint written before them lacks
        del meta["config"]["backbone"][name]
    (old / "config.json").write_text(json.dumps(meta))
    model = ProtoQuant.load(old)
    info, pretrained = model.backbone.info, timm.get_pretrained_cfg("test_convnext")
    assert (info.mean, info.std) == (tuple(pretrained.mean), tuple(pretrained.std))  # what was used then
    before = ViewTransform(64, 1.0, info.mean, info.std)  # the only transform there was: bilinear
    assert model.transform.describe() == before.describe()  # so its caches keep their keys too
    images = [tiny_run.result.splits.test.load_image(i) for i in range(3)]
    expected = model.predict_normalised(torch.stack([before(image, 0, 0) for image in images]))
    assert torch.equal(model.predict(images).logits, expected.logits)


def test_a_given_backbone_must_match_the_configured_input(tiny_run, tmp_path) -> None:
    config = replace(tiny_run.config, backbone=replace(tiny_run.config.backbone, image_size=96))
    with pytest.raises(ValueError, match="the backbone was built for 64 px input, the config asks for 96"):
        run(replace(config, out=str(tmp_path / "out")), backbone=tiny_run.result.model.backbone)


def test_default_run_is_compact_and_reports_it(tiny_run) -> None:
    """The default stage 2 limits every class to k prototypes and metrics.json says how compact."""
    metrics, head = tiny_run.result.metrics, tiny_run.result.model.head
    k = metrics["protoquant"]["top_k_per_class"]
    assert k in (tiny_run.config.head.top_k_per_class, *tiny_run.config.head.top_k_fallback)
    k = k or head.num_prototypes  # 0: every k lost validation accuracy, the head stayed dense
    assert ((head.class_weights > WEIGHT_THRESHOLD).sum(dim=1) <= k).all()
    summary = metrics["explanations"]
    assert summary["per_class_max"] <= k and summary["local_size_median"] <= k
    assert summary["global_size"] == metrics["protoquant"]["num_prototypes"]
    assert 0.0 <= summary["top5_specific_share_mean"] <= 1.0 + 1e-6


def test_stage_1_fit_is_the_share_of_the_probes_training_accuracy_kept(tiny_run, caplog) -> None:
    metrics = tiny_run.result.metrics
    kept = metrics["quantized"]["train_accuracy"] / metrics["linear_probe"]["train_accuracy"]
    assert metrics["quantized"]["train_fit"] == pytest.approx(kept)
    with caplog.at_level("WARNING", logger="protoquant.pipeline"):
        assert stage1_fit({"quantized.train_accuracy": 0.95, "linear_probe.train_accuracy": 1.0}) == 0.95
        assert not caplog.records
        assert stage1_fit({"quantized.train_accuracy": 0.6, "linear_probe.train_accuracy": 0.96}) == 0.625
    assert "under-fits" in caplog.text and "codebook.lr" in caplog.text
