"""`protoquant finetune`: stage -1 alone, then the `protoquant train` command that uses its weights."""

from __future__ import annotations

import argparse
import math
import shlex
import sys

import yaml

from protoquant.cli.checks import require, run_problems
from protoquant.cli.config_flags import EPILOG, add_config_flags, config_lines, flat_values
from protoquant.cli.output import emit
from protoquant.cli.parsing import add_json_flag, command
from protoquant.config import RunConfig, load_yaml, to_dict

SKIPPED_PREFIXES = ("finetune.", "backbone.weights")  # flags the train command must not repeat


def _flag_value(value: object) -> str:
    """A config value as its flag takes it: booleans true / false, lists comma-joined."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_flag_value(v) for v in value)
    return str(value)


def train_command(config: RunConfig, weights: str, config_file: str | None) -> str:
    """`protoquant train` with the same settings as `config` (its differences from the config file,
    or from the defaults) and `--backbone.weights WEIGHTS`, shell-quoted."""
    base = load_yaml(config_file) if config_file else RunConfig()
    ours, theirs = flat_values(to_dict(config)), flat_values(to_dict(base))
    words = ["protoquant", "train"] + (["--config", config_file] if config_file else [])
    for name, value in ours.items():
        if value != theirs.get(name) and not name.startswith(SKIPPED_PREFIXES):
            words += [f"--{name}", _flag_value(value)]
    words += ["--backbone.weights", weights]
    return shlex.join(words)


def finetune(args: argparse.Namespace) -> int:
    """Fine-tune the backbone (or reuse / resume the same fine-tuning) and print how to train on it."""
    config: RunConfig = args.run
    if args.help_config:
        print("\n".join(config_lines(config)))
        return 0
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    require(run_problems(config, training=False))
    from protoquant import distributed
    from protoquant.finetuning import finetune as run_finetune

    result = run_finetune(config)
    if not distributed.context().is_main:  # under torchrun, rank 0 reports
        return 0
    train = train_command(config, str(result.weights), args.config_file)
    accuracy = None if math.isnan(result.best_val_accuracy) else result.best_val_accuracy
    shown = "n/a (no validation images)" if accuracy is None else f"{accuracy:.4f}"
    text = (
        f"fine-tuned weights: {result.weights}\n"
        f"  best val accuracy: {shown}\n  weights hash:      {result.weights_hash[:16]}\n\n"
        f"train on them:\n  {train}"
    )
    document = {
        "weights": str(result.weights),
        "weights_hash": result.weights_hash,
        "best_val_accuracy": accuracy,
        "folder": str(result.folder),
        "train_command": train,
    }
    emit(args, text, document)
    return 0


def register(sub: argparse._SubParsersAction, base: RunConfig) -> None:
    """Add `finetune`; `base` is the config its flags apply to (see `base_config`)."""
    text = "fine-tune the backbone on the training split (stage -1) and print how to train on it"
    usage = "protoquant finetune [--config FILE.yaml] [--section.field VALUE ...] [--json] [-v | -q]"
    parser = command(sub, "finetune", text, epilog=EPILOG, usage=usage)
    add_json_flag(parser, "the weights path, its hash, the best val accuracy and the train command")
    add_config_flags(parser, base)
    parser.set_defaults(func=finetune)
