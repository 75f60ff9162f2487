"""Verification: is the folded model the original, rounded differently? Three checks on the same inputs.

1. **End to end, against a rounding floor.** Besides the original and the folded model, a *rounding twin* runs:
   the original, unfolded, with every BatchNormalization parameter and every weight (and int32 bias)
   DequantizeLinear scale that a fold touched nudged by one to ``TWIN_ULPS`` ulps, in private copies (a
   QuantizeLinear that shares the scale keeps its integers), and each BN's beta moved by up to the int32 bias
   rounding its fold reports (with optimisations on, also by what onnxruntime's BiasQuantization rounds a
   folded float bias by). The twin computes the same function rounded differently; on deep
   QDQ networks a value on a quantizer's rounding boundary flips one step and the flip travels on, so the twin
   moves the outputs as much as a correct fold does. Per output: the largest difference as a share of the
   output's range, the elements moved by at least half a quantization step, and the signal-to-noise ratio of
   folded vs original, for the fold and for the floor, each the worst over the input sets (a flip is a rare
   event: the median of a few sets is often 0 for both); before an output is called beyond the floor, up to
   ``EXTRA_INPUT_SETS`` more random input sets run through the three.
2. **A certificate per fold.** The original runs with the activations that feed each folded layer exposed;
   the folded layers alone then run on exactly those activations, and their outputs are compared with the
   original's BN output, element by element, against a bound derived from float rounding:
   ``u * (k * |W'| |x| + 8 * (|y| + |y'| + |a mean| + |beta|))`` plus the int32 bias rounding the fold reports
   at the output, where ``|W'| |x|`` is the same layer run on absolute values (for a BN folded forwards, on
   ``|x| + (|a mean| + |beta|) / |a|``), ``u`` the unit roundoff of the type and ``k = 2 sqrt(K) + 8`` for ``K``
   accumulated products. A wrong channel that the end-to-end outputs hide shows here; the worst fold is named.
3. **Deployment levels.** Both run with onnxruntime's graph optimisations off and at its default level
   (``ORT_ENABLE_ALL``): a difference that appears only with optimisations on is reported as such.

Verdict per output and overall: **exact** (every certificate within its bound, and every output within
``FLOOR_MULTIPLE`` times the floor, see :func:`_judge`, or within ``tolerance`` of its range),
**approximate** (an approximate option folded something: the figures say how far), **uncertified** (the
outputs are within the floor, but some fold could not be isolated for a certificate: a fold inside a subgraph,
or parallel layers; ``uncertified`` names them), **differs** (anything else: exit status 3 in the CLI).

Cost: models given as files are loaded by onnxruntime by path; the derived models (twin, exposed original,
certificate model) refer to the weights in the model file in place; each session is built once and runs
every input set, one optimisation level at a time. It also counts onnxruntime's quantized node units
(QLinearConv, QGemm, ConvInteger, ...) before and after, in the model onnxruntime builds at the default level
(from the sessions verify runs; at ORT_ENABLE_EXTENDED when that level is not run): a fold must not stop
onnxruntime from forming the integer kernels it formed before.

The package, one module a section: :mod:`.loading` (models and sessions), :mod:`.inputs` (input sets),
:mod:`.steps` (quantization steps, quantized units), :mod:`.folds` (what the core's report says each fold did),
:mod:`.twin` (the rounding twin), :mod:`.certificates`, :mod:`.judge` (figures and verdicts), :mod:`.attribution`
(the runtime's integer kernels), :mod:`.result` (what verify returns); :mod:`.run` runs them level by level and
:func:`verify` below drives it. A fold made with a deployment target (``target="onnxruntime"``) gets a ``target``
section: :mod:`.target` (its plan, the reference an approximate rewrite is judged against, the quantizer checks),
:mod:`.target_figures` (kernels measured, saturation coverage, deviation against the QAT export), :mod:`.target_text`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

#: Default tolerance (DEFAULT_TOLERANCE): the largest difference allowed, as a share of each output's range,
#: where the rounding floor is smaller (float models). It and DEFAULT_LEVELS live in qdqfold._defaults, so the
#: command line names them without importing this package.
from .._defaults import DEFAULT_LEVELS, DEFAULT_TOLERANCE
from .attribution import _COST_RUNS, KERNEL_OPTIONS, _attribute_to_kernels
from .certificates import (_LAYERS, _SHAPE_OPS, _UNIT_ROUNDOFF, _before_forward_folds, _bn_magnitudes, _certificate,
                           _certificate_model, _CertPlan, _certify, _exposed_bytes, _folded_layer, _forward_magnitude,
                           _nodes_by_report_name, _plan_certificates, _producer_closure)
from .folds import _all_folded, _array, _folded_entries
from .inputs import (_NUMPY_TYPES, DEFAULT_SPATIAL_SIZE, _index_limits, check_dim_names, load_inputs, random_inputs,
                     symbolic_sizes)
from .judge import _figures, _judge
from .loading import (_EXTERNAL_FOLDER, _IN_PLACE_BYTES, LEVELS, ModelLike, _derived_session, _level, _Model,
                      _refer_to_file, _rewrite_trt, _run, _session)
from .result import FLOOR_MULTIPLE, SCHEMA_VERSION, FoldCertificate, OutputCheck, VerifyError, VerifyResult
from .run import EXTRA_INPUT_SETS, _Run
from .target import plan_target
from .target_figures import target_section
from .steps import (QUANTIZED_UNIT_OPS, _units_in, _upstream, is_quantized_unit, last_quantizer_steps, onnx_external,
                    quantization_steps, quantized_units)
from .twin import TWIN_ULPS, _next_ulp, _ort_bias_rounding, _twin_bytes, _twin_edits, rounding_twin

#: Input sets drawn when no inputs are given (seeds seed, seed + 1, ...).
DEFAULT_INPUT_SETS = 3


def verify(original: ModelLike, folded: ModelLike, *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
           symbolic_size: int | None = None, dims: dict[str, int] | None = None, count_units: bool = True,
           report: Any = None, inputs: Sequence[str | os.PathLike] | Sequence[Mapping[str, Any]] | None = None,
           input_sets: int = DEFAULT_INPUT_SETS, levels: Sequence[str] = DEFAULT_LEVELS, twin: bool = True,
           certificates: bool = True) -> VerifyResult:
    """Runs ``original`` and ``folded`` (ModelProto, bytes or a file path: a path is loaded by onnxruntime
    itself, external data included) on the same inputs at each onnxruntime optimisation level in ``levels``
    (``off``, ``basic``, ``extended``, ``default``/``all``), with a rounding twin of the original beside them
    and, given the fold ``report`` (``FoldReport`` or the native dict; folded again from ``original`` when
    None), a certificate per folded BN. ``inputs``: files (``.npz`` keyed by input name, ``.npy`` for a single
    input) or dicts of arrays, one input set each; else ``input_sets`` seeded random sets (seeds ``seed``, ``seed
    + 1``, ...). See the module doc for the verdict. Raises :class:`VerifyError` when a model cannot be run."""
    base, fold = _Model(original), _Model(folded)
    rewritten = _rewrite_trt(base, fold)
    if rewritten:
        base, fold = rewritten
    levels = sorted(dict.fromkeys(levels), key=lambda lv: lv != "off") or ["off"]  # off first: the baseline
    for lv in levels:
        _level(lv)
    if report is None and (twin or certificates):
        report = _fold_again(base)
    # A fold with a deployment target: an approximate rewrite is judged against the original given the same new
    # roundings (the reference), and measured against the original itself in the target section (.target).
    plan = plan_target(base, fold, report)
    compared = plan.reference if plan is not None and plan.reference is not None else base
    run = _Run(compared, fold, report, levels, tolerance=tolerance, seed=seed, symbolic_size=symbolic_size, dims=dims,
               count_units=count_units, inputs=inputs, input_sets=input_sets, twin=twin, certificates=certificates)
    if plan is not None and plan.approximate and plan.reference is None:
        run.approximate = True  # not separable: the rows compare with the original, as for an approximate fold
    for lv in list(levels):
        run.level(lv)
    result = run.result(bool(rewritten))
    if plan is not None:
        feeds = run.level_feeds.get("off", run.feed_sets)
        result.target = target_section(plan, result, base, fold, report, seed, run.names, feeds)
        if compared is not base and result.units_level is not None:  # the units before are the original's
            result.quantized_units_before = result.target["kernels"]["measured"]["before"] \
                if result.units_level == LEVELS["default"] else quantized_units(base)
    return result


def _fold_again(base: _Model) -> Any:
    """The core's report of folding ``base``, for the twin and the certificates; None when it is not foldable
    (nothing to certify or nudge)."""
    import qdqfold_native

    source = base.source()
    if isinstance(source, str):
        from ..api import load_model_bytes

        source = load_model_bytes(source)
    try:
        _, report = qdqfold_native.fold_with_report(source)
    except Exception:  # not foldable: nothing to certify or nudge
        report = None
    return report
