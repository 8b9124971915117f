"""PNG figures: a local explanation, a per-class sheet, and the global overview of the model.

Each reads explanation / gallery data and patch crops only; none runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from protoquant.explain.types import Explanation, Gallery, TrainingPatch
from protoquant.render.tiles import PNG_COMPRESSION, heatmap_overlay

PANEL_INCHES = 2.2  # side of one image panel
TITLE_INCHES = 0.45  # room above a panel for its two-line title
SUPTITLE_INCHES = 0.4  # room above the grid for the figure title
TITLE_SIZE = 9  # pt
BOX_COLOUR = "#ffd600"
DPI = 100
SHEET_PROTOTYPES = 6  # prototypes per class sheet
SHEET_PATCHES = 3  # training patches per prototype on a class sheet
OVERVIEW_TICKS = 60  # label the prototypes of the overview when there are at most this many
CHAR_INCHES = 0.07  # width of one tick-label character at TITLE_SIZE

Patches = Mapping[tuple[int, int], TrainingPatch]  # (prototype, rank) -> crop


def _figure(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    """A grid of image panels, each with room for a two-line title (fixed layout: fast)."""
    title, top = TITLE_INCHES, SUPTITLE_INCHES
    height = rows * (PANEL_INCHES + title) + top
    fig = Figure(figsize=(PANEL_INCHES * cols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)  # (rows, cols)
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        bottom=0.02,
        top=1 - (top + title) / height,  # room for the figure title and the first row's titles
        wspace=0.08,
        hspace=title / PANEL_INCHES,
    )
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _title(ax, text: str) -> None:
    """A title above the panel (placed as text: much faster than `set_title`'s layout pass)."""
    ax.text(0.5, 1.03, text, transform=ax.transAxes, ha="center", va="bottom", fontsize=TITLE_SIZE)


def _box(ax, box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(
        Rectangle(
            (x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, edgecolor=BOX_COLOUR, linewidth=2
        )
    )


def _patch(ax, patch: TrainingPatch | None, title: str) -> None:
    if patch is None:
        return
    ax.imshow(patch.crop)
    _box(ax, patch.cell_box)
    _title(ax, title)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path


def render_explanation(
    explanation: Explanation, path: str | Path, patches: Patches | None = None, *, class_rank: int = 0
) -> Path:
    """Local explanation of one class (the prediction by default): the image, each top prototype's
    activation and box with its score x weight = contribution, and its nearest training patch."""
    shown = explanation.classes[class_rank]
    evidence = shown.prototypes
    rows = 2 if patches else 1
    fig, axes = _figure(rows, len(evidence) + 1)
    axes[0, 0].imshow(explanation.image)
    _title(axes[0, 0], f"{shown.class_name}\np = {shown.probability:.2f}, logit {shown.logit:.2f}")
    for col, item in enumerate(evidence, start=1):
        axes[0, col].imshow(heatmap_overlay(explanation.image, item.activation))
        _box(axes[0, col], item.box)
        _title(
            axes[0, col],
            f"prototype {item.prototype}\n{item.score:.2f} × {item.weight:.2f} = {item.contribution:.2f}",
        )
        if patches:
            patch = patches.get((item.prototype, 0))
            title = f"train #{patch.ref.image}\ncosine {patch.ref.similarity:.2f}" if patch else ""
            _patch(axes[1, col], patch, title)
    if patches:
        axes[1, 0].text(0.5, 0.5, "looks like\n(nearest training\npatches)", ha="center", va="center")
    total = shown.logit - shown.rest
    fig.suptitle(
        f"top {len(evidence)} prototypes give {total:.2f} of logit {shown.logit:.2f} "
        f"(others {shown.rest:.2f})",
        fontsize=TITLE_SIZE + 1,
    )
    return _save(fig, path)


def render_class_sheet(gallery: Gallery, class_index: int, patches: Patches, path: str | Path) -> Path:
    """The prototypes a class weights most: one column each, its nearest training patches below."""
    weights = gallery.class_weights[class_index]  # (K,)
    order = [k for k in weights.argsort(descending=True)[:SHEET_PROTOTYPES].tolist() if weights[k] > 0]
    if not order:
        raise ValueError(f"class {class_index} ({gallery.classes[class_index]}) weights no prototype")
    fig, axes = _figure(SHEET_PATCHES, len(order))
    for col, k in enumerate(order):
        for rank in range(SHEET_PATCHES):
            patch = patches.get((k, rank))
            head = f"prototype {k}, w = {float(weights[k]):.2f}\n" if rank == 0 else ""
            _patch(axes[rank, col], patch, f"{head}cosine {patch.ref.similarity:.2f}" if patch else "")
    fig.suptitle(f"class {gallery.classes[class_index]}: its top prototypes", fontsize=TITLE_SIZE + 1)
    return _save(fig, path)


def render_overview(gallery: Gallery, path: str | Path) -> Path:
    """Global view: class x prototype weights (weighted prototypes, grouped by their main class)
    above each prototype's usage."""
    shown = list(gallery.weighted_prototypes())
    if not shown:
        raise ValueError("no class weights any prototype: nothing to draw in the overview")
    weights = gallery.class_weights[:, shown]  # (C, k)
    order = sorted(
        range(len(shown)), key=lambda i: (int(weights[:, i].argmax()), -float(weights[:, i].max()))
    )
    weights, shown = weights[:, order], [shown[i] for i in order]
    classes = len(gallery.classes)
    label_size = max(4, TITLE_SIZE - classes // 20)  # pt, smaller for many classes
    left = 0.4 + CHAR_INCHES * label_size / TITLE_SIZE * max(len(name) for name in gallery.classes)
    width, height = min(14.0, left + 3 + 0.08 * len(shown)), 2.5 + 0.22 * classes  # inches
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    usage_ax, weight_ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, max(2, classes // 3)))
    fig.subplots_adjust(left=left / width, right=1 - 1.3 / width, bottom=0.7 / height, top=1 - 0.2 / height)
    usage_ax.bar(range(len(shown)), gallery.usage[shown].numpy(), color="#3157d5", width=0.9)
    usage_ax.set_ylabel("usage\n(patches)", fontsize=TITLE_SIZE)
    image = weight_ax.imshow(weights.numpy(), aspect="auto", cmap="Blues", interpolation="nearest")
    weight_ax.set_yticks(range(classes), gallery.classes, fontsize=label_size)
    weight_ax.set_xlabel(f"{len(shown)} weighted prototypes of {gallery.num_prototypes}", fontsize=TITLE_SIZE)
    if len(shown) <= OVERVIEW_TICKS:
        weight_ax.set_xticks(range(len(shown)), [str(k) for k in shown], fontsize=label_size, rotation=90)
    else:
        weight_ax.set_xticks([])
    fig.colorbar(image, ax=[usage_ax, weight_ax], label="class weight", fraction=0.04, pad=0.02)
    return _save(fig, path)
