"""Drawing only: figures from explanation objects; nothing here runs a model."""

from protoquant.render.figures import render_explanation

__all__ = ["render_explanation"]
