"""EditSession: an ordered, undoable history of patches applied to one model.

    >>> session = EditSession(loaded)
    >>> session.apply(lmedit.edit(loaded, request, method="ft-m"))
    >>> session.undo()          # bit-identical to before the edit
    >>> session.reset()         # back to the base model

``apply`` is transactional: the patch's fingerprints are checked, a non-finite result or any exception
restores every touched tensor, and (with ``check=True``) the edit must raise the mean log-probability of its
requests' targets, else it is reverted and EditFailedError is raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lmedit.core.patch import AppliedPatch, EditPatch
from lmedit.errors import EditFailedError
from lmedit.evaluate.scoring import score_pairs
from lmedit.models.load import LoadedModel, load_model
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    patch: EditPatch
    handle: AppliedPatch
    gain: float | None


class EditSession:
    """Applies patches to ``loaded`` in order and undoes them in reverse, bit for bit."""

    def __init__(self, model: Any, check: bool = True):
        self.loaded: LoadedModel = load_model(model)
        self.check = check
        self._entries: list[_Entry] = []

    @property
    def history(self) -> list[EditPatch]:
        """Patches currently applied, oldest first."""
        return [e.patch for e in self._entries]

    def _target_score(self, patch: EditPatch) -> float:
        reqs = [EditRequest.from_dict(r) for r in patch.requests]
        scores = score_pairs(self.loaded, [r.prompt_text for r in reqs], [r.target_new for r in reqs])
        return sum(s.mean_logprob for s in scores) / len(scores)

    def apply(self, patch: EditPatch) -> EditPatch:
        """Apply ``patch`` on top of the current history (transactional; see the module docstring)."""
        before = self._target_score(patch) if self.check and patch.requests else None
        handle = patch.apply(self.loaded)
        gain = None
        try:
            if before is not None:
                after = self._target_score(patch)
                gain = after - before
                if not after > before:
                    raise EditFailedError(
                        f"the edit did not raise its targets' mean log-probability ({before:.3f} -> {after:.3f}); "
                        "model restored. Try more steps, a higher lr or another layer."
                    )
        except BaseException:
            handle.revert()
            raise
        self._entries.append(_Entry(patch, handle, gain))
        log.info(
            "applied %s patch (%d requests); history length %d",
            patch.method,
            len(patch.requests),
            len(self._entries),
        )
        return patch

    def undo(self, n: int = 1) -> list[EditPatch]:
        """Revert the last ``n`` patches (newest first); returns them."""
        if n < 0 or n > len(self._entries):
            raise ValueError(f"cannot undo {n} edits: the history holds {len(self._entries)}")
        undone = []
        for _ in range(n):
            entry = self._entries.pop()
            entry.handle.revert()
            undone.append(entry.patch)
        return undone

    def reset(self) -> None:
        """Undo everything: the model is bit-identical to when the session started."""
        self.undo(len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
