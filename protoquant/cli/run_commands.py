"""`protoquant demo` and `protoquant train`: one run from config flags, then a summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from protoquant.cli.checks import require, run_problems
from protoquant.cli.config_flags import EPILOG, add_config_flags, config_lines
from protoquant.cli.output import emit
from protoquant.cli.parsing import add_json_flag, command
from protoquant.config import RunConfig, to_dict


def _resolved(args: argparse.Namespace) -> RunConfig | None:
    """The checked config, or None when `--print_config` / `--help_config` answered instead."""
    config: RunConfig = args.run
    if args.help_config:
        print("\n".join(config_lines(config)))
        return None
    if args.print_config:  # checked by the dataclasses only: it may be printed where the data is not
        sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False))
        return None
    require(run_problems(config, training=True))
    from protoquant.preflight import preflight

    preflight(config)  # cross-field, device and process-count checks; pipeline.run adds the data ones
    return config


def _paths(out: Path) -> dict[str, str]:
    return {"checkpoint": str(out / "model"), "metrics_file": str(out / "metrics.json")}


def _report(args: argparse.Namespace, title: str, metrics: dict, paths: dict[str, str]) -> None:
    """The summary table and the files written; with `--json` the same as one document."""
    from protoquant.demo import format_table, summary_rows

    lines = [f"  {key.removesuffix('_file') + ':':<12} {path}" for key, path in paths.items()]
    text = f"{title}{format_table(summary_rows(metrics))}\n\n" + "\n".join(lines)
    emit(args, text, {**paths, "metrics": metrics})


def demo(args: argparse.Namespace) -> int:
    """Run the demo (pipeline, gallery, figure, report) and print its summary."""
    config = _resolved(args)
    if config is None:
        return 0
    from protoquant import distributed
    from protoquant.demo import REPORT_DIR, run_demo

    result = run_demo(config)
    if not distributed.context().is_main:  # under torchrun, rank 0 reports
        return 0
    paths = {
        **_paths(result.out),
        "explanation": str(result.out / "explanation.png"),
        "report": str((result.out / REPORT_DIR / "index.html").resolve()),
    }
    _report(args, "\nProtoQuant demo\n", result.metrics, paths)
    return 0


def train(args: argparse.Namespace) -> int:
    """Run the pipeline (cache -> stages 0-2 -> evaluation) and print its summary."""
    config = _resolved(args)
    if config is None:
        return 0
    from protoquant import distributed
    from protoquant.pipeline import run

    result = run(config)
    if not distributed.context().is_main:  # under torchrun, rank 0 reports
        return 0
    _report(args, "", result.metrics, _paths(result.out))
    return 0


def register(sub: argparse._SubParsersAction, base: RunConfig) -> None:
    """Add `demo` and `train`; `base` is the config their flags apply to (see `base_config`)."""
    for name, func, text in (
        ("demo", demo, "the whole pipeline on the built-in data, then a figure and an HTML report"),
        ("train", train, "train from --config FILE.yaml and/or --section.field flags"),
    ):
        usage = f"protoquant {name} [--config FILE.yaml] [--section.field VALUE ...] [--json] [-v | -q]"
        parser = command(sub, name, text, epilog=EPILOG, usage=usage)
        add_json_flag(parser, "the paths written and the run's metrics")
        add_config_flags(parser, base)
        parser.set_defaults(func=func)
