"""`evaluate`, `audit` and `gallery`: one checkpoint in, a report out."""

from __future__ import annotations

import argparse
from pathlib import Path

from protoquant.cli.checks import dataset_problem, folder_problem, require
from protoquant.cli.output import emit
from protoquant.cli.parsing import add_flag, add_json_flag, command

SPLITS = ("train", "val", "test")
METRIC_NAMES = (
    "accuracy, size, consistency, stability, purity, misalignment, funnybirds, grounding, placement"
)
DEFAULT_BATCH = 64  # images (or cached maps) per batch when reading a checkpoint's split


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a checkpoint folder (model.safetensors + config.json), or None."""
    folder = Path(path)
    if not folder.is_dir():
        return f"--model '{path}' is not a folder (a checkpoint is <out>/model)"
    missing = [name for name in ("model.safetensors", "config.json") if not (folder / name).is_file()]
    return f"--model '{path}' is not a checkpoint: no {', '.join(missing)}" if missing else None


def _written(paths: list[Path]) -> str:
    return "".join(f"\n  wrote {path}" for path in paths)


def evaluate(args: argparse.Namespace) -> int:
    """Accuracy (and interpretability metrics) of a checkpoint on a split."""
    dataset = dataset_problem(args.dataset, "--dataset") if args.dataset else None
    require([checkpoint_problem(args.model), dataset, folder_problem(args.root, "--root")])
    from protoquant.metrics import format_table, resolve_metrics
    from protoquant.metrics.evaluate import evaluate_checkpoint, metric_settings, write_report

    if args.metrics:
        resolve_metrics(args.metrics)  # unknown names fail here, before any feature is computed
    metric_settings(args.set)  # so do unknown or unreadable --set fields
    report = evaluate_checkpoint(
        args.model,
        split=args.split,
        root=args.root,
        dataset=args.dataset,
        batch_size=args.batch_size,
        metrics=args.metrics,
        overrides=args.set,
    )
    written = write_report(report, args.out) if args.out else []
    title = f"{report['model']} on {report['dataset']}/{report['split']} ({report['num_images']} images)"
    body = {key: value for key, value in report.items() if key != "rows"}  # rows: CSV files (--out)
    emit(args, f"{title}\n{format_table(report)}{_written(written)}", body)
    return 0


def audit(args: argparse.Namespace) -> int:
    """Grounding report of a checkpoint, and prototype drift against a second one."""
    against = checkpoint_problem(args.against) if args.against else None
    require([checkpoint_problem(args.model), against])
    from protoquant.metrics.evaluate import audit_checkpoint, format_audit, write_report

    report = audit_checkpoint(
        args.model, against=args.against, noise=not args.no_noise, batch_size=args.batch_size
    )
    written = write_report(report, args.out) if args.out else []
    title = f"grounding audit of {args.model}" + (f" against {args.against}" if args.against else "")
    body = {key: value for key, value in report.items() if key != "rows"}  # rows: CSV files (--out)
    emit(args, f"{title}\n{format_audit(report)}{_written(written)}", body)
    return 0


def gallery(args: argparse.Namespace) -> int:
    """Rebuild a checkpoint's prototype gallery from its training cache."""
    require([checkpoint_problem(args.model)])
    from protoquant.explain.gallery import GALLERY_META, ensure_gallery
    from protoquant.model import ProtoQuant

    model = ProtoQuant.load(args.model)
    built = ensure_gallery(model, args.model, top_k=args.top_k, rebuild=True)
    path = Path(args.model) / GALLERY_META
    weighted = len(built.weighted_prototypes())
    text = (
        f"gallery of {built.num_prototypes} prototypes x {built.top_k} training patches "
        f"({weighted} weighted): {path}"
    )
    document = {"gallery": str(path), "num_prototypes": built.num_prototypes, "top_k": built.top_k}
    emit(args, text, {**document, "weighted_prototypes": weighted})
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    parser = command(sub, "evaluate", "accuracy and metrics of a checkpoint on a split")
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to evaluate")
    parser.add_argument("--dataset", metavar="NAME", help="dataset name (default: the one it was trained on)")
    parser.add_argument("--root", metavar="DIR", help="dataset folder (default: the one it was trained on)")
    add_flag(parser, "batch_size", type=int, default=DEFAULT_BATCH, metavar="N", help="images per batch")
    parser.add_argument(
        "--out", metavar="FILE", help="also write the JSON report here (per-image rows to <out>.<metric>.csv)"
    )
    parser.add_argument(
        "--metrics",
        metavar="NAMES",
        help=f"interpretability metrics: 'all' or a comma list of {METRIC_NAMES}",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="metric setting (repeatable), e.g. misalignment_images=20; fields: protoquant.metrics.MetricSettings",
    )
    add_json_flag(parser, "the report")
    parser.set_defaults(func=evaluate)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `evaluate`, `audit` and `gallery`."""
    _add_evaluate(sub)
    parser = command(
        sub, "audit", "grounding: nearest training patch, usage, dead/duplicate prototypes, drift"
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    parser.add_argument(
        "--against", metavar="DIR", help="second checkpoint (same backbone): report prototype drift"
    )
    add_flag(parser, "no_noise", action="store_true", help="skip the input-noise stability check")
    add_flag(parser, "batch_size", type=int, default=DEFAULT_BATCH, metavar="N", help="images per batch")
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="also write the JSON report here (per-prototype rows to <out>.grounding.csv)",
    )
    add_json_flag(parser, "the report")
    parser.set_defaults(func=audit)

    parser = command(sub, "gallery", "build or refresh a checkpoint's prototype gallery from the cache")
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    add_flag(parser, "top_k", type=int, default=5, metavar="N", help="training patches kept per prototype")
    add_json_flag(parser, "the gallery's path and size")
    parser.set_defaults(func=gallery)
