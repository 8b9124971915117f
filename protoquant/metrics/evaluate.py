"""Evaluate a saved checkpoint on a dataset split, reading (or building) the feature cache.

`evaluate_checkpoint` reports accuracy and explanation size, plus any interpretability metrics
asked for (`protoquant.metrics`); `audit_checkpoint` is the grounding report of one checkpoint and,
given a second one, the drift between them. `write_report` writes the JSON and one CSV per metric
with per-image or per-prototype rows.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

import protoquant.metrics.grounding as grounding_metrics
from protoquant.cache.split import split_store
from protoquant.cache.view import CacheView
from protoquant.config import WEIGHT_THRESHOLD
from protoquant.data import Splits, load_splits
from protoquant.distributed import resolve_device
from protoquant.explain.grounding import nearest_patches
from protoquant.metrics.result import jsonable
from protoquant.metrics.runner import evaluate_metrics
from protoquant.metrics.settings import MetricSettings
from protoquant.model import ProtoQuant
from protoquant.train.head import evaluate_head, global_size


def _splits(model: ProtoQuant, dataset: str | None, root: str | None) -> Splits:
    data = replace(
        model.config.data, **{k: v for k, v in {"dataset": dataset, "root": root}.items() if v is not None}
    )
    splits = load_splits(data, model.config.seed)
    if tuple(splits.test.classes) != model.classes:
        raise ValueError(
            f"dataset {data.dataset} has classes {splits.test.classes[:5]}..., the model was trained on {model.classes[:5]}..."
        )
    return splits


def metric_settings(overrides: Sequence[str] = (), **values) -> MetricSettings:
    """`MetricSettings` from keyword values and "FIELD=VALUE" strings (e.g. "misalignment_images=20").

    Raises:
        ValueError: an unknown field or a value that does not parse as the field's type.
    """
    fields = {f.name: f for f in dataclasses.fields(MetricSettings)}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(
                f"metric setting '{item}': expected FIELD=VALUE with FIELD in {', '.join(fields)}"
            )
        kind = type(fields[name].default)
        try:
            values[name] = _parse_bool(text) if kind is bool else kind(text)
        except ValueError as err:
            raise ValueError(f"metric setting '{name}': cannot read {text!r} as {kind.__name__}") from err
    return MetricSettings(**values)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    root: str | None = None,
    batch_size: int = 64,
    metrics: str | Sequence[str] | None = None,
    settings: MetricSettings | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Accuracy and explanation size of checkpoint `path` on `split`, plus `metrics` ("all" or names).

    The report is one flat JSON object: metric -> value, and "protocol" (seed, image size, crop
    mode, prototype-to-class rule, thresholds, deviations) when metrics are asked for.
    `overrides` are "FIELD=VALUE" changes to the metric settings (see `MetricSettings`).
    """
    model = ProtoQuant.load(path)
    config = model.config
    splits = _splits(model, dataset, root)
    images = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    device = resolve_device(config.device)
    model = model.to(device)
    store = split_store(model, images, device)
    head = model.head
    report = {
        "model": str(path),
        "dataset": images.name,
        "split": split,
        "num_images": len(images),
        "accuracy": evaluate_head(
            head, CacheView(store, store.entries(first_view_only=True)), batch_size, device
        ),
        "num_prototypes": global_size(head, WEIGHT_THRESHOLD),
        "temperature": head.temperature,
        "seed": config.seed,
        "image_size": config.backbone.image_size,
    }
    if metrics:
        settings = settings or metric_settings(overrides, seed=config.seed, batch_size=batch_size)
        results = evaluate_metrics(
            model, images, metrics, settings=settings, device=device, store=store, train=splits.train
        )
        report.update(results)
    return report


def audit_checkpoint(
    path: str | Path,
    *,
    against: str | Path | None = None,
    noise: bool = True,
    batch_size: int = 64,
) -> dict:
    """Grounding report of a checkpoint (and drift against a second one with the same backbone).

    Args:
        noise: also measure how the pooled scores and argmax cells move under input noise
            (on the test split, as in the stability protocol).
    """
    model = ProtoQuant.load(path)
    device = resolve_device(model.config.device)
    model = model.to(device)
    splits = _splits(model, None, None)
    store = split_store(model, splits.train, device)  # view 0 of the training cache when complete
    train = CacheView(store, store.entries(first_view_only=True))
    settings = MetricSettings(seed=model.config.seed, batch_size=batch_size)
    report = evaluate_metrics(
        model, splits.train, ["grounding"], settings=settings, device=device, store=store, train=train
    )
    report["model"] = str(path)
    if noise:
        report["noise"] = _noise_check(model, splits, settings, device)
    if against is not None:
        report["drift"] = jsonable(
            drift_between(model, ProtoQuant.load(against).to(device), train, batch_size)
        )
        report["against"] = str(against)
    return report


def _noise_check(model: ProtoQuant, splits: Splits, settings: MetricSettings, device) -> dict:
    result = evaluate_metrics(model, splits.test, ["stability"], settings=settings, device=device)
    return {**result["stability"], "seconds": result["timing_seconds"]["stability"]}


def drift_between(model_a: ProtoQuant, model_b: ProtoQuant, train: CacheView, batch_size: int = 64):
    """Per-prototype drift from checkpoint a to b, with nearest training patches under each."""
    if model_a.backbone.info.weights_hash != model_b.backbone.info.weights_hash:
        raise ValueError("drift compares checkpoints on one backbone; the weights hashes differ")
    device = model_a.head.class_layer.weight.device
    codebooks = [m.head.codebook.detach().cpu() for m in (model_a, model_b)]
    nearest = [nearest_patches(c, train, batch_size, device) for c in codebooks]
    return grounding_metrics.drift(
        codebooks[0], codebooks[1], *((n.entry.numpy(), n.cell.numpy()) for n in nearest)
    )


def write_report(report: dict, out: str | Path) -> list[Path]:
    """Write the JSON report (without rows) to `out` and each metric's rows to `<out stem>.<metric>.csv`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = report.get("rows", {})
    body = {k: v for k, v in report.items() if k != "rows"}
    out.write_text(json.dumps(body, indent=2))
    written = [out]
    for name, records in rows.items():
        if records:
            target = out.with_name(f"{out.stem}.{name}.csv")
            with open(target, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
            written.append(target)
    return written


def format_audit(report: dict, worst: int = 10) -> str:
    """The grounding report as text: summary, least-grounded used prototypes, duplicates, noise, drift."""
    summary = report["grounding"]
    lines = [f"  {key:<24} {_number(value)}" for key, value in summary.items()]
    rows = [r for r in report.get("rows", {}).get("grounding", []) if r["usage"] > 0]
    rows.sort(key=lambda r: r["nearest_cosine"])
    lines.append(f"\n  least grounded used prototypes (of {len(rows)}):")
    lines += [
        f"    prototype {r['prototype']:>5}  cosine {r['nearest_cosine']:.3f}  usage {r['usage']:>7}  "
        f"nearest: train image {r['nearest_image']} cell {r['nearest_cell']}"
        for r in rows[:worst]
    ]
    duplicates = [r for r in report.get("rows", {}).get("grounding", []) if r["duplicate_of"] >= 0]
    if duplicates:
        pairs = ", ".join(f"{r['prototype']}~{r['duplicate_of']}" for r in duplicates[:20])
        lines.append(f"\n  near-duplicates: {pairs}")
    for section in ("noise", "drift"):
        if section in report:
            values = {k: v for k, v in report[section].items() if not isinstance(v, (list, dict))}
            lines.append(f"\n  {section}: " + ", ".join(f"{k} {_number(v)}" for k, v in values.items()))
    return "\n".join(lines)


def _number(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)
