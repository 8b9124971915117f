"""What type checkers and IDEs see of `protoquant` (at run time the names load lazily: __init__.py)."""

from protoquant.backbones import create_backbone
from protoquant.config import (
    BackboneConfig,
    CacheConfig,
    CodebookConfig,
    DataConfig,
    FinetuneConfig,
    HeadConfig,
    ProbeConfig,
    RunConfig,
    load_yaml,
)
from protoquant.data import load_dataset, load_splits
from protoquant.errors import CacheError, CheckpointError, ConfigError, DataError, ProtoQuantError
from protoquant.explain.gallery import ensure_gallery, load_gallery
from protoquant.explain.types import Explanation, Gallery
from protoquant.finetuning import FinetuneResult, finetune
from protoquant.model import DifferentiableModel, Prediction, ProtoQuant
from protoquant.pipeline import RunResult, run

__version__: str
__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ProtoQuantError",
    "BackboneConfig",
    "CacheConfig",
    "CodebookConfig",
    "DataConfig",
    "DifferentiableModel",
    "Explanation",
    "FinetuneConfig",
    "FinetuneResult",
    "Gallery",
    "HeadConfig",
    "Prediction",
    "ProbeConfig",
    "ProtoQuant",
    "RunConfig",
    "RunResult",
    "__version__",
    "create_backbone",
    "ensure_gallery",
    "finetune",
    "load_dataset",
    "load_gallery",
    "load_splits",
    "load_yaml",
    "run",
]
