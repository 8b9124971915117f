"""The public names: every one in `__all__` resolves, and `import protoquant` loads no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import protoquant


def test_every_public_name_resolves() -> None:
    assert len(set(protoquant.__all__)) == len(protoquant.__all__)
    for name in protoquant.__all__:
        assert getattr(protoquant, name) is not None, name
        assert name in dir(protoquant), name
    assert set(protoquant.__all__) == set(protoquant._EXPORTS) | {"__version__"}


def test_version_and_type_marker() -> None:
    major, minor, patch = protoquant.__version__.split(".")
    assert all(part.isdigit() for part in (major, minor, patch))
    assert (Path(protoquant.__file__).parent / "py.typed").is_file()


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        protoquant.no_such_name  # noqa: B018


def test_import_loads_no_torch() -> None:
    """Checked in a fresh interpreter: this one has imported torch long ago."""
    code = "import sys, protoquant; protoquant.__all__, protoquant.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_names_are_the_objects_they_name() -> None:
    from protoquant.config import RunConfig
    from protoquant.model import ProtoQuant

    assert protoquant.ProtoQuant is ProtoQuant and protoquant.RunConfig is RunConfig
    assert callable(protoquant.ProtoQuant.from_pretrained) and callable(protoquant.run)
