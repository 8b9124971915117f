"""protoquant: interpretable image classification with quantized prototypical parts on frozen backbones.

The public API, imported on first use (so `import protoquant` does not load torch and the CLI's
`--help` stays fast):

    import protoquant
    result = protoquant.run(protoquant.RunConfig(out="runs/mine"))   # cache -> stages 0-2 -> outputs
    model = protoquant.ProtoQuant.load("runs/mine/model")           # or .from_pretrained("owner/repo")
    prediction = model.predict(image)                                # PIL, numpy, tensor, or a batch
    protoquant.ensure_gallery(model, "runs/mine/model")              # each prototype's training patches
    explanation = model.explain(image)
"""

from __future__ import annotations

from protoquant._lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "ProtoQuant": "protoquant.model",
    "Prediction": "protoquant.model",
    "DifferentiableModel": "protoquant.model",
    "RunConfig": "protoquant.config",
    "DataConfig": "protoquant.config",
    "BackboneConfig": "protoquant.config",
    "CacheConfig": "protoquant.config",
    "ProbeConfig": "protoquant.config",
    "CodebookConfig": "protoquant.config",
    "HeadConfig": "protoquant.config",
    "FinetuneConfig": "protoquant.config",
    "load_yaml": "protoquant.config",
    "run": "protoquant.pipeline",
    "RunResult": "protoquant.pipeline",
    "finetune": "protoquant.finetuning",
    "FinetuneResult": "protoquant.finetuning",
    "create_backbone": "protoquant.backbones",
    "load_dataset": "protoquant.data",
    "load_splits": "protoquant.data",
    "Explanation": "protoquant.explain.types",
    "Gallery": "protoquant.explain.types",
    "ensure_gallery": "protoquant.explain.gallery",
    "load_gallery": "protoquant.explain.gallery",
    "ProtoQuantError": "protoquant.errors",
    "ConfigError": "protoquant.errors",
    "DataError": "protoquant.errors",
    "CheckpointError": "protoquant.errors",
    "CacheError": "protoquant.errors",
}
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
