"""Perplexity on held-out text: the general-ability check of lifelong editing runs.

    >>> held = HeldOut.from_corpus(loaded, "../shared/data/wikitext-2/test.txt", n_tokens=4096)
    >>> held.perplexity(loaded)          # exp(mean NLL per token) of the model as it is now (patches included)

The text is tokenized and packed into sequences exactly as the key statistics are (``core.stats.token_sequences``:
documents back to back, each sequence starting with the tokenizer's special prefix), and every token after the
prefix is scored teacher-forced through the streamed LM head (``core.forward.head_scores``), so the 262k-token
vocabulary of the bundled Gemma never materialises full logits. The same ``HeldOut`` scored before and after
edits gives the change of perplexity an editing run causes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmedit.core.corpus import Corpus, resolve_corpus
from lmedit.core.forward import final_hidden, head_scores
from lmedit.core.stats import token_sequences
from lmedit.errors import ConfigError
from lmedit.models import tokens


@dataclass
class HeldOut:
    """Token sequences of a held-out text and how many leading tokens of each are not scored.

    Attributes:
        sequences: token ids, each ``seq_len`` long (the last may be shorter).
        prefix_len: leading special tokens of every sequence (not scored as targets).
        source: the corpus id.
    """

    sequences: list[list[int]]
    prefix_len: int
    source: str

    @classmethod
    def from_corpus(
        cls, loaded, corpus: str | Path | Corpus, n_tokens: int = 4096, seq_len: int = 256
    ) -> HeldOut:
        """The first ``n_tokens`` scored tokens of ``corpus`` (anything ``resolve_corpus`` takes)."""
        if n_tokens < 1:
            raise ConfigError(f"perplexity tokens must be >= 1, got {n_tokens}")
        corp = resolve_corpus(corpus)
        prefix_len = len(tokens.special_prefix(loaded.tokenizer))
        first = max(prefix_len, 1)  # a sequence's first scored token (the first token needs one before it)
        seqs: list[list[int]] = []
        scored = 0
        for seq in token_sequences(loaded.tokenizer, corp, seq_len):
            take = min(len(seq), first + n_tokens - scored)
            seqs.append(seq[:take])
            scored += max(0, take - first)
            if scored >= n_tokens:
                break
        if scored == 0:
            raise ConfigError(f"held-out corpus {corp.id!r} yielded no text to score")
        return cls(seqs, prefix_len, corp.id)

    @property
    def n_tokens(self) -> int:
        """Tokens scored (every token after each sequence's special prefix, or after its first token)."""
        return sum(max(0, len(s) - max(self.prefix_len, 1)) for s in self.sequences)

    @torch.no_grad()
    def perplexity(self, loaded, batch_size: int = 8) -> float:
        """exp(mean NLL) over the scored tokens, with the model as it is (applied patches included)."""
        model, arch, device = loaded.model, loaded.arch, loaded.device
        first = max(self.prefix_len, 1)  # the first target position (a token needs something before it)
        total, count = 0.0, 0
        for b in range(0, len(self.sequences), batch_size):
            chunk = self.sequences[b : b + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), tokens.pad_id(loaded.tokenizer), dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = final_hidden(model, arch, ids, mask)  # [b, width, d]
            scored = mask[:, first:].bool()  # [b, width - first]: targets at positions first..
            lp, _ = head_scores(model, arch, hidden[:, first - 1 : -1][scored], ids[:, first:][scored])
            total -= float(lp.double().sum())
            count += int(scored.sum())
        return math.exp(total / count)

    def describe(self) -> dict:
        return {"source": self.source, "tokens": self.n_tokens, "sequences": len(self.sequences)}


__all__ = ["HeldOut"]
