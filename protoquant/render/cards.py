"""HTML pieces of the report: one explained image ("this looks like that"), one prototype, the colour bar.

Both sides of "this looks like that" use the same localisation rule (the peak cell's window,
`protoquant.explain.types.window`) at the same zoom, and every heatmap of the report is drawn on
the gallery's one colour scale, which the colour bar shows.
"""

from __future__ import annotations

import math
from html import escape

from protoquant.config import WEIGHT_THRESHOLD
from protoquant.explain.types import (
    CROP_SIDE,
    ClassExplanation,
    Explanation,
    PatchRef,
    PrototypeEvidence,
    Report,
)
from protoquant.render.figures import share_text
from protoquant.render.text import number, percent, shown_name
from protoquant.render.tile_cache import TileWriter
from protoquant.render.tiles import (
    colour_stops,
    evidence_tile,
    image_tile,
    patch_tile,
    source_tile,
    strip_tile,
    this_tile,
)

INPUT_TILE = 256  # px, the explained image
EVIDENCE_TILE = 224  # px, image with a prototype's heatmap and peak cell
PATCH_TILE = 128  # px, a window crop ("this" and "that" alike: one zoom)
SOURCE_TILE = 96  # px, a prototype's source image (its stored thumbnail size)


def text(name: str) -> str:
    """A name (class, file, image) as HTML text: printable, then escaped."""
    return escape(shown_name(name))


def img(src: str, alt: str, size: int, css: str = "tile") -> str:
    return f'<img class="{css}" src="{src}" alt="{text(alt)}" width="{size}" height="{size}">'


def bar(fraction: float) -> str:
    """A bar filled to `fraction` of its width (empty for a non-finite fraction)."""
    width = max(0.0, min(100.0, 100.0 * fraction)) if math.isfinite(fraction) else 0.0
    return f'<div class="bar"><span style="width: {width:.1f}%"></span></div>'


def colour_bar(report: Report) -> str:
    """The report's one heatmap colour scale, low to high."""
    low, high = report.gallery.cosine_range
    return (
        f'<div class="colourbar"><span class="ramp" style="background: linear-gradient(to right, {colour_stops()})">'
        f'</span><span class="ends num"><span>≤ {low:.2f}</span><span>{high:.2f}</span></span>'
        '<span class="muted small">heatmaps: cosine similarity to the prototype, one scale for every '
        "heatmap of this report</span></div>"
    )


def patch_caption(ref: PatchRef, classes: tuple[str, ...]) -> str:
    """cosine · class · file (or training image number) of a training patch."""
    name = text(ref.file.rsplit("/", 1)[-1]) if ref.file else f"train #{ref.image}"
    title = text(ref.file) if ref.file else f"training image {ref.image}"
    label = text(classes[ref.label])
    return (
        f'<b>cos {ref.similarity:.2f}</b><span class="clip" title="{label}">{label}</span>'
        f'<span class="clip" title="{title}">{name}</span>'
    )


def patch_figure(ref: PatchRef, report: Report, tiles: TileWriter) -> str:
    gallery = report.gallery
    src = tiles.gallery_tile(
        f"patch-{ref.prototype}-{ref.rank}.jpg", lambda: patch_tile(gallery.patch(ref), PATCH_TILE)
    )
    alt = f"training image {ref.image}, cell {ref.cell}, nearest to prototype {ref.prototype}"
    return f"<figure>{img(src, alt, PATCH_TILE)}<figcaption>{patch_caption(ref, gallery.classes)}</figcaption></figure>"


def source_figure(k: int, report: Report, tiles: TileWriter) -> str:
    """Prototype k's own source image (its nearest training image) with its heatmap."""
    gallery = report.gallery
    source = gallery.source_picture(k)
    src = tiles.gallery_tile(
        f"source-{k}.jpg", lambda: source_tile(source, gallery.cosine_range, SOURCE_TILE)
    )
    ref = source.ref
    return (
        f'<figure class="source">{img(src, f"source image of prototype {k}: training image {ref.image}", SOURCE_TILE)}'
        f'<figcaption>its source<span class="clip">train #{ref.image}</span>'
        f'<span class="clip" title="{text(gallery.classes[ref.label])}">{text(gallery.classes[ref.label])}</span>'
        "</figcaption></figure>"
    )


def _prototype_link(k: int, report: Report) -> str:
    """A link to prototype k's gallery card; plain text where no class weights it (it has no card)."""
    weighted = report.gallery.class_weights[:, k].max() > WEIGHT_THRESHOLD
    return f'<a href="prototypes.html#p{k}">{k}</a>' if weighted else str(k)


def _evidence_row(
    ids: tuple[int, int, int],
    item: PrototypeEvidence,
    cls: ClassExplanation,
    explanation: Explanation,
    report: Report,
    tiles,
) -> str:
    """Row `j` of class `rank` of image `i` (ids = (i, rank, j)): this, that, and the numbers."""
    (i, rank, j), k = ids, item.prototype
    scale = report.gallery.cosine_range
    heat = tiles.report_tile(
        f"evidence-{i}-{rank}-{k}.jpg", evidence_tile(explanation.image, item, scale, EVIDENCE_TILE)
    )
    this = tiles.report_tile(
        f"this-{i}-{rank}-{k}.jpg", this_tile(explanation.image, item, explanation.grid, PATCH_TILE)
    )
    largest = max(cls.prototypes[0].contribution, 1e-12)  # the bar is relative to the top contribution
    that = "".join(patch_figure(ref, report, tiles) for ref in item.patches)
    that = (that or '<p class="muted small">no gallery patches</p>') + source_figure(k, report, tiles)
    share = item.specific / cls.specific_logit if cls.specific_logit > 0 else 0.0
    (h, w) = item.location
    return (
        f'<li><div class="rank">{j + 1}</div>'
        f'<figure class="heat">{img(heat, f"prototype {k} on the image", EVIDENCE_TILE)}'
        f"<figcaption>prototype {_prototype_link(k, report)} · peak at cell ({h}, {w})</figcaption></figure>"
        f'<figure class="this">{img(this, f"the image around cell ({h}, {w})", PATCH_TILE)}'
        f"<figcaption><b>this: cos {item.cosine:.2f}</b><br>peak cell ({h}, {w})</figcaption></figure>"
        '<div class="looks">looks like</div>'
        f'<div class="that">{that}</div>'
        f'<div class="numbers"><div class="contrib">+{item.contribution:.2f}</div>'
        f'<div class="formula">{item.score:.2f} score × {item.weight:.2f} weight</div>'
        f'{bar(item.contribution / largest)}<div class="formula">{percent(share)} of the class-specific logit</div></div></li>'
    )


def why(i: int, rank: int, cls: ClassExplanation, explanation: Explanation, report: Report, tiles) -> str:
    rows = "".join(
        _evidence_row((i, rank, j), item, cls, explanation, report, tiles)
        for j, item in enumerate(cls.prototypes)
    )
    others = cls.num_contributing - sum(item.contribution > 0 for item in cls.prototypes)
    rest = (
        f'<p class="rest num">+ {cls.rest:.2f} from the other {others} contributing prototypes '
        f'= logit {number(cls.logit)}</p><p class="rest num share">{escape(share_text(cls))}.</p>'
    )
    body = f'<ol class="evidence">{rows}</ol>{rest}'
    name = text(cls.class_name)
    if rank == 0:
        return f'<section class="why"><h3>Why “{name}”? This looks like that:</h3>{body}</section>'
    return (
        f'<details class="why"><summary>Class #{rank + 1} “{name}” ({percent(cls.probability)}): '
        f"why it scored logit {number(cls.logit)}</summary>{body}</details>"
    )


def explanation_card(
    i: int, name: str, explanation: Explanation, report: Report, tiles: TileWriter, figure: str
) -> str:
    """One explained image: its classes, the evidence of each, and a link to its PNG figure."""
    pred = explanation.predicted
    size = explanation.image.shape[0]
    input_src = tiles.report_tile(f"input-{i}.jpg", image_tile(explanation.image, INPUT_TILE))
    probs = "".join(
        f'<li{" class=top" if c is pred else ""}><span class="name">{text(c.class_name)}</span>'
        f'{bar(c.probability)}<span class="right num">{percent(c.probability)}</span></li>'
        for c in explanation.classes
    )
    body = "".join(why(i, r, c, explanation, report, tiles) for r, c in enumerate(explanation.classes))
    return (
        f'<article class="card explanation" id="image-{i}"><div class="exp-head">'
        f'<figure class="input">{img(input_src, f"input image {name}", INPUT_TILE)}'
        f"<figcaption>{text(name)} · as the model sees it ({size} × {size} px)</figcaption></figure>"
        f'<div><div class="kicker">Image {i + 1} of {len(report.explanations)}</div>'
        f'<h2>{text(pred.class_name)} <span class="pill">{percent(pred.probability)}</span></h2>'
        f'<ul class="probs">{probs}</ul>'
        f'<p class="muted small num share">Logit {number(pred.logit)} = Σ score × weight over all prototypes; '
        f"{escape(share_text(pred))}. The boxes mark each prototype's peak cell; “this” and “that” are the "
        f'same window around it, at the same zoom. <a href="{figure}">PNG figure</a></p>'
        f"{colour_bar(report)}</div></div>{body}</article>"
    )


def prototype_card(k: int, report: Report, tiles: TileWriter, chips: str) -> str:
    """Prototype k: its source image and nearest training patches (one strip), the classes weighting it."""
    gallery = report.gallery
    refs, source = gallery.patches(k), gallery.source_picture(k)

    def draw():
        first = source_tile(source, gallery.cosine_range, CROP_SIDE)
        return strip_tile([first, *(patch_tile(gallery.patch(ref), CROP_SIDE) for ref in refs)])

    strip = tiles.gallery_tile(f"strip-{k}.jpg", draw)
    head = f'<figcaption>its source<span class="clip">train #{refs[0].image}</span></figcaption>'
    captions = head + "".join(
        f"<figcaption>{patch_caption(ref, gallery.classes)}</figcaption>" for ref in refs
    )
    alt = f"source image of prototype {k} and the {len(refs)} training patches nearest to it"
    return (
        f'<article class="card proto" id="p{k}"><div class="proto-head"><h3>Prototype {k}</h3>'
        f'<span class="muted small num">nearest prototype of {int(gallery.usage[k]):,} training patches</span></div>'
        f'<img class="strip-img" src="{strip}" alt="{alt}" width="{CROP_SIDE * (len(refs) + 1)}" height="{CROP_SIDE}">'
        f'<div class="strip" style="grid-template-columns: repeat({len(refs) + 1}, minmax(0, 1fr))">{captions}</div>'
        f'<div class="chips">{chips}</div></article>'
    )
