"""Typed method configs and their one loader.

Precedence: the dataclass defaults < the method's preset for the model (by bundled name, then
``config.model_type``) < the caller's overrides. Every field carries help text in its metadata; unknown keys
and out-of-range values raise ConfigError naming the field.

    >>> cfg = build_config(FTConfig, loaded, {"lr": 1e-3})
    >>> describe(FTConfig)          # one line per hyperparameter, for --help and the docs
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from lmedit.errors import ConfigError


def hp(default: Any, help: str, **kw: Any) -> Any:
    """A config field with help text (``default`` may be a list; it is copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class MethodConfig:
    """Fields every method has."""

    seed: int = hp(0, "Seed for every random choice the method makes (results are deterministic given it).")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Override to check ranges; raise ConfigError naming the field."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _accepts(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_accepts(inner, v) for v in value)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _coerce(tp: Any, value: Any) -> Any:
    """Turn CLI strings ("5", "[3,4]", "3,4", "true", "None"/"null") and bare scalars into what ``tp`` accepts."""
    candidates = [value]
    if isinstance(value, str) and value.strip() in ("None", "none") and _accepts(tp, None):
        return None  # Python's spelling of JSON's null, as the hyperparameter docs write it
    if isinstance(value, str):
        for parse in (json.loads, lambda s: [json.loads(v) for v in s.split(",")]):
            try:
                candidates.append(parse(value))
            except ValueError:
                pass
    # every candidate as it is before any candidate wrapped in a list: a JSON list given for a list[str]
    # field is that list, not a one-element list holding the JSON text
    options = [*candidates, *([c] for c in candidates)]
    options += [float(c) for c in candidates if isinstance(c, int) and not isinstance(c, bool)]
    for option in options:
        if _accepts(tp, option):
            return option
    return value


def build_config(
    cls: type[MethodConfig], presets: dict | None = None, overrides: dict | None = None, model_keys=()
):
    """Merge defaults < preset (first of ``model_keys`` found in ``presets``) < overrides; validate."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key in model_keys:
        if presets and key in presets:
            values.update(presets[key])
            break
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in names:
            raise ConfigError(f"unknown {cls.__name__} field {key!r}; known: {sorted(names)}")
        values[key] = value
    for key, value in list(values.items()):
        value = _coerce(hints[key], value)
        if not _accepts(hints[key], value):
            raise ConfigError(f"{cls.__name__}.{key} must be {hints[key]}, got {value!r}")
        values[key] = value
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def describe(cls: type[MethodConfig]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field of a config class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        tp = hints[f.name]
        out.append(
            (
                f.name,
                getattr(tp, "__name__", str(tp)).replace("typing.", ""),
                default,
                f.metadata.get("help", ""),
            )
        )
    return out
