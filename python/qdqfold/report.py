"""The fold report: what happened to every BatchNormalization, in a form for people and for machines."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class BatchNormEntry:
    """One BatchNormalization: folded (into what, which way) or kept (reason code and sentence)."""

    graph: str
    node: str
    folded: bool
    direction: str | None
    into: list[str]
    into_op: str | None
    code: str
    message: str
    exact: bool
    new_tensors: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for people."""
        if self.folded:
            how = "exactly" if self.exact else "APPROXIMATELY"
            return f"{self.node}: folded {self.direction} into {self.into_op} {', '.join(self.into)} ({how}; {self.code})"
        return f"{self.node}: kept [{self.code}] {self.message}"


@dataclass
class FoldReport:
    """The report of one fold run. ``batchnorms`` lists every BatchNormalization, subgraphs included."""

    batchnorms: list[BatchNormEntry]

    @classmethod
    def from_native(cls, data: dict[str, Any]) -> "FoldReport":
        return cls([BatchNormEntry(**entry) for entry in data["batchnorms"]])

    @property
    def folded(self) -> list[BatchNormEntry]:
        return [b for b in self.batchnorms if b.folded]

    @property
    def kept(self) -> list[BatchNormEntry]:
        return [b for b in self.batchnorms if not b.folded]

    def kept_by_reason(self) -> Counter:
        return Counter(b.code for b in self.kept)

    def find(self, node: str) -> BatchNormEntry | None:
        return next((b for b in self.batchnorms if b.node == node), None)

    def summary(self) -> str:
        """A short summary: how many folded, how many kept and why."""
        total = len(self.batchnorms)
        lines = [f"BatchNormalization: {total} found, {len(self.folded)} folded, {len(self.kept)} kept"]
        approximate = [b for b in self.folded if not b.exact]
        if approximate:
            lines.append(f"  {len(approximate)} folded approximately (an approximate option was given)")
        for code, count in sorted(self.kept_by_reason().items()):
            lines.append(f"  kept {count} x {code}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": {"batchnorms": len(self.batchnorms), "folded": len(self.folded), "kept": len(self.kept)},
            "batchnorms": [asdict(b) for b in self.batchnorms],
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
