"""How a failed command ends: one line on stderr and an exit status, a traceback only with --debug.

User-caused problems (a bad value, file, folder, image or checkpoint) end with
`protoquant: error: <what and where>` and status 2; anything else is a bug, reported as
`protoquant: internal error: <Type>: <message> (rerun with --debug for the traceback)`, status 1.
"""

from __future__ import annotations

import json
import re
import sys
import traceback

from protoquant.cli.parsing import PROG, USAGE_ERROR

INTERNAL_ERROR = 1  # exit status of a failure that is not the user's
WORKER_TRACEBACK = "Original Traceback (most recent call last):"  # torch DataLoader worker errors
SHAPE_MISMATCH = (  # torch RuntimeError texts of tensors that do not fit each other (the input's fault)
    "shape mismatch",
    "size mismatch",
    "shapes cannot be multiplied",
    "must match the size",
    "Error(s) in loading state_dict",
)
QUALIFIED_TYPE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")  # "module.Type: " prefix


def _optional_types() -> tuple[type, ...]:
    """The error types of the file-format libraries (YAML, safetensors) that bad files raise."""
    found: list[type] = []
    try:
        import yaml

        found.append(yaml.YAMLError)
    except ImportError:
        pass
    try:
        from safetensors import SafetensorError

        found.append(SafetensorError)
    except ImportError:
        pass
    return tuple(found)


def one_line(text: str) -> str:
    """`text` on one line (inner line breaks become spaces)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def message(error: BaseException) -> str:
    """The error's own message; for a DataLoader worker's error only its original final line."""
    text = str(error)
    if WORKER_TRACEBACK in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return QUALIFIED_TYPE.sub("", lines[-1])
    if isinstance(error, KeyError) and error.args:
        text = f"missing key {error.args[0]!r}"
    return one_line(text) or type(error).__name__


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (see the module docstring)."""
    user = (ValueError, OSError, KeyError, json.JSONDecodeError, *_optional_types())
    if isinstance(error, user):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in SHAPE_MISMATCH)


def report(error: BaseException, *, debug: bool) -> int:
    """Print the failure (its traceback first with `debug`) and return the exit status."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    if is_user_error(error):
        print(f"{PROG}: error: {message(error)}", file=sys.stderr)
        return USAGE_ERROR
    print(
        f"{PROG}: internal error: {type(error).__name__}: {message(error)} "
        "(rerun with --debug for the traceback)",
        file=sys.stderr,
    )
    return INTERNAL_ERROR


def debug_requested(argv: list[str]) -> bool:
    """Whether `--debug` appears among the flags (before any `--`), wherever it stands."""
    flags = argv[: argv.index("--")] if "--" in argv else argv
    return "--debug" in flags
