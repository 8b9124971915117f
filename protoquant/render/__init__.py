"""Drawing only: PNG figures and the HTML report from explanation / gallery data; nothing here runs a model."""

from protoquant.render.figures import render_class_sheet, render_explanation, render_overview
from protoquant.render.html import write_report

__all__ = ["render_class_sheet", "render_explanation", "render_overview", "write_report"]
