"""Stage -1: training lowers the loss; the weights load back bit for bit; resuming; reuse."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from protoquant.backbones.frozen import create_backbone
from protoquant.cache.build import cache_key
from protoquant.config import CacheConfig
from protoquant.data import load_splits
from protoquant.data.transforms import view_transform
from protoquant.finetuning import finetune, loop
from protoquant.finetuning.files import CLASSIFIER_FILE, RESULT_FILE, RESUME_FILE
from tests.finetune.conftest import BACKBONES, tiny_config

UNUSED_CLASSIFIER = {
    "torchvision/mobilenet_v3_small": "classifier.",
    "timm/test_convnext": "head.fc.",
}  # ImageNet heads


def test_training_lowers_the_loss(tmp_path) -> None:
    config = tiny_config(
        tmp_path, "torchvision/resnet18", per_class=8, epochs=2, batch_size=6, mix_prob=0.0, warmup_epochs=0.0
    )
    result = finetune(config)
    meta = json.loads((result.folder / RESULT_FILE).read_text())
    losses = [row["train_loss"] for row in meta["history"]]
    assert len(losses) == meta["epochs_run"] == 2
    assert losses[-1] < losses[0] * 0.8
    assert [row["epoch"] for row in meta["history"]] == [0, 1]
    assert all(row["lr"] > 0 and row["seconds"] > 0 for row in meta["history"])


@pytest.mark.parametrize("name", list(BACKBONES))
def test_weights_load_back_bit_exactly(finished, name) -> None:
    """Through backbone.weights: the same tensors and state hash; the ImageNet classifier untouched."""
    config, result = finished[name]
    meta = json.loads((result.folder / RESULT_FILE).read_text())
    loaded = create_backbone(replace(config.backbone, weights=str(result.weights)))
    assert loaded.info.weights_hash == meta["weights_hash"] == result.weights_hash
    stored = load_file(str(result.weights))
    state = loaded.model.state_dict()
    assert set(stored) == set(state) and all(torch.equal(stored[k], state[k]) for k in state)
    base = create_backbone(config.backbone).model.state_dict()
    prefix = UNUSED_CLASSIFIER[name]
    assert all(torch.equal(base[k], state[k]) for k in state if k.startswith(prefix))
    assert any(not torch.equal(base[k], state[k]) for k in state if not k.startswith(prefix))
    assert meta["base_weights_hash"] != meta["weights_hash"]
    classifier = load_file(str(result.folder / CLASSIFIER_FILE))
    assert classifier["weight"].shape == (3, loaded.info.channels)
    assert not (result.folder / RESUME_FILE).exists()


def test_fine_tuned_weights_get_a_new_cache_key(finished) -> None:
    config, result = finished["timm/test_convnext"]
    train = load_splits(config.data, config.seed).train
    keys = []
    for weights in (config.backbone.weights, str(result.weights)):
        backbone = create_backbone(replace(config.backbone, weights=weights))
        transform = view_transform(config, backbone.info.mean, backbone.info.std)
        keys.append(cache_key(train, backbone, transform, 1, CacheConfig()))
    assert keys[0]["weights_hash"] != keys[1]["weights_hash"] == result.weights_hash
    assert {k: v for k, v in keys[0].items() if k != "weights_hash"} == {
        k: v for k, v in keys[1].items() if k != "weights_hash"
    }


def test_resume_after_an_interruption_gives_the_same_weights(
    finished, with_out, tmp_path, monkeypatch
) -> None:
    """Killed after epoch 1 (mixing on), rerun: the weights of the run that never stopped."""
    config, uninterrupted = finished["torchvision/mobilenet_v3_small"]
    config = with_out(config, tmp_path / "resumed")
    original = loop.run_epoch

    def first_only(trainer, data, progress):
        if progress.epoch >= 1:
            raise KeyboardInterrupt("killed")
        return original(trainer, data, progress)

    monkeypatch.setattr(loop, "run_epoch", first_only)
    with pytest.raises(KeyboardInterrupt):
        finetune(config)
    assert (tmp_path / "resumed" / RESUME_FILE).is_file() and not (
        tmp_path / "resumed" / RESULT_FILE
    ).exists()
    epochs = []
    monkeypatch.setattr(loop, "run_epoch", lambda t, d, p: epochs.append(p.epoch) or original(t, d, p))
    resumed = finetune(config)
    assert epochs == [1]  # only the epoch that was missing
    assert resumed.weights_hash == uninterrupted.weights_hash
    history = json.loads((resumed.folder / RESULT_FILE).read_text())["history"]
    reference = json.loads((uninterrupted.folder / RESULT_FILE).read_text())["history"]
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in reference]


def test_a_finished_folder_is_reused_without_training(finished, monkeypatch) -> None:
    config, result = finished["torchvision/mobilenet_v3_small"]
    monkeypatch.setattr(loop, "run_epoch", lambda *args: pytest.fail("trained again"))
    again = finetune(config)
    assert again == result


def test_early_stopping_keeps_the_best_epoch(tmp_path) -> None:
    config = tiny_config(tmp_path, epochs=6, patience=1, lr=0.5, head_lr=0.5)
    result = finetune(config)
    meta = json.loads((result.folder / RESULT_FILE).read_text())
    accuracies = [row["val_accuracy"] for row in meta["history"]]
    best = meta["best_epoch"]
    assert meta["best_val_accuracy"] == max(accuracies) == accuracies[best] == result.best_val_accuracy
    assert accuracies.index(max(accuracies)) == best  # the first epoch reaching the best
    assert meta["epochs_run"] == min(6, best + 2)  # stopped after one epoch without improvement


def test_fine_tuning_at_a_smaller_side_loads_at_the_backbone_side(tmp_path) -> None:
    """finetune.image_size: trained at 32 px (recorded in the key), read frozen at the run's 64 px."""
    config = tiny_config(tmp_path, "timm/test_convnext", epochs=1, image_size=32)
    result = finetune(config)
    meta = json.loads((result.folder / RESULT_FILE).read_text())
    assert meta["key"]["backbone"]["image_size"] == 32
    frozen = create_backbone(replace(config.backbone, weights=str(result.weights)))
    assert frozen.info.image_size == 64 and frozen.info.weights_hash == result.weights_hash
    full = finetune(replace(config, finetune=replace(config.finetune, image_size=0), out=str(tmp_path / "b")))
    assert full.folder != result.folder  # another side, another fine-tuning
