"""Server state: one LoadedModel, one EditSession, a lock around every model use and a single edit worker.

    >>> state = ServerState(lmedit.load_model("gemma3-270m"))
    >>> state.generate("The Eiffel Tower is located in the city of")          # a read, under the model lock
    >>> job = state.submit_edit(EditSpec(prompt=..., subject=..., target_new=" Rome"))
    >>> job.wait(); job.result["metrics"]                                       # before/after + metric table
    >>> state.submit_undo(edit_id=1).wait()                                     # any edit, not only the last

Concurrency model:

* Every use of the model (generation, scoring, computing an edit, applying or reverting a patch) holds one
  lock. Computing an edit must hold it too: methods differentiate through candidate weights with
  ``torch.func.functional_call``, which swaps the module's parameters for the duration of each forward pass, so a
  concurrent reader could otherwise see candidate weights. A read therefore sees either the whole state before
  an edit or the whole state after it, never a half-applied one.
* State changes (edit, undo, upload, reset) are jobs run one at a time, in submission order, by a single worker
  thread; each job reports its position in the queue. A job that fails leaves the session exactly as it was
  (``EditSession.apply`` is transactional; undo rolls back on failure) and records an error with an HTTP status.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import itertools
import logging
import math
import queue
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmedit.api import edit as compute_edit
from lmedit.config import build_config, describe
from lmedit.core.context import with_context
from lmedit.core.forward import final_hidden
from lmedit.core.patch import META_FILE, TENSOR_FILE, EditPatch
from lmedit.errors import ConfigError, EditFailedError, LmeditError, PatchError, RequestError
from lmedit.evaluate.scoring import greedy_generate, score_pairs
from lmedit.models import tokens
from lmedit.models.arch import final_logits
from lmedit.models.load import LoadedModel
from lmedit.registry import get_method, list_methods
from lmedit.request import EditRequest, check_against_model
from lmedit.session import EditSession

log = logging.getLogger(__name__)

#: Config fields the server never exposes (they only affect terminal output).
HIDDEN_FIELDS = frozenset({"progress"})
#: State kinds a causal trace can restore (``lmedit.locate.causal_trace``).
TRACE_KINDS = ("hidden", "mlp", "attn")


class ServeError(LmeditError):
    """An error with the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, kind: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def error_info(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, error type, message) for an exception raised while serving a request."""
    if isinstance(exc, ServeError):
        return exc.status, exc.kind, str(exc)
    if isinstance(exc, (RequestError, ConfigError)):
        return 422, type(exc).__name__, str(exc)
    if isinstance(exc, EditFailedError):
        return 422, "EditFailedError", str(exc)
    if isinstance(exc, PatchError):
        return 409, "PatchError", str(exc)
    if isinstance(exc, LmeditError):
        return 400, type(exc).__name__, str(exc)
    return 500, type(exc).__name__, f"internal error: {exc}"


@dataclass
class EditSpec:
    """One edit as the API receives it (validated again by EditRequest and the method's config)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    unrelated: list[str] = field(default_factory=list)
    method: str = "ft-m"
    hparams: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 12


@dataclass
class HistoryEntry:
    """One applied patch, with the server's id for it (ids are never reused)."""

    id: int
    patch: EditPatch
    source: str  # "edit" | "upload"
    created: float
    seconds: float | None = None
    rebased: bool = False

    def summary(self) -> dict:
        reqs = [
            {
                "prompt": r.get("prompt"),
                "subject": r.get("subject"),
                "target_new": r.get("target_new"),
                "target_true": r.get("target_true"),
            }
            for r in self.patch.requests
        ]
        return {
            "id": self.id,
            "method": self.patch.method,
            "source": self.source,
            "requests": reqs,
            "params": self.patch.param_names,
            "created": self.created,
            "seconds": self.seconds,
            "rebased": self.rebased,
        }


@dataclass
class Job:
    """A state change waiting for, or run by, the worker."""

    id: str
    kind: str
    fn: Callable[[], dict] = field(repr=False)
    status: str = "queued"  # queued | running | done | failed
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict | None = None
    error: dict | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (True) or ``timeout`` seconds passed (False)."""
        return self.done.wait(timeout)


class ServerState:
    """The model, its edit session and history, the model lock and the edit worker.

    Args:
        loaded: the model to serve.
        max_queue: most state-changing jobs waiting at once (more are refused with 503).
        keep_jobs: finished jobs kept for ``GET /api/jobs/{id}``.
        max_generate_tokens: cap on ``max_new_tokens`` of one generation.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_queue: int = 16,
        keep_jobs: int = 256,
        max_generate_tokens: int = 64,
    ):
        self.loaded = loaded
        self.session = EditSession(loaded)
        self.max_queue = max_queue
        self.keep_jobs = keep_jobs
        self.max_generate_tokens = max_generate_tokens
        self.model_lock = threading.RLock()  # every use of the model
        self._meta_lock = threading.Lock()  # history list, version, job table
        self._entries: list[HistoryEntry] = []  # aligned with self.session.history
        self._ids = itertools.count(1)
        self._job_ids = itertools.count(1)
        self.version = 0  # bumped by every state change
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: list[str] = []
        self._running: str | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ worker
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._meta_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="lmedit-edit-worker", daemon=True)
                self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop after the jobs already queued."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._meta_lock:
                self._pending.remove(job.id)
                self._running = job.id
                job.status, job.started = "running", time.time()
            try:
                result = job.fn()
                job.result, job.status = result, "done"
            except Exception as exc:  # every failure becomes a job error; the worker keeps going
                status, kind, message = error_info(exc)
                if status >= 500:
                    log.exception("%s job %s failed", job.kind, job.id)
                else:
                    log.info("%s job %s refused: %s", job.kind, job.id, message)
                job.error, job.status = {"status": status, "type": kind, "message": message}, "failed"
            finally:
                with self._meta_lock:
                    self._running = None
                    job.finished = time.time()
                job.done.set()

    def _submit(self, kind: str, fn: Callable[[], dict]) -> Job:
        self.start()
        with self._meta_lock:
            if len(self._pending) >= self.max_queue:
                raise ServeError(
                    503,
                    f"the edit queue is full ({self.max_queue} jobs waiting); retry when a job has finished",
                    "queue_full",
                )
            job = Job(f"j{next(self._job_ids)}", kind, fn)
            self._jobs[job.id] = job
            self._pending.append(job.id)
            while len(self._jobs) > self.keep_jobs:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].status in ("queued", "running"):
                    break
                self._jobs.pop(oldest)
            self._queue.put(job)
        return job

    def job(self, job_id: str) -> Job:
        with self._meta_lock:
            if job_id not in self._jobs:
                raise ServeError(
                    404, f"no job {job_id!r} (finished jobs are kept for a while only)", "not_found"
                )
            return self._jobs[job_id]

    def job_view(self, job: Job) -> dict:
        """JSON view of a job: status, position in the queue (jobs ahead of it), result or error."""
        with self._meta_lock:
            if job.status == "queued":
                ahead = self._pending.index(job.id) + (1 if self._running else 0)
            else:
                ahead = 0
            queued = len(self._pending)
        now = time.time()
        return {
            "job": job.id,
            "kind": job.kind,
            "status": job.status,
            "position": ahead,
            "queue_length": queued,
            "elapsed": round((job.finished or now) - (job.started or now), 3) if job.started else 0.0,
            "result": job.result,
            "error": job.error,
        }

    # ------------------------------------------------------------------ reads
    def info(self) -> dict:
        """Model, methods with their hyperparameters (defaults resolved for this model), capabilities."""
        model = self.loaded.model
        keys = (self.loaded.name, getattr(model.config, "model_type", None))
        methods = []
        for name in list_methods():
            info = get_method(name)
            try:
                resolved = build_config(info.config_cls, info.presets, {}, model_keys=keys).to_dict()
            except Exception as e:  # one method's broken preset must not hide the others
                log.warning("cannot resolve %s defaults for %s: %s", name, self.loaded.name, e)
                resolved = {}
            hps = [
                {"name": f, "type": tp, "default": _jsonable(resolved.get(f, default)), "help": help_}
                for f, tp, default, help_ in describe(info.config_cls)
                if f not in HIDDEN_FIELDS
            ]
            methods.append(
                {"name": info.name, "family": info.family, "summary": info.summary, "hyperparameters": hps}
            )
        return {
            "model": {
                "name": self.loaded.name,
                "model_type": getattr(model.config, "model_type", None),
                "n_layers": self.loaded.arch.n_layers(model),
                "n_params": sum(p.numel() for p in model.parameters()),
                "device": str(self.loaded.device),
            },
            "methods": methods,
            "trace_available": trace_function() is not None,
            "version": self.version,
        }

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 20, top_k: int = 5) -> dict:
        """Greedy continuation of ``prompt`` and the ``top_k`` next tokens with their probabilities."""
        if not 1 <= max_new_tokens <= self.max_generate_tokens:
            raise ServeError(422, f"max_new_tokens must be in 1..{self.max_generate_tokens}", "validation")
        tok = self.loaded.tokenizer
        with self.model_lock:
            # the prompt as the model reads it: an installed context memory (IKE) may prepend a prefix
            ids, _ = tokens.encode_prompt(tok, with_context(self.loaded.model, [prompt])[0])
            self._check_length(len(ids) + max_new_tokens, "prompt")
            version = self.version
            history = [e.id for e in self._entries]
            ids_t = torch.tensor([ids], device=self.loaded.device)  # [1, pos]
            hidden = final_hidden(self.loaded.model, self.loaded.arch, ids_t, torch.ones_like(ids_t))
            logits = final_logits(self.loaded.model, self.loaded.arch, hidden[:, -1]).float()  # [1, vocab]
            probs = torch.softmax(logits[0], -1)  # [vocab]
            top = torch.topk(probs, top_k)
            continuation = greedy_generate(self.loaded, [prompt], max_new_tokens=max_new_tokens)[0]
        return {
            "prompt": prompt,
            "continuation": continuation,
            "top": [
                {"token": tok.decode([int(i)]), "id": int(i), "prob": float(p)}
                for p, i in zip(top.values.tolist(), top.indices.tolist())
            ],
            "version": version,
            "history": history,
        }

    def score(self, prompt: str, targets: list[str]) -> dict:
        """Teacher-forced log-probabilities of each target after ``prompt``."""
        with self.model_lock:
            # the prompt as the model reads it: an installed context memory (IKE) may prepend a prefix
            read = with_context(self.loaded.model, [prompt])[0]
            for j, t in enumerate(targets):
                enc = tokens.encode_pair(self.loaded.tokenizer, read, t)
                if enc.target_len == 0:
                    raise ServeError(422, f"targets[{j}]: {t!r} tokenizes to nothing", "validation")
                self._check_length(len(enc.ids), "prompt")
            version = self.version
            scores = score_pairs(self.loaded, [prompt] * len(targets), targets)
        return {
            "prompt": prompt,
            "scoring": "teacher-forced",
            "scores": [
                {
                    "target": t,
                    "logprobs": s.logprobs,
                    "logprob": sum(s.logprobs),
                    "prob": math.exp(sum(s.logprobs)),
                    "mean_logprob": s.mean_logprob,
                    "accuracy": s.accuracy,
                }
                for t, s in zip(targets, scores)
            ],
            "version": version,
        }

    def history(self) -> dict:
        with self._meta_lock:
            return {"version": self.version, "edits": [e.summary() for e in self._entries]}

    def entry(self, edit_id: int) -> HistoryEntry:
        with self._meta_lock:
            for e in self._entries:
                if e.id == edit_id:
                    return e
        raise ServeError(404, f"no edit #{edit_id} in the history (see GET /api/history)", "not_found")

    def patch_zip(self, edit_id: int) -> tuple[str, bytes]:
        """(file name, zip bytes) of the patch folder of edit ``edit_id``."""
        entry = self.entry(edit_id)
        name = f"lmedit-edit-{entry.id}-{entry.patch.method}"
        with tempfile.TemporaryDirectory(prefix="lmedit-serve-") as tmp:
            folder = entry.patch.save(Path(tmp) / name)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for f in (META_FILE, TENSOR_FILE):
                    zf.write(folder / f, f"{name}/{f}")
        return f"{name}.zip", buf.getvalue()

    def trace(
        self, prompt: str, subject: str, kind: str = "mlp", samples: int = 3, answer: str | None = None
    ) -> dict:
        """Causal tracing of ``prompt`` via ``lmedit.locate.causal_trace`` (restored P(answer) per layer x token).

        Returns ``TraceResult.to_dict()`` plus ``"kind"``; ``scores[kind]`` is [layers, tokens].
        """
        fn = trace_function()
        if fn is None:
            raise ServeError(
                501,
                "causal tracing is not available in this lmedit version (lmedit.locate.causal_trace is missing)",
                "not_implemented",
            )
        if kind not in TRACE_KINDS:
            raise ServeError(422, f"kind must be one of {TRACE_KINDS}, got {kind!r}", "validation")
        ids, _ = tokens.encode_prompt(self.loaded.tokenizer, prompt)
        self._check_length(len(ids), "prompt")
        with self.model_lock:
            version = self.version
            try:
                result = fn(self.loaded, prompt, subject, answer=answer, kinds=[kind], samples=samples)
            except ValueError as e:  # the subject is not in the prompt, ...
                raise ServeError(422, f"trace: {e}", "validation") from None
        return trace_to_json(result) | {"kind": kind, "version": version}

    # ------------------------------------------------------------------ state changes (queued)
    def submit_edit(self, spec: EditSpec) -> Job:
        """Validate ``spec`` now (4xx before queueing) and queue the edit."""
        request = EditRequest(
            spec.prompt, spec.subject, spec.target_new, spec.target_true, rephrase=list(spec.paraphrases)
        )
        check_against_model([request], self.loaded.tokenizer, self.loaded.max_positions)
        for j, p in enumerate(spec.unrelated):
            self._check_length(
                len(tokens.encode_prompt(self.loaded.tokenizer, p)[0]) + spec.max_new_tokens,
                f"unrelated[{j}]",
            )
        info = get_method(spec.method)  # ConfigError for an unknown method
        names = {f for f, *_ in describe(info.config_cls)}
        hparams = dict(spec.hparams)
        unknown = sorted(set(hparams) - names)
        if unknown:
            raise ConfigError(f"hparams: {info.name} has no field {unknown[0]!r}; known: {sorted(names)}")
        if "progress" in names:
            hparams["progress"] = False
        keys = (self.loaded.name, getattr(self.loaded.model.config, "model_type", None))
        build_config(info.config_cls, info.presets, hparams, model_keys=keys)  # validate before queueing
        if not 1 <= spec.max_new_tokens <= self.max_generate_tokens:
            raise ServeError(422, f"max_new_tokens must be in 1..{self.max_generate_tokens}", "validation")
        return self._submit("edit", lambda: self._run_edit(request, spec, info.name, hparams))

    def submit_undo(self, edit_id: int, rebase: bool = False) -> Job:
        """Queue the removal of edit ``edit_id`` (later edits are re-applied on top)."""
        return self._submit("undo", lambda: self._run_undo(edit_id, rebase))

    def submit_reset(self) -> Job:
        return self._submit("reset", self._run_reset)

    def submit_patch(self, patch: EditPatch) -> Job:
        """Queue applying an uploaded patch (fingerprints are checked against the current model)."""
        return self._submit("upload", lambda: self._run_upload(patch))

    # ------------------------------------------------------------------ jobs (run by the worker)
    def _probe_outputs(self, probes: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
        return greedy_generate(self.loaded, [p for _, p in probes], max_new_tokens=max_new_tokens)

    def _run_edit(self, request: EditRequest, spec: EditSpec, method: str, hparams: dict) -> dict:
        probes = [("edit", request.prompt_text)]
        probes += [("paraphrase", p) for p in request.rephrase]
        probes += [("unrelated", p) for p in spec.unrelated]
        with self.model_lock:
            before = self._probe_outputs(probes, spec.max_new_tokens)
            # locality reference: each unrelated prompt's pre-edit greedy continuation
            refs = [(p, g) for (kind, p), g in zip(probes, before) if kind == "unrelated" and g.strip()]
            scores_before = self._metric_scores(request, refs)
            t0 = time.perf_counter()
            patch = compute_edit(self.loaded, request, method=method, **hparams)
            seconds = time.perf_counter() - t0
            self.session.apply(patch)  # transactional: raises with the session unchanged
            try:
                after = self._probe_outputs(probes, spec.max_new_tokens)
                scores_after = self._metric_scores(request, refs)
            except BaseException:
                self.session.undo(1)  # a failed job leaves the session as it was
                raise
            with self._meta_lock:
                entry = HistoryEntry(next(self._ids), patch, "edit", time.time(), seconds)
                self._entries.append(entry)
                self.version += 1
                version = self.version
        rows = [
            {"kind": kind, "prompt": p, "before": b, "after": a, "changed": a != b}
            for (kind, p), b, a in zip(probes, before, after)
        ]
        return {
            "edit": entry.summary(),
            "probes": rows,
            "metrics": _metric_table(scores_before, scores_after, request),
            "patch_info": _jsonable(patch.info),
            "seconds": round(seconds, 3),
            "version": version,
        }

    def _metric_scores(self, request: EditRequest, refs: list[tuple[str, str]]) -> dict:
        pairs: list[tuple[str, str, str]] = [("reliability", request.prompt_text, request.target_new)]
        if request.target_true:
            pairs.append(("true", request.prompt_text, request.target_true))
        pairs += [("generalization", p, request.target_new) for p in request.rephrase]
        pairs += [("locality", p, g) for p, g in refs]
        scores = score_pairs(self.loaded, [p for _, p, _ in pairs], [t for _, _, t in pairs])
        out: dict[str, list] = {}
        for (kind, _, _), s in zip(pairs, scores):
            out.setdefault(kind, []).append(s)
        return out

    def _run_undo(self, edit_id: int, rebase: bool) -> dict:
        with self.model_lock:
            with self._meta_lock:
                entries = list(self._entries)
            idx = next((i for i, e in enumerate(entries) if e.id == edit_id), None)
            if idx is None:
                raise ServeError(
                    404, f"no edit #{edit_id} in the history (see GET /api/history)", "not_found"
                )
            later = entries[idx + 1 :]
            self.session.undo(len(entries) - idx)  # bit-exact: back to the state before edit #edit_id
            reapplied: list[HistoryEntry] = []
            try:
                for e in later:
                    patch, rebased = e.patch, e.rebased
                    try:
                        patch.check_base(self.loaded)
                    except PatchError:
                        if not rebase:
                            raise PatchError(
                                f"edit #{e.id} was computed on top of edit #{edit_id} and changes the same "
                                f"weights ({', '.join(patch.param_names)}), so it cannot be re-applied "
                                f"unchanged once #{edit_id} is gone. Undo #{e.id} first, or pass "
                                f'"rebase": true to add its weight change onto the model without #{edit_id}.'
                            ) from None
                        patch = _rebased(patch, self.loaded, edit_id)
                        rebased = True
                    self.session.apply(patch)
                    reapplied.append(dataclasses.replace(e, patch=patch, rebased=rebased))
            except BaseException:
                self.session.undo(len(reapplied))
                check, self.session.check = self.session.check, False
                try:  # the originals re-apply exactly: the tensors are bit-identical to when they were made
                    for e in entries[idx:]:
                        self.session.apply(e.patch)
                finally:
                    self.session.check = check
                raise
            with self._meta_lock:
                self._entries = entries[:idx] + reapplied
                self.version += 1
                version = self.version
        log.info("undid edit #%d (%d later edits re-applied)", edit_id, len(reapplied))
        return {
            "undone": edit_id,
            "reapplied": [e.id for e in reapplied],
            "rebased": [e.id for e in reapplied if e.rebased],
            "version": version,
        }

    def _run_reset(self) -> dict:
        with self.model_lock:
            self.session.reset()
            with self._meta_lock:
                undone = [e.id for e in self._entries]
                self._entries = []
                self.version += 1
                version = self.version
        return {"undone": undone, "version": version}

    def _run_upload(self, patch: EditPatch) -> dict:
        with self.model_lock:
            self.session.apply(patch)  # checks fingerprints against the current model first
            with self._meta_lock:
                entry = HistoryEntry(next(self._ids), patch, "upload", time.time())
                self._entries.append(entry)
                self.version += 1
                version = self.version
        return {"edit": entry.summary(), "version": version}

    # ------------------------------------------------------------------ helpers
    def _check_length(self, n_tokens: int, field_name: str) -> None:
        limit = self.loaded.max_positions
        if limit is not None and n_tokens > limit:
            raise ServeError(
                422,
                f"{field_name}: {n_tokens} tokens is longer than the model's context of {limit}",
                "validation",
            )


def _rebased(patch: EditPatch, loaded: LoadedModel, removed: int) -> EditPatch:
    """The same deltas, recorded as made against the current tensors (used when an earlier edit was undone)."""
    info = dict(patch.info)
    info["rebased"] = {"after_undo_of": removed, "original_fingerprints": patch.base.get("fingerprints", {})}
    return dataclasses.replace(patch, base=EditPatch.base_of(loaded, patch.param_names), info=info)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _metric_table(before: dict, after: dict, request: EditRequest) -> list[dict]:
    """Teacher-forced metric rows (before / after) for the edit prompt, paraphrases and unrelated prompts."""
    rows = []

    def add(metric: str, key: str, fn: Callable, protocol: str) -> None:
        if before.get(key):
            rows.append(
                {
                    "metric": metric,
                    "scoring": "teacher-forced",
                    "protocol": protocol,
                    "n": len(before[key]),
                    "before": _mean([fn(s) for s in before[key]]),
                    "after": _mean([fn(s) for s in after[key]]),
                }
            )

    add("reliability", "reliability", lambda s: s.accuracy, "token accuracy of target_new on the edit prompt")
    add("P(target_new)", "reliability", lambda s: math.exp(sum(s.logprobs)), "probability of target_new")
    if request.target_true:
        add("P(target_true)", "true", lambda s: math.exp(sum(s.logprobs)), "probability of target_true")
    add(
        "generalization",
        "generalization",
        lambda s: s.accuracy,
        "token accuracy of target_new on paraphrases",
    )
    add(
        "locality",
        "locality",
        lambda s: s.accuracy,
        "argmax agreement with the pre-edit greedy continuation of each unrelated prompt",
    )
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------------- causal tracing hook
def trace_function() -> Callable | None:
    """``lmedit.locate.causal_trace`` if that module provides it, else None.

    It is called as ``causal_trace(loaded, prompt, subject, answer=..., kinds=[kind], samples=...)`` and
    returns a TraceResult whose ``to_dict()`` holds ``tokens``, ``subject_range`` and ``scores`` {kind:
    [layers, tokens]}; ``trace_to_json`` adapts it for JSON.
    """
    try:
        mod = importlib.import_module("lmedit.locate")
    except ImportError:
        return None
    return getattr(mod, "causal_trace", None)


def trace_to_json(result: Any) -> dict:
    """A JSON view of a causal-tracing result (NaN becomes null)."""
    data = result.to_dict() if hasattr(result, "to_dict") else result
    if not isinstance(data, dict):
        data = {k: getattr(result, k) for k in ("scores", "tokens", "layers") if hasattr(result, k)}
    return _jsonable(data)


def read_patch_zip(path: Path, max_unpacked: int) -> EditPatch:
    """Load an uploaded patch archive (``patch.json`` + ``patch.safetensors``, at the root or in one folder).

    Member paths are never used to write files (only the two known names are extracted), and the unpacked size
    is capped at ``max_unpacked`` bytes.
    """
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ServeError(400, "the upload is not a zip archive of a patch folder", "bad_patch") from None
    with zf, tempfile.TemporaryDirectory(prefix="lmedit-upload-") as tmp:
        found: dict[str, zipfile.ZipInfo] = {}
        for member in zf.infolist():
            if member.is_dir():
                continue
            base = member.filename.rsplit("/", 1)[-1]
            if base not in (META_FILE, TENSOR_FILE):
                raise ServeError(
                    400,
                    f"unexpected file {member.filename!r} in the archive; a patch holds "
                    f"{META_FILE} and {TENSOR_FILE} only",
                    "bad_patch",
                )
            if base in found:
                raise ServeError(400, f"the archive holds {base} twice", "bad_patch")
            found[base] = member
        missing = {META_FILE, TENSOR_FILE} - set(found)
        if missing:
            raise ServeError(400, f"the archive has no {sorted(missing)[0]}", "bad_patch")
        if sum(m.file_size for m in found.values()) > max_unpacked:
            raise ServeError(413, f"the patch unpacks to more than {max_unpacked} bytes", "too_large")
        for base, member in found.items():
            written = 0
            with zf.open(member) as src, open(Path(tmp) / base, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_unpacked:
                        raise ServeError(
                            413, f"the patch unpacks to more than {max_unpacked} bytes", "too_large"
                        )
                    dst.write(chunk)
        try:
            return EditPatch.load(tmp)
        except PatchError as e:
            raise ServeError(400, f"invalid patch: {e}", "bad_patch") from None
        except (KeyError, ValueError, OSError) as e:
            raise ServeError(400, f"invalid patch: {type(e).__name__}: {e}", "bad_patch") from None
