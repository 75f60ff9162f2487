"""The fold report: what happened to every BatchNormalization, in a form for people and for machines."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from .graphinfo import ModelInfo


#: The JSON document's format: "schema" in every report the CLI writes (see docs/report.schema.json). The
#: number changes when a field changes meaning or goes away; new fields may appear without a change.
SCHEMA = "qdqfold.report/2"  # 2: "attempts" per BatchNormalization


def with_schema(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with ``"schema"`` first."""
    return {"schema": SCHEMA, **document}


def _how(exact: bool | str, metrics: dict[str, float], approximately: str) -> str:
    if exact == "bias-rounded":
        return f"exactly but for the int32 bias rounding, <= {metrics.get('bias_error_at_output', 0):.3g} at the output"
    return "exactly" if exact else approximately


class FoldAttempt(TypedDict):
    """One fold rule's look at a BN (``BatchNormEntry.attempts``)."""

    rule: str  # "conv-bn", "bn-layers" (the forward folds), "merge-branches", ...
    verdict: str  # "kept" or "folded"
    code: str  # the reason code, or the fold's name
    message: str
    at: str | None  # the node or value at fault, where the rule names one
    option: str | None  # the option (keyword) that changes this outcome


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
    exact: bool | str  # True, "bias-rounded" (exact but for a reported int32 bias rounding), or False
    new_tensors: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    # "BatchNormalization", or Mul / Add / Sub / Div by a per-channel constant folded like one (FrozenBatchNorm2d,
    # layer scale); such a node is listed when folded, or kept after a layer with a constant weight.
    op_type: str = "BatchNormalization"
    #: Every fold rule that looked at it, in order: {"rule", "verdict" ("kept" / "folded"), "code", "message",
    #: "at" (the node or value at fault, or None), "option" (the keyword that changes it, or None)}. ``code`` is
    #: the deciding one (the fold, or the first reason to keep it), the one the summary counts.
    attempts: list[FoldAttempt] = field(default_factory=list)

    def describe(self) -> str:
        """One line for people."""
        if self.folded:
            how = _how(self.exact, self.metrics, "APPROXIMATELY")
            return f"{self.node}: folded {self.direction} into {self.into_op} {', '.join(self.into)} ({how}; {self.code})"
        return f"{self.node}: kept [{self.code}] {self.message}"


def found_line(totals: dict[str, int]) -> str:
    """The head line of a summary from ``totals`` (one model's or summed over many): the BatchNormalization
    count, the per-channel Mul/Add/Sub/Div count when there are any, then folded and kept (both kinds)."""
    ew = totals.get("elementwise", 0)
    found = f"BatchNormalization: {totals['batchnorms']} found" + (
        f", per-channel Mul/Add/Sub/Div: {ew} found" if ew else "")
    return f"{found}; {totals['folded']} folded, {totals['kept']} kept" if ew else \
        f"{found}, {totals['folded']} folded, {totals['kept']} kept"


#: The keys of the native report (``qdqfold_native.report_fields()["report"]``) that :class:`FoldReport` does
#: not keep: batch.py reads them for its op-type and size columns. FoldReport's fields and these are every key
#: (tests/test_report_fields.py), so a key the core adds is either kept here or listed here.
NATIVE_KEYS_NOT_KEPT = frozenset({"op_types", "input_files", "input_bytes"})


@dataclass
class FoldReport:
    """The report of one fold run. ``batchnorms`` lists every BatchNormalization, subgraphs included."""

    batchnorms: list[BatchNormEntry]
    #: File to file: the external data files written beside the output (named after it), and the input's
    #: data files an in-place fold removed (the new model no longer uses them).
    data_files: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    #: merge_branches: one entry per sum of parallel branches (node: the sum), merged ("merge-branches") or
    #: kept with its reason; the identity BNs a merge removed are in ``batchnorms`` too.
    merges: list[BatchNormEntry] = field(default_factory=list)
    #: The deployment target (``target="onnxruntime"``; "" without one): one entry per layer it looked at
    #: (node: the layer; folded: given output quantizers, code "output-quantizer"; else left in float with the
    #: reason), and the integer kernels onnxruntime is expected to form, {"before": {op: n}, "after": {op: n}}.
    target: str = ""
    target_layers: list[BatchNormEntry] = field(default_factory=list)
    target_kernels: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_native(cls, data: dict[str, Any]) -> "FoldReport":
        return cls([BatchNormEntry(**entry) for entry in data["batchnorms"]],
                   list(data.get("data_files", [])), list(data.get("removed_files", [])),
                   [BatchNormEntry(**entry) for entry in data.get("merges", [])],
                   str(data.get("target", "")),
                   [BatchNormEntry(**entry) for entry in data.get("target_layers", [])],
                   {k: dict(v) for k, v in data.get("target_kernels", {}).items()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FoldReport":
        """The inverse of :meth:`to_dict` (totals are recomputed, not read)."""
        target = data.get("target")
        if isinstance(target, dict):  # to_dict's block
            data = {**data, "target": target["name"], "target_layers": target["layers"],
                    "target_kernels": target["kernels"]}
        return cls.from_native(data)

    @property
    def folded(self) -> list[BatchNormEntry]:
        return [b for b in self.batchnorms if b.folded]

    @property
    def kept(self) -> list[BatchNormEntry]:
        return [b for b in self.batchnorms if not b.folded]

    @property
    def approximate(self) -> list[BatchNormEntry]:
        """Folded BNs whose fold is not exact (only an approximate option allows those)."""
        return [b for b in self.batchnorms if b.folded and not b.exact]

    @property
    def new_tensors(self) -> list[str]:
        return [name for b in self.batchnorms for name in b.new_tensors]

    def kept_by_reason(self) -> Counter:
        return Counter(b.code for b in self.kept)

    def folded_by_fold(self) -> Counter:
        """Folded BNs counted by the fold that took them (its name, e.g. ``conv-bn``)."""
        return Counter(b.code for b in self.folded)

    @property
    def elementwise(self) -> list[BatchNormEntry]:
        """The per-channel Mul / Add / Sub / Div entries (not BatchNormalization nodes)."""
        return [b for b in self.batchnorms if b.op_type != "BatchNormalization"]

    def totals(self) -> dict[str, int]:
        # "batchnorms" counts BatchNormalization nodes; "elementwise" (present when there are any) the per-channel
        # Mul / Add / Sub / Div entries; the other totals count both.
        totals = {
            "batchnorms": len(self.batchnorms) - len(self.elementwise),
            "folded": len(self.folded),
            "kept": len(self.kept),
            "exact": sum(1 for b in self.folded if b.exact),
            "approximate": len(self.approximate),
            "backward": sum(1 for b in self.folded if b.direction == "backward"),
            "forward": sum(1 for b in self.folded if b.direction == "forward"),
            "new_tensors": len(self.new_tensors),
        }
        if self.elementwise:
            totals["elementwise"] = len(self.elementwise)
        return totals

    def find(self, node: str) -> BatchNormEntry | None:
        return next((b for b in self.batchnorms if b.node == node), None)

    def target_lines(self) -> list[str]:
        """The deployment target's part of a summary: layers given output quantizers, left in float by reason,
        and the integer kernels expected before -> after (empty without a target)."""
        if not self.target:
            return []
        given = [e for e in self.target_layers if e.folded]
        left = Counter(e.code for e in self.target_layers if not e.folded)
        approximate = sum(not e.exact for e in given)
        lines = [f"Target {self.target}: {len(given)} of {len(self.target_layers)} layers given output quantizers "
                 + ("(exactly)" if not approximate else f"({approximate} APPROXIMATE: requantize_residuals)")]
        for code, count in sorted(left.items()):
            lines.append(f"  unchanged {count} x {code}")
        before, after = self.target_kernels.get("before", {}), self.target_kernels.get("after", {})
        changed = [op for op in sorted(set(before) | set(after)) if before.get(op, 0) or after.get(op, 0)]
        kernels = ", ".join(f"{op} {before.get(op, 0)} -> {after.get(op, 0)}" for op in changed) or "none"
        lines.append(f"  integer kernels onnxruntime is expected to form: {kernels}")
        return lines

    def explain_layer(self, node: str) -> str | None:
        """A layer's story under the target, or None when the target did not look at a layer of that name."""
        entry = next((e for e in self.target_layers if e.node == node), None)
        if entry is None:
            return None
        lines = [f"{entry.op_type} {entry.node}" + ("" if entry.graph == "main" else f" (graph {entry.graph})"),
                 f"  target  {self.target}: " + ("given output quantizers" if entry.folded else "left as it was")
                 + f" [{entry.code}]"]
        if entry.into:
            lines.append(f"  from    {', '.join(entry.into)}")
        if entry.new_tensors:
            lines.append(f"  new tensors: {', '.join(entry.new_tensors)}")
        lines.append(f"  why     {entry.message}")
        return "\n".join(lines)

    def explain(self, node: str, model: "ModelInfo | None" = None) -> str:
        """One BN's story for people: where it sits (when the original model's ``ModelInfo`` is given), what
        happened to it and why. Raises ``KeyError`` (listing the BN names) when there is no such BN."""
        entry = self.find(node)
        if entry is None and (story := self.explain_layer(node)) is not None:
            return story
        if entry is None:
            names = ", ".join(b.node for b in self.batchnorms) or "none"
            raise KeyError(f"no BatchNormalization named {node!r}; the model's are: {names}")
        lines = [f"{entry.op_type} {entry.node}" + ("" if entry.graph == "main" else f" (graph {entry.graph})")]
        if model is not None:
            bn = next((n for n in model.nodes if n.graph == entry.graph and n.name == entry.node), None)
            if bn is not None and bn.inputs and bn.outputs:
                producer = model.producer(bn.inputs[0], entry.graph)
                lines.append(f"  reads   {bn.inputs[0]!r} from "
                             + (f"{producer.op_type} {producer.name}" if producer else "a graph input or constant"))
                readers = model.readers(bn.outputs[0], entry.graph)
                read_by = ", ".join(f"{r.op_type} {r.name}" for r in readers)
                lines.append(f"  writes  {bn.outputs[0]!r}, read by " + (read_by or "nothing (a graph output)"))
        if entry.folded:
            how = _how(entry.exact, entry.metrics, "APPROXIMATELY (an approximate option allowed it)")
            lines.append(f"  folded  {entry.direction} into {entry.into_op} {', '.join(entry.into)}, {how}"
                         f" (fold {entry.code})")
            if entry.new_tensors:
                lines.append(f"  new tensors: {', '.join(entry.new_tensors)}")
        else:
            lines.append(f"  kept    [{entry.code}]")
        if entry.message:
            lines.append(f"  why     {entry.message}")
        for key, value in entry.metrics.items():
            lines.append(f"  {key} = {value:.6g}")
        from .render import attempt_lines

        lines += attempt_lines(entry.attempts)
        return "\n".join(lines)

    def summary(self) -> str:
        """A short summary: how many folded, how many kept and why."""
        bns = [b for b in self.batchnorms if b.op_type == "BatchNormalization"]
        lines = [f"BatchNormalization: {len(bns)} found, {sum(b.folded for b in bns)} folded, "
                 f"{sum(not b.folded for b in bns)} kept"]
        if self.elementwise:
            ew = self.elementwise
            lines.append(f"Per-channel Mul/Add/Sub/Div: {len(ew)} found, {sum(b.folded for b in ew)} folded, "
                         f"{sum(not b.folded for b in ew)} kept")
        approximate = [b for b in self.folded if not b.exact]
        if approximate:
            lines.append(f"  {len(approximate)} folded approximately (an approximate option was given)")
        for code, count in sorted(self.kept_by_reason().items()):
            lines.append(f"  kept {count} x {code}")
        lines += self.target_lines()
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": self.totals(),
            "kept_by_reason": dict(sorted(self.kept_by_reason().items())),
            "folded_by_fold": dict(sorted(self.folded_by_fold().items())),
            "batchnorms": [asdict(b) for b in self.batchnorms],
            "data_files": list(self.data_files),
            "removed_files": list(self.removed_files),
            **({"merges": [asdict(m) for m in self.merges]} if self.merges else {}),
            **({"target": {
                "name": self.target,
                "given_output_quantizers": sum(e.folded for e in self.target_layers),
                "left_by_reason": dict(sorted(Counter(e.code for e in self.target_layers if not e.folded).items())),
                "kernels": self.target_kernels,
                # The integer-kernel saturation check (issue 21) adds its verdict per layer here.
                "layers": [asdict(e) for e in self.target_layers],
            }} if self.target else {}),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
