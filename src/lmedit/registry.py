"""The method registry: methods register where they are defined; CLI, docs and tests discover them here.

    >>> @register_method("ft-m", FTConfig, family="fine-tuning", presets={...})
    ... def edit_ft_m(loaded, requests, config) -> EditPatch: ...
    >>> list_methods()
    ['ft-l', 'ft-m', ...]

Third-party methods register through the ``lmedit.methods`` entry-point group.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from lmedit.config import MethodConfig
from lmedit.errors import ConfigError

BUILTIN_MODULES = (
    "lmedit.methods.ft",
    "lmedit.methods.kn",
    "lmedit.methods.rome",
    "lmedit.methods.memit",
    "lmedit.methods.alphaedit",
    "lmedit.methods.emmet",
    "lmedit.methods.pmet",
    "lmedit.methods.grace",
    "lmedit.methods.wise",
    "lmedit.methods.tpatcher",
    "lmedit.methods.lora",
    "lmedit.methods.ike",
)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable
    config_cls: type[MethodConfig]
    family: str
    summary: str
    presets: dict = field(default_factory=dict)


_REGISTRY: dict[str, MethodInfo] = {}
_loaded = False


def register_method(name: str, config_cls: type[MethodConfig], family: str, presets: dict | None = None):
    """Decorator registering ``fn(loaded, requests, config) -> EditPatch`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = MethodInfo(name, fn, config_cls, family, doc[0] if doc else "", presets or {})
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for ep in entry_points(group="lmedit.methods"):
        ep.load()


def get_method(name: str) -> MethodInfo:
    _load_all()
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_methods() -> list[str]:
    """Names of all registered editing methods."""
    _load_all()
    return sorted(_REGISTRY)
