"""Report: the result of an evaluation run, as a stable JSON document (schema in docs/evaluation.md).

>>> report = Report.load("runs/ft-m.json")
>>> print(report.table())
>>> print(compare_table([Report.load("a.json"), Report.load("b.json")], ["a", "b"]))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmedit.evaluate.metrics import ALL_KEYS

SCHEMA = "lmedit.report/1"

#: Metric rows of the table, grouped by scoring family.
FAMILIES = {
    "teacher-forced": ("reliability_tf", "generalization_tf", "locality_tf", "portability_tf"),
    "probability comparison": (
        "efficacy_score",
        "efficacy_magnitude",
        "paraphrase_score",
        "paraphrase_magnitude",
        "neighborhood_score",
        "neighborhood_magnitude",
    ),
    "generation": (
        "reliability_gen",
        "reliability_gen_prefix",
        "generalization_gen",
        "generalization_gen_prefix",
        "portability_gen",
        "locality_gen",
    ),
    "free text": ("fluency", "consistency"),
}


@dataclass
class Report:
    """Aggregate metrics before (``pre``) and after (``post``) editing, per-case details and run metadata.

    Attributes:
        pre, post: {metric key: value or None} (keys in ``lmedit.evaluate.metrics.ALL_KEYS``).
        cases: one dict per case (``case_id``, ``requests``, ``group``, ``pre``, ``post``, ``generations``).
        meta: protocol, scoring, dataset, n, seed, model, method, config, versions, timings.
        retention: sequential runs evaluated after each step: [{"step", "edits", "metrics"}].
    """

    pre: dict[str, float | None]
    post: dict[str, float | None]
    cases: list[dict] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    retention: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "meta": self.meta,
            "pre": self.pre,
            "post": self.post,
            "retention": self.retention,
            "cases": self.cases,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False))
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, data: dict, source: str = "<memory>") -> Report:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f'{source}: not an lmedit report (expected "schema": {SCHEMA!r})')
        for key in ("pre", "post", "meta"):
            if not isinstance(data.get(key), dict):
                raise ValueError(f"{source}: field {key!r} must be an object")
        return cls(data["pre"], data["post"], data.get("cases", []), data["meta"], data.get("retention", []))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        return cls.from_json(json.loads(Path(path).read_text()), str(path))

    def title(self) -> str:
        m = self.meta
        proto = m.get("protocol", {})
        return (
            f"{m.get('method', '?')} on {m.get('model', {}).get('name', '?')}, dataset "
            f"{m.get('dataset', {}).get('name', '?')} (n={m.get('n', '?')}), protocol {proto.get('name', '?')}"
            + (f" k={proto['k']}" if proto.get("k", 1) != 1 else "")
        )

    def table(self) -> str:
        """Metrics table: pre, post and the change, grouped by scoring family."""
        return _table([self.pre, self.post], ["pre", "post"], delta=True, title=self.title())


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _table(columns: list[dict], names: list[str], delta: bool = False, title: str = "") -> str:
    keys = [k for k in ALL_KEYS if any(c.get(k) is not None for c in columns)]
    width = max([len(k) for k in keys] + [12]) + 2
    colw = max([len(n) for n in names] + [8]) + 2
    head = (
        f"{'metric':<{width}}"
        + "".join(f"{n:>{colw}}" for n in names)
        + (f"{'change':>{colw}}" if delta else "")
    )
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for family, fkeys in FAMILIES.items():
        rows = [k for k in fkeys if k in keys]
        if not rows:
            continue
        lines.append(f"[{family}]")
        for k in rows:
            vals = [c.get(k) for c in columns]
            line = f"  {k:<{width - 2}}" + "".join(f"{_fmt(v):>{colw}}" for v in vals)
            if delta:
                d = None if None in vals[:2] else vals[1] - vals[0]
                line += f"{'-' if d is None else f'{d:+.3f}':>{colw}}"
            lines.append(line)
    return "\n".join(lines)


def compare_table(reports: list[Report], names: list[str] | None = None) -> str:
    """Post-edit metrics of several reports side by side (with each report's title above)."""
    names = names or [f"#{i + 1}" for i in range(len(reports))]
    titles = "\n".join(f"{n}: {r.title()}" for n, r in zip(names, reports))
    return titles + "\n" + _table([r.post for r in reports], names)
