"""Load `configs/FILE.py:ARG` config files (ml_collections `get_config(arg)`) and apply
command-line style overrides (`model.num_layers=4`, given as `--config.model.num_layers=4`)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os

import ml_collections


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads a Python config file's `get_config(arg)` and applies overrides.

    Args:
      spec: `path/to/file.py` or `path/to/file.py:arg` (`arg` is passed to `get_config`; without
        it `get_config()` runs with its default).
      overrides: `field.path=value` items (as `--config.field.path=value` on the command line);
        values are Python literals where they parse, else strings (default: none).

    Returns:
      The `ml_collections.ConfigDict`.

    Raises:
      FileNotFoundError: no file at `path`.
      AttributeError: the file has no `get_config`.
      ValueError: from `get_config` (an unknown variant), or an override without `=`.
      KeyError: an override naming a field the config does not have.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found (spec {spec!r}; expected FILE.py[:VARIANT])")
    name = "mi_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config(arg) function")
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        apply_override(config, item)
    return config


def split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The `--config.FIELD=VALUE` arguments of `rest` (what `parse_known_args` left) as
    `FIELD=VALUE`; any other leftover argument is a usage error of `parser`."""
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return [r[len("--config."):] for r in rest]


def parse_args(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, list[str]]:
    """`parser`'s arguments and the `--config.FIELD=VALUE` overrides after them (as `FIELD=VALUE`)."""
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(rest, parser)


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Sets one field of `config` in place.

    Args:
      config: the config to change.
      item: `a.b.c=value` (a leading `--` or `config.` is ignored); value parsed as a Python
        literal when possible, else kept as a string.

    Raises:
      ValueError: no `=` in `item`.
      KeyError: the config has no such field.
    """
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} must look like field.path=value")
    *parents, leaf = key.strip().lstrip("-").removeprefix("config.").split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"override {item!r}: the config has no field {key!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    with node.ignore_type():
        node[leaf] = value
