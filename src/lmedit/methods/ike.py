"""IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?"): editing by demonstrations.

The weights are never touched. The patch carries a context memory (``lmedit.core.context``) with one entry per
edited fact ``f = prompt + target_new``: its sentence embedding (the retrieval key), the similarity ``threshold``
and the prefix, the ``k`` pool demonstrations nearest to the fact followed by the fact itself::

    New Fact: {pool fact}\\nPrompt: {pool query} {answer}\\n\\n      <- k demonstrations, the most similar last
    New Fact: {f}\\nPrompt: {query}                                 <- the query, as scored or generated from

Demonstrations are of the paper's three types, built from every case of the pool (a dataset; by default the
bundled CounterFact set): **copy** (the case's edit prompt -> its new target), **update** (its first paraphrase
-> the new target) and **retain** (its first neighbourhood prompt -> that prompt's original answer); those that
mention an edited subject are left out. As in the paper and EasyEdit they are retrieved once per fact at edit
time, by cosine similarity of all-MiniLM-L6-v2 embeddings between ``"New Fact: {f}\\nPrompt: {prompt}\\n\\n"``
and each demonstration; pool embeddings are memoised per process.

At query time lmedit's scoring and generation embed each prompt and find its nearest stored fact; if the cosine
similarity reaches ``threshold`` the prompt is read with that fact's prefix, otherwise exactly as it is (on the
bundled set paraphrases score 0.5-0.96 against their fact, neighbourhood prompts 0.08-0.77, prompts of other
cases -0.17-0.49). ``threshold=-1`` prepends the nearest fact to every prompt, as the paper does.

Sequential editing: when the model already carries a context memory (an ``EditSession`` applied an earlier IKE
patch), the new patch extends it (``ContextSpec.parent``) and stores only its own facts.

    >>> patch = lmedit.edit(loaded, request, method="ike", k=16)
    >>> with patch.applied(loaded):
    ...     lmedit.greedy_generate(loaded, ["The Eiffel Tower can be found in the city of"], 3)
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmedit.config import MethodConfig, hp
from lmedit.core.context import ENCODER, ContextSpec, SentenceEncoder, encoder_for, installed_context
from lmedit.core.patch import EditPatch
from lmedit.data.loaders import EvalCase, load_dataset
from lmedit.errors import ConfigError
from lmedit.models import tokens
from lmedit.models.arch import get_submodule
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class IKEConfig(MethodConfig):
    k: int = hp(16, "Demonstrations prepended per fact, retrieved from the pool (the paper uses 32).")
    threshold: float = hp(
        0.5,
        "Cosine similarity between a prompt and its nearest stored fact below which nothing is prepended "
        "(the prompt is read unchanged); -1 prepends to every prompt, as in the paper.",
    )
    pool: str = hp(
        "bundled",
        "Demonstration pool: a dataset name or file load_dataset reads; demonstrations that mention an edited "
        "subject are left out.",
    )
    progress: bool = hp(False, "Log each fact's retrieval (pool size, prefix length) at INFO level.")

    def validate(self) -> None:
        if self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [-1, 1] (a cosine similarity), got {self.threshold}")


def demonstration(fact: str, query: str, answer: str) -> str:
    """One demonstration block: ``"New Fact: {fact}\\nPrompt: {query} {answer}\\n\\n"``."""
    return f"New Fact: {fact}\nPrompt: {''.join(tokens.join_target(query, answer))}\n\n"


def fact_text(request: EditRequest) -> str:
    """The new fact as text: the prompt followed by the new target."""
    return "".join(tokens.join_target(request.prompt_text, request.target_new))


def build_prefix(demonstrations: Sequence[str], fact: str) -> str:
    """The text read before a query: the demonstrations, then ``"New Fact: {fact}\\nPrompt: "``."""
    return "".join(demonstrations) + f"New Fact: {fact}\nPrompt: "


def demonstration_pool(cases: Sequence[EvalCase], exclude_subjects: Sequence[str] = ()) -> list[str]:
    """Copy, update and retain demonstrations of ``cases``, leaving out every one that mentions a subject of
    ``exclude_subjects`` (as a whole word or phrase, case-insensitive).

    A case gives copy (edit prompt -> new target), update (first paraphrase -> new target) and retain (first
    neighbourhood prompt -> its answer), as far as it has paraphrases and neighbourhood prompts. Leaving out
    mentions drops the edited case itself, and also e.g. retain demonstrations of its neighbours whose prompt is
    about the edited subject: they would state its old answer.
    """
    excluded = [re.compile(rf"(?<!\w){re.escape(s.strip())}(?!\w)", re.IGNORECASE) for s in exclude_subjects]
    pool = []
    for case in cases:
        req = case.requests[0]
        fact = fact_text(req)
        pool.append(demonstration(fact, req.prompt_text, req.target_new))
        if case.generalization:
            pool.append(demonstration(fact, case.generalization[0].prompt, req.target_new))
        if case.locality:
            pool.append(demonstration(fact, case.locality[0].prompt, case.locality[0].answer))
    return [d for d in pool if not any(s.search(d) for s in excluded)]


def retrieve(encoder: SentenceEncoder, pool: Sequence[str], query: str, k: int) -> list[str]:
    """The ``k`` demonstrations of ``pool`` most similar to ``query``, in ascending similarity (most similar
    last, next to the query, as in the paper)."""
    if k == 0 or not pool:
        return []
    sim = encoder.embed(pool) @ encoder.embed([query])[0]  # [len(pool)]
    top = torch.topk(sim, min(k, len(pool))).indices.tolist()
    return [pool[i] for i in reversed(top)]


def _base_params(loaded) -> list[str]:
    """Parameters fingerprinted to recognise the base model: the final norm's (the LM head's where the norm has
    none). Context patches change no tensor; this only refuses them on another model."""

    def params(name: str) -> list[str]:
        return [f"{name}.{n}" for n, _ in get_submodule(loaded.model, name).named_parameters()]

    return params(loaded.arch.ln_f) or params(loaded.arch.lm_head)


def run_ike(loaded, requests: list[EditRequest], config: IKEConfig) -> EditPatch:
    """Compute the IKE patch for ``requests``, extending the installed context memory if there is one."""
    t0 = time.perf_counter()
    encoder = encoder_for(loaded.model, ENCODER)
    pool_ds = load_dataset(config.pool)
    pool = demonstration_pool(pool_ds.cases, [r.subject for r in requests])
    if config.k > 0 and not pool:
        raise ConfigError(
            f"pool {config.pool!r} gives no demonstrations once the edited subjects are left out"
        )
    facts, prefixes, prefix_tokens = [], [], []
    for r in requests:
        fact = fact_text(r)
        demos = retrieve(encoder, pool, f"New Fact: {fact}\nPrompt: {r.prompt_text}\n\n", config.k)
        prefix = build_prefix(demos, fact)
        enc = tokens.encode_pair(loaded.tokenizer, prefix + r.prompt_text, r.target_new)
        limit = loaded.max_positions
        if limit is not None and len(enc.ids) > limit:
            raise ConfigError(
                f"with k={config.k} demonstrations the prompt {r.prompt_text!r} is {len(enc.ids)} tokens, longer "
                f"than the model's context of {limit}; lower k"
            )
        facts.append(fact)
        prefixes.append(prefix)
        prefix_tokens.append(enc.prompt_len - len(tokens.encode_prompt(loaded.tokenizer, r.prompt_text)[0]))
    previous = installed_context(loaded.model)
    spec = ContextSpec(
        config={"encoder": ENCODER, "facts": facts, "prefixes": prefixes},
        tensors={
            "keys": encoder.embed(facts),
            "thresholds": torch.full((len(facts),), float(config.threshold)),
        },
        parent=previous.spec_fingerprint if previous is not None else None,
    )
    info = {
        "pool": pool_ds.name,
        "pool_demonstrations": len(pool),
        "prefix_tokens": prefix_tokens,
        "memory_facts": len(facts) + (len(previous) if previous is not None else 0),
        "seconds": time.perf_counter() - t0,
    }
    (log.info if config.progress else log.debug)("ike: %s", info)
    return EditPatch(
        method="ike",
        config=config.to_dict(),
        requests=[r.to_dict() for r in requests],
        deltas=[],
        base=EditPatch.base_of(loaded, _base_params(loaded)),
        info=info,
        context=spec,
    )


@register_method("ike", IKEConfig, family="memory-based")
def edit_ike(loaded, requests: list[EditRequest], config: IKEConfig) -> EditPatch:
    """IKE: retrieved demonstrations and the new fact prepended to related prompts; weights untouched."""
    return run_ike(loaded, requests, config)


__all__ = ["IKEConfig", "build_prefix", "demonstration", "demonstration_pool", "retrieve", "run_ike"]
