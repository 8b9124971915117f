"""Config flags of `train` and `demo`: `--config FILE.yaml`, then `--section.field VALUE` on top.

The flags come from the config dataclasses (simple-parsing reads each field's type, default, help
text and choices); the defaults they show are the ones the command will use, i.e. the YAML file's
when `--config` is given. Values are checked while the dataclasses are built, before any work.
"""

from __future__ import annotations

import argparse
import typing

from protoquant.cli.parsing import add_flag
from protoquant.config import RunConfig, flat_fields, leaf_fields, load_yaml, to_dict
from protoquant.knobs import choices_of
from protoquant.presets import demo_config

CONFIG_DEST = "run"  # the parsed RunConfig is `args.run`
EPILOG = """\
Flags override --config FILE.yaml, which overrides the command's defaults.
Tuple fields take a comma list (--head.temperature_grid 0.05,0.1; "" for none);
booleans take true / false. --print_config shows the result without running."""


def base_config(command: str | None, argv: list[str]) -> RunConfig:
    """What the flags of `command` apply to: `--config FILE.yaml` if given, else its own defaults.

    Raises:
        ConfigError: the YAML file cannot be read or has a bad field (the message names both).
    """
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    early.add_argument("--out")
    known, _ = early.parse_known_args(argv)
    if known.config:
        return load_yaml(known.config)
    if command == "demo":
        return demo_config(known.out) if known.out else demo_config()
    return RunConfig()


def list_flags() -> list[str]:
    """The `--section.field` flags of tuple fields (they take comma lists)."""
    return [f"--{name}" for name, hint in flat_fields().items() if typing.get_origin(hint) is tuple]


def add_config_flags(parser: argparse.ArgumentParser, base: RunConfig) -> None:
    """`--config`, `--print_config`, `--help_config` and one `--section.field` flag per config field."""
    group = parser.add_argument_group("config file")
    group.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE.yaml",
        help="YAML file with any RunConfig fields (the flags below override it; their defaults are its values)",
    )
    add_flag(group, "print_config", action="store_true", help="print the resolved config as YAML and exit")
    add_flag(group, "help_config", action="store_true", help="list every config flag, one a line, and exit")
    parser.add_arguments(RunConfig, dest=CONFIG_DEST, default=base)


def config_lines(config: RunConfig) -> list[str]:
    """One line per config flag: name, type, current value, accepted choices and the help text."""
    values, hints = flat_values(to_dict(config)), flat_fields()
    lines = []
    for name, spec in leaf_fields().items():
        hint, choices = hints[name], choices_of(hints[name])
        kind = "list" if typing.get_origin(hint) is tuple else "str" if choices else hint.__name__
        accepts = f" {{{','.join(map(str, choices))}}}" if choices else ""
        lines.append(
            f"  --{name:<34} {kind:<5} {values[name]!r:<26}{accepts}  {spec.metadata.get('help', '')}"
        )
    return lines


def flat_values(data: dict, prefix: str = "") -> dict[str, object]:
    """A nested config dict as {'section.field': value}."""
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_values(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
