"""Bundled data and dataset loaders."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any


def bundled_json(name: str) -> Any:
    """Load ``lmedit/data/bundled/<name>`` (shipped with the package)."""
    return json.loads(files("lmedit.data").joinpath("bundled", name).read_text())
