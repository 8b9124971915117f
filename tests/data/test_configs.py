"""configs/*.yaml: each says what a user must add, cites the paper itself, and fails at once without weights."""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import replace
from pathlib import Path

import pytest

from protoquant.backbones.frozen import create_backbone
from protoquant.config import load_yaml
from protoquant.data import load_dataset
from tests.data.layouts import write_cars, write_cub, write_imagenet

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
WRITERS = {"cub": write_cub, "cars": write_cars, "imagenet": write_imagenet}
PAPER = 'Method: "ProtoQuant", Janusz, Wróbel, Zieliński, Rymarczyk, 2026, arXiv 2602.06592'
UNREADABLE_SOURCES = ("wizwand", "design brief", "third-party")  # sources a user of the file cannot read
FAIL_FAST_SECONDS = 5.0


def header(path: Path) -> str:
    return "\n".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))


def command(path: Path) -> list[str]:
    """The flags of the `protoquant train --config ...` example in the file's header."""
    (line,) = [x for x in header(path).splitlines() if x.startswith("protoquant train --config")]
    return shlex.split(line)[2:]


def test_there_are_six_configs() -> None:
    assert [p.stem for p in CONFIGS] == [
        f"{d}_{b}" for d in ("cars", "cub", "imagenet") for b in ("convnext_tiny", "resnet50")
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_config_states_what_to_add_and_cites_the_paper(path: Path) -> None:
    text = header(path)
    config = load_yaml(path)
    assert PAPER in " ".join(text.split()) and "https://arxiv.org/abs/2602.06592" in text
    assert not any(word in text.lower() for word in UNREADABLE_SOURCES)
    assert "--data.root PATH" in text and "--backbone.download true" in text and "--backbone.weights" in text
    assert config.data.root == "" and config.cache.root == "" and not config.backbone.download
    flags = command(path)
    assert flags[:2] == ["--config", f"configs/{path.name}"] and "--data.root" in flags
    assert flags[flags.index("--backbone.download") + 1] == "true"
    assert not re.search(r"\d+(\.\d+)? ?%", text)  # no accuracy figure is quoted


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_without_weights_a_config_fails_at_once_saying_how_to_add_them(
    path: Path, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty caches, whatever this machine holds
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    config = load_yaml(path)
    data = WRITERS[config.data.dataset](tmp_path / "data")
    assert len(load_dataset(replace(config.data, root=str(data)), "train")) > 0  # the one thing to add
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"(?s)not available offline.*backbone\.download=true"):
        create_backbone(config.backbone)
    assert time.perf_counter() - start < FAIL_FAST_SECONDS
