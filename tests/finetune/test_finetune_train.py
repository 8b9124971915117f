"""`train` with finetune.enabled: fine-tunes first, freezes those weights, and the checkpoint carries them."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from protoquant.config import FinetuneConfig
from protoquant.data import load_dataset
from protoquant.finetuning.files import WEIGHTS_FILE
from protoquant.model import ProtoQuant
from protoquant.pipeline import run
from tests.conftest import tiny_run_config


def test_train_with_finetuning_gives_a_checkpoint_that_travels_alone(tmp_path) -> None:
    section = FinetuneConfig(enabled=True, epochs=1, batch_size=4, num_workers=0, patience=0)
    config = replace(tiny_run_config(tmp_path), finetune=section)
    result = run(config)
    weights = Path(result.model.config.backbone.weights)
    assert weights.name == WEIGHTS_FILE and weights.is_file()
    assert not result.model.config.finetune.enabled  # the saved config freezes these weights
    assert result.metrics["backbone"]["weights"] == str(weights)
    checkpoint = Path(config.out) / "model"
    assert (checkpoint / "backbone.safetensors").is_file()
    shutil.rmtree(weights.parent)
    loaded = ProtoQuant.load(checkpoint)
    assert loaded.backbone.info.weights_hash == result.model.backbone.info.weights_hash
    test = load_dataset(config.data, "test")
    images = [test.load_image(i) for i in range(3)]
    assert torch.equal(loaded.predict(images).logits, result.model.predict(images).logits)
    resaved = ProtoQuant.load(loaded.save(tmp_path / "resaved"))  # still carries its backbone
    assert torch.equal(resaved.predict(images).logits, result.model.predict(images).logits)
