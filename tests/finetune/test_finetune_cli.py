"""`protoquant finetune`: prints the weights and a train command that reads them; bad input names the field."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from protoquant.cli import main
from protoquant.cli.app import build_parser
from protoquant.cli.config_flags import list_flags
from protoquant.cli.parsing import expand_lists
from protoquant.config import FinetuneConfig
from protoquant.data import load_splits
from protoquant.errors import ConfigError
from protoquant.finetuning.api import check_batches
from tests.finetune.conftest import tiny_config

FLAGS = [
    "--backbone.name", "timm/test_convnext", "--backbone.weights", "none", "--backbone.image_size", "64",
    "--data.synthetic_classes", "3", "--data.synthetic_train_per_class", "4",
    "--data.synthetic_test_per_class", "1", "--finetune.epochs", "1", "--finetune.batch_size", "2",
    "--finetune.num_workers", "0", "--device", "cpu",
]  # fmt: skip


def _parsed(argv: list[str]):
    args, extras = build_parser(argv).parse_known_args(expand_lists(argv, list_flags()))
    assert not extras
    return args.run


def test_cli_prints_the_weights_and_a_train_command_that_uses_them(tmp_path, capsys) -> None:
    argv = ["finetune", *FLAGS, "--cache.root", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    weights = Path(out.split("fine-tuned weights: ")[1].split("\n")[0])
    assert weights.is_file() and weights.parent.parent == tmp_path / "finetune"
    words = shlex.split(out.strip().splitlines()[-1])
    assert words[:2] == ["protoquant", "train"]
    trained = _parsed(words[1:])
    expected = _parsed(argv)
    expected = replace(
        expected, backbone=replace(expected.backbone, weights=str(weights)), finetune=FinetuneConfig()
    )
    assert trained == expected  # the same run, on the fine-tuned weights
    assert main([*argv, "--json"]) == 0  # the finished folder: reused
    assert f'"weights": "{weights}"' in capsys.readouterr().out


def test_cli_refuses_early_stopping_without_validation_images(tmp_path, capsys) -> None:
    argv = ["finetune", *FLAGS, "--cache.root", str(tmp_path), "--data.val_fraction", "0"]
    assert main([*argv, "--finetune.patience", "2"]) == 2
    assert "finetune.patience" in capsys.readouterr().err
    assert not (tmp_path / "finetune").exists()


@pytest.mark.parametrize(
    ("batch", "processes", "says"),
    [(3, 2, "divisible by the 2 processes"), (6, 2, "must be even"), (10, 1, "exceeds the 9 training")],
)
def test_batch_sizes_the_processes_cannot_share_are_refused(tmp_path, batch, processes, says) -> None:
    config = tiny_config(tmp_path, batch_size=batch)
    splits = load_splits(config.data, config.seed)
    with pytest.raises(ConfigError, match=f"'finetune.batch_size' \\({batch}\\).*{says}"):
        check_batches(config, splits, processes)
    check_batches(tiny_config(tmp_path, batch_size=4), splits, 2)  # 2 even images per process
