"""The errors protoquant raises for problems the user can fix (a bad value, file or folder).

Every one is a `ProtoQuantError`, itself a ValueError (so `except ValueError` keeps working), and
its message names the file, field or image and what was expected. The command line prints such an
error as one line `protoquant: error: ...`; anything else is reported as an internal error.
"""

from __future__ import annotations


class ProtoQuantError(ValueError):
    """A problem with the user's input: the message says what and where."""


class ConfigError(ProtoQuantError):
    """A config field (or a flag) has a value the run cannot use; the message names the field."""


class DataError(ProtoQuantError):
    """A dataset file (an image, an annotation file) is missing, unreadable or malformed."""


class CheckpointError(ProtoQuantError):
    """A checkpoint folder is incomplete or corrupt; the message names the file and the tensor or field."""


class CacheError(ProtoQuantError):
    """A feature cache folder is incomplete, stale or corrupt; the message names the folder or file."""


__all__ = ["CacheError", "CheckpointError", "ConfigError", "DataError", "ProtoQuantError"]
