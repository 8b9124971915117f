"""PNG figures: a local explanation, a per-class sheet, and the global overview of the model.

Each reads explanation / gallery data and patch crops only; none runs a model.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from protoquant.explain.types import (
    ClassExplanation,
    Explanation,
    Gallery,
    PatchRef,
    TrainingPatch,
    window_crop,
)
from protoquant.render.files import write_whole
from protoquant.render.text import number, percent, shown_name
from protoquant.render.tiles import COLORMAP, PNG_COMPRESSION, Scale, heatmap_overlay, map_scale, source_tile

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
TITLE_CHARS = 30  # characters of a panel title line that fit above a panel; longer names are cut
BAR_INCHES = 0.9  # room right of the grid for the colour bar and its labels
BAR_WIDTH_INCHES = 0.15

Patches = Mapping[tuple[int, int], TrainingPatch]  # (prototype, rank) -> crop


def _figure(rows: int, cols: int, right: float = 0.0) -> tuple[Figure, np.ndarray]:
    """A grid of image panels, each with room for a two-line title (fixed layout: fast), and
    `right` inches free beside it."""
    title, top = TITLE_INCHES, SUPTITLE_INCHES
    height, width = rows * (PANEL_INCHES + title) + top, PANEL_INCHES * cols + right
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)  # (rows, cols)
    fig.subplots_adjust(
        left=0.02,
        right=0.98 - right / width,
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
    ax.text(
        0.5,
        1.03,
        text,
        transform=ax.transAxes,
        ha="center",
        va="bottom",
        fontsize=TITLE_SIZE,
        parse_math=False,
    )  # names are shown as written: "$" starts no formula


def _box(ax, box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(
        Rectangle(
            (x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, edgecolor=BOX_COLOUR, linewidth=2
        )
    )


def _crop(ax, crop: np.ndarray, cell: tuple[int, int, int, int], title: str) -> None:
    ax.imshow(crop)
    _box(ax, cell)
    _title(ax, title)


def _patch(ax, patch: TrainingPatch | None, title: str) -> None:
    if patch is not None:
        _crop(ax, patch.crop, patch.cell_box, title)


def _save(fig: Figure, path: str | Path) -> Path:
    """Draw `fig` as PNG in memory, then write the file whole."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return write_whole(path, buffer.getvalue())


def share_text(shown: ClassExplanation) -> str:
    """What the shown prototypes carry: shares of the class-specific logit and of the margin."""
    count = len(shown.prototypes)
    text = f"the {count} shown carry {percent(shown.shown_share)} of the class-specific logit"
    text += (
        f" {number(shown.specific_logit)} (logit {number(shown.logit)} − class-agnostic part "
        f"{number(shown.agnostic)})"
    )
    if shown.runner_up >= 0:
        text += f" and {percent(shown.shown_margin_share)} of the margin {number(shown.margin)} over the runner-up"
    return text


def figure_scale(explanation: Explanation, gallery: Gallery | None) -> Scale:
    """The one colour scale of a figure: the gallery's (shared by every heatmap of the model), else
    the range of the figure's own maps."""
    if gallery is not None:
        return gallery.cosine_range
    return map_scale([item.similarity for c in explanation.classes for item in c.prototypes])


def _cut(text: str) -> str:
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"


def _patch_title(ref: PatchRef, classes: tuple[str, ...]) -> str:
    name = shown_name(ref.file.rsplit("/", 1)[-1]) if ref.file else f"train #{ref.image}"
    return f"{_cut(f'that: cosine {ref.similarity:.2f} · {name}')}\n{_cut(shown_name(classes[ref.label]))}"


def _colour_bar(fig: Figure, axes: np.ndarray, scale: Scale, clipped: bool) -> None:
    """The figure's one colour bar, beside its first row (the heatmaps)."""
    first, last = axes[0, 1].get_position(), axes[0, -1].get_position()
    width = fig.get_figwidth()
    rect = (last.x1 + 0.1 / width, first.y0, BAR_WIDTH_INCHES / width, first.height)
    cax = fig.add_axes(rect, label="<colorbar>")  # the label matplotlib gives the axes it makes for bars
    bar = fig.colorbar(
        ScalarMappable(Normalize(*scale), COLORMAP), cax=cax, extend="min" if clipped else "neither"
    )
    bar.set_label("cosine similarity", fontsize=TITLE_SIZE)
    bar.ax.tick_params(labelsize=TITLE_SIZE - 1)


def explanation_figure(
    explanation: Explanation, gallery: Gallery | None = None, *, class_rank: int = 0
) -> Figure:
    """The figure `render_explanation` saves (for tests: its colour bar and images can be read)."""
    shown = explanation.classes[class_rank]
    scale = figure_scale(explanation, gallery)
    rows = 4 if gallery is not None else 2
    fig, axes = _figure(rows, len(shown.prototypes) + 1, BAR_INCHES)
    axes[0, 0].imshow(explanation.image)
    _title(
        axes[0, 0],
        f"{_cut(shown_name(shown.class_name))}\np = {number(shown.probability)}, logit {number(shown.logit)}",
    )
    for col, item in enumerate(shown.prototypes, start=1):
        axes[0, col].imshow(heatmap_overlay(explanation.image, item.similarity, scale))
        _box(axes[0, col], item.box)
        _title(
            axes[0, col],
            f"prototype {item.prototype}\n{item.score:.2f} × {item.weight:.2f} = {item.contribution:.2f}",
        )
        crop, cell = window_crop(explanation.image, item.location, explanation.grid)
        _crop(axes[1, col], crop, cell, f"this: cosine {item.cosine:.2f}\ncell {item.location}")
        if gallery is not None:
            ref = gallery.patches(item.prototype, 1)[0]
            _patch(axes[2, col], gallery.patch(ref), _patch_title(ref, gallery.classes))
            source = gallery.source_picture(item.prototype)
            axes[3, col].imshow(source_tile(source, scale, explanation.image.shape[0]))
            _title(
                axes[3, col],
                f"its source: train #{ref.image}\n{_cut(shown_name(gallery.classes[ref.label]))}",
            )
    labels = ("heatmap: cosine\nto the prototype", "this (test patch)", "that (nearest\ntraining patch)")
    for row, label in enumerate(labels[1:rows] + (("prototype's\nsource image",) if rows == 4 else ()), 1):
        axes[row, 0].text(0.5, 0.5, label, ha="center", va="center", fontsize=TITLE_SIZE)
    _colour_bar(fig, axes, scale, clipped=gallery is not None)  # the gallery's scale clips low cosines
    fig.suptitle(share_text(shown), fontsize=TITLE_SIZE + 1, parse_math=False)
    return fig


def render_explanation(
    explanation: Explanation, path: str | Path, gallery: Gallery | None = None, *, class_rank: int = 0
) -> Path:
    """Local explanation of one class (the prediction by default) as a PNG: for each top prototype
    its cosine map on the image (score × weight = contribution), the window around its peak cell
    ("this"), and with a gallery its nearest training patch ("that", the same window rule and
    zoom) and its source image, every heatmap on one colour scale shown by the colour bar."""
    return _save(explanation_figure(explanation, gallery, class_rank=class_rank), path)


def render_class_sheet(gallery: Gallery, class_index: int, patches: Patches, path: str | Path) -> Path:
    """The prototypes a class weights most: one column each, its nearest training patches below."""
    weights = gallery.class_weights[class_index]  # (K,)
    order = [k for k in weights.argsort(descending=True)[:SHEET_PROTOTYPES].tolist() if weights[k] > 0]
    if not order:
        raise ValueError(
            f"class {class_index} ({shown_name(gallery.classes[class_index])}) weights no prototype"
        )
    fig, axes = _figure(SHEET_PATCHES, len(order))
    for col, k in enumerate(order):
        for rank in range(SHEET_PATCHES):
            patch = patches.get((k, rank))
            head = f"prototype {k}, w = {float(weights[k]):.2f}\n" if rank == 0 else ""
            _patch(axes[rank, col], patch, f"{head}cosine {patch.ref.similarity:.2f}" if patch else "")
    name = shown_name(gallery.classes[class_index])
    fig.suptitle(f"class {name}: its top prototypes", fontsize=TITLE_SIZE + 1, parse_math=False)
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
    names = [shown_name(name) for name in gallery.classes]
    left = 0.4 + CHAR_INCHES * label_size / TITLE_SIZE * max(len(name) for name in names)
    width, height = min(14.0, left + 3 + 0.08 * len(shown)), 2.5 + 0.22 * classes  # inches
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    usage_ax, weight_ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, max(2, classes // 3)))
    fig.subplots_adjust(left=left / width, right=1 - 1.3 / width, bottom=0.7 / height, top=1 - 0.2 / height)
    usage_ax.bar(range(len(shown)), gallery.usage[shown].numpy(), color="#3157d5", width=0.9)
    usage_ax.set_ylabel("usage\n(patches)", fontsize=TITLE_SIZE)
    image = weight_ax.imshow(weights.numpy(), aspect="auto", cmap="Blues", interpolation="nearest")
    weight_ax.set_yticks(range(classes), names, fontsize=label_size, parse_math=False)
    weight_ax.set_xlabel(f"{len(shown)} weighted prototypes of {gallery.num_prototypes}", fontsize=TITLE_SIZE)
    if len(shown) <= OVERVIEW_TICKS:
        weight_ax.set_xticks(range(len(shown)), [str(k) for k in shown], fontsize=label_size, rotation=90)
    else:
        weight_ax.set_xticks([])
    fig.colorbar(image, ax=[usage_ax, weight_ax], label="class weight", fraction=0.04, pad=0.02)
    return _save(fig, path)
