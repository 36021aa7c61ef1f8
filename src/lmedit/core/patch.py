"""EditPatch: what an edit changed, as data that can be applied, reverted, saved and shipped.

    >>> patch = lmedit.edit(loaded, request, method="ft-m")      # the model is untouched
    >>> with patch.applied(loaded.model):                         # edited inside, restored bit for bit after
    ...     ...
    >>> patch.save("patches/eiffel")                              # patch.safetensors + patch.json, atomically
    >>> EditPatch.load("patches/eiffel").apply(other_copy_of_the_same_base_model)

A patch records fingerprints of every base tensor it touches; applying it to a model whose tensors differ
(another base model, or the same one already edited differently) is refused.

Weight-preserving methods (GRACE, ...) put ``adapters`` (``lmedit.core.adapters.AdapterSpec``) in the patch next
to (or instead of) deltas: ``apply()`` installs them as wrapper modules and the handle's ``revert()`` puts the
original module objects back. Their base modules' weights are fingerprinted in ``base`` like touched tensors.

In-context methods (IKE) put a ``context`` (``lmedit.core.context.ContextSpec``) in the patch: ``apply()``
installs it as the model's context memory, which lmedit's scoring and generation honour (raw ``model(...)`` calls
do not); the handle's ``revert()`` puts the previous memory (or none) back.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from lmedit.core.adapters import AdapterSpec, AppliedAdapters, install_adapters, resolve_name
from lmedit.core.context import AppliedContext, ContextSpec, install_context
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


def _base_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Parameter by canonical name, looked up through any installed adapter wrappers."""
    return get_parameter(model, resolve_name(model, name))


class AppliedPatch:
    """Handle returned by ``EditPatch.apply``: ``revert()`` reverts the deltas, then removes the context memory,
    then the adapters (the reverse of applying; every step runs even if an earlier one raises)."""

    def __init__(
        self, deltas: AppliedDeltas, adapters: AppliedAdapters, context: AppliedContext | None = None
    ):
        self.deltas = deltas
        self.adapters = adapters
        self.context = context

    def _handles(self) -> list:
        """The parts in the order they were applied."""
        return [h for h in (self.adapters, self.context, self.deltas) if h is not None]

    @property
    def active(self) -> bool:
        return any(h.active for h in self._handles())

    def revert(self) -> None:
        with contextlib.ExitStack() as stack:  # callbacks run last-in first-out
            for handle in self._handles():
                stack.callback(handle.revert)


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
        extras: method state tensors carried with the patch (e.g. AlphaEdit's accumulated keys), saved in the
            same safetensors file under an ``extra.`` prefix.
        adapters: wrapper modules installed by ``apply()`` (weight-preserving methods); their tensors are saved
            under an ``adapter.<i>.`` prefix, the rest in ``patch.json``.
        context: the context memory installed by ``apply()`` (in-context methods), or None; its tensors are
            saved under a ``context.`` prefix.
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
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: list[AdapterSpec] = field(default_factory=list)
    context: ContextSpec | None = None

    @staticmethod
    def base_of(loaded: Any, param_names: Sequence[str]) -> dict:
        """The ``base`` record for a patch touching ``param_names`` of ``loaded`` (a LoadedModel)."""
        model = loaded.model
        return {
            "model": loaded.name,
            "model_type": getattr(model.config, "model_type", None),
            "arch": loaded.arch.to_dict(),
            "fingerprints": {n: fingerprint(_base_parameter(model, n)) for n in dict.fromkeys(param_names)},
        }

    @property
    def param_names(self) -> list[str]:
        return list(dict.fromkeys(d.name for d in self.deltas))

    def check_base(self, model: Any) -> None:
        """Raise PatchError unless every touched tensor of ``model`` matches the recorded fingerprint."""
        model = _module(model)
        for name, expected in self.base.get("fingerprints", {}).items():
            actual = fingerprint(_base_parameter(model, name))
            if actual != expected:
                raise PatchError(
                    f"this patch was made for another base model: {name} has fingerprint {actual}, the patch "
                    f"expects {expected} (patch base model: {self.base.get('model')!r}). Apply it to the model "
                    "it was made on, in the same edit history (undo later edits first)."
                )

    def apply(self, model: Any, verify: bool = True) -> AppliedPatch:
        """Apply to ``model`` (nn.Module or LoadedModel); returns a handle whose ``revert()`` is bit-exact.

        Adapters are installed first, then the context memory, then the deltas are added (parameter names
        resolved through wrappers); any failure undoes all of them.
        """
        if verify:
            self.check_base(model)
        module = _module(model)
        adapters = install_adapters(module, self.adapters)
        context = None
        try:
            context = install_context(module, self.context) if self.context is not None else None
            deltas = [dataclasses.replace(d, name=resolve_name(module, d.name)) for d in self.deltas]
            return AppliedPatch(apply_deltas(module, deltas), adapters, context)
        except BaseException:
            if context is not None:
                context.revert()
            adapters.revert()
            raise

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
            "adapters": [{"index": i, **a.to_json()} for i, a in enumerate(self.adapters)],
            "context": self.context.to_json() if self.context is not None else None,
            "base": self.base,
            "versions": self.versions,
            "info": self.info,
            "created": self.created,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the patch carries, under the names ``save`` writes them with."""
        out = {f"{i}.{key}": t for i, d in enumerate(self.deltas) for key, t in d.tensors().items()}
        out.update({f"extra.{k}": t for k, t in self.extras.items()})
        for i, a in enumerate(self.adapters):
            out.update({f"adapter.{i}.{k}": t for k, t in a.tensors.items()})
        if self.context is not None:
            out.update({f"context.{k}": t for k, t in self.context.tensors.items()})
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of memory the patch's tensors keep alive: their storages, each counted once (a small view of a
        large tensor counts the whole tensor, which is what it holds); JSON metadata not counted."""
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors().values()
        }
        return sum(storages.values())

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``patch.safetensors`` and ``patch.json`` into folder ``path`` atomically.

        Everything is written to a temporary sibling folder first and renamed into place, so a failure leaves
        either the previous content or nothing, never a partial patch.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.detach().contiguous().cpu() for k, t in self.tensors().items()}
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
        adapters = []
        for entry in meta.get("adapters", []):
            prefix = f"adapter.{entry['index']}."
            parts = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
            missing = sorted(set(entry.get("tensors", [])) - set(parts))
            if missing:
                raise PatchError(f"{tensor_path}: adapter {entry['index']} lacks tensors {missing}")
            adapters.append(
                AdapterSpec(
                    entry["kind"], entry["module"], entry.get("config", {}), parts, entry.get("parent")
                )
            )
        context = None
        if meta.get("context") is not None:
            entry = meta["context"]
            parts = {k[len("context.") :]: v for k, v in flat.items() if k.startswith("context.")}
            missing = sorted(set(entry.get("tensors", [])) - set(parts))
            if missing:
                raise PatchError(f"{tensor_path}: the context memory lacks tensors {missing}")
            context = ContextSpec(entry.get("config", {}), parts, entry.get("parent"))
        return cls(
            method=meta["method"],
            config=meta["config"],
            requests=meta["requests"],
            deltas=deltas,
            base=meta["base"],
            versions=meta.get("versions", {}),
            info=meta.get("info", {}),
            created=meta.get("created", ""),
            extras={k[len("extra.") :]: v for k, v in flat.items() if k.startswith("extra.")},
            adapters=adapters,
            context=context,
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
        if self.adapters:
            lines.append(f"adapters: {len(self.adapters)}")
        for a in self.adapters:
            shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in sorted(a.tensors.items()))
            lines.append(
                f"  - {a.module}: {a.kind} [{shapes}]" + (f" extends {a.parent}" if a.parent else "")
            )
        if self.context is not None:
            facts = self.context.config.get("facts", [])
            parent = f" (extends {self.context.parent})" if self.context.parent else ""
            lines.append(f"context:  {len(facts)} fact(s){parent}")
            lines.extend(f"  - {f!r}" for f in facts[:10])
        lines.append("config:   " + json.dumps(self.config, sort_keys=True))
        if self.info:
            lines.append("info:     " + json.dumps(self.info, sort_keys=True))
        return "\n".join(lines)
