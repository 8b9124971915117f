"""`edit` and `info`: change a checkpoint with an audit trail, and show what a checkpoint is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from protoquant.cli.checkpoint_commands import DEFAULT_BATCH, checkpoint_problem
from protoquant.cli.checks import require
from protoquant.cli.output import emit
from protoquant.cli.parsing import add_flag, add_json_flag, command

PRUNE_MODES = ("exact", "drop")  # protoquant.explain.edit.PRUNE_MODES (not imported: the CLI starts fast)


META_FIELDS = ("format", "classes", "num_prototypes")  # what `edit` and `info` read from config.json


def _meta(path: str) -> dict:
    """The checkpoint's config.json (classes, number of prototypes), read without loading the model.

    Raises:
        CheckpointError: the file is not JSON or lacks one of META_FIELDS (the message names it).
    """
    from protoquant.errors import CheckpointError

    file = Path(path) / "config.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not a readable JSON file ({err})") from err
    missing = [name for name in META_FIELDS if not isinstance(meta, dict) or name not in meta]
    if missing:
        raise CheckpointError(f"{file}: no field {', '.join(map(repr, missing))}")
    return meta


def parse_disable(spec: str, num_prototypes: int, classes: list[str]) -> tuple[int, int | None]:
    """'K' (every class) or 'K:CLASS' (a class name or index) -> (prototype, class index or None).

    Raises:
        ValueError: the prototype or class does not exist (the message names the flag).
    """
    prototype_text, colon, class_text = spec.partition(":")
    if not prototype_text.strip().isdigit() or int(prototype_text) >= num_prototypes:
        raise ValueError(
            f"--disable '{spec}': expected PROTOTYPE or PROTOTYPE:CLASS with PROTOTYPE in 0..{num_prototypes - 1}"
        )
    if not colon:
        return int(prototype_text), None
    if class_text in classes:
        return int(prototype_text), classes.index(class_text)
    if class_text.isdigit() and int(class_text) < len(classes):
        return int(prototype_text), int(class_text)
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    raise ValueError(
        f"--disable '{spec}': no class '{class_text}' (a name among {shown} or 0..{len(classes) - 1})"
    )


def _edit_problems(args: argparse.Namespace) -> list[str | None]:
    problems: list[str | None] = []
    if args.top_k is not None and args.top_k < 1:
        problems.append(f"--top_k must be >= 1, got {args.top_k}")
    if args.merge_cosine is not None and not 0.0 < args.merge_cosine < 1.0:
        problems.append(f"--merge_cosine must be in (0, 1), got {args.merge_cosine}")
    for name in ("refit_epochs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.refit_lr is not None and args.refit_lr <= 0:
        problems.append(f"--refit_lr must be > 0, got {args.refit_lr}")
    if not (args.disable or args.merge_cosine is not None or args.top_k or args.remove_unused or args.refit):
        problems.append(
            "no edit asked for: give --disable, --merge_cosine, --top_k, --remove_unused or --refit"
        )
    if args.prune_mode is not None and not args.remove_unused:
        problems.append("--prune_mode applies to --remove_unused, which was not given")
    same = Path(args.out).resolve() == Path(args.model).resolve()
    if Path(args.out).exists() and not args.overwrite:
        what = "is the input checkpoint" if same else "exists"
        problems.append(f"--out '{args.out}' {what}; pass --overwrite to replace it")
    return problems


def edit(args: argparse.Namespace) -> int:
    """Apply the asked edits to a checkpoint; write the new checkpoint with its edit history."""
    require([checkpoint_problem(args.model)])
    require(_edit_problems(args))
    meta = _meta(args.model)
    disable = tuple(
        parse_disable(spec, int(meta["num_prototypes"]), meta["classes"]) for spec in args.disable or ()
    )
    from protoquant.explain.edit_session import EditPlan, edit_checkpoint
    from protoquant.history import format_history

    plan = EditPlan(
        disable=disable,
        merge_cosine=args.merge_cosine,
        top_k=args.top_k or 0,
        remove_unused=args.remove_unused,
        prune_mode=args.prune_mode or PRUNE_MODES[0],
        refit=args.refit,
        refit_epochs=args.refit_epochs or 0,
        refit_lr=args.refit_lr or 0.0,
    )
    result = edit_checkpoint(args.model, args.out, plan, overwrite=args.overwrite, batch_size=args.batch_size)
    text = (
        f"{format_history(result.records)}\nwrote {result.out} (gallery: {result.gallery}; "
        f"{result.seconds:.1f} s)"
    )
    document = {
        "model": args.model,
        "out": str(result.out),
        "gallery": result.gallery,
        "seconds": result.seconds,
        "edits": [record.to_dict() for record in result.records],
    }
    emit(args, text, document)
    return 0


def info(args: argparse.Namespace) -> int:
    """Print a checkpoint's model card and its edit history."""
    require([checkpoint_problem(args.model)])
    from protoquant.explain.gallery import has_gallery
    from protoquant.history import format_history
    from protoquant.hub import run_metrics
    from protoquant.model import ProtoQuant
    from protoquant.model_card import explanation_size, model_card

    model = ProtoQuant.load(args.model)
    card = model_card(model, run_metrics(model), with_gallery=has_gallery(args.model))
    global_size, per_class = explanation_size(model)
    document = {
        "model": args.model,
        "format": _meta(args.model)["format"],
        "classes": list(model.classes),
        "num_prototypes": model.head.num_prototypes,
        "num_removed_prototypes": int(getattr(model.head, "num_removed", 0)),
        "temperature": model.head.temperature,
        "global_size": global_size,
        "per_class_size": per_class,
        "gallery": has_gallery(args.model),
        "edits": [record.to_dict() for record in model.edits],
        "card": card,
    }
    emit(args, f"{card}\n## Edit history, in detail\n\n{format_history(model.edits)}", document)
    return 0


def _add_edit(sub: argparse._SubParsersAction) -> None:
    parser = command(
        sub,
        "edit",
        "limit, prune, disable, merge or re-fit a checkpoint's prototypes; writes a new checkpoint",
        epilog="Edits run in this order: disable, merge, top-k, remove unused (renumbers), re-fit; "
        "prototype numbers refer to the input checkpoint. Each is measured on the validation split "
        "and recorded in the new checkpoint (see `protoquant info`).",
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="input checkpoint folder (left untouched)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of the edited checkpoint")
    add_flag(parser, "overwrite", action="store_true", help="replace --out if it exists (even the input)")
    parser.add_argument(
        "--disable",
        action="append",
        metavar="K[:CLASS]",
        help="prototype K contributes nothing (to CLASS only: a name or index); repeatable",
    )
    add_flag(
        parser,
        "merge_cosine",
        type=float,
        metavar="X",
        help="merge weighted prototypes with cosine > X (e.g. 0.95) into the most used one",
    )
    add_flag(parser, "top_k", type=int, metavar="N", help="every class keeps its N largest weights")
    add_flag(parser, "remove_unused", action="store_true", help="remove prototypes no class weighs")
    add_flag(
        parser,
        "prune_mode",
        choices=PRUNE_MODES,
        help="exact: removed prototypes keep their softmax-normaliser share (logits unchanged); "
        "drop: removed from the softmax too (smaller, logits change; combine with --refit) (default: exact)",
    )
    parser.add_argument("--refit", action="store_true", help="re-fit the class layer on the training cache")
    add_flag(
        parser,
        "refit_epochs",
        type=int,
        metavar="N",
        help="re-fit epochs (default: the run's head.top_k_epochs)",
    )
    add_flag(
        parser, "refit_lr", type=float, metavar="LR", help="re-fit learning rate (default: the run's head.lr)"
    )
    add_flag(parser, "batch_size", type=int, default=DEFAULT_BATCH, metavar="N", help="cached maps per batch")
    add_json_flag(parser, "the edit records")
    parser.set_defaults(func=edit)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `edit` and `info`."""
    _add_edit(sub)
    parser = command(sub, "info", "a checkpoint's model card and edit history")
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    add_json_flag(parser, "the model's facts, card and edit history")
    parser.set_defaults(func=info)
