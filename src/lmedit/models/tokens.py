"""Token positions from offset mappings: where the subject ends, where the target starts.

One policy for the whole package (editing and evaluation both use it):

* Prompts get the tokenizer's own leading special tokens (BOS for Gemma/Llama, none for GPT-2), exactly as
  ``tokenizer(prompt)`` would add them; targets never do.
* A target is joined to its prompt with a single space unless one side already has whitespace there
  (``"... city of" + "Rome"`` becomes ``"... city of" + " Rome"``).
* Prompt and target are tokenized as one string and split at the character boundary, so the target tokens
  are the ones the model would really produce after the prompt. If a token straddles the boundary, the two
  parts are tokenized separately and concatenated instead.
* Batches are padded explicitly (right for scoring, left for generation) and pad positions are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmedit.errors import RequestError


def join_target(prompt: str, target: str) -> tuple[str, str]:
    """Move whitespace to the target side of the boundary: ``("city of ", "Rome") -> ("city of", " Rome")``."""
    if not target:
        return prompt, target
    stripped = prompt.rstrip()
    if target[0].isspace():
        return stripped if stripped else prompt, target
    if stripped and stripped != prompt:
        return stripped, " " + target
    if prompt and not prompt[-1].isspace():
        return prompt, " " + target
    return prompt, target


def special_prefix(tok) -> list[int]:
    """The ids the tokenizer puts before any text (e.g. ``[bos]``), found by probing, not by name."""
    probe = "hello"
    with_special = tok(probe, add_special_tokens=True)["input_ids"]
    without = tok(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(without) + 1):
        if with_special[i : i + len(without)] == without:
            return list(with_special[:i])
    return []


def encode_prompt(tok, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``prompt``, with the tokenizer's leading special tokens (offsets (0,0))."""
    prefix = special_prefix(tok)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return prefix + list(enc["input_ids"]), [(0, 0)] * len(prefix) + [tuple(o) for o in enc["offset_mapping"]]


@dataclass(frozen=True)
class PairEncoding:
    """``ids = prompt_ids + target_ids``; logits at ``prompt_len - 1 + j`` predict target token ``j``."""

    ids: list[int]
    prompt_len: int

    @property
    def target_len(self) -> int:
        return len(self.ids) - self.prompt_len


def encode_pair(tok, prompt: str, target: str) -> PairEncoding:
    """Tokenize a (prompt, target) pair under the package's one policy (see module docstring)."""
    prompt, target = join_target(prompt, target)
    prompt_ids, _ = encode_prompt(tok, prompt)
    if not target:
        return PairEncoding(prompt_ids, len(prompt_ids))
    full_ids, offsets = encode_prompt(tok, prompt + target)
    boundary = len(prompt)
    n_prompt = next((i for i, (s, e) in enumerate(offsets) if e > s and s >= boundary), len(full_ids))
    straddles = any(s < boundary < e for s, e in offsets)
    if not straddles and full_ids[:n_prompt] == prompt_ids and n_prompt < len(full_ids):
        return PairEncoding(full_ids, n_prompt)
    target_ids = list(tok(target, add_special_tokens=False)["input_ids"])
    return PairEncoding(prompt_ids + target_ids, len(prompt_ids))


def subject_last_index(tok, prompt: str, subject_start: int, subject_end: int) -> int:
    """Index (in ``encode_prompt(tok, prompt)`` ids) of the token holding the subject's last character."""
    _, offsets = encode_prompt(tok, prompt)
    last_char = subject_end - 1
    for i, (s, e) in enumerate(offsets):
        if s <= last_char < e:
            return i
    raise RequestError("subject", f"no token covers the subject's end (char {last_char}) in {prompt!r}")


@dataclass
class PairBatch:
    """A right-padded batch of (prompt, target) pairs.

    Attributes:
        input_ids: [batch, pos]
        attention_mask: [batch, pos], 0 on padding
        target_mask: [batch, pos], 1 where the logits at that position predict a target token
        target_ids: [batch, pos], the token predicted at each masked position (pad elsewhere)
        prompt_lens, target_lens: per row
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    target_ids: torch.Tensor
    prompt_lens: list[int]
    target_lens: list[int]

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            self.target_ids.to(device),
            self.prompt_lens,
            self.target_lens,
        )


def pad_id(tok) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pid is None else int(pid)


def pair_batch(tok, prompts: Sequence[str], targets: Sequence[str]) -> PairBatch:
    """Encode and right-pad many pairs at once (positions of every target token in ``target_mask``)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encs = [encode_pair(tok, p, t) for p, t in zip(prompts, targets)]
    width = max(len(e.ids) for e in encs)
    pid = pad_id(tok)
    n = len(encs)
    input_ids = torch.full((n, width), pid, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    target_mask = torch.zeros((n, width), dtype=torch.bool)
    target_ids = torch.full((n, width), pid, dtype=torch.long)
    for i, e in enumerate(encs):
        ids = torch.tensor(e.ids, dtype=torch.long)
        input_ids[i, : len(e.ids)] = ids
        attention[i, : len(e.ids)] = 1
        start, stop = e.prompt_len - 1, len(e.ids) - 1
        target_mask[i, start:stop] = True
        target_ids[i, start:stop] = ids[e.prompt_len :]
    return PairBatch(
        input_ids,
        attention,
        target_mask,
        target_ids,
        [e.prompt_len for e in encs],
        [e.target_len for e in encs],
    )


def left_padded(tok, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask of prompts (for batched generation)."""
    encs = [encode_prompt(tok, p)[0] for p in prompts]
    width = max(len(e) for e in encs)
    ids = torch.full((len(encs), width), pad_id(tok), dtype=torch.long)
    mask = torch.zeros((len(encs), width), dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e) :] = 1
    return ids, mask
