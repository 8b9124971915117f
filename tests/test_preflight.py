"""Checks across fields, the backbone's grid and the training split, before any work starts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protoquant.config import CodebookConfig, HeadConfig, RunConfig
from protoquant.errors import ConfigError
from protoquant.preflight import config_problems, preflight


def test_a_fitting_config_passes(convnext, tiny_synthetic) -> None:
    config = RunConfig(codebook=CodebookConfig(num_prototypes=8, kmeans_patches=100), device="cpu")
    preflight(config, convnext.info, train=tiny_synthetic)  # 18 images x 2 views x 2x2 cells = 144


@pytest.mark.parametrize("init", ["kmeans", "orthogonal"])
def test_more_prototypes_than_training_patches_is_refused(init, convnext, tiny_synthetic) -> None:
    codebook = CodebookConfig(num_prototypes=300, kmeans_patches=1000, init=init)
    config = RunConfig(codebook=codebook, device="cpu")
    patches = len(tiny_synthetic) * config.cache.train_views * convnext.info.grid[0] * convnext.info.grid[1]
    with pytest.raises(
        ConfigError, match=rf"'codebook\.num_prototypes' \(300\) exceeds the {patches} training"
    ):
        preflight(config, convnext.info, train=tiny_synthetic)
    preflight(config)  # without the data, only what the config alone shows is checked


def test_part_coverage_needs_part_masks(convnext, noise_images) -> None:
    config = RunConfig(codebook=CodebookConfig(num_prototypes=4), head=HeadConfig(min_part_coverage=0.5))
    with pytest.raises(ConfigError, match=r"head\.min_part_coverage.*'noise' has none"):
        preflight(replace(config, device="cpu"), convnext.info, train=noise_images(20))


def test_kmeans_needs_at_least_k_sampled_patches() -> None:
    config = RunConfig(codebook=CodebookConfig(num_prototypes=64, kmeans_patches=10), device="cpu")
    assert any("codebook.kmeans_patches" in p for p in config_problems(config))
    orthogonal = replace(config, codebook=replace(config.codebook, init="orthogonal"))
    assert config_problems(orthogonal) == []


def test_batch_sizes_must_split_over_the_processes(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    problems = config_problems(RunConfig(device="cpu"))
    assert [p.split("'")[1] for p in problems] == [
        "probe.batch_size",
        "codebook.batch_size",
        "head.batch_size",
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert config_problems(RunConfig(device="cpu")) == []


def test_every_problem_is_reported_in_one_line(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError) as error:
        preflight(RunConfig(codebook=CodebookConfig(num_prototypes=64, kmeans_patches=10), device="cpu"))
    assert str(error.value).startswith("4 problems: ") and "\n" not in str(error.value)


def test_one_class_is_not_a_classifier(convnext, tmp_path) -> None:
    from PIL import Image

    from protoquant.data.image_folder import ImageFolder

    (tmp_path / "cat").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "cat" / f"{i}.png")
    config = RunConfig(codebook=CodebookConfig(num_prototypes=4, kmeans_patches=4), device="cpu")
    with pytest.raises(ConfigError, match=r"has 1 class \(cat\); a classifier needs at least 2"):
        preflight(config, convnext.info, train=ImageFolder(tmp_path, "train", test_fraction=0.0))
