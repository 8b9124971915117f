"""Explanations: the data types (`types`), computing them (`explanation`), the prototype gallery
(`gallery`) and grounding (`grounding`).

The functions are imported on first use, so the drawing code can import the data types from
`protoquant.explain.types` without loading the model.
"""

from protoquant._lazy import lazy_exports

_EXPORTS = {
    "ClassExplanation": "protoquant.explain.types",
    "Explanation": "protoquant.explain.types",
    "Gallery": "protoquant.explain.types",
    "PatchRef": "protoquant.explain.types",
    "PrototypeEvidence": "protoquant.explain.types",
    "Report": "protoquant.explain.types",
    "TrainingPatch": "protoquant.explain.types",
    "explain": "protoquant.explain.explanation",
    "build_report": "protoquant.explain.explanation",
    "build_gallery": "protoquant.explain.gallery",
    "ensure_gallery": "protoquant.explain.gallery",
    "load_gallery": "protoquant.explain.gallery",
    "nearest_patches": "protoquant.explain.grounding",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
