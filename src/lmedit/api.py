"""``edit``: compute an EditPatch with any registered method, leaving the model untouched."""

from __future__ import annotations

import logging
from typing import Any

from lmedit.config import build_config
from lmedit.core.forward import frozen, seeded
from lmedit.core.patch import EditPatch
from lmedit.models.load import LoadedModel, load_model
from lmedit.registry import get_method
from lmedit.request import EditRequest, as_requests, check_against_model

log = logging.getLogger(__name__)


def edit(model: Any, requests: EditRequest | dict | list, method: str = "ft-m", **config: Any) -> EditPatch:
    """Compute the edit of ``requests`` with ``method``; the model is bit-identical afterwards.

    Args:
        model: a LoadedModel (from ``load_model``), a ``(model, tokenizer)`` pair or a spec ``load_model`` takes.
        requests: one EditRequest or dict, or a list of them.
        method: a name from ``list_methods()``.
        **config: overrides of the method's config fields (see ``lmedit methods --describe NAME``).

    Returns:
        EditPatch; apply it with ``patch.applied(model)`` or an ``EditSession``.

    Example:
        >>> loaded = lmedit.load_model("gemma3-270m")
        >>> patch = lmedit.edit(loaded, {"prompt": "The Eiffel Tower is located in the city of",
        ...                              "subject": "Eiffel Tower", "target_new": "Rome"}, method="ft-m")
    """
    loaded: LoadedModel = load_model(model)
    reqs = as_requests(requests)
    check_against_model(reqs, loaded.tokenizer, loaded.max_positions)
    info = get_method(method)
    keys = (loaded.name, getattr(loaded.model.config, "model_type", None))
    cfg = build_config(info.config_cls, info.presets, config, model_keys=keys)
    log.info("editing %d request(s) with %s on %s", len(reqs), info.name, loaded.name)
    with frozen(loaded.model), seeded(cfg.seed, loaded.device):
        return info.fn(loaded, reqs, cfg)
