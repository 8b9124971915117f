"""Config: dict/YAML round trips, unknown fields, override coercion, flat field list."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from protoquant.config import (
    BackboneConfig,
    CodebookConfig,
    HeadConfig,
    RunConfig,
    flat_fields,
    from_dict,
    leaf_fields,
    load_yaml,
    save_yaml,
    to_dict,
    with_overrides,
)
from protoquant.errors import ConfigError
from protoquant.knobs import choices_of


def _custom() -> RunConfig:
    return RunConfig(
        backbone=BackboneConfig(name="timm/test_vit", weights="none", image_size=64, crop_ratio=0.875),
        codebook=CodebookConfig(num_prototypes=32, init="orthogonal", lr=5e-4),
        head=HeadConfig(temperature_grid=(0.05, 0.1), lr_grid=(0.05,), top_k_per_class=3),
        seed=7,
        out="runs/x",
    )


@pytest.mark.parametrize("config", [RunConfig(), _custom()], ids=["default", "custom"])
def test_yaml_round_trip(config, tmp_path) -> None:
    path = tmp_path / "config.yaml"
    save_yaml(config, path)
    assert load_yaml(path) == config


def test_dict_round_trip_and_plain_types() -> None:
    config = _custom()
    data = to_dict(config)
    assert data["head"]["temperature_grid"] == [0.05, 0.1]  # tuples become lists
    assert data["codebook"]["num_prototypes"] == 32
    assert from_dict(RunConfig, data) == config
    assert isinstance(from_dict(RunConfig, data).head.temperature_grid, tuple)


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().seed = 1  # type: ignore[misc]


def test_missing_sections_keep_their_defaults(tmp_path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text("codebook:\n  num_prototypes: 64\nseed: 3\n")
    config = load_yaml(path)
    assert config.codebook.num_prototypes == 64 and config.seed == 3
    assert config.codebook.lr == CodebookConfig().lr and config.head == HeadConfig()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == RunConfig()


@pytest.mark.parametrize(
    ("data", "name"),
    [
        ({"codebook": {"num_code": 5}}, "codebook.num_code"),
        ({"seeed": 1}, "seeed"),
        ({"headd": {}}, "headd"),
    ],
)
def test_unknown_field_raises_naming_it(data, name) -> None:
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        from_dict(RunConfig, data)


def test_unknown_field_in_yaml_names_the_file_and_field(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("head:\n  temprature: 0.1\n")
    with pytest.raises(ValueError) as error:
        load_yaml(path)
    assert str(path) in str(error.value) and "head.temprature" in str(error.value)


def test_bad_value_raises_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"codebook\.num_prototypes"):
        from_dict(RunConfig, {"codebook": {"num_prototypes": "many"}})
    with pytest.raises(ValueError, match=r"codebook\.num_prototypes"):
        from_dict(RunConfig, {"codebook": {"num_prototypes": 2.5}})
    with pytest.raises(ValueError, match=r"cache\.autocast_bf16"):
        from_dict(RunConfig, {"cache": {"autocast_bf16": "maybe"}})
    with pytest.raises(ValueError, match="codebook"):
        from_dict(RunConfig, {"codebook": 5})


def test_unreadable_yaml_names_the_file(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("head: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_yaml(path)
    with pytest.raises(ValueError, match="missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")


def test_with_overrides_coerces_strings_to_field_types() -> None:
    config = with_overrides(
        RunConfig(),
        {
            "codebook.num_prototypes": "256",
            "head.temperature_grid": "0.05,0.1",
            "cache.autocast_bf16": "true",
            "codebook.lr": "5e-4",
            "backbone.name": "timm/test_vit",
            "seed": "3",
        },
    )
    assert config.codebook.num_prototypes == 256 and isinstance(config.codebook.num_prototypes, int)
    assert config.head.temperature_grid == (0.05, 0.1)
    assert all(isinstance(t, float) for t in config.head.temperature_grid)
    assert config.cache.autocast_bf16 is True
    assert config.codebook.lr == 5e-4
    assert config.backbone.name == "timm/test_vit" and config.seed == 3
    # everything else untouched
    assert config.head.temperature == HeadConfig().temperature and config.data == RunConfig().data


@pytest.mark.parametrize(("text", "value"), [("false", False), ("0", False), ("yes", True), ("On", True)])
def test_with_overrides_bool_spellings(text, value) -> None:
    assert with_overrides(RunConfig(), {"backbone.download": text}).backbone.download is value


def test_with_overrides_single_value_tuple() -> None:
    assert with_overrides(RunConfig(), {"head.lr_grid": "0.2"}).head.lr_grid == (0.2,)


@pytest.mark.parametrize("key", ["codebook.num_code", "codebok.num_prototypes", "nothing"])
def test_with_overrides_unknown_key_raises_naming_it(key) -> None:
    with pytest.raises(ValueError, match=key.split(".")[0]):
        with_overrides(RunConfig(), {key: "1"})


def test_flat_fields_lists_every_leaf_with_its_type() -> None:
    fields = flat_fields()
    assert fields["codebook.num_prototypes"] is int
    assert fields["head.temperature"] is float
    assert fields["cache.autocast_bf16"] is bool
    assert fields["seed"] is int and fields["out"] is str
    assert "codebook" not in fields and "head" not in fields
    defaults = RunConfig()
    sections = [getattr(defaults, f.name) for f in dataclasses.fields(RunConfig)]
    expected = sum(len(dataclasses.fields(s)) if dataclasses.is_dataclass(s) else 1 for s in sections)
    assert len(fields) == expected
    # every flat field can be set by name from its string form (as the CLI does)
    for name in fields:
        assert with_overrides(defaults, {name: _string_default(name)}) == defaults


def _string_default(name: str) -> str:
    value = to_dict(RunConfig())
    for part in name.split("."):
        value = value[part]
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def test_leaf_fields_carry_help_and_no_empty_metadata() -> None:
    fields = leaf_fields()
    assert fields.keys() == flat_fields().keys()
    for name, spec in fields.items():
        assert spec.metadata["help"], name
        assert None not in spec.metadata.values(), name  # absent, not None: simple-parsing reads them


def test_help_states_the_bounds_that_are_checked() -> None:
    fields = leaf_fields()
    assert fields["codebook.num_prototypes"].metadata["help"].endswith("(>= 1)")
    assert fields["codebook.cutmix_prob"].metadata["help"].endswith("(in [0, 1])")
    assert fields["head.temperature_grid"].metadata["help"].endswith("(comma list, each > 0)")
    assert fields["seed"].metadata["help"].endswith("shuffling (in [0, 4294967295])")
    assert fields["out"].metadata["help"] == "output folder (checkpoint, metrics.json, figures, report)"


BOUNDED = sorted(n for n, s in leaf_fields().items() if {"minimum", "maximum", "above"} & set(s.metadata))
CHOICE_FIELDS = sorted(n for n, hint in flat_fields().items() if choices_of(hint))
UNBOUNDED_NUMBERS = {  # int / float fields that accept any finite value, and why
    "head.weight_init_mean": "the mean of the weights before the ReLU: any real number",
    "backbone.mean": "normalisation means: any real number per channel",
}


def _numeric(name: str) -> tuple[type, bool]:
    """(item type, is a tuple field) of a numeric field."""
    hint = flat_fields()[name]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def _set(name: str, value: object) -> RunConfig:
    return with_overrides(RunConfig(), {name: _as_field(name, value)})


def _as_field(name: str, value: object) -> object:
    """`value` as the field takes it: float tuples (mean / std) get 3 equal values, int tuples
    (backbone.stages) 3 distinct ones starting at `value`."""
    item_type, is_tuple = _numeric(name)
    if not is_tuple:
        return value
    return tuple(value + i for i in range(3)) if item_type is int else (value,) * 3


def _outside_and_edges(name: str) -> tuple[list, list]:
    """Values just outside the declared bounds, and the bounds (or just inside an open one)."""
    meta, (item_type, _) = leaf_fields()[name].metadata, _numeric(name)
    step = (lambda v, d: v + d) if item_type is int else (lambda v, d: math.nextafter(v, d * math.inf))
    outside, edges = [], []
    if "minimum" in meta:
        outside, edges = [step(meta["minimum"], -1)], [meta["minimum"]]
    if "above" in meta:
        outside, edges = [meta["above"]], [step(meta["above"], 1)]
    if "maximum" in meta:
        outside, edges = [*outside, step(meta["maximum"], 1)], [*edges, meta["maximum"]]
    return [item_type(v) for v in outside], [item_type(v) for v in edges]


@pytest.mark.parametrize("name", BOUNDED)
def test_every_declared_bound_is_enforced_and_the_bound_itself_accepted(name) -> None:
    outside, edges = _outside_and_edges(name)
    assert outside and edges
    for value in outside:
        with pytest.raises(ConfigError, match=rf"'{re.escape(name)}'"):
            _set(name, value)
    for value in edges:
        assert _get(_set(name, value), name) == _as_field(name, value), name


def _get(config: RunConfig, name: str) -> object:
    section, _, leaf = name.rpartition(".")
    return getattr(getattr(config, section) if section else config, leaf)


@pytest.mark.parametrize("name", CHOICE_FIELDS)
def test_every_choice_is_accepted_and_others_refused(name) -> None:
    choices = choices_of(flat_fields()[name])
    for choice in choices:
        assert _get(with_overrides(RunConfig(), {name: choice}), name) == choice
    for wrong in ("nope", choices[-1].upper() + "x", 3):
        with pytest.raises(ConfigError, match=rf"'{re.escape(name)}'"):
            with_overrides(RunConfig(), {name: wrong})


def test_choice_fields_are_typed_as_literals() -> None:
    assert {"backbone.interpolation", "codebook.init", "head.scores_dtype"} <= set(CHOICE_FIELDS)
    assert choices_of(flat_fields()["codebook.init"]) == ("kmeans", "orthogonal")


def test_every_number_field_declares_a_bound_or_is_allowed_unbounded() -> None:
    numbers = {n for n in flat_fields() if _numeric(n)[0] in (int, float)}
    unbounded = numbers - set(BOUNDED)
    assert unbounded == set(UNBOUNDED_NUMBERS), sorted(unbounded ^ set(UNBOUNDED_NUMBERS))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_even_without_bounds(value) -> None:
    for name in ("head.weight_init_mean", "head.lr", "codebook.warmup_epochs"):
        with pytest.raises(ConfigError, match=re.escape(name)):
            with_overrides(RunConfig(), {name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("seed", True), ("seed", None), ("codebook.init", None), ("head.lr_grid", {"a": 1}), ("out", [1])],
)
def test_wrong_types_are_refused_not_converted(name, value) -> None:
    with pytest.raises(ConfigError, match=re.escape(name)):
        with_overrides(RunConfig(), {name: value})


def test_mean_and_std_take_three_values_or_none() -> None:
    assert BackboneConfig(mean=(0.5, 0.5, 0.5)).mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match=r"backbone\.std"):
        BackboneConfig(std=(0.2, 0.2))


def test_non_string_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown config field.*1"):
        from_dict(RunConfig, {1: 2, "seed": 0})
