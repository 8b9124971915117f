"""What only the command line can check before any work starts (the dataclasses check the rest).

Types, choices and bounds are checked when a config dataclass is built. These checks need the
registries or the file system: the dataset name, the backbone's library, the folders and files
named, the device spelling, and what training needs (a validation split).
"""

from __future__ import annotations

import re
from pathlib import Path

from protoquant.config import DataConfig, RunConfig
from protoquant.errors import ConfigError

BACKBONE_LIBRARIES = ("timm", "torchvision")  # the libraries protoquant.backbones builds from
DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")  # device spellings a run accepts
WEIGHTS_KEYWORDS = ("default", "none")  # backbone.weights values that name no file


def dataset_problem(name: str, where: str = "config field 'data.dataset'") -> str | None:
    """Why `name` is neither a registry dataset nor the config's default (e.g. 'auto'), or None."""
    from protoquant.data import DATASETS

    valid = list(dict.fromkeys([DataConfig().dataset, *DATASETS]))
    return None if name in valid else f"{where} must be one of {', '.join(valid)}; got '{name}'"


def folder_problem(path: str | None, where: str) -> str | None:
    """Why `path` (when given) is not an existing folder, or None."""
    if not path or Path(path).is_dir():
        return None
    return f"{where} '{path}' is not a folder" + (" (it is a file)" if Path(path).exists() else "")


def run_problems(config: RunConfig, *, training: bool = True) -> list[str]:
    """Everything wrong with `config` that its dataclasses cannot see; empty when it is fine."""
    problems = [
        dataset_problem(config.data.dataset),
        folder_problem(config.data.root, "config field 'data.root':"),
        _backbone_problem(config.backbone.name),
        _weights_problem(config.backbone.weights),
        _device_problem(config.device),
        *_dataset_option_problems(config.data),
    ]
    if training and config.data.val_fraction <= 0:
        problems.append(
            "config field 'data.val_fraction' must be > 0 to train: early stopping and the tau / lr "
            f"grids select on the validation split; got {config.data.val_fraction}"
        )
    return [p for p in problems if p]


def _backbone_problem(name: str) -> str | None:
    library, _, model = name.partition("/")
    if library in BACKBONE_LIBRARIES and model:
        return None
    libraries = ", ".join(BACKBONE_LIBRARIES)
    return f"config field 'backbone.name' must be '<library>/<model>' with library {libraries}; got '{name}'"


def _weights_problem(weights: str) -> str | None:
    """A weights value that looks like a file (a folder part or a suffix) must be one."""
    path = Path(weights)
    if weights in WEIGHTS_KEYWORDS or not (path.suffix or len(path.parts) > 1) or path.is_file():
        return None
    return f"config field 'backbone.weights': no file '{weights}' (or use default, none, an enum name)"


def _device_problem(device: str) -> str | None:
    if DEVICE.match(device):
        return None
    return f"config field 'device' must be auto, cpu, cuda, cuda:N, mps or xpu; got '{device}'"


def _dataset_option_problems(data: DataConfig) -> list[str | None]:
    """Dataset-specific options set for a registry dataset that ignores them."""
    from protoquant.data import CROP_DATASETS, DATASETS, SPLIT_FILE_DATASETS

    if data.dataset not in DATASETS:  # chosen from data.root later ('auto'): cannot tell yet
        return []
    return [
        f"config field 'data.{name}' applies to {', '.join(datasets)} only, not '{data.dataset}'"
        for name, value, datasets in (
            ("crop_to_box", data.crop_to_box, CROP_DATASETS),
            ("split_file", data.split_file, SPLIT_FILE_DATASETS),
        )
        if value and data.dataset not in datasets
    ]


def require(problems: list[str | None]) -> None:
    """Raise one ConfigError listing every problem on one line; nothing when there is none."""
    problems = [p for p in problems if p]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems: " + "; ".join(problems))
