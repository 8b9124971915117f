"""`protoquant data check`: verify a copy of a dataset before caching it."""

from __future__ import annotations

import argparse

from protoquant.cli.checks import dataset_problem, folder_problem, require
from protoquant.cli.output import emit
from protoquant.cli.parsing import add_flag, add_json_flag, command

PROBLEMS_FOUND = 1  # exit status of `data check` when the copy has problems


def data_check(args: argparse.Namespace) -> int:
    """Counts, classes, unreadable files and annotations; exit status 1 when problems are found."""
    require([dataset_problem(args.dataset, "--dataset"), folder_problem(args.root, "--root")])
    from protoquant.config import DataConfig
    from protoquant.data.check import check_dataset, format_check

    report = check_dataset(
        DataConfig(dataset=args.dataset, root=args.root or ""), verify_images=not args.skip_images
    )
    emit(args, format_check(report), report)
    return PROBLEMS_FOUND if report["problems"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data check`."""
    tools = command(sub, "data", "dataset tools").add_subparsers(
        dest="data_command", required=True, metavar="TOOL"
    )
    check = command(tools, "check", "verify a dataset copy: counts, classes, unreadable files, annotations")
    check.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help="registry name (synthetic, fashion-mnist, cub, cars, ...)",
    )
    check.add_argument("--root", metavar="DIR", help="dataset folder")
    add_flag(check, "skip_images", action="store_true", help="do not open every image (faster)")
    add_json_flag(check, "the report")
    check.set_defaults(func=data_check)
