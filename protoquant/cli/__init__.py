"""Command line: thin subcommands, each calling one library function.

Flags are snake_case everywhere. `train` and `demo` take every config field as a
`--section.field VALUE` flag (e.g. `--codebook.num_prototypes 512`, help text and choices from
the config dataclasses), applied on top of `--config FILE.yaml` when given. Output is text for
people by default and one JSON document with `--json`. Nothing heavy (torch) is imported until
a command runs, so `--help` stays fast.
"""

from protoquant.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
