"""Checks that need more than one config field, the backbone or the training split: run before any work.

The config dataclasses check each field alone when they are built. What depends on several fields
(k-means needs at least K sampled patches), on the device, on the number of processes, on the
backbone's feature grid or on the training split (at least K training patches; part masks for
`head.min_part_coverage`) is checked here, so a run fails in seconds instead of after the whole
backbone pass. `pipeline.run` calls `preflight` once the backbone is built and the splits are
loaded; the command line calls it with the config alone before starting.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from protoquant.config import RunConfig
from protoquant.distributed import device_problem
from protoquant.errors import ConfigError

if TYPE_CHECKING:  # hints only: the backbones and data layers are not needed to check a config
    from protoquant.backbones.frozen import BackboneInfo
    from protoquant.data.base import ImageDataset

BATCHED_SECTIONS = ("probe", "codebook", "head")  # sections whose batch_size rank_batches splits


def config_problems(config: RunConfig) -> list[str]:
    """What is wrong with `config` as a whole (its fields are each fine), on this machine."""
    problems = [device_problem(config.device)]
    codebook = config.codebook
    if codebook.init == "kmeans" and codebook.kmeans_patches < codebook.num_prototypes:
        problems.append(
            f"config field 'codebook.kmeans_patches' ({codebook.kmeans_patches}) must be >= "
            f"'codebook.num_prototypes' ({codebook.num_prototypes}): k-means needs at least K patches"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    for section in BATCHED_SECTIONS:
        batch = getattr(config, section).batch_size
        if batch % world_size:
            problems.append(
                f"config field '{section}.batch_size' ({batch}) must be divisible by the "
                f"{world_size} processes (WORLD_SIZE) so every process takes the same steps"
            )
    return [p for p in problems if p]


def data_problems(config: RunConfig, info: BackboneInfo, train: ImageDataset) -> list[str]:
    """What the training split and the backbone's grid make impossible in `config`."""
    problems = []
    if train.num_classes < 2:
        where = f" in {config.data.root}" if config.data.root else ""
        problems.append(
            f"dataset '{train.name}'{where} has {train.num_classes} class ({', '.join(train.classes)}); "
            "a classifier needs at least 2"
        )
    pool = config.cache.grid_pool
    cells = -(-info.grid[0] // pool) * -(-info.grid[1] // pool)  # ceil mode, as patch_features pools
    patches = len(train) * config.cache.train_views * cells
    if config.codebook.num_prototypes > patches:
        problems.append(
            f"config field 'codebook.num_prototypes' ({config.codebook.num_prototypes}) exceeds the "
            f"{patches} training patches ({len(train)} images x {config.cache.train_views} views x "
            f"{cells} grid cells of {info.name}): k-means and dead-prototype resets draw prototypes "
            "from them; use fewer prototypes or more data"
        )
    if config.head.min_part_coverage > 0 and not train.has_parts:
        problems.append(
            f"config field 'head.min_part_coverage' ({config.head.min_part_coverage}) needs part "
            f"masks; dataset '{train.name}' has none (set it to 0)"
        )
    return problems


def preflight(
    config: RunConfig, backbone_info: BackboneInfo | None = None, *, train: ImageDataset | None = None
) -> None:
    """Refuse `config` before any work if it cannot run (see the module docstring).

    Args:
        config: the run's config (resolved or not).
        backbone_info: the built backbone's facts (its grid); with `train`, enables the data checks.
        train: the training split the run will cache.

    Raises:
        ConfigError: one line naming every problem found (the fields and what they need).
    """
    problems = config_problems(config)
    if backbone_info is not None and train is not None:
        problems += data_problems(config, backbone_info, train)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems: " + "; ".join(problems))
