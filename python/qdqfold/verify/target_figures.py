"""The figures of verify's ``target`` section (see :mod:`.target`): onnxruntime's integer kernels measured at its
default level, the static saturation check's coverage of them, and the deviation an approximate rewrite causes
against the QAT export."""

from __future__ import annotations

import math
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .judge import _figures
from .loading import _Model, _run, _session
from .steps import is_quantized_unit, last_quantizer_steps
from .twin import _twin_bytes

if TYPE_CHECKING:
    from .result import VerifyResult
    from .target import TargetPlan

#: onnxruntime's integer kernels whose u8s8 GEMM sums int8 weight pairs (the saturation check's subject).
GEMM_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger")

#: The level and provider the kernels are measured at (what a deployment gets by default).
MEASURED_AT = {"level": "ORT_ENABLE_ALL", "provider": "CPUExecutionProvider"}

_TOKEN = re.compile(r"_token_\d+$")  # onnxruntime names a fused node after the layer: "<layer>_token_<n>"


def measured_kernels(model: _Model) -> tuple[dict[str, int], dict[str, list[str]]]:
    """onnxruntime's quantized node units by op type in the model it saves at ORT_ENABLE_ALL (CPU provider), and
    the names of its integer GEMM kernels (each the layer's name, onnxruntime's ``_token_<n>`` suffix removed)."""
    import mmap

    import onnxruntime as ort

    from ..graphinfo import read_model_info

    with tempfile.TemporaryDirectory(prefix="qdqfold-verify-target-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        _session(model.source(), ort.GraphOptimizationLevel.ORT_ENABLE_ALL, path, external_folder=model.folder)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                nodes = [n for n in read_model_info(view).nodes if n.graph == "main"]
            finally:
                view.release()
    counts: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    for n in nodes:
        if is_quantized_unit(n.op_type):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
            if n.op_type in GEMM_KERNELS:
                names.setdefault(n.op_type, []).append(_TOKEN.sub("", n.name))
    return dict(sorted(counts.items())), names


def kernel_table(predicted: Mapping[str, Mapping[str, int]], before: Mapping[str, int],
                 after: Mapping[str, int]) -> dict[str, Any]:
    """Predicted beside measured, per op, and where they disagree (ops the prediction covers)."""
    ops = sorted(set(predicted.get("before", {})) | set(predicted.get("after", {})) | set(before) | set(after))
    rows, disagree = [], []
    for op in ops:
        row = {"op": op, "predicted_before": predicted.get("before", {}).get(op),
               "measured_before": before.get(op, 0), "predicted_after": predicted.get("after", {}).get(op),
               "measured_after": after.get(op, 0)}
        for side in ("before", "after"):
            p = row[f"predicted_{side}"]
            if p is not None and p != row[f"measured_{side}"]:
                disagree.append({"op": op, "model": "original" if side == "before" else "output", "predicted": p,
                                 "measured": row[f"measured_{side}"]})
        if any(row[k] for k in row if k != "op"):
            rows.append(row)
    return {"rows": rows, "disagreements": disagree,
            "not_predicted": [op for op in ops if op not in predicted.get("after", {}) and
                              (before.get(op) or after.get(op))]}


def saturation(layers: Sequence[Any], formed: Mapping[str, list[str]]) -> dict[str, Any]:
    """The static check's layers against the integer GEMM kernels onnxruntime formed: covered when every formed
    kernel is a layer the check looked at (by name; unnamed layers by count per kernel)."""
    checked = {lay.node: lay for lay in layers}
    uncovered: list[dict[str, str]] = []
    matched: set[str] = set()
    for op, names in sorted(formed.items()):
        unmatched = [n for n in names if n not in checked or checked[n].kernel != op]
        matched |= {n for n in names if n not in unmatched}
        spare = [lay for lay in layers if lay.kernel == op and lay.node not in names]  # e.g. "Conv#12": unnamed
        uncovered += [{"node": n or "(unnamed)", "kernel": op} for n in unmatched[len(spare):]]
    flagged = [lay.node for lay in layers if lay.can_saturate]
    return {"checked": len(layers), "formed": sum(len(v) for v in formed.values()), "covered": not uncovered,
            "uncovered": uncovered, "can_saturate": len(flagged), "flagged": flagged,
            "not_formed": [lay.node for lay in layers if lay.node not in {n for v in formed.values() for n in v}],
            "cpus": "x86-64 without VNNI (AVX2, or AVX-512 without VNNI)", "remedy": "session.x64quantprecision=1"}


def deviation(base: _Model, fold: _Model, report: Any, seed: int, names: list[str],
              feed_sets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How far the output moves against the QAT export (the original, optimisations off) on the input sets verify
    ran, beside its rounding twin's deviation from the same original: per output the worst input set's max abs,
    share of the range, steps of the last quantizer before it, SNR, elements moved by half a step, and (for a
    [batch, classes] output) the rows whose largest element changed."""
    import numpy as np

    original = _session(base.source(), None, external_folder=base.folder)
    folded = _session(fold.source(), None, external_folder=fold.folder)
    twin = _session(_twin_bytes(base.proto(), report, seed, base.folder), None, external_folder=base.folder) \
        if report is not None else None
    steps = last_quantizer_steps(base.proto())
    figures: dict[str, tuple[list, list]] = {n: ([], []) for n in names}
    top1 = {n: [0, 0] for n in names}
    for feeds in feed_sets:
        out_o, out_f = _run(original, feeds), _run(folded, feeds)
        out_t = _run(twin, feeds) if twin is not None else None
        for k, name in enumerate(names):
            figures[name][0].append(_figures(out_o[k], out_f[k], steps.get(name)))
            if out_t is not None:
                figures[name][1].append(_figures(out_o[k], out_t[k], steps.get(name)))
            o, f = np.asarray(out_o[k]), np.asarray(out_f[k])
            if o.ndim == 2 and o.shape[1] > 1 and o.shape == f.shape:
                top1[name][0] += int(np.count_nonzero(o.argmax(1) != f.argmax(1)))
                top1[name][1] += o.shape[0]
    rows = []
    for name in names:
        fold_f, twin_f = figures[name]
        worst = max(fold_f, key=lambda f: f[3])
        step = steps.get(name)
        max_abs = max(f[0] for f in fold_f)
        floor_abs = max((f[0] for f in twin_f), default=None)
        floor_range = max((f[3] for f in twin_f), default=None)
        of_range = max(f[3] for f in fold_f)
        rows.append({
            "name": name, "max_abs": max_abs, "of_range": of_range, "range": worst[2],
            "step": step, "steps": max_abs / step if step else None,
            "moved": None if worst[4] is None else max(f[4] for f in fold_f),
            "snr_db": min(f[5] for f in fold_f),
            "floor_max_abs": floor_abs, "floor_of_range": floor_range,
            "floor_snr_db": min((f[5] for f in twin_f), default=None),
            "times_floor": (of_range / floor_range if floor_range else (math.inf if of_range else 0.0))
            if floor_range is not None else None,
            "top1_changed": top1[name][0] if top1[name][1] else None, "top1_rows": top1[name][1] or None,
        })
    return rows


def target_section(plan: TargetPlan, result: VerifyResult, base: _Model, fold: _Model, report: Any, seed: int,
                   names: list[str], feed_sets: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``target`` section of the verify result."""
    from .. import kernels as kernel_check

    before, _ = measured_kernels(base)
    after, formed = measured_kernels(fold)
    source = fold.source()
    layers = kernel_check.check_file(source) if isinstance(source, str) else \
        kernel_check.check_bytes(source, fold.folder)
    section: dict[str, Any] = {
        "name": plan.name, "measured_at": dict(MEASURED_AT),
        "kernels": {"predicted": plan.predicted, "measured": {"before": before, "after": after},
                    **kernel_table(plan.predicted, before, after)},
        "saturation": saturation(layers, formed),
        "rewrites": "differs" if plan.problems else "approximate" if plan.approximate else "exact",
        "judged_against": "the original (QAT export)" if plan.reference is None else
        "the original given the same new roundings (reference)",
        "quantizers": dict(plan.quantizers), "problems": list(plan.problems), "approximate": None,
    }
    if plan.approximate:
        section["approximate"] = {
            "option": "requantize_residuals" if any(e.get("code") == "requantized-residual" for e in plan.approximate)
            else "approximate target rewrite",
            "layers": [{"node": e["node"], "code": e.get("code"),
                        "new_rounding_step": dict(e.get("metrics") or {}).get("new_rounding_step")}
                       for e in plan.approximate],
            "rounded_inputs": plan.rounded, "separated": plan.reference is not None,
            "not_separated": plan.not_separated,
            "outputs": deviation(base, fold, report, seed, names, feed_sets),
        }
    return section
