"""The argument parser every command shares: no abbreviations, snake_case flags, one error format.

Config flags come from the dataclasses through simple-parsing (`--section.field VALUE`, help text
and choices from each field's metadata); the few flags of their own that commands add follow the
same snake_case spelling, with the older kebab-case spelling kept as a hidden alias.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

import simple_parsing

PROG = "protoquant"
USAGE_ERROR = 2  # exit status of every user-input error (argparse's convention)
_ALIAS_KEYS = ("action", "type", "nargs", "choices", "metavar", "const")  # what an alias copies


class HelpFormatter(simple_parsing.SimpleHelpFormatter):
    """simple-parsing's layout; no "(default: ...)" on switches and unset options, '' shown as ''.

    A '%' in a field's help text is printed as it is (argparse would read it as a format).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = re.sub(r"%(?!\()", "%%", action.help or "")
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS
        if unset or not action.option_strings or "%(default)" in text:
            return text
        return text + (" (default: '')" if default == "" else " (default: %(default)s)")


class Parser(simple_parsing.ArgumentParser):
    """A parser (and the class of every subcommand parser) that never accepts abbreviated flags.

    Config dataclasses become `--section.field` flags (nested, without the root's name).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("nested_mode", simple_parsing.NestedMode.WITHOUT_ROOT)
        kwargs.setdefault("argument_generation_mode", simple_parsing.ArgumentGenerationMode.NESTED)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Usage line, then `protoquant: error: ...` on stderr; exit status 2."""
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-v/-q/--debug on `parser`; every parser has them, so they work before and after the subcommand."""
    group = parser.add_argument_group("output")
    for flags, value, text in (
        (("-v", "--verbose"), 1, "also log every epoch and step"),
        (("-q", "--quiet"), -1, "errors only: no progress bars, no warnings"),
    ):
        group.add_argument(
            *flags, dest="verbosity", action="store_const", const=value, default=argparse.SUPPRESS, help=text
        )
    group.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on failure, also print the traceback (errors are one line without it)",
    )


def command(sub: argparse._SubParsersAction, name: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser: `text` is its line in `protoquant --help` and its description."""
    kwargs.setdefault("description", text[0].upper() + text[1:] + ".")
    parser = sub.add_parser(name, help=text, **kwargs)
    add_verbosity(parser)
    parser.set_defaults(command_parser=parser)  # the innermost command's parser names unknown flags
    return parser


def reject_unknown(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """Exit naming the flags `parser` does not know, with the closest ones it does (status 2)."""
    known = [option for option in parser._option_string_actions if option.startswith("--")]
    hints = []
    for flag in (arg.partition("=")[0] for arg in extras if arg.startswith("--")):
        close = [k for k in known if k.startswith(flag)] or difflib.get_close_matches(flag, known, n=3)
        hints += [f"{flag}: did you mean {' or '.join(close[:3])}?"] if close else []
    parser.error(f"unrecognized arguments: {' '.join(extras)}" + "".join(f"; {hint}" for hint in hints))


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> argparse.Action:
    """Add `--name` (snake_case) and, when it has an underscore, the hidden alias `--kebab-name`."""
    action = parser.add_argument(f"--{name}", **kwargs)
    if "_" in name:
        alias = {key: kwargs[key] for key in _ALIAS_KEYS if key in kwargs}
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=action.dest,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            **alias,
        )
    return action


def add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """`--json`: print `what` as one JSON document on stdout, and nothing else there."""
    parser.add_argument(
        "--json", action="store_true", help=f"print {what} as one JSON document on stdout (nothing else)"
    )


def expand_lists(argv: list[str], list_flags: Iterable[str]) -> list[str]:
    """Comma lists of tuple flags as separate values: `--head.lr_grid 0.05,0.2` -> `0.05 0.2`.

    An empty value (`--head.lr_grid ""`) clears the tuple. Arguments after `--` stay as they are.
    """
    flags, out, i = set(list_flags), [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        name, equals, value = arg.partition("=")
        i += 1
        if name not in flags:
            out.append(arg)
            continue
        if not equals and i < len(argv) and not argv[i].startswith("--"):
            value, i = argv[i], i + 1
        out += [name, *(item.strip() for item in value.split(",") if item.strip())]
    return out
