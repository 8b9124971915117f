"""Checkpoints written before fields were renamed still load, and give the same predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from protoquant.config import RENAMED_FIELDS, RunConfig, from_dict, to_dict
from protoquant.model import ProtoQuant


def _with_old_names(config: dict) -> dict:
    for old, new in RENAMED_FIELDS.items():
        (section, old_name), (_, new_name) = old.split("."), new.split(".")
        config[section][old_name] = config[section].pop(new_name)
    return config


def test_old_field_names_map_to_the_new_ones() -> None:
    config = RunConfig()
    old = _with_old_names(to_dict(config))
    assert "num_codes" in old["codebook"] and "num_prototypes" not in old["codebook"]
    assert from_dict(RunConfig, old) == config


def test_old_and_new_name_together_is_an_error() -> None:
    data = to_dict(RunConfig())
    data["codebook"]["num_codes"] = 7
    with pytest.raises(ValueError, match="num_codes.*num_prototypes"):
        from_dict(RunConfig, data)


def test_checkpoint_with_old_field_names_loads_and_predicts_alike(tiny_run, tmp_path) -> None:
    checkpoint = Path(tiny_run.config.out) / "model"
    old = tmp_path / "old-model"
    shutil.copytree(checkpoint, old)
    meta = json.loads((old / "config.json").read_text())
    meta["config"] = _with_old_names(meta["config"])
    (old / "config.json").write_text(json.dumps(meta))
    new_model, old_model = ProtoQuant.load(checkpoint), ProtoQuant.load(old)
    assert old_model.config == new_model.config
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(old_model.predict(images).logits, new_model.predict(images).logits)
