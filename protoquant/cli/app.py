"""`main`: parse, set the verbosity, run one subcommand; every failure ends as one line on stderr.

User-caused problems exit with status 2, internal errors with 1, Ctrl-C with 130 (see
`protoquant.cli.failures`); `--debug`, before or after COMMAND, also prints the traceback.
"""

from __future__ import annotations

import sys

import protoquant.cli.checkpoint_commands as checkpoint_commands
import protoquant.cli.data_commands as data_commands
import protoquant.cli.edit_commands as edit_commands
import protoquant.cli.finetune_commands as finetune_commands
import protoquant.cli.image_commands as image_commands
import protoquant.cli.run_commands as run_commands
from protoquant import __version__
from protoquant.cli.config_flags import base_config, list_flags
from protoquant.cli.failures import debug_requested, report
from protoquant.cli.parsing import PROG, Parser, add_verbosity, expand_lists, reject_unknown

INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), the shell's convention
DESCRIPTION = """Interpretable image classification with quantized prototypical parts.

`protoquant COMMAND --help` lists a command's flags; -v / -q / --debug work before or after COMMAND."""


def _command(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (global flags before it take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> Parser:
    """The whole command line; `argv` decides the config that `train` / `demo` flags start from.

    Raises:
        ConfigError: `--config FILE.yaml` cannot be read or has a bad field.
    """
    argv = list(argv or [])
    parser = Parser(prog=PROG, description=DESCRIPTION)
    add_verbosity(parser)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    base = base_config(_command(argv), argv)
    run_commands.register(sub, base)
    finetune_commands.register(sub, base)
    checkpoint_commands.register(sub)
    edit_commands.register(sub)
    image_commands.register(sub)
    data_commands.register(sub)
    return parser


def _run(argv: list[str]) -> int:
    """Parse `argv` and run its command; failures (and the SystemExit of --help) propagate to `main`."""
    args, extras = build_parser(argv).parse_known_args(expand_lists(argv, list_flags()))
    if extras:
        reject_unknown(args.command_parser, extras)
    from protoquant import progress

    progress.configure(getattr(args, "verbosity", progress.NORMAL))
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except SystemExit as done:  # --help, --version, or a flag error already printed
        return done.code if isinstance(done.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:  # the one boundary: every failure ends as one line (see failures)
        return report(error, debug=debug_requested(argv))
