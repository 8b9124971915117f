"""PNG figures of explanations ("this part of your image looks like these training parts")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from protoquant.explain import Explanation, TrainingPatch

PANEL_INCHES = 2.4  # side of one panel
HEATMAP_ALPHA = 0.5  # opacity of the activation overlay
BOX_COLOUR = "#ffd400"


def _box(ax, box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(
        Rectangle(
            (x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, edgecolor=BOX_COLOUR, linewidth=2
        )
    )


def render_explanation(
    explanation: Explanation, path: str | Path, patches: dict[int, TrainingPatch] | None = None
) -> Path:
    """Draw the top class's evidence: the image, each prototype's heatmap and box, and the
    training patch it stands for (when `patches` maps prototype -> TrainingPatch)."""
    shown = explanation.classes[0]
    evidence = shown.prototypes
    rows = 2 if patches else 1
    fig = Figure(
        figsize=(PANEL_INCHES * (len(evidence) + 1), PANEL_INCHES * rows + 0.6), layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, len(evidence) + 1, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(explanation.image)
    axes[0, 0].set_title(
        f"{shown.class_name}\np = {shown.probability:.2f}, logit {shown.logit:.2f}", fontsize=9
    )
    for col, item in enumerate(evidence, start=1):
        ax = axes[0, col]
        ax.imshow(explanation.image)
        ax.imshow(item.heatmap, cmap="jet", alpha=HEATMAP_ALPHA)
        _box(ax, item.box)
        ax.set_title(
            f"prototype {item.prototype}\n{item.score:.2f} x {item.weight:.2f} = {item.contribution:.2f}",
            fontsize=9,
        )
        if patches and item.prototype in patches:
            patch = patches[item.prototype]
            axes[1, col].imshow(patch.crop)
            _box(axes[1, col], patch.cell_box)
            axes[1, col].set_title(
                f"looks like: train #{patch.image_index}\ncosine {patch.cosine:.2f}", fontsize=9
            )
    if patches:
        axes[1, 0].text(0.5, 0.5, "nearest training\npatches", ha="center", va="center", fontsize=10)
    total = sum(item.contribution for item in evidence)
    fig.suptitle(
        f"top {len(evidence)} prototypes contribute {total:.2f} of logit {shown.logit:.2f}", fontsize=10
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
