"""lmedit: knowledge editing of language models.

>>> import lmedit
>>> loaded = lmedit.load_model("gemma3-270m")
>>> patch = lmedit.edit(loaded, lmedit.EditRequest("The Eiffel Tower is located in the city of",
...                                                "Eiffel Tower", " Rome"), method="ft-m")
>>> with patch.applied(loaded.model):
...     print(lmedit.greedy_generate(loaded, ["The Eiffel Tower is located in the city of"]))
"""

from lmedit.api import edit
from lmedit.core.patch import EditPatch
from lmedit.errors import (
    ArchitectureError,
    ConfigError,
    EditFailedError,
    LmeditError,
    ModelLoadError,
    PatchError,
    RequestError,
)
from lmedit.evaluate.scoring import greedy_generate, score_pairs
from lmedit.models.arch import ArchSpec
from lmedit.models.load import LoadedModel, load_model
from lmedit.registry import list_methods
from lmedit.request import EditRequest
from lmedit.session import EditSession

__all__ = [
    "ArchSpec",
    "ArchitectureError",
    "ConfigError",
    "EditFailedError",
    "EditPatch",
    "EditRequest",
    "EditSession",
    "LmeditError",
    "LoadedModel",
    "ModelLoadError",
    "PatchError",
    "RequestError",
    "edit",
    "greedy_generate",
    "list_methods",
    "load_model",
    "score_pairs",
]
