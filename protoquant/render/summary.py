"""Numbers for the report's summary: headline cards, explanation sizes, the accuracy table.

All read from a `Report` (gallery, explanations, the run's metrics.json); nothing runs a model.
"""

from __future__ import annotations

from html import escape

from protoquant.config import WEIGHT_THRESHOLD
from protoquant.explain.types import Report
from protoquant.render.text import finite, number, percent

STAGES = (  # metrics.json sections with val/test accuracy, in pipeline order
    ("linear_probe", "linear probe (reference, not interpretable)"),
    ("quantized", "stage 1: quantized features"),
    ("protoquant", "ProtoQuant (interpretable)"),
)


def _per_class(report: Report) -> list[int]:
    """Number of prototypes each class weights above WEIGHT_THRESHOLD."""
    return (report.gallery.class_weights > WEIGHT_THRESHOLD).sum(dim=1).tolist()


def mean_shares(report: Report) -> tuple[float | None, float | None]:
    """Mean `shown_share` (class-specific logit) and `shown_margin_share` of the predictions, over the
    explained images where each is defined (None where it is nowhere)."""
    out = []
    for name in ("shown_share", "shown_margin_share"):
        values = [getattr(e.predicted, name) for _, e in report.explanations]
        values = [v for v in values if finite(v)]  # nan where the logit or margin is not positive
        out.append(sum(values) / len(values) if values else None)
    return out[0], out[1]


def _card(value: str, label: str) -> str:
    return f'<div class="stat"><div class="value">{escape(value)}</div><div class="label">{escape(label)}</div></div>'


def stat_cards(report: Report) -> str:
    """Headline numbers for the top of the explanations page."""
    gallery = report.gallery
    cards = []
    accuracy = report.metrics.get("protoquant", {}).get("test_accuracy")
    if accuracy is not None:
        cards.append(_card(percent(accuracy), "test accuracy"))
    cards.append(
        _card(f"{len(gallery.weighted_prototypes())} / {gallery.num_prototypes}", "prototypes in use")
    )
    per_class = _per_class(report)
    cards.append(_card(f"{sum(per_class) / max(1, len(per_class)):.1f}", "prototypes per class (mean)"))
    share, margin = mean_shares(report)
    shown = max((len(e.predicted.prototypes) for _, e in report.explanations), default=0)
    if share is not None:
        cards.append(_card(percent(share), f"of the class-specific logit from the top {shown} (mean)"))
    if margin is not None:
        cards.append(_card(percent(margin), f"of the margin over the runner-up from the top {shown} (mean)"))
    return f'<div class="stats">{"".join(cards)}</div>'


def explanation_sizes(report: Report) -> list[tuple[str, str]]:
    """(label, value) rows: global, per-class and local explanation sizes."""
    gallery = report.gallery
    per_class = _per_class(report) or [0]
    rows = [
        (
            "global: prototypes some class weights",
            f"{len(gallery.weighted_prototypes())} of {gallery.num_prototypes}",
        ),
        (
            "per class: prototypes it weights",
            f"mean {sum(per_class) / len(per_class):.1f}, min {min(per_class)}, max {max(per_class)}",
        ),
        ("weight threshold", f"w > {WEIGHT_THRESHOLD:g}"),
    ]
    count = f"mean over {len(report.explanations)} images"
    share, margin = mean_shares(report)
    if share is not None:
        rows.append(
            (
                "local: share of the class-specific logit from the shown prototypes",
                f"{percent(share)} ({count})",
            )
        )
    if margin is not None:
        rows.append(
            ("local: share of the margin over the runner-up from them", f"{percent(margin)} ({count})")
        )
    return rows


def metrics_table(metrics: dict) -> str:
    """Validation and test accuracy of each stage, or a note that the run's metrics are missing."""
    rows = [
        (label, metrics[key].get("val_accuracy"), metrics[key].get("test_accuracy"))
        for key, label in STAGES
        if isinstance(metrics.get(key), dict)
    ]
    if not rows:
        return '<p class="muted">No metrics.json was found beside the checkpoint.</p>'

    def cell(value) -> str:
        return (
            f'<td class="n">{percent(value)}</td>'
            if isinstance(value, (int, float))
            else '<td class="n">–</td>'
        )

    body = "".join(f"<tr><th>{escape(label)}</th>{cell(val)}{cell(test)}</tr>" for label, val, test in rows)
    grounding = metrics.get("grounding", {}).get("mean_nearest_cosine_used")
    note = (
        f'<p class="muted small">Prototypes sit on real training patches: mean cosine to the nearest one '
        f"{number(grounding, 3)}.</p>"
        if isinstance(grounding, (int, float))
        else ""
    )
    return (
        '<table class="facts"><tr><th>stage</th><td class="n"><b>validation</b></td>'
        f'<td class="n"><b>test</b></td></tr>{body}</table>{note}'
    )
