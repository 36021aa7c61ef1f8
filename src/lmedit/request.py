"""EditRequest: one fact to change, plus the probes that check it.

    >>> r = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome", " Paris",
    ...                 rephrase=["Where is the Eiffel Tower? It is in"],
    ...                 locality=[("The Colosseum is located in the city of", " Rome")])
    >>> r.prompt_text, r.subject_span
    ('The Eiffel Tower is located in the city of', (4, 16))

``prompt`` either contains ``{}`` (replaced by the subject) or contains the subject verbatim.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmedit.errors import RequestError
from lmedit.models import tokens

Probe = tuple[str, str]


def _probes(value: Any, name: str, index: int | None) -> list[Probe]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise RequestError(name, "must be a list of [prompt, answer] pairs", index)
    out = []
    for j, item in enumerate(value):
        if isinstance(item, dict):
            item = (item.get("prompt"), item.get("answer", item.get("ground_truth")))
        if not (isinstance(item, Sequence) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise RequestError(f"{name}[{j}]", "must be a [prompt, answer] pair of strings", index)
        if not item[0].strip() or not item[1].strip():
            raise RequestError(f"{name}[{j}]", "prompt and answer must be non-empty", index)
        out.append((item[0], item[1]))
    return out


@dataclass
class EditRequest:
    """A fact to edit.

    Args:
        prompt: the edit prompt, with ``{}`` where the subject goes or containing the subject.
        subject: the entity whose fact changes (its last token is where locate-then-edit methods write).
        target_new: the new answer, e.g. ``" Rome"`` (a leading space is added when needed).
        target_true: the current answer, optional (used by probability-comparison metrics).
        rephrase: paraphrased prompts that should change with the edit.
        locality: (prompt, answer) pairs that must not change.
        portability: (prompt, answer) pairs that should follow from the edit.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase: list[str] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    index: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        i = self.index
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise RequestError(name, f"must be a string, got {type(value).__name__}", i)
            if not value.strip():
                raise RequestError(name, "must be non-empty", i)
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise RequestError(
                "target_true", f"must be a string or null, got {type(self.target_true).__name__}", i
            )
        if self.target_true is not None and not self.target_true.strip():
            self.target_true = None
        if "{}" in self.prompt:
            if self.prompt.count("{}") != 1:
                raise RequestError("prompt", "may contain at most one '{}' placeholder", i)
        elif self.subject not in self.prompt:
            raise RequestError(
                "subject",
                f"{self.subject!r} does not occur in the prompt {self.prompt!r}; put it in the prompt or "
                "write the prompt with a '{}' placeholder",
                i,
            )
        _, self.target_new = tokens.join_target(self.prompt_text, self.target_new)
        if self.target_true is not None:
            _, self.target_true = tokens.join_target(self.prompt_text, self.target_true)
            if self.target_true.strip() == self.target_new.strip():
                raise RequestError(
                    "target_new", f"is identical to target_true ({self.target_true!r}): nothing to edit", i
                )
        if isinstance(self.rephrase, str) or not isinstance(self.rephrase, Iterable):
            raise RequestError("rephrase", "must be a list of strings", i)
        self.rephrase = list(self.rephrase)
        for j, r in enumerate(self.rephrase):
            if not isinstance(r, str) or not r.strip():
                raise RequestError(f"rephrase[{j}]", "must be a non-empty string", i)
        self.locality = _probes(self.locality, "locality", i)
        self.portability = _probes(self.portability, "portability", i)

    @property
    def prompt_text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject) if "{}" in self.prompt else self.prompt

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span [start, end) of the subject in ``prompt_text``."""
        start = self.prompt.index("{}") if "{}" in self.prompt else self.prompt.index(self.subject)
        return start, start + len(self.subject)

    @property
    def template(self) -> str:
        """The prompt with ``{}`` in place of the subject."""
        start, end = self.subject_span
        text = self.prompt_text
        return text[:start] + "{}" + text[end:]

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "rephrase": list(self.rephrase),
            "locality": [list(p) for p in self.locality],
            "portability": [list(p) for p in self.portability],
        }

    @classmethod
    def from_dict(cls, d: dict, index: int | None = None) -> EditRequest:
        if not isinstance(d, dict):
            raise RequestError("request", f"must be a JSON object, got {type(d).__name__}", index)
        known = {"prompt", "subject", "target_new", "target_true", "rephrase", "locality", "portability"}
        unknown = set(d) - known
        if unknown:
            raise RequestError(sorted(unknown)[0], f"unknown field; known fields: {sorted(known)}", index)
        missing = {"prompt", "subject", "target_new"} - set(d)
        if missing:
            raise RequestError(sorted(missing)[0], "is required", index)
        return cls(**d, index=index)


def as_requests(requests: Any) -> list[EditRequest]:
    """Normalise one request, a dict, or a list of either into a list of EditRequest."""
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    if not isinstance(requests, Sequence) or isinstance(requests, str) or not requests:
        raise RequestError("requests", "pass an EditRequest, a dict, or a non-empty list of them")
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, EditRequest):
            out.append(r)
        else:
            out.append(EditRequest.from_dict(r, index=i))
    return out


def check_against_model(requests: Sequence[EditRequest], tok, max_positions: int | None) -> None:
    """Validation that needs the tokenizer: token positions resolve and the prompt fits the context."""
    for i, r in enumerate(requests):
        idx = r.index if r.index is not None else i
        start, end = r.subject_span
        tokens.subject_last_index(tok, r.prompt_text, start, end)
        enc = tokens.encode_pair(tok, r.prompt_text, r.target_new)
        if enc.target_len == 0:
            raise RequestError("target_new", f"{r.target_new!r} tokenizes to nothing", idx)
        if max_positions is not None and len(enc.ids) > max_positions:
            raise RequestError(
                "prompt",
                f"prompt + target is {len(enc.ids)} tokens, longer than the model's context of {max_positions}",
                idx,
            )
