"""`protoquant data check` verifies a copy of a dataset before caching it; `protoquant data resize`
writes a downscaled copy of an image tree."""

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


def data_resize(args: argparse.Namespace) -> int:
    """Write the downscaled copy; its counts (resized, copied, other files, kept) are the report."""
    require([folder_problem(args.root, "--root")])
    from dataclasses import asdict

    from protoquant.data.resize import resize_dataset

    report = resize_dataset(args.root, args.out, args.shorter_side, args.quality, threads=args.threads)
    text = (
        f"{args.out}: {report.resized} images resized to a shorter side of {args.shorter_side} px, "
        f"{report.copied} copied (already that small), {report.other_files} other files copied, "
        f"{report.kept} kept from an earlier run, "
        f"{report.annotations} annotation files rewritten in the copy's pixels"
    )
    emit(args, text, {"root": args.root, "out": args.out, **asdict(report)})
    return 0


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
    _register_resize(tools)


def _register_resize(tools: argparse._SubParsersAction) -> None:
    resize = command(
        tools,
        "resize",
        "write a copy of an image tree with every image larger than --shorter_side downscaled "
        "(same relative paths; resumes an interrupted copy)",
    )
    resize.add_argument("--root", required=True, metavar="DIR", help="the dataset folder to copy")
    resize.add_argument("--out", required=True, metavar="DIR", help="folder of the copy (outside --root)")
    add_flag(
        resize,
        "shorter_side",
        type=int,
        default=256,
        metavar="PX",
        help="shorter side of the resized images (256 keeps room for a 224 px crop)",
    )
    resize.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG / WebP quality")
    resize.add_argument("--threads", type=int, default=4, metavar="N", help="images processed at once")
    add_json_flag(resize, "the counts")
    resize.set_defaults(func=data_resize)
