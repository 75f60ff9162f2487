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
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence, Union

if TYPE_CHECKING:
    import numpy as np
    import onnx

# numpy, onnx and onnxruntime are imported where they are used: folding without --verify never loads them.
ModelLike = Union["onnx.ModelProto", bytes, bytearray, memoryview, str, os.PathLike]

#: Version of the ``verify`` section of the JSON report.
SCHEMA_VERSION = 3

#: Default tolerance (DEFAULT_TOLERANCE): the largest difference allowed, as a share of each output's range,
#: where the rounding floor is smaller (float models). It and DEFAULT_LEVELS live in qdqfold._defaults, so the
#: command line names them without importing this module.
from ._defaults import DEFAULT_LEVELS, DEFAULT_TOLERANCE  # noqa: E402

#: A fold is within the floor when its deviation is at most this multiple of the twin's (worst input sets).
FLOOR_MULTIPLE = 4.0

#: Input sets drawn when no inputs are given (seeds seed, seed + 1, ...).
DEFAULT_INPUT_SETS = 3

#: Random input sets added, at most, before an output beyond the floor is called "differs" (see verify).
EXTRA_INPUT_SETS = 9

#: Symbolic dimensions: the first (batch) takes 1, the others (spatial sizes, sequence lengths) this, which a
#: 7x7 kernel with stride 2 survives.
DEFAULT_SPATIAL_SIZE = 32

#: onnxruntime optimisation levels by the names the CLI takes.
LEVELS = {"off": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "default": "ORT_ENABLE_ALL", "all": "ORT_ENABLE_ALL"}

#: onnxruntime's quantized node units besides the QLinear* family.
QUANTIZED_UNIT_OPS = frozenset({
    "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention",
    "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization",
    "MatMulNBits", "NhwcQLinearConv",
})

_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def is_quantized_unit(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in QUANTIZED_UNIT_OPS


@dataclass
class OutputCheck:
    """The comparison of one output at one optimisation level; every figure is that of the worst input set."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max |folded - original| / |original| over elements where original != 0
    range: float  # max - min of the original output
    of_range: float  # max_abs / range
    step: float | None  # quantization step (see quantization_steps); None when no quantizer feeds the output
    moved: int | None  # elements that moved by at least half a step
    elements: int
    passed: bool
    level: str = "off"
    floor_of_range: float | None = None  # the rounding twin's deviation, as a share of the range
    floor_moved: int | None = None
    snr_db: float | None = None  # 10 log10(sum original^2 / sum (folded - original)^2); inf when identical
    floor_snr_db: float | None = None
    verdict: str = "exact"  # exact / approximate / differs

    @property
    def moved_share(self) -> float | None:
        return None if self.moved is None else self.moved / max(self.elements, 1)


@dataclass
class FoldCertificate:
    """One folded BN checked where it sits: its folded layer(s) run on the original's activations."""

    node: str  # the BN
    into: list[str]
    compared: str  # the value compared (the original's BN output, or the layer's output for forward folds)
    max_abs: float
    ratio: float  # largest |folded - original| / bound over elements; <= 1 passes
    channel: int | None  # the channel where that ratio is
    bound_bias: float  # the reported int32 bias rounding included in the bound
    exact_fold: bool  # False: an approximate option allowed this fold, the figure says how far
    passed: bool


@dataclass
class VerifyResult:
    outputs: list[OutputCheck]  # optimisations off (the first level run), one per model output
    tolerance: float
    seed: int
    input_shapes: dict[str, list[int]]
    quantized_units_before: dict[str, int] = field(default_factory=dict)
    quantized_units_after: dict[str, int] = field(default_factory=dict)
    levels: dict[str, list[OutputCheck]] = field(default_factory=dict)  # every level run
    certificates: list[FoldCertificate] = field(default_factory=list)
    uncertified: list[str] = field(default_factory=list)  # folded BNs no certificate could isolate
    input_sets: int = 1
    input_source: str = "random"  # "random" or the files given
    symbolic_dims: dict[str, int] = field(default_factory=dict)
    floor_multiple: float = FLOOR_MULTIPLE
    units_level: str | None = None  # the onnxruntime level the quantized units were counted at
    extra_input_sets: dict[str, int] = field(default_factory=dict)  # per level: random sets added to decide
    #: Levels asked for that could not be checked: onnxruntime cannot build the original there (its own
    #: rewrites fail, e.g. ConvBnFusion making a weight over 2 GB). The level and onnxruntime's reason.
    skipped_levels: dict[str, str] = field(default_factory=dict)
    #: Set when the models were compared with TensorRT's trt:: quantizers rewritten as standard ops
    #: (qdqfold.trt_compat.standard_qdq): onnxruntime cannot run them as they are.
    rewritten: str | None = None
    #: Set when the folded model differed at a level only because of onnxruntime's integer kernels on this CPU
    #: (see _attribute_to_kernels): the level, the session option under which the fold is within the floor,
    #: the deployed figures per output, the integer layers measured one by one, and the option's cost.
    kernels: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def verdict(self) -> str:
        checks = [o for outs in (self.levels.values() or [self.outputs]) for o in outs]
        if any(o.verdict == "differs" for o in checks) or any(not c.passed for c in self.certificates):
            return "differs"
        if any(o.verdict == "approximate" for o in checks) or any(not c.exact_fold for c in self.certificates):
            return "approximate"
        # No certificate, no "exact": the outputs agree, but a fold no certificate isolated is not proven.
        return "uncertified" if self.uncertified else "exact"

    @property
    def passed(self) -> bool:
        return self.verdict != "differs"

    @property
    def kernel_warning(self) -> bool:
        """The fold is judged without them, but this CPU's integer kernels move the deployed outputs."""
        return self.kernels is not None and any(o["moved"] or o["of_range"] > 0 for o in self.kernels["outputs"])

    def kernel_message(self) -> str | None:
        """One line on what this CPU's integer kernels do to the folded model (None when nothing)."""
        if not self.kernel_warning:
            return None
        k = self.kernels
        worst = max(k["outputs"], key=lambda o: o["of_range"])
        layers = [lay["node"] for lay in k["layers"] if lay["moved"]]
        named = f" in {', '.join(layers[:6])}{' ...' if len(layers) > 6 else ''}" if layers else ""
        return (f"onnxruntime's integer kernels on this CPU move output {worst['name']!r} by {worst['of_range']:.3g} "
                f"of its range at level {k['level']} (the fold itself is exact: with {k['option']} it is within the "
                f"rounding floor); their 16-bit pair sums saturate{named}")

    @property
    def moved(self) -> int:
        """Elements that moved by a quantization step, over all quantized outputs."""
        return sum(o.moved or 0 for o in self.outputs)

    @property
    def worst_fold(self) -> FoldCertificate | None:
        return max(self.certificates, key=lambda c: c.ratio, default=None)

    def only_with_optimisations(self) -> bool:
        """A difference that shows only at an optimisation level other than off."""
        off = self.levels.get("off", self.outputs)
        return all(o.verdict != "differs" for o in off) and self.verdict == "differs" and \
            all(c.passed for c in self.certificates)

    def failure_message(self) -> str | None:
        """One line saying why the verdict is differs (None when it is not)."""
        if self.passed:
            return None
        bad = [c for c in self.certificates if not c.passed]
        if bad:
            c = max(bad, key=lambda c: c.ratio)
            return (f"fold of {c.node} into {', '.join(c.into)} is off by {c.max_abs:.3g} in channel {c.channel} "
                    f"({c.ratio:.3g} times its float-rounding bound)")
        level, worst = max(((lv, o) for lv, outs in self.levels.items() for o in outs if o.verdict == "differs"),
                           key=lambda p: p[1].of_range)
        where = " (only with onnxruntime's optimisations on)" if self.only_with_optimisations() else ""
        floor = "-" if worst.floor_of_range is None else f"{worst.floor_of_range:.3g}"
        return (f"output {worst.name!r} differs by {worst.max_abs:.3g} ({worst.of_range:.3g} of its range; rounding "
                f"floor {floor}) at optimisation level {level}{where}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for out, check in zip(data["outputs"], self.outputs):
            out["moved_share"] = check.moved_share
        data["passed"] = self.passed
        data["verdict"] = self.verdict
        worst = self.worst_fold
        data["worst_fold"] = None if worst is None else {"node": worst.node, "ratio": worst.ratio,
                                                         "max_abs": worst.max_abs, "channel": worst.channel}
        data["differs_only_with_optimisations"] = self.only_with_optimisations()
        data["kernel_warning"] = self.kernel_warning
        data["quantized_units"] = {"before": sum(self.quantized_units_before.values()),
                                   "after": sum(self.quantized_units_after.values())}
        return data


class VerifyError(ValueError):
    """A model cannot be run (e.g. onnxruntime rejects it, or an input type cannot be generated)."""


# ------------------------------------------------------------------------------------------------ loading

class _Model:
    """A model as onnxruntime should load it: by path when it is a file (external data beside it, never a
    serialised copy), else bytes; and its ModelProto without external data, loaded when needed."""

    def __init__(self, model: ModelLike):
        self.path: str | None = None
        self.data: bytes | None = None
        self._proto = None
        if isinstance(model, (str, os.PathLike)):
            self.path = os.fspath(model)
            if not os.path.isfile(self.path):
                raise VerifyError(f"{self.path}: no such file")
        elif isinstance(model, (bytes, bytearray, memoryview)):
            self.data = bytes(model)
        else:
            self._proto = model

    @property
    def folder(self) -> str | None:
        return os.path.dirname(os.path.abspath(self.path)) if self.path else None

    def proto(self) -> onnx.ModelProto:
        """The ModelProto; for a file, its large embedded tensors are turned into external references to their
        own bytes in that file, so models derived from it (the twin, the exposed original, the certificate
        model) serialise without their weights and onnxruntime reads those from the file."""
        import onnx

        if self._proto is None:
            if self.path:
                self._proto = onnx.load(self.path, load_external_data=False)
                _refer_to_file(self._proto, self.path)
            else:
                self._proto = onnx.load_from_string(self.data)
        return self._proto

    def source(self) -> str | bytes:
        if self.path:
            return self.path
        if self.data is None:
            self.data = self._proto.SerializeToString()
        return self.data


#: Embedded tensors at least this large are referred to in place by derived models (see _Model.proto).
_IN_PLACE_BYTES = 1 << 16


def _refer_to_file(model: onnx.ModelProto, path: str) -> None:
    """Main-graph initializers of ``model`` whose raw data is embedded in the file ``path`` (and at least
    ``_IN_PLACE_BYTES`` long) become external data at their own offset in that file."""
    import mmap

    from onnx import TensorProto

    from .graphinfo import WireFormatError, _fields

    spans: dict[str, tuple[int, int]] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                for number, wire, graph in _fields(buf):
                    if number != 7 or wire != 2:  # ModelProto.graph
                        continue
                    for g_number, g_wire, tensor in _fields(buf, *graph):
                        if g_number != 5 or g_wire != 2:  # GraphProto.initializer
                            continue
                        name, raw = None, None
                        for t_number, t_wire, value in _fields(buf, *tensor):
                            if t_number == 8 and t_wire == 2:
                                name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
                            elif t_number == 9 and t_wire == 2:
                                raw = value
                        if name is not None and raw is not None and raw[1] - raw[0] >= _IN_PLACE_BYTES:
                            spans[name] = raw
            finally:
                buf.release()
    except (OSError, ValueError, WireFormatError):
        return
    location = os.path.basename(path)
    for tensor in model.graph.initializer:
        span = spans.get(tensor.name)
        if span is None or tensor.data_location == TensorProto.EXTERNAL or len(tensor.raw_data) != span[1] - span[0]:
            continue
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(span[0])), ("length", str(span[1] - span[0]))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value



def _run(session, feeds: Mapping[str, Any]) -> list:
    """Runs ``session`` on the feeds it takes (a fold may drop a graph input that only named a BN parameter)."""
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def _level(name: str):
    import onnxruntime as ort

    if name not in LEVELS:
        raise VerifyError(f"unknown onnxruntime optimisation level {name!r} (one of {', '.join(LEVELS)})")
    return getattr(ort.GraphOptimizationLevel, LEVELS[name])


def _rewrite_trt(base: _Model, fold: _Model) -> tuple[_Model, _Model] | None:
    """Both models with TensorRT's trt:: quantizers rewritten as standard ops (qdqfold.trt_compat), when the
    original has any; onnxruntime cannot run them. None otherwise."""
    from .trt_compat import TRT_OPS, TrtCompatError, standard_qdq

    def data(m: _Model) -> bytes:
        source = m.source()
        if isinstance(source, str):
            from .api import load_model_bytes

            return load_model_bytes(source)
        return source

    # The ModelProto without external data (loaded once, verify needs it anyway): no model is read twice.
    if not any(n.domain == "trt" and n.op_type in TRT_OPS for n in base.proto().graph.node):
        return None
    try:
        return _Model(standard_qdq(data(base))), _Model(standard_qdq(data(fold)))
    except TrtCompatError as e:
        raise VerifyError(f"onnxruntime cannot run TensorRT's trt:: quantizers, and {e}") from e


def _session(source: str | bytes, level: Any = None, optimized_path: str | None = None,
             external_folder: str | None = None, config: Mapping[str, str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # failures come back as exceptions, worded once in our message
    options.intra_op_num_threads = 1  # deterministic, and fair to other models verified in parallel
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if external_folder and not isinstance(source, str):
        options.add_session_config_entry(_EXTERNAL_FOLDER, external_folder)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise VerifyError(f"onnxruntime cannot load the model: {str(e).strip().splitlines()[0]}") from e


def _derived_session(model: onnx.ModelProto, base: _Model, level: Any = None):
    """A session for a model derived from ``base`` (external tensors still name ``base``'s files)."""
    data = model.SerializeToString()
    return _session(data, level, external_folder=base.folder)


# ------------------------------------------------------------------------------------------------- inputs

_NUMPY_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16", "tensor(bool)": "bool",
}


def check_dim_names(dims: Iterable[str], names: Iterable[str]) -> None:
    """A VerifyError when ``dims`` names a symbolic dimension that is not among the inputs' ``names``."""
    names = set(names)
    unknown = sorted(set(dims) - names)
    if unknown:
        have = ", ".join(sorted(names)) or "none"
        raise VerifyError(f"the model's inputs have no symbolic dimension {', '.join(map(repr, unknown))} "
                          f"(they have: {have})")


def symbolic_sizes(session, dims: Mapping[str, int] | None = None, symbolic_size: int | None = None) -> dict[str, int]:
    """The size every symbolic dimension of the inputs takes: ``dims[name]`` when given, else ``symbolic_size``
    when given, else 1 for a leading (batch) dimension and ``DEFAULT_SPATIAL_SIZE`` for the others. A ``dims``
    name the inputs do not have is an error."""
    dims = dict(dims or {})
    names: dict[str, int] = {}
    for i in session.get_inputs():
        for axis, d in enumerate(i.shape):
            if isinstance(d, str) and d not in names:
                names[d] = axis
    check_dim_names(dims, names)
    return {name: dims[name] if name in dims else symbolic_size if symbolic_size is not None
            else 1 if axis == 0 else DEFAULT_SPATIAL_SIZE for name, axis in names.items()}


def _index_limits(model: onnx.ModelProto | None) -> dict[str, int]:
    """Graph inputs used as Gather / GatherElements indices into a constant table: the table's size."""
    if model is None:
        return {}
    graph = model.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    limits: dict[str, int] = {}
    inputs = {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type in ("Gather", "GatherElements") and len(node.input) > 1 and node.input[1] in inputs:
            table = shapes.get(node.input[0])
            if table:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                size = table[axis % len(table)]
                limits[node.input[1]] = min(limits.get(node.input[1], size), size)
    return limits


def random_inputs(session, seed: int = 0, symbolic_size: int | None = None, dims: dict[str, int] | None = None,
                  index_limits: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs shaped from the session's inputs (symbolic dimensions: :func:`symbolic_sizes`).
    Floats are standard normal; integers used as Gather indices into a table span the table; other integers
    are small non-negative values (safe as indices), 8-bit integers span their whole range."""
    import numpy as np

    sizes = symbolic_sizes(session, dims, symbolic_size)
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else sizes.get(d, 1) if isinstance(d, str) else 1
                 for d in i.shape]
        if i.type not in _NUMPY_TYPES:
            raise VerifyError(f"cannot generate random values for input {i.name!r} of type {i.type}")
        dtype = np.dtype(_NUMPY_TYPES[i.type]).type
        if dtype == np.bool_:
            feeds[i.name] = rng.random(shape) > 0.5
        elif index_limits and i.name in index_limits and np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.integers(0, max(index_limits[i.name], 1), size=shape).astype(dtype)
        elif dtype in (np.int8, np.uint8):
            limits = np.iinfo(dtype)
            feeds[i.name] = rng.integers(limits.min, limits.max, size=shape, endpoint=True).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.integers(0, 3, size=shape).astype(dtype)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def load_inputs(paths: Iterable[str | os.PathLike], session) -> list[dict[str, np.ndarray]]:
    """Input sets from files: ``.npz`` keyed by input name, or ``.npy`` for a model with a single input; one set
    per file. Every input must be given, with the model's element type."""
    import numpy as np

    wanted = {i.name: i for i in session.get_inputs()}
    sets = []
    for path in paths:
        path = os.fspath(path)
        try:
            if path.endswith(".npy"):
                if len(wanted) != 1:
                    raise VerifyError(f"{path}: a .npy file gives one input, the model has {len(wanted)}: "
                                      f"use an .npz keyed by {', '.join(wanted)}")
                feeds = {next(iter(wanted)): np.load(path, allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as npz:
                    feeds = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise VerifyError(f"{path}: cannot read inputs: {e}") from e
        missing, extra = sorted(set(wanted) - set(feeds)), sorted(set(feeds) - set(wanted))
        if missing or extra:
            raise VerifyError(f"{path}: " + "; ".join(
                ([f"missing input(s) {', '.join(missing)}"] if missing else [])
                + ([f"no model input named {', '.join(extra)}"] if extra else [])))
        for name, value in feeds.items():
            dtype = np.dtype(_NUMPY_TYPES.get(wanted[name].type, "float32"))
            if value.dtype != dtype:
                if value.dtype.kind == dtype.kind == "f" or (value.dtype.kind in "iu" and dtype.kind in "iu"):
                    feeds[name] = value.astype(dtype)
                else:
                    raise VerifyError(f"{path}: input {name!r} is {value.dtype}, the model wants {dtype}")
        sets.append(feeds)
    return sets


# ------------------------------------------------------------------------------------ quantization steps

def quantization_steps(model: onnx.ModelProto) -> dict[str, float]:
    """For each main-graph output fed by an activation quantizer: the smallest scale among those quantizers."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    constants[node.output[0]] = attribute.t
    producers = {out: node for node in graph.node for out in node.output}
    graph_inputs = {i.name for i in graph.input} - set(constants)

    def is_constant(tensor: str) -> bool:
        seen, stack = set(), [tensor]
        while stack:
            name = stack.pop()
            if name in seen or name == "" or name in constants:
                continue
            seen.add(name)
            if name in graph_inputs or name not in producers:
                return False
            stack.extend(producers[name].input)
        return True

    def smallest_scale(node: onnx.NodeProto) -> float | None:
        if len(node.input) < 2 or node.input[1] not in constants:
            return None
        tensor = constants[node.input[1]]
        if tensor.data_location == onnx_external():
            return None
        scale = np.abs(numpy_helper.to_array(tensor).astype(np.float64)).ravel()
        scale = scale[scale > 0]
        return float(scale.min()) if scale.size else None

    steps = {}
    for output in graph.output:
        smallest = None
        for node in _upstream(producers, output.name):
            if node.op_type == "QuantizeLinear" and node.input and not is_constant(node.input[0]):
                scale = smallest_scale(node)
                if scale is not None:
                    smallest = scale if smallest is None else min(smallest, scale)
        if smallest is not None:
            steps[output.name] = smallest
    return steps


def _upstream(producers: Mapping[str, Any], value: str, stop: Any = None) -> Iterator[Any]:
    """The nodes ``value`` depends on, each once, depth first from it; the walk does not go past a node for
    which ``stop(node)`` is true (it is still yielded)."""
    seen, stack = set(), [value]
    while stack:
        name = stack.pop()
        if name in seen or name not in producers:
            continue
        seen.add(name)
        node = producers[name]
        yield node
        if stop is None or not stop(node):
            stack.extend(node.input)


def last_quantizer_steps(model: onnx.ModelProto) -> dict[str, float]:
    """For each main-graph output: the largest scale of the activation quantizers nearest to it (the last ones
    its values pass through). One flip of such a quantizer moves the output by that step; a fold that rounds
    differently (an int32 bias re-quantized, float weights rounded once) may cause one."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    def nearest(node: onnx.NodeProto) -> bool:  # an activation quantizer with a constant scale ends a path
        return node.op_type == "QuantizeLinear" and bool(node.input) and node.input[0] not in inits and \
            len(node.input) > 1 and node.input[1] in inits and inits[node.input[1]].data_location != onnx_external()

    steps = {}
    for output in graph.output:
        largest = None
        for node in _upstream(producers, output.name, stop=nearest):
            if nearest(node):
                scale = np.abs(numpy_helper.to_array(inits[node.input[1]]).astype(np.float64))
                if scale.size:
                    largest = max(largest or 0.0, float(scale.max()))
        if largest:
            steps[output.name] = largest
    return steps


def onnx_external() -> int:
    from onnx import TensorProto

    return TensorProto.EXTERNAL


def quantized_units(model: ModelLike | _Model) -> dict[str, int]:
    """onnxruntime's quantized node units, by op type, in the model it builds at ORT_ENABLE_EXTENDED."""
    import onnxruntime as ort

    m = model if isinstance(model, _Model) else _Model(model)
    with tempfile.TemporaryDirectory(prefix="qdqfold-verify-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        _session(m.source(), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path, external_folder=m.folder)
        return _units_in(path)


def _units_in(path: str) -> dict[str, int]:
    """The quantized node units, by op type, in the (optimized) model file ``path``."""
    import mmap

    from .graphinfo import read_model_info

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            counts = read_model_info(view).op_counts()
        finally:
            view.release()
    return dict(sorted((op.rsplit(".", 1)[-1], n) for op, n in counts.items() if is_quantized_unit(op.rsplit(".", 1)[-1])))


# ------------------------------------------------------------------------------------- the rounding twin

#: The twin moves each parameter by 1 to this many ulps (at random, either way): a fold rounds every folded
#: weight, scale and bias once, a few ulps in all; a twin moved by one ulp only flips too rarely to be seen on a
#: few input sets where the fold's flips are.
TWIN_ULPS = 4


def _next_ulp(values: np.ndarray, rng) -> np.ndarray:
    """Every element moved by 1 to ``TWIN_ULPS`` ulps of its own type, up or down at random (zeros stay)."""
    import numpy as np

    direction = np.where(rng.random(values.shape) < 0.5, -np.inf, np.inf).astype(values.dtype)
    steps = rng.integers(1, TWIN_ULPS + 1, size=values.shape)
    moved = values.copy()
    for k in range(1, TWIN_ULPS + 1):
        moved = np.where(steps >= k, np.nextafter(moved, direction), moved).astype(values.dtype)
    return np.where(values == 0, values, moved).astype(values.dtype)


def rounding_twin(model: onnx.ModelProto, report: Any, seed: int = 0, folder: str | None = None) -> onnx.ModelProto:
    """A copy of ``model`` (external tensors stay references) where, for every BN a fold took: its gamma, beta,
    mean and variance, and the scale of the DequantizeLinear of the layer's weight and int32 bias, are nudged by
    one ulp in private copies (a QuantizeLinear that shares the scale keeps reading the original, so its
    integers do not change); where the fold re-quantized an int32 bias, beta also moves by up to the reported
    rounding at the output (uniform per channel)."""
    import onnx

    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    edits, tensors = _twin_edits(twin, report, seed, folder)
    for node, slot, name in edits:
        node.input[slot] = name
    twin.graph.initializer.extend(tensors)
    return twin


def _twin_bytes(model: onnx.ModelProto, report: Any, seed: int, folder: str | None,
                spreads: Mapping[str, Any] | None = None) -> bytes:
    """``rounding_twin(model, ...)`` serialised, without a second copy of the model's weights in memory: the
    edits are made on ``model`` itself for the serialisation and undone."""
    edits, tensors = _twin_edits(model, report, seed, folder, spreads)
    before = [(node, slot, node.input[slot]) for node, slot, _ in edits]
    count = len(model.graph.initializer)
    try:
        for node, slot, name in edits:
            node.input[slot] = name
        model.graph.initializer.extend(tensors)
        return model.SerializeToString()
    finally:
        for node, slot, name in reversed(before):
            node.input[slot] = name
        del model.graph.initializer[count:]


def _twin_edits(model: onnx.ModelProto, report: Any, seed: int, folder: str | None,
                spreads: Mapping[str, Any] | None = None):
    """The twin as edits: (node, input slot, new tensor name) and the new (nudged) tensors. ``spreads``: per BN,
    a further per-channel range its beta moves in (see :func:`_ort_bias_rounding`)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    rng = np.random.default_rng(seed + 7919)
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node if n.name}
    producers = {o: n for n in graph.node for o in n.output}
    edits, tensors = [], []
    done: set[tuple[int, int]] = set()

    def nudge(node: onnx.NodeProto, slot: int, spread: Any = 0.0) -> None:
        if slot >= len(node.input) or node.input[slot] not in inits or (id(node), slot) in done:
            return
        done.add((id(node), slot))
        tensor = inits[node.input[slot]]
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            return
        values = _array(tensor, folder)  # small (BN parameters, scales): the copy lives in the twin's proto
        moved = _next_ulp(values, rng)
        spread = np.broadcast_to(np.asarray(spread, np.float64), moved.shape) if np.size(spread) in (1, moved.size) \
            else np.zeros(moved.shape)
        if np.any(spread > 0):
            moved = (moved.astype(np.float64) + rng.uniform(-1, 1, moved.shape) * spread).astype(values.dtype)
        name = f"{tensor.name}__twin{len(tensors)}"
        tensors.append(numpy_helper.from_array(moved, name))
        edits.append((node, slot, name))

    for entry in _folded_entries(report):
        bn = nodes.get(entry["node"])
        if bn is None:
            continue
        # A fold whose int32 bias is re-quantized moves BN's output by up to the reported rounding: the twin's
        # BN beta moves by as much (uniformly, per channel), the same rounding without the fold.
        bias_error = float(entry["metrics"].get("bias_error_at_output", 0.0))
        extra = (spreads or {}).get(entry["node"])
        for slot in (1, 2, 3, 4):
            nudge(bn, slot, (bias_error if extra is None else np.maximum(bias_error, extra)) if slot == 2 else 0.0)
        for name in entry["into"]:
            layer = nodes.get(name)
            if layer is None:
                continue
            for slot in (1, 2):
                dq = producers.get(layer.input[slot]) if slot < len(layer.input) else None
                if dq is not None and dq.op_type == "DequantizeLinear":
                    nudge(dq, 1)
    return edits, tensors


def _ort_bias_rounding(folded: onnx.ModelProto, report: Any, folder: str | None) -> dict[str, Any]:
    """Per folded BN, per channel: the rounding onnxruntime's BiasQuantization (graph optimisations BASIC and
    above) applies to the folded layer's float bias, ``0.5 * s_x * s'_w * |beta|``, when the layer is a Conv or
    Gemm fed by DequantizeLinear on both inputs with a float bias initializer (its conditions). The original's
    BN shift is not rounded so; the twin run with optimisations on moves beta by as much."""
    import numpy as np

    graph = folded.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node if n.name}
    producers = {o: n for n in graph.node for o in n.output}
    last: dict[str, str] = {}
    for entry in _folded_entries(report):
        if entry["direction"] == "backward" and entry["into"]:
            last[entry["into"][0]] = entry["node"]  # a chain: the layer's last BN carries it
    spreads = {}
    for layer_name, bn_name in last.items():
        layer = nodes.get(layer_name)
        if layer is None or layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 3 or layer.input[2] not in inits:
            continue
        dq_x, dq_w = producers.get(layer.input[0]), producers.get(layer.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        try:
            s_x = _array(inits[dq_x.input[1]], folder).astype(np.float64)
            s_w = _array(inits[dq_w.input[1]], folder).astype(np.float64).ravel()
        except (KeyError, IndexError, ValueError):
            continue
        if s_x.size != 1:
            continue
        beta = next((a.f for a in layer.attribute if a.name == "beta"), 1.0) if layer.op_type == "Gemm" else 1.0
        spreads[bn_name] = 0.5 * abs(float(s_x.ravel()[0])) * np.abs(s_w) * abs(beta)
    return spreads


def _array(tensor, folder: str | None):
    """A tensor's values, read from its external data file (in ``folder``) when it has one."""
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, base_dir=folder or "")


def _all_folded(report: Any) -> list[dict[str, Any]]:
    if report is None:
        return []
    entries = report["batchnorms"] if isinstance(report, dict) else [asdict(b) for b in report.batchnorms]
    return [e for e in entries if e["folded"]]


def _folded_entries(report: Any) -> list[dict[str, Any]]:
    """The folded BNs of a report (FoldReport or the native dict), main graph only, as dicts."""
    if report is None:
        return []
    entries = report["batchnorms"] if isinstance(report, dict) else [asdict(b) for b in report.batchnorms]
    return [e for e in entries if e["folded"] and e["graph"] == "main"]


# ------------------------------------------------------------------------------------- the certificates

_UNIT_ROUNDOFF = {1: 2.0**-23, 10: 2.0**-10, 16: 2.0**-7, 11: 2.0**-52}  # by TensorProto element type
_LAYERS = tuple(k["op"] for k in __import__("qdqfold_native").layer_kinds())  # the core's table (layer_kinds.h)


@dataclass
class _CertPlan:
    node: str
    into: list[str]
    x: str  # the activation fed from the original
    y: str  # the value compared
    abs_out: str | None  # |W'| * |x| for the bound
    terms: int  # products accumulated per output element
    bias: float
    exact: bool
    unit: float
    shift: Any = None  # per channel: |a * mean| + |beta|, the magnitudes the BN's own shift is rounded at
    forward_shift: Any = None  # forward folds: (|a * mean| + |beta|) / |a| per channel of x


def _producer_closure(graph, targets: Sequence[str], stops: set[str]) -> list | None:
    """The nodes of ``graph`` that compute ``targets`` from ``stops``, constants and graph inputs, in order."""
    producers = {o: (i, n) for i, n in enumerate(graph.node) for o in n.output}
    keep: set[int] = set()
    stack = list(targets)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in stops or name == "":
            continue
        seen.add(name)
        if name not in producers:
            continue
        index, node = producers[name]
        if index in keep:
            continue
        keep.add(index)
        stack.extend(node.input)
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH or attribute.type == attribute.GRAPHS:
                return None  # a subgraph reading outer values: not isolated here
    return [graph.node[i] for i in sorted(keep)]


def _plan_certificates(original: onnx.ModelProto, folded: onnx.ModelProto, report: Any, folder: str | None = None):
    """Which value to feed and which to compare for every folded BN of the main graph."""
    import numpy as np

    o_nodes = _nodes_by_report_name(original.graph.node)
    f_nodes = _nodes_by_report_name(folded.graph.node)
    f_produced = {o for n in folded.graph.node for o in n.output} | {i.name for i in folded.graph.input}
    f_inits = {t.name: t for t in folded.graph.initializer}
    o_inits = {t.name: t for t in original.graph.initializer}
    plans, skipped, chained = [], [], []
    forward_bns = {e["node"] for e in _folded_entries(report) if e["direction"] == "forward"}
    merged = {}  # layer -> last plan (a chain Conv -> BN -> BN: the later BN's output is what the layer makes)
    for entry in _folded_entries(report):
        bn = o_nodes.get(entry["node"])
        originals = [o_nodes.get(name) for name in entry["into"]]
        layers = [_folded_layer(f_nodes, folded, name, o, bn, entry["direction"])
                  for name, o in zip(entry["into"], originals)]
        if bn is None or any(n is None for n in layers) or any(n is None for n in originals):
            skipped.append(entry["node"])
            continue
        backward = entry["direction"] == "backward"
        if backward and sum(n.op_type in _LAYERS for n in layers) > 1:  # concat-bn: parallel layers, no one input
            skipped.append(entry["node"])
            continue
        layer = next((n for n in layers if n.op_type in _LAYERS), None)
        if backward:
            x, ys = _before_forward_folds(originals[0].input[0], original, forward_bns), [bn.output[0]]
        else:
            x, ys = bn.input[0], [n.output[0] for n in originals]
            # A later BN of a chain BN -> (shape ops) -> BN -> layer, all folded forwards into the layer: the
            # original's value at its input already holds the earlier BN, which the folded layer applies too,
            # so the chain's first BN's certificate covers it.
            feeder = next((n for n in original.graph.node if x in n.output), None)
            while feeder is not None and feeder.op_type in _SHAPE_OPS and feeder.input:
                feeder = next((n for n in original.graph.node if feeder.input[0] in n.output), None)
            if feeder is not None and feeder.op_type == "BatchNormalization" and feeder.name in forward_bns:
                continue
        dtype = o_inits[bn.input[1]].data_type if bn.input[1] in o_inits else 1
        for y in ys:
            if y not in f_produced:
                # A chain (Conv -> BN -> BN): a later BN's fold into the same layer covers this one.
                chained.append((entry["node"], layer.output[0] if layer is not None else None))
                continue
            terms = 1
            if layer is not None and len(layer.input) > 1:
                w = f_inits.get(layer.input[1])
                dims = list(w.dims) if w is not None else None
                if dims is None:  # through a DequantizeLinear: its integer (or QAT float) input
                    for n in folded.graph.node:
                        if layer.input[1] in n.output and n.input and n.input[0] in f_inits:
                            dims = list(f_inits[n.input[0]].dims)
                        elif layer.input[1] in n.output and n.input:
                            for m in folded.graph.node:  # QAT: W -> Q -> DQ
                                if n.input[0] in m.output and m.input and m.input[0] in f_inits:
                                    dims = list(f_inits[m.input[0]].dims)
                if dims:
                    if layer.op_type in ("Conv", "ConvTranspose"):
                        terms = int(np.prod(dims[1:])) if layer.op_type == "Conv" else int(np.prod(dims)) // max(dims[1], 1)
                    elif layer.op_type == "Gemm":
                        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
                        terms = dims[1] if trans_b else dims[0]
                    else:
                        terms = dims[0]
            plan = _CertPlan(node=entry["node"], into=list(entry["into"]), x=x, y=y, abs_out=None,
                             terms=max(terms, 1), bias=float(entry["metrics"].get("bias_error_at_output", 0.0)),
                             exact=entry["exact"] is not False, unit=_UNIT_ROUNDOFF.get(dtype, 2.0**-23))
            plan.abs_out = f"qdqfold_cert_abs::{y}" if layer is not None else None
            plan.layer = layer  # type: ignore[attr-defined]
            scale_shift = _bn_magnitudes(bn, o_inits, folder)
            if scale_shift is not None and backward:
                plan.shift = scale_shift[1]
            elif scale_shift is not None and np.all(scale_shift[0] > 0):
                plan.forward_shift = scale_shift[1] / scale_shift[0]
                # A chain BN -> BN -> layer folded forwards: the original rounds at every BN of it; in x's
                # units each later BN's shift counts divided by the factors before it.
                factor, value = scale_shift[0], bn.output[0]
                while True:
                    readers = [n for n in original.graph.node if value in n.input]
                    while len(readers) == 1 and readers[0].op_type in _SHAPE_OPS:
                        readers = [n for n in original.graph.node if readers[0].output[0] in n.input]
                    if len(readers) != 1 or readers[0].op_type != "BatchNormalization" or \
                            readers[0].name not in forward_bns:
                        break
                    later = _bn_magnitudes(readers[0], o_inits, folder)
                    if later is None or len(later[0]) != len(factor) or not np.all(later[0] > 0):
                        break
                    plan.forward_shift = plan.forward_shift + later[1] / (factor * later[0])
                    factor, value = factor * later[0], readers[0].output[0]
                    plan.terms += 1  # one more rounding per element on the way
                scale_shift = None
            if backward and layer is not None:
                previous = merged.get(layer.output[0])
                if previous is not None and previous in plans:
                    plans.remove(previous)  # its output no longer exists; this one covers the layer
                    if previous.shift is not None and scale_shift is not None and len(previous.shift) == len(plan.shift):
                        plan.shift = plan.shift + scale_shift[0] * previous.shift
                merged[layer.output[0]] = plan
            plans.append(plan)
    skipped += [node for node, layer in chained if layer is None or layer not in merged]
    return plans, skipped


def _nodes_by_report_name(nodes) -> dict[str, Any]:
    """Nodes by the name the core's report gives them: their own, or ``<op type>#<position>`` when unnamed
    (graph::Node::display_name), so that certificates do not depend on an exporter naming its nodes."""
    named: dict[str, Any] = {}
    for position, n in enumerate(nodes):
        named.setdefault(n.name or f"{n.op_type}#{position}", n)
    return named


def _folded_layer(f_nodes: Mapping[str, Any], folded, name: str, original_layer, bn, direction: str):
    """The folded model's node for the layer the report calls ``name``. A named layer keeps its name; an
    unnamed one (reported by its position in the original) is found by what it reads and makes: backwards,
    the node that now produces the BN's output from the layer's input; forwards, the node of that op type
    that makes the layer's output. None when that is not one node."""
    if original_layer is None or bn is None:
        return None
    if original_layer.name:
        return f_nodes.get(name)
    want = bn.output[0] if direction == "backward" else original_layer.output[0]
    same = [n for n in folded.graph.node if n.op_type == original_layer.op_type and not n.name and n.output]
    found = [n for n in same if n.output[0] == want]
    if not found and original_layer.input:  # a chain of BNs folded into it: it makes the last one's output
        found = [n for n in same if n.input and n.input[0] == original_layer.input[0]]
    return found[0] if len(found) == 1 else None


def _before_forward_folds(x: str, original, forward_bns: set[str]) -> str:
    """The value to feed for activation ``x`` of the original so that it means the same in the folded model: BNs
    folded forwards upstream of ``x`` (through shape-only ops) are gone there, so the first one's input is fed."""
    producers = {o: n for n in original.graph.node for o in n.output}
    value = result = x
    for _ in range(32):  # a chain of them (BN -> Flatten -> BN -> layer): the first one's input
        node = producers.get(value)
        if node is None:
            break
        if node.op_type == "BatchNormalization":
            if node.name not in forward_bns:
                break
            value = result = node.input[0]
            continue
        if node.op_type not in _SHAPE_OPS or not node.input:
            break
        value = node.input[0]
    return result


def _bn_magnitudes(bn, inits, folder: str | None) -> tuple | None:
    """(|a|, |a * mean| + |beta|) per channel of a BN with constant parameters (initializers)."""
    import numpy as np

    try:
        g, beta, mean, var = (_array(inits[n], folder).astype(np.float64).ravel() for n in bn.input[1:5])
    except (KeyError, ValueError):
        return None
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    a = np.abs(g / np.sqrt(var + eps))
    return a, a * np.abs(mean) + np.abs(beta)


_SHAPE_OPS = ("Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze")


def _forward_magnitude(graph, plan: _CertPlan, layer_input: str, out: str, x_info: Mapping[str, tuple]) -> list | None:
    """For a BN folded forwards: the magnitudes the original's layer input was rounded at, |x| + (|a mean| +
    |beta|) / |a| per channel of x (so that |W'| times it is |W| times |a x| + |a mean| + |beta|), carried to
    the layer's input through the same shape-only ops. None when there is no such path."""
    import numpy as np
    from onnx import helper, numpy_helper

    if plan.forward_shift is None or plan.x not in x_info:
        return None
    elem, rank = x_info[plan.x]
    producers = {o: n for n in graph.node for o in n.output}
    path, value = [], layer_input
    while value != plan.x:
        node = producers.get(value)
        if node is None or node.op_type not in _SHAPE_OPS or len(path) > 8:
            return None
        path.append(node)
        value = node.input[0]
    tag = f"{out}::m"
    const = numpy_helper.from_array(np.asarray(plan.forward_shift, helper.tensor_dtype_to_np_dtype(elem)), tag + "_c")
    nodes = [helper.make_node("Constant", [], [tag + "_c0"], value=const),
             helper.make_node("Abs", [plan.x], [tag + "_abs"])]
    shape = numpy_helper.from_array(np.asarray([1, -1] + [1] * (rank - 2), np.int64), tag + "_s")
    nodes += [helper.make_node("Constant", [], [tag + "_s0"], value=shape),
              helper.make_node("Reshape", [tag + "_c0", tag + "_s0"], [tag + "_cr"]),
              helper.make_node("Add", [tag + "_abs", tag + "_cr"], [tag + "_0"])]
    current = tag + "_0"
    for k, node in enumerate(reversed(path)):
        clone = helper.make_node(node.op_type, [current] + list(node.input[1:]), [f"{tag}_{k + 1}"])
        clone.attribute.extend(node.attribute)
        nodes.append(clone)
        current = clone.output[0]
    nodes[-1].output[0] = out
    return nodes


def _certificate_model(folded: onnx.ModelProto, plans: list[_CertPlan], x_types: Mapping[str, tuple]) -> onnx.ModelProto | None:
    """The folded layers alone: each plan's x is a graph input, its y (and |W'| * |x|) an output."""
    import onnx
    from onnx import helper

    graph = folded.graph
    stops = {p.x for p in plans}
    extra: list[onnx.NodeProto] = []
    for p in plans:
        layer = getattr(p, "layer", None)
        if layer is None or p.abs_out is None:
            continue
        ax, aw = f"{p.abs_out}::x", f"{p.abs_out}::w"
        attrs = {a.name: helper.get_attribute_value(a) for a in layer.attribute if a.name not in ("beta",)}
        if "alpha" in attrs:
            attrs["alpha"] = abs(attrs["alpha"])
        extra += _forward_magnitude(graph, p, layer.input[0], ax, x_types) or [helper.make_node("Abs", [layer.input[0]], [ax])]
        extra += [helper.make_node("Abs", [layer.input[1]], [aw]),
                  helper.make_node(layer.op_type, [ax, aw], [p.abs_out], **attrs)]
    targets = [p.y for p in plans] + [p.abs_out for p in plans if p.abs_out]
    base = onnx.GraphProto()
    base.node.extend(list(graph.node) + extra)
    nodes = _producer_closure(base, targets, stops)
    if nodes is None:
        return None
    needed = {i for n in nodes for i in n.input} | set(targets)
    cert = onnx.ModelProto()  # not a copy of the folded model: only the folded layers' tensors
    cert.ir_version = folded.ir_version
    cert.opset_import.extend(folded.opset_import)
    cert.functions.extend(folded.functions)
    g = cert.graph
    g.name = "qdqfold_certificate"
    g.node.extend(nodes)
    g.initializer.extend(t for t in graph.initializer if t.name in needed)
    g.input.extend(i for i in graph.input if i.name in needed and i.name not in stops)
    for x in sorted(stops):
        if x in needed:
            g.input.append(helper.make_tensor_value_info(x, x_types.get(x, (onnx.TensorProto.FLOAT, 0))[0], None))
    del g.output[:]
    for t in dict.fromkeys(targets):
        g.output.append(helper.make_empty_tensor_value_info(t))
    return cert


def _exposed_bytes(original: onnx.ModelProto, names: Iterable[str]) -> bytes:
    """``original`` serialised with the given values also as graph outputs (after its own outputs), without a
    second copy of its weights in memory."""
    from onnx import helper

    outputs = original.graph.output
    count = len(outputs)
    have = {o.name for o in outputs} | {i.name for i in original.graph.input}
    try:
        for name in dict.fromkeys(names):
            if name not in have:
                outputs.append(helper.make_empty_tensor_value_info(name))
        return original.SerializeToString()
    finally:
        del outputs[count:]


def _certify(plan: _CertPlan, expected: np.ndarray, actual: np.ndarray, magnitude: np.ndarray | None) -> FoldCertificate:
    import numpy as np

    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.shape != a.shape:
        return _certificate(plan, max_abs=math.inf, ratio=math.inf, channel=None, passed=False)
    diff = np.abs(a - e)
    diff[np.isnan(a) & np.isnan(e)] = 0.0
    diff[np.isnan(diff)] = np.inf
    k = 2.0 * math.sqrt(plan.terms) + 8.0
    mag = np.zeros_like(e)
    if magnitude is not None and np.size(magnitude) == e.size:
        # The layer's |W'| |x| in the layer's shape; a Reshape or Flatten between the layer and the BN (LeViT's
        # MatMul -> Reshape -> BN) is a row-major view, element for element the BN's value.
        mag = np.abs(np.asarray(magnitude, np.float64)).reshape(e.shape)
    shift = 0.0
    if plan.shift is not None and e.ndim >= 2 and e.shape[1] == len(plan.shift):
        shift = np.asarray(plan.shift).reshape([1, -1] + [1] * (e.ndim - 2))
    bound = plan.unit * (k * mag + 8.0 * (np.abs(e) + np.abs(np.nan_to_num(a)) + shift)) + plan.bias * 1.0001 + 1e-30
    ratio = diff / bound
    if ratio.size == 0:
        return _certificate(plan, max_abs=0.0, ratio=0.0, channel=None, passed=True)
    worst = int(np.argmax(ratio))
    channel = int(np.unravel_index(worst, ratio.shape)[1]) if ratio.ndim >= 2 else None
    r = float(ratio.flat[worst])
    return _certificate(plan, max_abs=float(diff.max()), ratio=r, channel=channel, passed=r <= 1.0 or not plan.exact)


def _certificate(plan: _CertPlan, *, max_abs: float, ratio: float, channel: int | None,
                 passed: bool) -> FoldCertificate:
    """The certificate of ``plan``'s fold with these figures."""
    return FoldCertificate(node=plan.node, into=plan.into, compared=plan.y, max_abs=max_abs, ratio=ratio,
                           channel=channel, bound_bias=plan.bias, exact_fold=plan.exact, passed=passed)


# ---------------------------------------------------------------------------------------------- compare

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
    import numpy as np

    base, fold = _Model(original), _Model(folded)
    rewritten = _rewrite_trt(base, fold)
    if rewritten:
        base, fold = rewritten
    levels = sorted(dict.fromkeys(levels), key=lambda lv: lv != "off") or ["off"]  # off first: the baseline
    for lv in levels:
        _level(lv)
    if report is None and (twin or certificates):
        import qdqfold_native

        source = base.source()
        if isinstance(source, str):
            from .api import load_model_bytes

            source = load_model_bytes(source)
        try:
            _, report = qdqfold_native.fold_with_report(source)
        except Exception:  # not foldable: nothing to certify or nudge
            report = None
    entries = _folded_entries(report)
    approximate = any(e["exact"] is False for e in entries)
    proto = base.proto() if (entries or inputs is None) else None

    # One level at a time (the sessions of a level are dropped before the next level's are built, so at most
    # four models are in memory at once): the original (off: with the certified activations exposed), the
    # fold, the twin, and at level off the certificate model. Each is built once and runs every input set.
    plans, skipped = ([], [])
    if certificates and entries:
        plans, skipped = _plan_certificates(proto, fold.proto(), report, base.folder)
    exposed_names = [p.x for p in plans] + [p.y for p in plans]
    steps = flips = {}
    if proto is not None and any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
        steps, flips = quantization_steps(proto), last_quantizer_steps(proto)
    feed_sets: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    source_text = "random"
    names: list[str] = []
    shapes: list[list[int]] = []
    # Per level and output: figures of folded vs original, twin vs original, and (levels other than off) the
    # original at that level vs the original with optimisations off (kept per input set: the baseline).
    per_level: dict[str, dict[str, tuple[list, list, list]]] = {}
    baselines: list[list[Any]] = []
    certs: dict[str, FoldCertificate] = {}
    extra_sets: dict[str, int] = {}
    level_feeds: dict[str, list[dict[str, Any]]] = {}
    twin_off: bytes | None = None
    twin_on: bytes | None = None
    # onnxruntime's quantized units are counted in the model it builds at the default level (or extended)
    # when verify runs that level anyway, else in sessions of their own at ORT_ENABLE_EXTENDED.
    units_level = next((lv for lv in ("default", "all", "extended") if lv in levels), None) if count_units else None
    units: tuple[dict, dict] | None = None
    tmpdir = tempfile.TemporaryDirectory(prefix="qdqfold-verify-")
    tmp = tmpdir.name
    def judge_level(lv: str, replaced: Mapping[str, list] | None = None) -> list[OutputCheck]:
        checks = []
        for name in names:
            folds, floors, _ = per_level[lv][name]
            if replaced is not None:
                folds = replaced[name]
            off_floors = per_level["off"][name][1] if "off" in per_level else []
            floor_off = max((f[3] for f in off_floors), default=None)
            # With optimisations on, onnxruntime's own rewrites of the original move it too (e.g. its
            # BiasQuantization of a float bias): that is deployment rounding the fold is not judged on.
            drift = [f[3] for f in per_level[lv][name][2]] if lv != "off" else []
            if drift:
                floor_off = max(floor_off or 0.0, max(drift))
            checks.append(_judge(name, lv, folds, floors or None, tolerance, approximate, floor_off, flips.get(name)))
        return checks

    skipped_levels: dict[str, str] = {}
    for lv in list(levels):
        level = _level(lv)
        s: dict[str, Any] = {}
        if lv == "off" and plans:
            s["original"] = _session(_exposed_bytes(proto, exposed_names), level, external_folder=base.folder)
        else:
            try:
                s["original"] = _session(base.source(), level, external_folder=base.folder,
                                         optimized_path=os.path.join(tmp, "original.onnx") if lv == units_level
                                         else None)
            except VerifyError as e:
                if lv == "off":
                    raise
                # onnxruntime cannot build the original itself at this level: nothing to compare the fold with.
                reason = str(e).rsplit("FAIL : ", 1)[-1].strip()  # onnxruntime's own sentence, without its prefixes
                skipped_levels[lv] = reason
                levels.remove(lv)
                if lv == units_level:
                    units_level = None
                continue
        s["folded"] = _session(fold.source(), level, external_folder=fold.folder,
                               optimized_path=os.path.join(tmp, "folded.onnx") if lv == units_level else None)
        if lv == units_level:  # the units come from the sessions verify runs anyway
            units = (_units_in(os.path.join(tmp, "original.onnx")), _units_in(os.path.join(tmp, "folded.onnx")))
            for name in ("original.onnx", "folded.onnx"):
                os.unlink(os.path.join(tmp, name))
        if lv == levels[0] and lv != "off" and plans:  # the certificates run with optimisations off
            s["exposing"] = _session(_exposed_bytes(proto, exposed_names), _level("off"), external_folder=base.folder)
        if twin and entries:
            # Optimisations off: the twin as it is. On: its BN betas also move by the bias rounding onnxruntime's
            # BiasQuantization applies to the folded layers' float biases (serialised once for those levels).
            if lv == "off":
                twin_off = twin_off or _twin_bytes(proto, report, seed, base.folder)
                s["twin"] = _session(twin_off, level, external_folder=base.folder)
            else:
                if twin_on is None:
                    spreads = _ort_bias_rounding(fold.proto(), report, fold.folder)
                    twin_on = _twin_bytes(proto, report, seed, base.folder, spreads) if spreads else \
                        (twin_off or _twin_bytes(proto, report, seed, base.folder))
                s["twin"] = _session(twin_on, level, external_folder=base.folder)
        if not names:
            names = [o.name for o in s["folded"].get_outputs()]
            if [o.name for o in s["original"].get_outputs()][: len(names)] != names:
                raise VerifyError("the folded model's outputs are not the original's")
            if inputs is None:
                sizes = symbolic_sizes(s["original"], dims, symbolic_size)
                limits = _index_limits(proto)
                feed_sets = [random_inputs(s["original"], seed + k, symbolic_size, dims, limits)
                             for k in range(max(input_sets, 1))]
            else:
                given = list(inputs)
                if not given:
                    raise VerifyError("no input files given")
                if all(isinstance(i, Mapping) for i in given):
                    feed_sets = [{k: np.asarray(v) for k, v in i.items()} for i in given]
                    source_text = "given"
                else:
                    feed_sets = load_inputs(given, s["original"])  # type: ignore[arg-type]
                    source_text = ", ".join(os.fspath(i) for i in given)  # type: ignore[arg-type]
        per_level[lv] = {n: ([], [], []) for n in names}
        level_feeds[lv] = list(feed_sets)
        cert_session = None  # built on the first input set, once the exposed activations' types are known
        for index, feeds in enumerate(feed_sets):
            try:
                out_original = _run(s["original"], feeds)
                out_folded = _run(s["folded"], feeds)
                out_twin = _run(s["twin"], feeds) if "twin" in s else None
            except Exception as e:
                raise VerifyError(f"onnxruntime cannot run the model: {str(e).strip().splitlines()[0]}") from e
            if not shapes:
                shapes = [list(np.shape(v)) for v in out_original[: len(names)]]
            if lv == levels[0]:
                baselines.append(out_original[: len(names)] if lv == "off" else [])
            for k, name in enumerate(names):
                step = steps.get(name)
                per_level[lv][name][0].append(_figures(out_original[k], out_folded[k], step))
                if lv != "off" and baselines[index]:
                    per_level[lv][name][2].append(_figures(baselines[index][k], out_original[k], step))
                if out_twin is not None:
                    per_level[lv][name][1].append(_figures(out_original[k], out_twin[k], step))
            if lv == levels[0] and plans:  # the certificates: optimisations off, whatever levels are verified
                exposing = s.get("exposing", s["original"])
                out_exposing = out_original if exposing is s["original"] else _run(exposing, feeds)
                exposed = dict(zip([o.name for o in exposing.get_outputs()], out_exposing))
                for name in set(feeds) & set(exposed_names):
                    exposed[name] = feeds[name]
                if cert_session is None:
                    from onnx import helper

                    types = {p.x: (helper.np_dtype_to_tensor_dtype(np.asarray(exposed[p.x]).dtype),
                                   np.ndim(exposed[p.x])) for p in plans}
                    cert_model = _certificate_model(fold.proto(), plans, types)
                    if cert_model is None:
                        skipped += [p.node for p in plans]
                        plans = []
                        continue
                    cert_session = _derived_session(cert_model, fold)
                    del cert_model
                cert_inputs = {i.name: exposed[i.name] if i.name in exposed else feeds[i.name]
                               for i in cert_session.get_inputs()}
                cert_out = dict(zip([o.name for o in cert_session.get_outputs()], cert_session.run(None, cert_inputs)))
                for p in plans:
                    c = _certify(p, exposed[p.y], cert_out[p.y], cert_out.get(p.abs_out) if p.abs_out else None)
                    key = f"{p.node}->{p.y}"
                    if key not in certs or c.ratio > certs[key].ratio:
                        certs[key] = c
                del exposed, cert_out, out_exposing
        # Flips are rare events: on a few input sets the fold may show one where the twin shows none. Before
        # calling an output "differs", more random input sets run through original, fold and twin.
        extra = 0
        while inputs is None and "twin" in s and extra < EXTRA_INPUT_SETS and \
                any(c.verdict == "differs" for c in judge_level(lv)):
            feeds = random_inputs(s["original"], seed + 1000 + extra, symbolic_size, dims, _index_limits(proto))
            level_feeds[lv].append(feeds)
            extra += 1
            out_original, out_folded, out_twin = _run(s["original"], feeds), _run(s["folded"], feeds), \
                _run(s["twin"], feeds)
            for k, name in enumerate(names):
                per_level[lv][name][0].append(_figures(out_original[k], out_folded[k], steps.get(name)))
                per_level[lv][name][1].append(_figures(out_original[k], out_twin[k], steps.get(name)))
        extra_sets[lv] = extra
        del s, cert_session
    if not levels:
        raise VerifyError("onnxruntime cannot build the original at any optimisation level asked: " +
                          "; ".join(f"{lv}: {why}" for lv, why in skipped_levels.items()))
    level_checks = {lv: judge_level(lv) for lv in levels}
    kernels = None
    if all(c.verdict != "differs" for c in level_checks.get("off", [])) and \
            all(c.passed for c in certs.values()):
        for lv in levels:
            if lv != "off" and any(c.verdict == "differs" for c in level_checks[lv]):
                found = _attribute_to_kernels(base, fold, lv, names, level_feeds[lv], steps, level_checks[lv],
                                              lambda replaced, lv=lv: judge_level(lv, replaced))
                if found is not None:
                    level_checks[lv], kernels = found
                    break
    for checks in level_checks.values():
        for check, shape in zip(checks, shapes):
            check.shape, check.elements = shape, int(np.prod(shape)) if shape else 1
    # Folds inside subgraphs (If / Loop / Scan bodies, functions) are not isolated by a certificate.
    skipped += [e["node"] for e in _all_folded(report) if e["graph"] != "main"]
    result = VerifyResult(outputs=level_checks[levels[0]], tolerance=tolerance, seed=seed,
                          input_shapes={k: list(v.shape) for k, v in feed_sets[0].items()},
                          levels=level_checks, certificates=list(certs.values()), uncertified=sorted(set(skipped)),
                          input_sets=len(feed_sets), input_source=source_text, symbolic_dims=sizes,
                          extra_input_sets=extra_sets, skipped_levels=skipped_levels,
                          rewritten="TensorRT's trt:: quantizers rewritten as standard ops for this comparison"
                          if rewritten else None, kernels=kernels)
    tmpdir.cleanup()
    # onnxruntime forms quantized units only from Q/DQ pairs: a model without them has none to lose.
    if count_units and any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in base.proto().graph.node):
        if units is None:
            try:
                units = (quantized_units(base), quantized_units(fold))
                units_level = "extended"
            except VerifyError as e:
                skipped_levels.setdefault("extended", str(e))
        if units is not None:
            result.quantized_units_before, result.quantized_units_after = units
            result.units_level = LEVELS[units_level]
    return result


# ------------------------------------------------------------------------------- the runtime's kernels

#: Session options under which onnxruntime's integer kernels cannot saturate: 16-bit precision for x86-64's
#: u8s8 kernels (the same graph and kernels, no saturating pair sums). Not ``session.disable_quant_qdq``: it also
#: turns off onnxruntime's other QDQ rewrites (its float16 bias quantization, say), so it would excuse
#: deployment hazards that are the fold's to avoid (tests/test_verify_levels.py).
KERNEL_OPTIONS = (("session.x64quantprecision", "1"),)

#: Runs of each session when the cost of the session option is measured.
_COST_RUNS = 5


def _attribute_to_kernels(base: _Model, fold: _Model, lv: str, names: list[str], feed_sets: list[dict[str, Any]],
                          steps: Mapping[str, float], deployed: list[OutputCheck], judge) -> tuple | None:
    """At level ``lv`` the folded model differs from the original beyond the floor. When onnxruntime's integer
    kernels are the cause (the folded model lets it form kernels the original did not have), the fold run
    under one of :data:`KERNEL_OPTIONS` is within the floor: then the fold is exact and the difference is this
    CPU's kernels'. Returns the level's checks under that option and the ``kernels`` section (the deployed
    figures, each integer layer measured alone, and what the option costs), or None when no option explains
    the difference (it stays "differs")."""
    import time

    import numpy as np

    from . import kernels as kernel_check

    level = _level(lv)
    original = _session(base.source(), level, external_folder=base.folder)
    outs_original = [_run(original, feeds) for feeds in feed_sets]
    for key, value in KERNEL_OPTIONS:
        folded = _session(fold.source(), level, external_folder=fold.folder, config={key: value})
        replaced: dict[str, list] = {name: [] for name in names}
        for feeds, out_o in zip(feed_sets, outs_original):
            out_f = _run(folded, feeds)
            for k, name in enumerate(names):
                replaced[name].append(_figures(out_o[k], out_f[k], steps.get(name)))
        checks = judge(replaced)
        if any(c.verdict == "differs" for c in checks):
            continue
        # The cost of the option: the folded model's run time with it over without it (interleaved runs).
        plain = _session(fold.source(), level, external_folder=fold.folder)
        timing = {"plain": [], "option": []}
        for _ in range(_COST_RUNS):
            for which, sess in (("plain", plain), ("option", folded)):
                t0 = time.perf_counter()
                _run(sess, feed_sets[0])
                timing[which].append(time.perf_counter() - t0)
        cost = float(np.median(timing["option"]) / max(np.median(timing["plain"]), 1e-12))
        proto = fold.proto()
        source = fold.source()  # the file as written (mapped by check_file), or the bytes verify was given
        layers = kernel_check.check_file(source) if isinstance(source, str) else kernel_check.check_bytes(source)
        try:
            measured = kernel_check.measure(proto, fold.folder, feed_sets[:3], layers)
        except Exception:  # noqa: BLE001 - onnxruntime cannot build the isolated layers: report without them
            measured = [{"node": lay.node, "kernel": lay.kernel, "can_saturate": lay.can_saturate, "moved": None,
                         "elements": None, "max_steps": None} for lay in layers]
        section = {
            "level": lv, "option": f"{key}={value}",
            "outputs": [{"name": d.name, "of_range": d.of_range, "max_abs": d.max_abs, "moved": d.moved,
                         "elements": int(np.prod(np.shape(outs_original[0][k]))),
                         "snr_db": d.snr_db, "with_option_of_range": c.of_range}
                        for k, (d, c) in enumerate(zip(deployed, checks))],
            "layers": measured, "option_cost": cost,
            "remedies": [f"run with the session option {key}={value} (measured here: {cost:.2f}x the run time)",
                         "deploy on a CPU with VNNI (AVX-VNNI or AVX512-VNNI), whose integer kernels do not saturate",
                         "keep the saturating layers in float (no output QuantizeLinear after them)"],
        }
        return checks, section
    return None
