"""protoquant: interpretable image classification with quantized prototypical parts on frozen backbones.

The public API, imported on first use (so `import protoquant` and the CLI's `--help` stay fast):

    import protoquant
    result = protoquant.run(protoquant.RunConfig(out="runs/mine"))   # cache -> stages 0-2 -> outputs
    model = protoquant.ProtoQuant.load("runs/mine/model")
    explanation = model.explain(image)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protoquant._lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "ProtoQuant": "protoquant.model",
    "Prediction": "protoquant.model",
    "RunConfig": "protoquant.config",
    "DataConfig": "protoquant.config",
    "BackboneConfig": "protoquant.config",
    "CacheConfig": "protoquant.config",
    "ProbeConfig": "protoquant.config",
    "CodebookConfig": "protoquant.config",
    "HeadConfig": "protoquant.config",
    "load_yaml": "protoquant.config",
    "run": "protoquant.pipeline",
    "RunResult": "protoquant.pipeline",
    "create_backbone": "protoquant.backbones",
    "load_dataset": "protoquant.data",
    "load_splits": "protoquant.data",
    "Explanation": "protoquant.explain.types",
    "Gallery": "protoquant.explain.types",
}
__all__ = [
    "BackboneConfig",
    "CacheConfig",
    "CodebookConfig",
    "DataConfig",
    "Explanation",
    "Gallery",
    "HeadConfig",
    "Prediction",
    "ProbeConfig",
    "ProtoQuant",
    "RunConfig",
    "RunResult",
    "__version__",
    "create_backbone",
    "load_dataset",
    "load_splits",
    "load_yaml",
    "run",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily
    from protoquant.backbones import create_backbone
    from protoquant.config import (
        BackboneConfig,
        CacheConfig,
        CodebookConfig,
        DataConfig,
        HeadConfig,
        ProbeConfig,
        RunConfig,
        load_yaml,
    )
    from protoquant.data import load_dataset, load_splits
    from protoquant.explain.types import Explanation, Gallery
    from protoquant.model import Prediction, ProtoQuant
    from protoquant.pipeline import RunResult, run
