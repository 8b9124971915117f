"""What commands print: a human-readable text by default, one JSON document with `--json`.

In JSON mode stdout holds the document and nothing else (logs and progress bars go to stderr),
and the document is strict JSON: NaN and infinities become null.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """`value` as JSON types: mappings, lists, str, int, float (finite) and None.

    Paths become strings; numpy / torch scalars and arrays their Python values.
    """
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch values
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value: Any) -> str:
    """Strict JSON text of `value` (raises ValueError if anything is left that JSON cannot hold)."""
    return json.dumps(plain(value), indent=2, allow_nan=False)


def emit(args: argparse.Namespace, text: str, document: Any) -> None:
    """Print `document` as JSON when `--json` was given, else `text`."""
    print(to_json(document) if getattr(args, "json", False) else text)
