"""The dependency floors that pyproject.toml declares are the versions requirements/oldest.txt pins,
the stack `make test-oldest` runs the suite on: a floor cannot move without the tested pin."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OLDEST = ROOT / "requirements" / "oldest.txt"


def _declared_floors() -> dict[str, Version]:
    """{name: lowest allowed version} of the runtime and test requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        requirement = Requirement(line)
        lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert lows, f"pyproject.toml: {requirement} has no '>=' floor"
        floors[canonicalize_name(requirement.name)] = max(lows)
    return floors


def _pins() -> dict[str, Version]:
    pins = {}
    for line in OLDEST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_floor_is_pinned_in_the_oldest_stack_at_that_version() -> None:
    floors, pins = _declared_floors(), _pins()
    assert floors.keys() == pins.keys()
    for name, floor in floors.items():
        # 1.24 is pinned as 1.24.x (a patch release of the floor), 2.4.0 as 2.4.0
        assert pins[name].release[: len(floor.release)] == floor.release, (name, floor, pins[name])
        assert pins[name] >= floor, (name, floor, pins[name])
