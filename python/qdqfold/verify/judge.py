"""The judge: figures of one output on one input set, and the verdict of an output from them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .result import FLOOR_MULTIPLE, OutputCheck

if TYPE_CHECKING:
    import numpy as np


def _figures(expected: np.ndarray, actual: np.ndarray, step: float | None):
    """(max_abs, max_rel, range, of_range, moved, snr_db, step, rounding) of one output on one input set;
    rounding: a few units of the output type's own rounding at its largest magnitude, as a share of its range
    (what a float16 output moves by when anything upstream is rounded differently)."""
    import numpy as np

    e = np.asarray(expected).astype(np.float64)
    a = np.asarray(actual).astype(np.float64)
    if np.issubdtype(np.asarray(expected).dtype, np.integer):
        step = 1.0  # a quantized output counts in integer steps
    if e.shape != a.shape:
        return math.inf, math.inf, 0.0, math.inf, None, -math.inf, step, 0.0
    if e.size == 0:
        return 0.0, 0.0, 0.0, 0.0, 0 if step else None, math.inf, step, 0.0
    diff = np.abs(a - e)
    diff[np.isnan(a) & np.isnan(e)] = 0.0  # NaN where the original has NaN is no difference
    diff[np.isnan(diff)] = np.inf
    max_abs = float(diff.max())
    nonzero = e != 0
    max_rel = float((diff[nonzero] / np.abs(e[nonzero])).max()) if nonzero.any() else (0.0 if max_abs == 0 else math.inf)
    finite = e[np.isfinite(e)]
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    of_range = max_abs / span if span > 0 else max_abs
    moved = int(np.count_nonzero(diff >= step / 2)) if step else None
    ok = np.isfinite(e) & np.isfinite(diff)
    noise = float(np.sum(diff[ok] ** 2))
    signal = float(np.sum(e[ok] ** 2))
    snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    if not np.all(np.isfinite(diff)):
        snr = -math.inf
    kind = np.asarray(expected).dtype
    unit = {np.dtype(np.float16): 2.0**-10, np.dtype(np.float32): 2.0**-23}.get(kind, 0.0)
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    rounding = 4 * unit * peak / span if span > 0 else 0.0
    return max_abs, max_rel, span, of_range, moved, snr, step, rounding


def _judge(name: str, level: str, folds: list[tuple], floors: list[tuple] | None, tolerance: float,
           approximate: bool, floor_off: float | None = None, flip_step: float | None = None) -> OutputCheck:
    """One output at one level from its per-input-set figures (fold and floor). Within the floor: at most
    ``FLOOR_MULTIPLE`` times the twin's largest deviation over the input sets (at this level, or with
    optimisations off, or onnxruntime's own drift of the original at this level, whichever is largest), or four
    units of the output type's own rounding at its largest magnitude, or one step of the last quantizer before
    the output (a single flip: what rounding differently does, e.g. a reported int32 bias rounding, or
    onnxruntime running a folded layer as an integer kernel and the original as float), or ``tolerance``, as
    shares of the output's range."""
    worst = max(folds, key=lambda f: f[3])
    # Fold and floor alike: the worst input set (flips are rare events; a median of a few sets is often 0).
    of_range = max(f[3] for f in folds)
    moved = None if worst[4] is None else max(f[4] for f in folds)
    snr = min(f[5] for f in folds)
    floor_of_range = floor_moved = floor_snr = None
    if floors:
        floor_of_range = max(f[3] for f in floors)
        floor_moved = None if floors[0][4] is None else max(f[4] for f in floors)
        floor_snr = min(f[5] for f in floors)
    step = max(worst[6] or 0.0, flip_step or 0.0)
    rounding = max(f[7] for f in folds)
    # One flip, measured on the outputs: the step plus the output type's own rounding of the two values.
    step_share = (step / worst[2] + rounding) if step and worst[2] > 0 else 0.0
    limit = max(tolerance, FLOOR_MULTIPLE * max(floor_of_range or 0.0, floor_off or 0.0), step_share, rounding)
    within = of_range <= limit and math.isfinite(worst[3])
    verdict = "exact" if within else "approximate" if approximate else "differs"
    max_abs, max_rel = max(f[0] for f in folds), max(f[1] for f in folds)
    return OutputCheck(name=name, shape=[], max_abs=max_abs, max_rel=max_rel, range=worst[2], of_range=of_range,
                       step=worst[6], moved=moved, elements=0, passed=verdict != "differs", level=level,
                       floor_of_range=floor_of_range, floor_moved=floor_moved, snr_db=snr, floor_snr_db=floor_snr,
                       verdict=verdict)
