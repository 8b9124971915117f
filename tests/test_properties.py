"""Property tests: random configs, annotation files and image bytes only ever give documented errors.

Whatever a user writes into a config or a dataset file, the library either accepts it or raises a
ValueError (ConfigError / DataError) naming the field or the file: never an IndexError, a
TypeError or a traceback from deep inside.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protoquant.cli import main
from protoquant.config import RunConfig, flat_fields, from_dict
from protoquant.data.cars import read_annotations
from protoquant.data.cub import read_cub
from protoquant.data.image_folder import read_split_file
from protoquant.data.images import open_rgb
from tests.data.layouts import CARS_TRAIN, cars_struct, write_cub

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FIELDS = sorted(flat_fields())
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    # no subnormals: on torch 2.4-2.5 a CPU torch.compile (tests/test_head_fast.py) turns on
    # flush-to-zero for the whole process, and hypothesis refuses to draw them then
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
    st.sampled_from([0, 1, -1, 0.5, 1e30, "", "nan", "inf", "-3", "1,2", "kmeans", "float16", "true"]),
    st.text(max_size=12),
)
VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2)
)


def _paths(data: object, prefix: str = "") -> list[str]:
    """Every dotted key path in a nested dict."""
    if not isinstance(data, dict):
        return []
    out = []
    for key, value in data.items():
        out += [f"{prefix}{key}", *_paths(value, f"{prefix}{key}.")]
    return out


@st.composite
def config_dicts(draw) -> dict:
    """A nested dict mostly of real field names (some misspelt or foreign) with random values."""
    data: dict = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        *sections, leaf = name.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node.get(section, {}), dict) else node
        node[leaf] = draw(VALUES)
    if draw(st.booleans()):
        data[draw(st.text(max_size=6))] = draw(VALUES)  # an unknown or a section-level key
    return data


@SETTINGS
@given(config_dicts())
def test_random_config_dicts_are_accepted_or_refused_naming_a_field(data) -> None:
    try:
        config = from_dict(RunConfig, data)
    except ValueError as err:
        text = str(err)
        assert text.startswith(("config field", "unknown config field", "config section", "config has both"))
        assert any(path in text for path in _paths(data)), text
        return
    assert isinstance(config, RunConfig)
    for value in _leaves(config):
        assert not (isinstance(value, float) and not math.isfinite(value))


def _leaves(config: RunConfig) -> list:
    out = []
    for name in FIELDS:
        node = config
        for part in name.split("."):
            node = getattr(node, part)
        out += list(node) if isinstance(node, tuple) else [node]
    return out


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.text(max_size=10)), max_size=3))
def test_random_flags_exit_0_or_with_one_error_line(flags) -> None:
    argv = ["train", "--print_config"]
    for name, value in flags:
        argv += [f"--{name}", value] if not value.startswith("-") else [f"--{name}={value}"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    assert status in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue()
    if status == 2:
        assert "protoquant: error:" in err.getvalue()


def _refused_naming(call, path: Path) -> None:
    """`call()` succeeds or raises a ValueError (DataError) / FileNotFoundError naming `path`."""
    try:
        call()
    except (ValueError, FileNotFoundError) as err:
        assert str(path) in str(err), str(err)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_as_an_image_give_a_data_error_naming_the_file(content) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.png"
        path.write_bytes(content)
        _refused_naming(lambda: open_rgb(path), path)


@pytest.fixture(scope="module")
def cub_folder(tmp_path_factory) -> Path:
    return write_cub(tmp_path_factory.mktemp("cub"))


LINES = st.lists(
    st.one_of(
        st.text(alphabet=" 0123456789.-e\t", max_size=20),
        st.text(max_size=20),
        st.sampled_from(["1 1", "1 1 1 1 1", "8 1", "1 0 0 0", "1 1 1 10 0 0 1 x"]),
    ),
    max_size=6,
)
CUB_FILES = (
    "images.txt",
    "classes.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "parts/parts.txt",
    "parts/part_locs.txt",
)


@SETTINGS
@given(st.sampled_from(CUB_FILES), st.one_of(LINES.map("\n".join).map(str.encode), st.binary(max_size=60)))
def test_random_cub_annotation_files_give_an_error_naming_a_file(cub_folder, name, content) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(shutil.copytree(cub_folder, Path(folder) / "CUB_200_2011", ignore=_images))
        (root / name).write_bytes(content)
        _refused_naming(lambda: read_cub(root), root)  # the file itself, or one it contradicts


def _images(folder: str, names: list[str]) -> list[str]:
    return ["images"] if "images" in names else []


def _split_file(content: bytes) -> tuple[Path, Path]:
    root = Path(tempfile.mkdtemp())
    (root / "cat").mkdir()
    (root / "cat" / "1.png").write_bytes(b"")
    (root / "split.txt").write_bytes(content)
    return root, root / "split.txt"


@SETTINGS
@given(LINES.map("\n".join).map(str.encode))
def test_random_split_files_give_an_error_naming_the_file(content) -> None:
    root, path = _split_file(content)
    try:
        _refused_naming(lambda: read_split_file(path, root, ["cat"]), path)
    finally:
        shutil.rmtree(root)


def test_a_split_file_that_is_not_utf8_is_named() -> None:
    root, path = _split_file(b"\x80 train\n")
    try:
        _refused_naming(lambda: read_split_file(path, root, ["cat"]), path)
    finally:
        shutil.rmtree(root)


ANNOTATION_VALUES = st.one_of(  # infinite / huge numbers: see the test below
    st.integers(-5, 300),
    st.floats(min_value=-1e6, max_value=1e6, allow_subnormal=False) | st.just(math.nan),  # see SCALARS
    st.text(max_size=4),
    st.just(None),
    st.just([]),
)


@st.composite
def cars_annotations(draw) -> dict:
    """A cars_train_annos.mat dict: the real struct with one field of one record replaced, or junk."""
    kind = draw(st.sampled_from(["struct", "array", "missing"]))
    if kind == "array":
        return {"annotations": np.asarray(draw(st.lists(st.integers(-3, 3), max_size=4)))}
    if kind == "missing":
        return {"other": np.zeros(2)}
    records = cars_struct(CARS_TRAIN)
    field = draw(st.sampled_from(records.dtype.names))
    value = draw(ANNOTATION_VALUES)
    records[0, draw(st.integers(0, len(CARS_TRAIN) - 1))][field] = np.array(
        [[value]] if value is not None else [], dtype=object
    )
    return {"annotations": records}


@SETTINGS
@given(st.one_of(cars_annotations(), st.binary(max_size=80)))
def test_random_cars_annotation_files_give_an_error_naming_the_file(content) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cars_train_annos.mat"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            scipy.io.savemat(path, content)
        _refused_naming(lambda: read_annotations(path, 3), path)


def test_an_infinite_cars_box_is_named(tmp_path) -> None:
    records = cars_struct(CARS_TRAIN)
    records[0, 0]["bbox_x2"] = np.array([[math.inf]], dtype=object)
    path = tmp_path / "cars_train_annos.mat"
    scipy.io.savemat(path, {"annotations": records})
    _refused_naming(lambda: read_annotations(path, 3), path)
