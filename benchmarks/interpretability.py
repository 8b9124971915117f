"""ProtoQuant vs a PIP-Net-style head vs the linear probe on the built-in data, every metric.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/interpretability.py

Trains (or reuses) ProtoQuant with the demo's settings (frozen torchvision MobileNetV2, 10
synthetic classes, 60 train / 40 test images per class; the demo's feature cache folder is
reused), trains the PIP-Net-style head on the same cached features with the same stage-2 code,
evaluates both with `protoquant.metrics` and prints a markdown table and per-metric timings.
Results go to runs/interpretability/benchmark.json. The misalignment attack (40 PGD steps through
the backbone) and FunnyBirds interventions run on the first test images only (see --attack-images,
--funnybirds-images) to keep the run under 15 minutes on two CPU cores.

With --funnybirds-root (e.g. ../shared/funnybirds/FunnyBirds, the official layout) it also trains
(or reuses) a model with the demo's settings on that FunnyBirds folder and runs the FunnyBirds
protocols on its whole test split, once with each attribution upsampling (OpenCV-exact bicubic,
and bilinear as the FunnyBirds framework's default); results go to <out>/funnybirds.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from protoquant.data import load_splits
from protoquant.demo import demo_config
from protoquant.distributed import resolve_device
from protoquant.metrics import FeatureMemo, MetricSettings, evaluate_metrics
from protoquant.model import ProtoQuant
from protoquant.pipeline import build_caches, run
from protoquant.train.baseline import baseline_model, train_baseline_head

METRICS = [
    "accuracy",
    "size",
    "consistency",
    "stability",
    "purity",
    "misalignment",
    "funnybirds",
    "grounding",
]


def _trained(config, retrain: bool):
    """(model, caches, splits, probe test accuracy): reuse <config.out>/model unless asked to retrain."""
    out = Path(config.out)
    if not retrain and (out / "model").is_dir() and (out / "metrics.json").is_file():
        model = ProtoQuant.load(out / "model")
        splits = load_splits(model.config.data, model.config.seed)
        caches = build_caches(splits, model.backbone, model.config, resolve_device(model.config.device))
        metrics = json.loads((out / "metrics.json").read_text())
        return model, caches, splits, metrics["linear_probe"]["test_accuracy"], 0.0
    start = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - start
    return (
        result.model,
        result.caches,
        result.splits,
        result.metrics["linear_probe"]["test_accuracy"],
        seconds,
    )


def _evaluate(model, splits, caches, settings: MetricSettings, memo: FeatureMemo) -> dict:
    kwargs = {"settings": settings, "store": caches.test.store, "train": caches.train_plain, "memo": memo}
    report = evaluate_metrics(model, splits.test, METRICS, **kwargs)
    published = replace(settings, random_start_only=True)
    random_start = evaluate_metrics(model, splits.test, ["misalignment"], **{**kwargs, "settings": published})
    report["misalignment_random_start"] = random_start["misalignment"]
    report["timing_seconds"]["misalignment_random_start"] = random_start["timing_seconds"]["misalignment"]
    return report


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pm(block: dict) -> str:
    """Headline mean ± std over prototypes with images (the reference's), then the all-counted extra."""
    return (
        f"{_num(block['mean'])} ± {_num(block['std'])} ({block['num_pure']} > 0.5; "
        f"{block['num_with_images']} of {block['num_prototypes']} with images; "
        f"all counted {block['mean_all']:.3f} ± {block['std_all']:.3f})"
    )


def _rows(report: dict) -> list[tuple[str, str]]:
    size, fb, mis, ground = report["size"], report["funnybirds"], report["misalignment"], report["grounding"]
    rand = report["misalignment_random_start"]
    return [
        ("test accuracy (%)", f"{100 * report['accuracy']:.1f}"),
        ("consistency (%)", f"{report['consistency']['score']:.1f}"),
        ("stability (%)", f"{report['stability']['score']:.1f}"),
        ("argmax cell unchanged under noise", f"{report['stability']['argmax_cell_unchanged']:.3f}"),
        ("purity top-10", _pm(report["purity"]["top_k"])),
        ("purity all@0.5", _pm(report["purity"]["all_above"])),
        ("global size / prototypes", f"{size['global_size']} / {size['num_prototypes']}"),
        ("local size (predicted class)", f"{size['local_size']:.1f}"),
        ("sparsity (weights <= 1e-3)", f"{size['sparsity']:.3f}"),
        ("PAC / PLC (%), PGD on activation", f"{mis['pac']:.1f} / {mis['plc']:.1f}"),
        ("PRC / AC (pp), PGD on activation", f"{mis['prc']:.2f} / {mis['ac']:.1f}"),
        ("PAC / PLC (%), random start only (published)", f"{rand['pac']:.1f} / {rand['plc']:.1f}"),
        ("FunnyBirds accuracy", f"{fb['accuracy']:.3f}"),
        ("FB CSDC / PC / DC / D", f"{fb['csdc']:.3f} / {fb['pc']:.3f} / {fb['dc']:.3f} / {fb['d']:.3f}"),
        (
            "FB BI / SD / TS",
            f"{fb['bi']:.3f} / {fb['sd']:.3f} / " + (f"{fb['ts']:.3f}" if fb["ts"] is not None else "n/a"),
        ),
        (
            "FB Com / headline (t*)",
            f"{fb['completeness']:.3f} / "
            + (f"{fb['headline']:.3f}" if fb["headline"] is not None else "n/a")
            + f" ({fb['threshold']:.3f})",
        ),
        (
            "nearest-patch cosine, used (mean / min)",
            f"{ground['mean_cosine_used']:.3f} / {ground['min_cosine_used']:.3f}",
        ),
        (
            "used / dead / duplicate prototypes",
            f"{ground['num_used']} / {ground['num_dead']} / {ground['num_duplicates']}",
        ),
    ]


def markdown(reports: dict[str, dict], probe_accuracy: float) -> str:
    """The comparison table; the probe has accuracy only."""
    names = list(reports)
    rows = {name: dict(_rows(report)) for name, report in reports.items()}
    lines = ["| metric | " + " | ".join(names) + " | linear probe |", "|---" * (len(names) + 2) + "|"]
    for key in rows[names[0]]:
        probe = f"{100 * probe_accuracy:.1f}" if key.startswith("test accuracy") else "—"
        lines.append(f"| {key} | " + " | ".join(rows[n][key] for n in names) + f" | {probe} |")
    return "\n".join(lines)


def timings(reports: dict[str, dict]) -> str:
    keys = list(next(iter(reports.values()))["timing_seconds"])
    lines = ["| seconds | " + " | ".join(reports) + " |", "|---" * (len(reports) + 1) + "|"]
    for key in keys:
        lines.append(
            f"| {key} | " + " | ".join(f"{r['timing_seconds'][key]:.1f}" for r in reports.values()) + " |"
        )
    return "\n".join(lines)


FB_ROWS = {
    "accuracy": "FunnyBirds accuracy",
    "csdc": "CSDC",
    "pc": "PC",
    "dc": "DC",
    "d": "D",
    "bi": "BI",
    "sd": "SD",
    "ts": "TS",
    "completeness": "Com",
    "headline": "headline",
    "threshold": "t*",
}


def funnybirds_official(root: str, out: Path, retrain: bool) -> dict[str, dict]:
    """FunnyBirds protocols on the official layout for a demo-settings model trained there, per upsampling."""
    config = demo_config(str(out / "funnybirds"))
    config = replace(config, data=replace(config.data, dataset="funnybirds", root=root))
    model, caches, splits, _, _ = _trained(config, retrain)
    reports, memo = {}, FeatureMemo()  # re-renders are featurised once for both upsamplings
    for upsampling in ("bicubic", "bilinear"):
        settings = MetricSettings(seed=model.config.seed, funnybirds_upsampling=upsampling)
        kwargs = {"settings": settings, "store": caches.test.store, "memo": memo}
        report = evaluate_metrics(model, splits.test, ["funnybirds"], **kwargs)
        reports[upsampling] = {"funnybirds": report["funnybirds"], "protocol": report["protocol"]}
    (out / "funnybirds.json").write_text(json.dumps(reports, indent=2))
    return reports


def funnybirds_markdown(reports: dict[str, dict]) -> str:
    """One column per upsampling: the FunnyBirds scores at t*, and how many images had a full re-render."""
    lines = [
        "| FunnyBirds (official layout) | " + " | ".join(reports) + " |",
        "|---" * (len(reports) + 1) + "|",
    ]
    for key, label in FB_ROWS.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{r['funnybirds'][key]:.3f}" for r in reports.values()) + " |"
        )
    counts = [r["funnybirds"]["counts"] for r in reports.values()]
    lines.append(
        "| images (full re-render) | "
        + " | ".join(f"{c['images']} ({c['full_render_images']})" for c in counts)
        + " |"
    )
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/interpretability")
    parser.add_argument("--retrain", action="store_true", help="train again even if <out>/model exists")
    parser.add_argument("--attack-images", type=int, default=8, help="test images attacked (misalignment)")
    parser.add_argument("--funnybirds-images", type=int, default=60, help="test images for FunnyBirds")
    parser.add_argument(
        "--funnybirds-root",
        default="",
        help="also train and evaluate on this FunnyBirds folder (official layout)",
    )
    parser.add_argument("--funnybirds-only", action="store_true", help="only the --funnybirds-root part")
    args = parser.parse_args()
    if args.funnybirds_only and not args.funnybirds_root:
        parser.error("--funnybirds-only needs --funnybirds-root (the FunnyBirds folder)")
    return args


def synthetic_benchmark(args: argparse.Namespace, out: Path) -> None:
    """ProtoQuant vs the PIP-Net-style head on the built-in data: table, timings, benchmark.json."""
    start = time.perf_counter()
    config = demo_config(str(out))
    config = replace(config, cache=replace(config.cache, root="runs/demo/cache"))  # the demo's cache
    model, caches, splits, probe_accuracy, train_seconds = _trained(config, args.retrain)
    device = model.head.class_layer.weight.device
    baseline_start = time.perf_counter()
    head, selection = train_baseline_head(
        caches.train, caches.val, len(model.classes), model.config.head, seed=model.config.seed, device=device
    )
    baseline_seconds = time.perf_counter() - baseline_start
    settings = MetricSettings(
        seed=model.config.seed,
        misalignment_images=args.attack_images,
        funnybirds_images=args.funnybirds_images,
    )
    memo = FeatureMemo()  # both heads share the backbone: changed images are featurised once
    reports = {
        "ProtoQuant": _evaluate(model, splits, caches, settings, memo),
        "PIP-Net-style head": _evaluate(baseline_model(model, head), splits, caches, settings, memo),
    }
    total = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "reports": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in reports.items()},
        "probe_test_accuracy": probe_accuracy,
        "baseline_selection": selection,
        "seconds": {"train_protoquant": train_seconds, "train_baseline": baseline_seconds, "total": total},
    }
    (out / "benchmark.json").write_text(json.dumps(record, indent=2))
    print(markdown(reports, probe_accuracy))
    print(
        f"\nPer-metric seconds ({len(splits.test)} test images; misalignment on {args.attack_images}, FunnyBirds on {args.funnybirds_images}):\n"
    )
    print(timings(reports))
    print(
        f"\ntrain ProtoQuant {train_seconds:.0f} s, baseline head {baseline_seconds:.0f} s, total {total:.0f} s, threads {torch.get_num_threads()}"
    )


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    if not args.funnybirds_only:
        synthetic_benchmark(args, out)
    if args.funnybirds_root:
        print("\n" + funnybirds_markdown(funnybirds_official(args.funnybirds_root, out, args.retrain)))


if __name__ == "__main__":
    main()
