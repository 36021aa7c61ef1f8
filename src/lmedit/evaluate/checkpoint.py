"""Resumable sequential runs: a folder that holds a run's patches, its retention curve and a partial report.

Lifelong runs take hours (1000 ROME edits on the bundled model: about 5 CPU-hours). With a checkpoint folder
(``lmedit bench --protocol sequential --eval-every M --checkpoint DIR``) every retention checkpoint writes

- ``patches/000017/``: each step's patch (the method state carried to the next edit - ``patch.extras``, e.g.
  AlphaEdit's accumulated keys - is kept only in the newest one, so storage grows with the edits, not with
  their square);
- ``state.json``: what identifies the run (method, k, eval_every, overrides, scoring, case ids), the number of
  steps done, the per-step edit records, the retention curve and the time spent so far;
- ``pristine.json``: the pristine model's scores of every case and its held-out perplexity, with the model's
  fingerprint (written with the first checkpoint): a resumed run whose unedited model has that fingerprint reads
  its pre-edit reference from there instead of scoring the unedited model again (1000 cases on the bundled
  model: 134 s on one thread, plus the held-out perplexity);
- ``report.json``: a partial report (``meta.partial``) whose ``post`` is the latest checkpoint's scores, readable
  by ``lmedit bench --compare`` and ``benchmarks/lifelong.py`` while the run goes on; the full report once the
  run has finished (started again then, the run re-applies everything and only evaluates again).

Started again with the same folder and settings, the run re-applies the saved patches (their base fingerprints
are checked as for any patch) and continues after the last checkpoint; the edits of a step are deterministic
given the model state and the seed, so a resumed run gives the numbers of an uninterrupted one. Different
settings are refused with the field that differs. Every file is written atomically (temporary + rename), and
``state.json`` last, so an interruption while saving leaves the previous checkpoint valid.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError

STATE_FILE = "state.json"
PRISTINE_FILE = "pristine.json"
FORMAT = "lmedit.checkpoint/1"


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON (non-JSON leaves as their ``str``), for comparing run identities."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


@dataclasses.dataclass
class Resumed:
    """What a checkpoint restores: the steps done, the chained state and the run's records so far."""

    steps_done: int
    previous: EditPatch | None
    edits: list[dict]
    retention: list[dict]
    timings: dict[str, float]


class RunCheckpoint:
    """The checkpoint folder of one sequential run (see the module docstring).

    Args:
        path: the folder (created on the first save).
        identity: what must match for a resume (JSON-able after ``str`` of odd leaves).
    """

    def __init__(self, path: str | os.PathLike, identity: dict):
        self.path = Path(path)
        self.identity = _jsonable(identity)
        self._saved = 0  # patches of the session history already in patches/
        self._full: int | None = None  # the saved patch that still carries its extras
        self._pristine: dict | None = None  # the pre-edit reference, written with the first save

    def _state(self) -> dict | None:
        """The saved state (None: nothing saved yet), checked to belong to this run.

        Raises:
            ConfigError: the folder holds another run's checkpoint, or is not a checkpoint folder.
        """
        state_path = self.path / STATE_FILE
        if not state_path.exists():
            if self.path.exists() and any(self.path.iterdir()):
                raise ConfigError(
                    f"checkpoint: {self.path} exists, is not empty and has no {STATE_FILE}; "
                    "give an empty or new folder"
                )
            return None
        state = json.loads(state_path.read_text())
        if state.get("format") != FORMAT:
            raise ConfigError(f"checkpoint: {state_path} is not an lmedit checkpoint (format {FORMAT!r})")
        theirs = state["identity"]
        for key in sorted(set(theirs) | set(self.identity)):
            if theirs.get(key) != self.identity.get(key):
                shown = {
                    k: str(v)[:120] for k, v in (("there", theirs.get(key)), ("here", self.identity.get(key)))
                }
                raise ConfigError(
                    f"checkpoint: {self.path} belongs to another run - field {key!r} is {shown['there']} there "
                    f"and {shown['here']} here; resume with the same settings or give another checkpoint folder"
                )
        return state

    def pristine(self) -> dict | None:
        """The pre-edit reference saved with this run's first checkpoint (``{"model": fingerprint, "scores":
        [...], "perplexity": float | None}``), or None (nothing saved yet, or a checkpoint written before this
        file existed).

        Raises:
            ConfigError: as ``resume``.
        """
        path = self.path / PRISTINE_FILE
        if self._state() is None or not path.exists():
            return None
        return json.loads(path.read_text())

    def keep_pristine(self, data: dict) -> None:
        """Write ``data`` (the pre-edit reference) with the next save (replacing what the folder has)."""
        self._pristine = data

    def _patch_dir(self, index: int) -> Path:
        return self.path / "patches" / f"{index:06d}"

    def resume(self, session) -> Resumed | None:
        """Re-apply the saved patches to ``session`` and return the run so far (None: nothing saved yet).

        Raises:
            ConfigError: the folder holds another run's checkpoint, or is not a checkpoint folder.
        """
        state = self._state()
        if state is None:
            return None
        done = state["steps_done"]
        for i in range(done):
            session.apply(EditPatch.load(self._patch_dir(i)))
        self._saved = done
        self._full = done - 1 if done and session.history[-1].extras else None
        return Resumed(
            done, session.history[-1] if done else None, state["edits"], state["retention"], state["timings"]
        )

    def save(
        self,
        history: list[EditPatch],
        steps_done: int,
        edits: list[dict],
        retention: list,
        timings: dict,
        report,
    ) -> None:
        """Write the patches of ``history[:steps_done]`` not saved yet (the newest with its method state), the
        report, then the state."""
        for i in range(self._saved, steps_done):
            patch = history[i]
            newest = i == steps_done - 1
            (patch if newest or not patch.extras else dataclasses.replace(patch, extras={})).save(
                self._patch_dir(i)
            )
        self._saved = steps_done
        if self._pristine is not None:
            tmp = self.path / (PRISTINE_FILE + ".tmp")
            tmp.write_text(json.dumps(self._pristine))
            tmp.replace(self.path / PRISTINE_FILE)
            self._pristine = None
        report.save(self.path / "report.json")
        state = {
            "format": FORMAT,
            "identity": self.identity,
            "steps_done": steps_done,
            "edits": edits,
            "retention": retention,
            "timings": timings,
        }
        tmp = self.path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(_jsonable(state), indent=1))
        tmp.replace(self.path / STATE_FILE)
        # the previous checkpoint's newest patch no longer needs its state (only now: until state.json moved on
        # it was what a resume would continue from)
        if self._full is not None and self._full != steps_done - 1:
            dataclasses.replace(history[self._full], extras={}).save(self._patch_dir(self._full))
        self._full = steps_done - 1 if history[steps_done - 1].extras else None
