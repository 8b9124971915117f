"""`predict` and `explain`: image files in, classes or an HTML report out."""

from __future__ import annotations

import argparse
from pathlib import Path

from protoquant.cli.checkpoint_commands import checkpoint_problem
from protoquant.cli.checks import require
from protoquant.cli.output import emit
from protoquant.cli.parsing import add_flag, add_json_flag, command

PROBABILITY_DIGITS = 4  # decimals of the probabilities `predict --json` prints


def open_images(paths: list[str]) -> list:
    """Every image file as RGB, opened before the model loads.

    Raises:
        DataError: a file that is missing or not a readable image (the message names it and why).
    """
    from protoquant.data.images import open_rgb

    return [open_rgb(path) for path in paths]


def predict(args: argparse.Namespace) -> int:
    """Classify image files: the top classes of each, with probabilities."""
    require([checkpoint_problem(args.model)])
    images = open_images(args.images)
    from protoquant.model import ProtoQuant

    model = ProtoQuant.load(args.model)
    rows = []
    for path, image in zip(args.images, images):
        probabilities = model.predict([image]).probabilities[0]
        top = probabilities.argsort(descending=True)[: args.top].tolist()
        rows.append(
            {
                "image": str(path),
                "top": [
                    {
                        "class": model.classes[c],
                        "index": c,
                        "probability": round(float(probabilities[c]), PROBABILITY_DIGITS),
                    }
                    for c in top
                ],
            }
        )
    from protoquant.render.text import percent  # lazy: drawing is not loaded for --help

    text = "\n".join(
        f"{row['image']}: " + ", ".join(f"{t['class']} {percent(t['probability'])}" for t in row["top"])
        for row in rows
    )
    emit(args, text, {"model": args.model, "predictions": rows})
    return 0


def explain(args: argparse.Namespace) -> int:
    """Write the static HTML report explaining image files; print the path of its index.html."""
    require([checkpoint_problem(args.model)])
    images = open_images(args.images)
    from protoquant.explain.explanation import build_report, read_run_metrics
    from protoquant.explain.gallery import ensure_gallery
    from protoquant.model import ProtoQuant
    from protoquant.render import write_report

    model = ProtoQuant.load(args.model)
    named = [(Path(path).name, image) for path, image in zip(args.images, images)]
    report = build_report(
        model,
        named,
        ensure_gallery(model, args.model),
        metrics=read_run_metrics(args.model),
        top_classes=args.top_classes,
        top_prototypes=args.top_prototypes,
    )
    index = write_report(report, args.out).resolve()
    emit(args, str(index), {"report": str(index), "images": [str(path) for path in args.images]})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `predict` and `explain`."""
    parser = command(sub, "predict", "classify image files")
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--top", type=int, default=3, metavar="N", help="classes shown per image")
    add_json_flag(parser, "the predictions")
    parser.set_defaults(func=predict)

    parser = command(sub, "explain", "static HTML report explaining image files (this looks like that)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="checkpoint folder (its gallery is built if missing)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="report folder; DIR/index.html is written"
    )
    add_flag(parser, "top_classes", type=int, default=2, metavar="N", help="classes explained per image")
    add_flag(parser, "top_prototypes", type=int, default=5, metavar="N", help="prototypes shown per class")
    add_json_flag(parser, "the report's path")
    parser.set_defaults(func=explain)
