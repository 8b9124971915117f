"""Command line: thin subcommands, each calling one library function.

Training flags are derived from the config dataclasses: every field is a
`--section.field VALUE` flag (e.g. `--codebook.num_prototypes 512`), applied on top of
`--config FILE.yaml` when given. `protoquant train --help-config` lists them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from protoquant import distributed
from protoquant.config import RunConfig, flat_fields, load_yaml, to_dict, with_overrides

logger = logging.getLogger("protoquant")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any RunConfig fields (flags override it)")
    parser.add_argument(
        "--help-config", action="store_true", help="list every --section.field flag with its default"
    )
    for dotted in flat_fields():
        if f"--{dotted}" in parser._option_string_actions:  # the subcommand defines it itself (demo --out)
            continue
        parser.add_argument(f"--{dotted}", dest=f"cfg:{dotted}", help=argparse.SUPPRESS)


def _config_from(args: argparse.Namespace, base: RunConfig) -> RunConfig:
    config = load_yaml(args.config) if args.config else base
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return with_overrides(config, overrides)


def _print_config_help(base: RunConfig) -> None:
    defaults = to_dict(base)
    for dotted, hint in flat_fields().items():
        section, field = dotted.split(".") if "." in dotted else (None, dotted)
        value = defaults[section][field] if section else defaults[field]
        print(f"  --{dotted:<34} {getattr(hint, '__name__', str(hint)):<8} default {value!r}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from protoquant.demo import demo_config, format_table, run_demo, summary_rows

    base = demo_config(args.out)
    if args.help_config:
        _print_config_help(base)
        return 0
    result = run_demo(_config_from(args, base))
    if not distributed.context().is_main:  # under torchrun, rank 0 reports
        return 0
    print(f"\nProtoQuant demo\n{format_table(summary_rows(result.metrics))}")
    print(f"\n  metrics:     {result.out / 'metrics.json'}")
    print(f"  checkpoint:  {result.out / 'model'}")
    print(f"  explanation: {result.out / 'explanation.png'}")
    print(f"  report:      {(result.out / 'report' / 'index.html').resolve()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from protoquant.demo import format_table, summary_rows
    from protoquant.pipeline import run

    if args.help_config:
        _print_config_help(RunConfig())
        return 0
    result = run(_config_from(args, RunConfig()))
    if not distributed.context().is_main:  # under torchrun, rank 0 reports
        return 0
    print(format_table(summary_rows(result.metrics)))
    print(f"\n  checkpoint: {result.out / 'model'}\n  metrics:    {result.out / 'metrics.json'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from protoquant.metrics import format_table
    from protoquant.metrics.evaluate import evaluate_checkpoint, write_report

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
    if args.metrics:
        print(f"{report['model']} on {report['dataset']}/{report['split']} ({report['num_images']} images)")
        print(format_table(report))
        for path in written:
            print(f"  wrote {path}")
    else:
        print(json.dumps(report, indent=2))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from protoquant.metrics.evaluate import audit_checkpoint, format_audit, write_report

    report = audit_checkpoint(
        args.model, against=args.against, noise=not args.no_noise, batch_size=args.batch_size
    )
    print(f"grounding audit of {args.model}" + (f" against {args.against}" if args.against else ""))
    print(format_audit(report))
    for path in write_report(report, args.out) if args.out else []:
        print(f"  wrote {path}")
    return 0


def _open_images(paths: list[str]) -> list:
    """Every image file as RGB, or exit naming the file that cannot be read."""
    from protoquant.data.images import open_rgb

    try:
        return [open_rgb(path) for path in paths]
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read image: {err}") from err


def _cmd_predict(args: argparse.Namespace) -> int:

    from protoquant.model import ProtoQuant

    model = ProtoQuant.load(args.model)
    for path, image in zip(args.images, _open_images(args.images)):
        prediction = model.predict([image])
        probs = prediction.probabilities[0]
        top = probs.argsort(descending=True)[: args.top].tolist()
        print(
            json.dumps(
                {
                    "image": str(path),
                    "top": [
                        {"class": model.classes[c], "index": c, "probability": round(float(probs[c]), 4)}
                        for c in top
                    ],
                }
            )
        )
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from protoquant.explain.explanation import build_report, read_run_metrics
    from protoquant.explain.gallery import ensure_gallery
    from protoquant.model import ProtoQuant
    from protoquant.render import write_report

    model = ProtoQuant.load(args.model)
    gallery = ensure_gallery(model, args.model)
    images = [(Path(path).name, image) for path, image in zip(args.images, _open_images(args.images))]
    report = build_report(
        model,
        images,
        gallery,
        metrics=read_run_metrics(args.model),
        top_classes=args.top_classes,
        top_prototypes=args.top_prototypes,
    )
    print(write_report(report, args.out).resolve())
    return 0


def _cmd_gallery(args: argparse.Namespace) -> int:
    from protoquant.explain.gallery import GALLERY_META, ensure_gallery
    from protoquant.model import ProtoQuant

    model = ProtoQuant.load(args.model)
    gallery = ensure_gallery(model, args.model, top_k=args.top_k, rebuild=True)
    print(
        f"gallery of {gallery.num_prototypes} prototypes x {gallery.top_k} training patches "
        f"({len(gallery.weighted_prototypes())} weighted): {args.model}/{GALLERY_META}"
    )
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from protoquant.config import DataConfig
    from protoquant.data.check import check_dataset, format_check

    report = check_dataset(
        DataConfig(dataset=args.dataset, root=args.root or ""), verify_images=not args.skip_images
    )
    print(json.dumps(report, indent=2) if args.json else format_check(report))
    return 1 if report["problems"] else 0


def _add_training(sub) -> None:
    demo = sub.add_parser("demo", help="whole pipeline on the built-in data, then an explanation figure")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    _add_config_flags(demo)
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="train from a config file and/or --section.field flags")
    _add_config_flags(train)
    train.set_defaults(func=_cmd_train)


def _add_evaluation(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="accuracy of a checkpoint on a dataset split")
    evaluate.add_argument("--model", required=True, help="checkpoint folder")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--dataset", help="dataset name (default: the one it was trained on)")
    evaluate.add_argument("--root", help="dataset folder (default: the one it was trained on)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument(
        "--out", help="also write the JSON report here (per-image rows go to <out>.<metric>.csv)"
    )
    evaluate.add_argument(
        "--metrics",
        help="interpretability metrics: 'all' or a comma list of "
        "accuracy,size,consistency,stability,purity,misalignment,funnybirds,grounding",
    )
    evaluate.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="metric setting (repeatable), e.g. misalignment_images=20, random_start_only=true; "
        "fields: protoquant.metrics.MetricSettings",
    )
    evaluate.set_defaults(func=_cmd_evaluate)

    audit = sub.add_parser(
        "audit", help="grounding report: nearest training patch, usage, dead/duplicate codes, drift"
    )
    audit.add_argument("--model", required=True, help="checkpoint folder")
    audit.add_argument("--against", help="second checkpoint (same backbone): report prototype drift")
    audit.add_argument("--no-noise", action="store_true", help="skip the input-noise stability check")
    audit.add_argument("--batch-size", type=int, default=64)
    audit.add_argument(
        "--out", help="also write the JSON report here (per-prototype rows to <out>.grounding.csv)"
    )
    audit.set_defaults(func=_cmd_audit)


def _add_explanation(sub) -> None:
    predict = sub.add_parser("predict", help="classify image files")
    predict.add_argument("--model", required=True, help="checkpoint folder")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--top", type=int, default=3, help="classes to print per image")
    predict.set_defaults(func=_cmd_predict)

    explain = sub.add_parser(
        "explain", help="static HTML report explaining image files (this looks like that)"
    )
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--model", required=True, help="checkpoint folder (its gallery is built if missing)")
    explain.add_argument("--out", required=True, help="report folder; DIR/index.html is written")
    explain.add_argument("--top-classes", type=int, default=2, help="classes explained per image")
    explain.add_argument("--top-prototypes", type=int, default=5, help="prototypes shown per class")
    explain.set_defaults(func=_cmd_explain)

    gallery = sub.add_parser(
        "gallery", help="build or refresh a checkpoint's prototype gallery from the cache"
    )
    gallery.add_argument("--model", required=True, help="checkpoint folder")
    gallery.add_argument("--top-k", type=int, default=5, help="training patches kept per prototype")
    gallery.set_defaults(func=_cmd_gallery)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser(
        "check", help="verify a dataset copy: counts, classes, unreadable files, annotations"
    )
    check.add_argument(
        "--dataset", required=True, help="registry name (synthetic, fashion-mnist, cub, cars, ...)"
    )
    check.add_argument("--root", help="dataset folder")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--skip-images", action="store_true", help="do not open every image (faster)")
    check.set_defaults(func=_cmd_data_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protoquant", description="Interpretable classification with quantized prototypical parts."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_training, _add_evaluation, _add_explanation, _add_data):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"protoquant: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
