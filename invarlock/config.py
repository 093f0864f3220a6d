"""Run configuration: load YAML files in the seed's shape, merge them in order, validate.

Later sources win: the files given with `-c/--preset` in order, then CLI flags. Unknown keys
and wrong types are `ConfigError`s (exit 2) that name the key, the source and, for a typo,
the nearest valid key.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from invarlock.config_schema import CONFIG_SCHEMA, NUMERIC_TEXT_BOUNDS
from invarlock.errors import ConfigError, InputError, nearest_hint
from invarlock.input_files import MiB, read_text

MAX_CONFIG_BYTES = 4 * MiB
MAX_DEPTH = 32          # sections nest three or four deep; more is not a config
MAX_VALUES = 100_000    # every value counted as often as aliases repeat it


def _numeric_text(validator: Any, bounds: dict[str, Any], instance: Any,
                  schema: Any) -> Iterator[ValidationError]:
    """A number written as text ("9e-4") meets the same type and range rules as one written
    as a number: it must be finite and within the bounds of its key."""
    if not isinstance(instance, str):
        return
    try:
        value = float(instance)
    except ValueError:
        return  # not numeric text: the pattern reports it
    if not math.isfinite(value):
        yield ValidationError(f"{instance!r} is not a finite number")
        return
    for error in validator.evolve(schema={"type": "number", **bounds}).iter_errors(value):
        yield ValidationError(f"{instance!r}: {error.message}")


_VALIDATOR = validators.extend(Draft202012Validator, {NUMERIC_TEXT_BOUNDS: _numeric_text})(
    CONFIG_SCHEMA)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading, plus YAML 1.2 floats: `9e-4` is a number, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    try:
        text = read_text(path, "config file", MAX_CONFIG_BYTES)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, "
                          f"got {type(data).__name__}")
    check_size(data, str(path))
    bad = next(nonfinite_numbers(data), None)
    if bad is not None:
        raise ConfigError(f"{path}: {bad[0]} is {bad[1]}; every number in a config must be "
                          "finite")
    return data


def check_size(data: Any, source: str) -> None:
    """Bound nesting and the number of values, counting a value once per alias that repeats
    it: a YAML alias bomb (a few lines naming each other a billion times) would otherwise
    take every later walk over the config (validation, merging) past any time limit."""
    todo, values = [(data, 1)], 0
    while todo:
        node, depth = todo.pop()
        values += 1
        if depth > MAX_DEPTH:
            raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels; a config "
                              "is not")
        if values > MAX_VALUES:
            raise ConfigError(f"{source}: expands to more than {MAX_VALUES:,} values "
                              "(aliases repeating aliases?); a config is far smaller")
        if isinstance(node, Mapping):
            todo.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)


def nonfinite_numbers(data: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every NaN or infinite number (YAML `.nan`, `.inf`) in `data`."""
    if isinstance(data, float) and not math.isfinite(data):
        yield where or "value", data
    elif isinstance(data, Mapping):
        for key, value in data.items():
            yield from nonfinite_numbers(value, f"{where}.{key}" if where else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from nonfinite_numbers(value, f"{where}[{i}]")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`; mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate(config: Mapping[str, Any], source: str = "config") -> None:
    """Check keys and types against the config schema; raise the first problem found."""
    errors = sorted(_VALIDATOR.iter_errors(dict(config)), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(f"{source}: {describe_error(errors[0])}")


def describe_error(error: ValidationError) -> str:
    """One human line for a schema violation, with the nearest key for unknown keys."""
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        key = unknown[0]
        full = f"{where}.{key}" if where else key
        return f"unknown key '{full}'{nearest_hint(key, allowed)}"
    if error.validator == "anyOf" and error.context:
        # the branch of the instance's own type explains the failure ("'-1': -1.0 is less
        # than the minimum of 0"), not "is not valid under any of the given schemas"
        typed = [e for e in error.context if e.validator != "type"]
        if typed and typed[0].validator == "pattern" and NUMERIC_TEXT_BOUNDS in typed[0].schema:
            return f"{where or 'value'} must be a finite number, got {error.instance!r}"
        if typed:
            return f"{where or 'value'}: {typed[0].message}"
    if error.validator == "enum":
        choices = ", ".join(repr(c) for c in error.validator_value)
        return f"{where or 'value'} must be one of {choices}, got {error.instance!r}"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where or 'value'} must be {expected}, got {error.instance!r}"
    return f"{where or 'value'}: {error.message}"


def merge_sources(sources: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Validate each (name, mapping) on its own, then merge them in order."""
    merged: dict[str, Any] = {}
    for name, data in sources:
        validate(data, name)
        merged = deep_merge(merged, data)
    validate(merged, "merged configuration")
    return merged


def get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """Look up `a.b.c` in nested mappings, or `default` when any part is missing or None."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return default
        node = node[part]
    return node


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` → `{'a.b': 1}`; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
