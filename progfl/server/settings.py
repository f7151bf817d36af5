"""KEY=VALUE settings (`--pace`, `--option`, Flower's JSON run config) read into a declared dataclass.

Each group of settings is a dataclass whose fields are its keys, with their types and defaults (PaceConfig, each
plan's Options). A value is converted by its field's type, so an unknown key or a value of the wrong type is
refused before any work starts, with the known keys listed; a string from the command line and a typed value from
a JSON config are read the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class SettingsError(ValueError):
    """An unknown key or a value that does not fit its declared type."""


def known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def parse_settings(cls: type[T], values: Mapping[str, Any], what: str) -> T:
    """`cls(**values)` with every value converted to its field's type; SettingsError names the bad key."""
    hints = typing.get_type_hints(cls)
    keys = known_keys(cls)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        known = ", ".join(keys) if keys else "none"
        raise SettingsError(f"{what}: unknown key {unknown[0]!r} (known keys: {known})")
    kwargs = {k: _convert(v, hints[k], f"{what} {k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the dataclass's own range checks
        raise SettingsError(f"{what}: {e}") from None


def given(settings: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a user gave, with their converted values: what a run's config records (defaults stay implicit)."""
    return {k: getattr(settings, k) for k in values}


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, where)
            except SettingsError as e:
                errors.append(str(e))
        raise SettingsError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise SettingsError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise SettingsError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise SettingsError(f"{where} must be an integer, got {value!r}") from None
    if hint is float:
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float(str(value))
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise SettingsError(f"{where} must be a finite number, got {value!r}")
        return number
    if hint is str:
        return str(value)
    if origin is dict or hint is dict:  # a nested group (the Flower run config's pace and options): checked later
        if isinstance(value, dict):
            return value
        raise SettingsError(f"{where} must be a table of KEY=VALUE, got {value!r}")
    raise TypeError(f"{where}: settings of type {hint} are not supported")
