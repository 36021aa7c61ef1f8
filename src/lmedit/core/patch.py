"""EditPatch: what an edit changed, as data that can be applied, reverted, saved and shipped.

    >>> patch = lmedit.edit(loaded, request, method="ft-m")      # the model is untouched
    >>> with patch.applied(loaded.model):                         # edited inside, restored bit for bit after
    ...     ...
    >>> patch.save("patches/eiffel")                              # patch.safetensors + patch.json, atomically
    >>> EditPatch.load("patches/eiffel").apply(other_copy_of_the_same_base_model)

A patch records fingerprints of every base tensor it touches; applying it to a model whose tensors differ
(another base model, or the same one already edited differently) is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmedit.core.delta import (
    AppliedDeltas,
    Delta,
    apply_deltas,
    delta_from_tensors,
    fingerprint,
    get_parameter,
)
from lmedit.errors import PatchError

FORMAT_VERSION = 1
TENSOR_FILE = "patch.safetensors"
META_FILE = "patch.json"


def versions() -> dict[str, str]:
    """Versions of lmedit, torch and transformers (recorded in patches and reports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("lmedit", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _module(model: Any) -> nn.Module:
    return model.model if hasattr(model, "tokenizer") and hasattr(model, "arch") else model


@dataclass
class EditPatch:
    """Deltas plus everything needed to audit, re-apply or refuse them.

    Attributes:
        method: registry name of the method that made it.
        config: the method's resolved configuration (JSON-able).
        requests: the edit requests, as dicts.
        deltas: the weight changes.
        base: ``{"model": name, "model_type": ..., "arch": {...}, "fingerprints": {param: sha}}``, the state
            of the touched tensors the deltas were computed against.
        versions: lmedit / torch / transformers versions.
        info: free-form metadata (timings, losses), JSON-able.
    """

    method: str
    config: dict
    requests: list[dict]
    deltas: list[Delta]
    base: dict
    versions: dict = field(default_factory=versions)
    info: dict = field(default_factory=dict)
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    @staticmethod
    def base_of(loaded: Any, param_names: Sequence[str]) -> dict:
        """The ``base`` record for a patch touching ``param_names`` of ``loaded`` (a LoadedModel)."""
        model = loaded.model
        return {
            "model": loaded.name,
            "model_type": getattr(model.config, "model_type", None),
            "arch": loaded.arch.to_dict(),
            "fingerprints": {n: fingerprint(get_parameter(model, n)) for n in dict.fromkeys(param_names)},
        }

    @property
    def param_names(self) -> list[str]:
        return list(dict.fromkeys(d.name for d in self.deltas))

    def check_base(self, model: Any) -> None:
        """Raise PatchError unless every touched tensor of ``model`` matches the recorded fingerprint."""
        model = _module(model)
        for name, expected in self.base.get("fingerprints", {}).items():
            actual = fingerprint(get_parameter(model, name))
            if actual != expected:
                raise PatchError(
                    f"this patch was made for another base model: {name} has fingerprint {actual}, the patch "
                    f"expects {expected} (patch base model: {self.base.get('model')!r}). Apply it to the model "
                    "it was made on, in the same edit history (undo later edits first)."
                )

    def apply(self, model: Any, verify: bool = True) -> AppliedDeltas:
        """Apply to ``model`` (nn.Module or LoadedModel); returns a handle whose ``revert()`` is bit-exact."""
        if verify:
            self.check_base(model)
        return apply_deltas(_module(model), self.deltas)

    @contextlib.contextmanager
    def applied(self, model: Any, verify: bool = True) -> Iterator[Any]:
        """Context manager: the patch is applied inside the block and reverted bit for bit on exit."""
        handle = self.apply(model, verify=verify)
        try:
            yield model
        finally:
            handle.revert()

    # ------------------------------------------------------------------ disk
    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "method": self.method,
            "config": self.config,
            "requests": self.requests,
            "deltas": [{"index": i, "name": d.name, "kind": d.kind} for i, d in enumerate(self.deltas)],
            "base": self.base,
            "versions": self.versions,
            "info": self.info,
            "created": self.created,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``patch.safetensors`` and ``patch.json`` into folder ``path`` atomically.

        Everything is written to a temporary sibling folder first and renamed into place, so a failure leaves
        either the previous content or nothing, never a partial patch.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{i}.{key}": t.detach().contiguous().cpu()
            for i, d in enumerate(self.deltas)
            for key, t in d.tensors().items()
        }
        meta = json.dumps(self.to_json(), indent=2, sort_keys=False)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        old = None
        try:
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": str(FORMAT_VERSION)})
            (tmp / META_FILE).write_text(meta)
            for f in (TENSOR_FILE, META_FILE):
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            if path.exists():
                if not (path / META_FILE).exists() and any(path.iterdir()):
                    raise PatchError(f"{path} exists and is not a patch folder; choose another --out")
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not path.exists():
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditPatch:
        """Read a patch folder written by ``save``."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path, tensor_path = path / META_FILE, path / TENSOR_FILE
        if not meta_path.exists() or not tensor_path.exists():
            raise PatchError(f"{path} is not a patch folder: expected {META_FILE} and {TENSOR_FILE}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise PatchError(f"{meta_path} is not valid JSON: {e}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise PatchError(
                f"{meta_path}: unsupported patch format {meta.get('format')!r} (expected {FORMAT_VERSION})"
            )
        for key in ("method", "config", "requests", "deltas", "base"):
            if key not in meta:
                raise PatchError(f"{meta_path}: missing field {key!r}")
        flat = load_file(str(tensor_path))
        deltas = []
        for entry in meta["deltas"]:
            i = entry["index"]
            parts = {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == str(i)}
            deltas.append(delta_from_tensors(entry["kind"], entry["name"], parts))
        return cls(
            method=meta["method"],
            config=meta["config"],
            requests=meta["requests"],
            deltas=deltas,
            base=meta["base"],
            versions=meta.get("versions", {}),
            info=meta.get("info", {}),
            created=meta.get("created", ""),
        )

    def summary(self) -> str:
        """A human-readable description (used by ``lmedit patch show``)."""
        lines = [
            f"method:   {self.method}",
            f"base:     {self.base.get('model')} ({self.base.get('model_type')})",
            f"created:  {self.created}   versions: {self.versions}",
            f"requests: {len(self.requests)}",
        ]
        for r in self.requests[:10]:
            lines.append(f"  - {r.get('prompt')!r} -> {r.get('target_new')!r} (subject {r.get('subject')!r})")
        if len(self.requests) > 10:
            lines.append(f"  ... {len(self.requests) - 10} more")
        lines.append(f"deltas:   {len(self.deltas)}")
        for d in self.deltas:
            m = d.materialize()
            shapes = " x ".join(str(tuple(t.shape)) for t in d.tensors().values())
            lines.append(f"  - {d.name}: {d.kind} {shapes}, |delta|_F = {float(torch.linalg.norm(m)):.4g}")
        lines.append("config:   " + json.dumps(self.config, sort_keys=True))
        if self.info:
            lines.append("info:     " + json.dumps(self.info, sort_keys=True))
        return "\n".join(lines)
