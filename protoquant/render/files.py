"""Report files are written whole: into a temporary file beside the target, then renamed.

A failure while drawing or encoding leaves the previous file (or none), never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (same-folder temporary file + `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
