"""Exceptions raised by lmedit. Every message names what was wrong and how to fix it."""

from __future__ import annotations


class LmeditError(Exception):
    """Base class of all lmedit errors."""


class RequestError(LmeditError, ValueError):
    """An edit request is malformed (the message names the field)."""

    def __init__(self, field: str, message: str, index: int | None = None):
        where = f"request[{index}].{field}" if index is not None else field
        super().__init__(f"{where}: {message}")
        self.field = field
        self.index = index


class ConfigError(LmeditError, ValueError):
    """A method configuration value is unknown or out of range."""


class ArchitectureError(LmeditError, LookupError):
    """The model's architecture is not in the ArchSpec table, or a module path does not resolve."""


class ModelLoadError(LmeditError, OSError):
    """A model spec could not be resolved or loaded."""


class PatchError(LmeditError):
    """A patch is malformed, or does not match the model it is applied to."""


class EditFailedError(LmeditError, RuntimeError):
    """An edit was computed or applied but failed its checks; the model was restored bit for bit."""
