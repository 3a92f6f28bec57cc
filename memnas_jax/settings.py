"""Frozen settings from a config, checked once: `from_config(cls, config, where)` turns a
ConfigDict (or any mapping) section into the dataclass `cls`, with `ConfigError` naming
`where.field` for an unknown field or a value of the wrong type; `check_choice` and `check_int`
state the value checks the same way. Used by `train.TrainSettings` and `search.SearchSettings`."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Sequence, TypeVar

import ml_collections

from memnas_jax.errors import ConfigError

T = TypeVar("T")


def from_config(cls: type[T], config: Mapping[str, Any] | None, where: str,
                skip: Sequence[str] = (), **converted: Any) -> T:
    """`cls(**fields of config)`; missing fields keep their defaults, `skip`ped ones are not
    settings of `cls`, `converted` ones (sections, derived values) are given as they are."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping) and not hasattr(config, "items"):
        raise ConfigError(f"{where} is a {type(config).__name__}, not a config section")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in config.items():
        if name in skip or name in converted:
            continue
        if name not in hints:
            raise ConfigError(f"{where}.{name} is not a setting; the settings are "
                              f"{sorted(hints)}")
        values[name] = _typed(value, hints[name], f"{where}.{name}")
    return cls(**values, **converted)


def _typed(value: Any, hint: Any, name: str) -> Any:
    if typing.get_origin(hint) is tuple:
        element = typing.get_args(hint)[0]
        what = getattr(element, "__name__", "value")
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{name} must be a sequence of {what}s, got {value!r}")
        items = tuple(value)
        if element in _CHECKS and not all(_CHECKS[element](v) for v in items):
            raise ConfigError(f"{name} must be a sequence of {what}s, got {value!r}")
        return items
    if hint not in _CHECKS:  # a section or a derived value: checked by its owner
        return value
    if not _CHECKS[hint](value):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


_CHECKS = {bool: lambda v: isinstance(v, bool),
           int: lambda v: isinstance(v, int) and not isinstance(v, bool),
           float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           str: lambda v: isinstance(v, str)}


def to_config(settings: Any) -> ml_collections.ConfigDict:
    """The ConfigDict of a settings dataclass (its defaults, for a `default_config`)."""
    return ml_collections.ConfigDict(dataclasses.asdict(settings))


def check_choice(value: Any, allowed: Sequence[Any], name: str) -> None:
    """ConfigError unless `value` is one of `allowed`; name: the field, e.g. "config.seed"."""
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of {tuple(allowed)}")


def check_int(value: Any, name: str, minimum: int) -> None:
    """ConfigError unless `value` is an integer >= `minimum`."""
    if not _CHECKS[int](value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


__all__ = ["check_choice", "check_int", "from_config", "to_config"]
