"""qdqfold as a pass of the ONNX IR (``onnx_ir``, which onnxscript's optimizer is built on).

    import onnx_ir as ir
    from qdqfold.passes import FoldBatchNormalization

    model = ir.load("model.onnx")                     # external data stays on disk, mapped
    result = FoldBatchNormalization(pad_correction=True)(model)
    result.model, result.modified                     # a new ir.Model; the input is left as it was
    ir.save(result.model, "model.folded.onnx")

    # or among other passes
    ir.passes.PassManager([FoldBatchNormalization(), ...])(model)

The pass is functional (``onnx_ir.passes.FunctionalPass``): it returns a new ``ir.Model`` and leaves the
input model unchanged. It needs ``onnx-ir`` (``pip install "qdqfold[ir]"``).

How the model gets to the native core without copying more than it must:

- The graph goes over as a small ModelProto *skeleton* (``onnx_ir.serde`` with each top-level initializer
  replaced by a stand-in that carries no data).
- Tensors the IR holds as external data (``ir.load`` of a model saved with external data) stay external: the
  native core reads them from their files (``qdqfold_native.fold(..., base_directory=)``), and those it does not
  fold come back as the same ``ir.ExternalTensor`` objects, never read. With a ``qdqfold_native`` that has no
  ``base_directory`` (older builds) they are read into memory instead, so their BNs still fold.
- Tensors held in memory go over as buffers beside the skeleton (``qdqfold_native.fold(..., tensors=)``), read in
  place where NumPy holds them (protobuf-backed tensors hand out their bytes only as a copy); those the core
  does not fold come back as the same tensor objects. With an older ``qdqfold_native`` they are copied once
  into the buffer the core reads.
- The folded model's initializers are NumPy views into the bytes the native core returned (no copy); tensors
  of types NumPy lacks (bfloat16, float8, int4, ...) and the initializers of subgraphs are parsed by onnx.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

try:
    import onnx_ir as ir
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('qdqfold.passes needs onnx-ir: pip install "qdqfold[ir]"') from error

import numpy as np

import qdqfold_native

from .graphinfo import _varint as read_varint
from .report import FoldReport

if TYPE_CHECKING:
    import onnx

__all__ = ["FoldBatchNormalization"]

# ------------------------------------------------------------------------------------------------------
# The protobuf wire format, as much of it as the skeleton needs.

_LEN = 2
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2

# TensorProto.DataType -> NumPy little-endian dtype, for the types a view can hold as they are on the wire.
_NUMPY_DTYPES = {
    1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8",
    12: "<u4", 13: "<u8",
}

# The NumPy dtypes whose bytes are the wire's as they are (int8's str is "|i1", not "i1": compare dtypes).
_VIEWABLE = frozenset(np.dtype(t) for t in _NUMPY_DTYPES.values())

# The location of a stand-in for an in-memory tensor: a NUL byte cannot start a file name.
_MARK = "\x00qdqfold-in-memory/"


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (the report reader's, bounded by the whole buffer)."""
    return read_varint(data, pos, len(data))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field (its payload follows)."""
    return _encode_varint(number << 3 | _LEN) + _encode_varint(length)


def _fields(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, payload start, payload end) of each field in data[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value_start = pos
            _, pos = _varint(data, pos)
        elif wire == 1:
            value_start, pos = pos, pos + 8
        elif wire == 2:
            length, value_start = _varint(data, pos)
            pos = value_start + length
        elif wire == 5:
            value_start, pos = pos, pos + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {field_start}")
        if pos > end:
            raise ValueError(f"field {number} at byte {field_start} runs past its message")
        yield number, wire, field_start, value_start, pos


def _rewrite_initializers(data: memoryview, rewrite) -> list[Any]:
    """The pieces of ModelProto `data` with each top-level initializer replaced by ``rewrite(start, end)``
    (a list of pieces forming the new TensorProto payload, or None to keep it)."""
    pieces: list[Any] = []
    for number, wire, field_start, start, end in _fields(data, 0, len(data)):
        if number != _MODEL_GRAPH or wire != _LEN:
            pieces.append(data[field_start:end])
            continue
        graph: list[Any] = []
        for g_number, g_wire, g_field_start, g_start, g_end in _fields(data, start, end):
            new = rewrite(g_start, g_end) if g_number == _GRAPH_INITIALIZER and g_wire == _LEN else None
            if new is None:
                graph.append(data[g_field_start:g_end])
            else:
                graph.append(_len_field(_GRAPH_INITIALIZER, sum(len(p) for p in new)))
                graph.extend(new)
        pieces.append(_len_field(_MODEL_GRAPH, sum(len(p) for p in graph)))
        pieces.extend(graph)
    return pieces


def _concatenate(pieces: list[Any]) -> np.ndarray:
    """The pieces in one new buffer. A NumPy array rather than bytes: NumPy asks the kernel for huge pages
    for large arrays, which makes filling 240 MB about 5x faster than b"".join (page faults dominate)."""
    total = sum(len(p) for p in pieces)
    buffer = np.empty(total, np.uint8)
    pos = 0
    for piece in pieces:
        n = len(piece)
        buffer[pos:pos + n] = np.frombuffer(piece, np.uint8)
        pos += n
    return buffer


def _external_location(data: memoryview, start: int, end: int) -> Optional[str]:
    for number, wire, _, s, e in _fields(data, start, end):
        if number == _TENSOR_EXTERNAL_DATA and wire == _LEN:
            key = value = None
            for n, w, _, s2, e2 in _fields(data, s, e):
                if n == _ENTRY_KEY:
                    key = bytes(data[s2:e2])
                elif n == _ENTRY_VALUE:
                    value = bytes(data[s2:e2])
            if key == b"location" and value is not None:
                return value.decode("utf-8", "replace")
    return None


# ------------------------------------------------------------------------------------------------------
# base_directory and tensors: feature-detected once each.


def _native_takes(keyword: str, value: Any) -> bool:
    """Whether this ``qdqfold_native``'s fold() takes the keyword (later builds than some users have)."""
    try:
        qdqfold_native.fold(b"", **{keyword: value})
    except TypeError:  # "unknown option '<keyword>'": a build from before it
        return False
    except ValueError:  # FoldError: the empty input, after the keyword was taken
        return True
    return True  # pragma: no cover - an empty input is never a model


_native_base_directory: Optional[bool] = None
_native_tensors: Optional[bool] = None


def native_reads_external_data() -> bool:
    """Whether this ``qdqfold_native`` takes ``base_directory=`` (reads external data itself)."""
    global _native_base_directory
    if _native_base_directory is None:
        _native_base_directory = _native_takes("base_directory", os.curdir)
    return _native_base_directory


def native_takes_tensors() -> bool:
    """Whether this ``qdqfold_native`` takes ``tensors=`` (external data from buffers held in memory)."""
    global _native_tensors
    if _native_tensors is None:
        _native_tensors = _native_takes("tensors", {})
    return _native_tensors


# ------------------------------------------------------------------------------------------------------


def _stays_external(tensor: Any, base_directory: Optional[str]) -> bool:
    """An external tensor whose file the native core may read: relative, inside `base_directory`."""
    if base_directory is None or not isinstance(tensor, ir.ExternalTensor):
        return False
    location = os.fspath(tensor.location)
    if os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
        return False
    return os.path.abspath(os.fspath(tensor.base_dir) or os.curdir) == base_directory


def _raw_bytes(tensor: Any) -> Any:
    """The tensor's bytes as ONNX raw_data holds them, without a copy where NumPy already has them."""
    if type(tensor) is ir.Tensor:  # noqa: E721 (subclasses may store their data differently)
        array = tensor.raw
        if (isinstance(array, np.ndarray) and array.flags.c_contiguous and array.dtype in _VIEWABLE
                and array.dtype == tensor.dtype.numpy()):
            return memoryview(array).cast("B")  # type: ignore[arg-type]
    return tensor.tobytes()


class FoldBatchNormalization(ir.passes.FunctionalPass):
    """Folds BatchNormalization into the layers around it, quantized (QDQ) weights included, exactly.

    The keyword arguments are qdqfold's fold options (``qdqfold_native.options()``; README, "What it folds").
    ``shapes`` (value name -> dims) gives the static sizes ``pad_correction`` needs; without it they come
    from the IR's own shapes and onnx shape inference on the graph.

    Returns ``PassResult(model, modified)``: a new ``ir.Model`` (the input is not changed) and whether any
    BatchNormalization was folded. While the input is serialized its top-level initializers stand in for
    themselves without data (put back before the call returns, also on error): do not run the pass on a model
    another thread is reading at the same time. The report of the last run is kept in :attr:`report` (a
    :class:`qdqfold.FoldReport`). Raises ``qdqfold.FoldError`` for a model the core cannot read.
    """

    def __init__(
        self,
        *,
        fold_backward: bool = True,
        fold_forward: bool = True,
        pad_correction: bool = False,
        allow_opset_upgrade: bool = False,
        allow_nonzero_zero_point: bool = False,
        materialize_quantized_weights: bool = False,
        drop_activation_quantizers: bool = False,
        fold_affine: bool = True,
        freeze_initializer_inputs: bool = False,
        merge_branches: bool = False,
        requantize_merged: bool = False,
        requantize_residuals: bool = False,
        store_float_weights: bool = False,
        shapes: Optional[Mapping[str, Sequence[Optional[int]]]] = None,
    ) -> None:
        super().__init__()
        self.options: dict[str, Any] = {
            "fold_backward": fold_backward,
            "fold_forward": fold_forward,
            "pad_correction": pad_correction,
            "allow_opset_upgrade": allow_opset_upgrade,
            "allow_nonzero_zero_point": allow_nonzero_zero_point,
            "materialize_quantized_weights": materialize_quantized_weights,
            "drop_activation_quantizers": drop_activation_quantizers,
            "fold_affine": fold_affine,
            "freeze_initializer_inputs": freeze_initializer_inputs,
            "merge_branches": merge_branches,
            "requantize_merged": requantize_merged,
            "requantize_residuals": requantize_residuals,
            "store_float_weights": store_float_weights,
        }
        self.shapes = None if shapes is None else {k: list(v) for k, v in shapes.items()}
        self.report: Optional[FoldReport] = None

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if v != qdqfold_native.options().get(k, v)}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"

    # -- the pass -------------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        base_directory = self._base_directory(model)
        skeleton, in_memory = self._skeleton(model, base_directory)
        options = dict(self.options)
        if self.options["pad_correction"]:
            options["shapes"] = self.shapes if self.shapes is not None else self._static_shapes(model, skeleton)
        if base_directory is not None:
            options["base_directory"] = base_directory
        if native_takes_tensors():
            # The in-memory tensors go over as buffers beside the skeleton, read in place; those the core does
            # not fold come back as references to them, and then as the same tensor objects.
            data: Any = skeleton
            options["tensors"] = {location: _raw_bytes(tensor) for location, tensor in in_memory.items()}
        else:
            data = self._with_tensors(skeleton, in_memory)
        del skeleton
        out, native_report = qdqfold_native.fold_with_report(data, **options)
        del data, options
        self.report = FoldReport.from_native(dict(native_report))
        folded = self._model_from(out, model, base_directory, in_memory)
        return ir.passes.PassResult(folded, modified=bool(self.report.folded))

    # -- to the native core ---------------------------------------------------------------------------

    @staticmethod
    def _base_directory(model: ir.Model) -> Optional[str]:
        """The directory of the model's external tensors, when the native core can read them there."""
        if not native_reads_external_data():
            return None
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return os.path.abspath(os.fspath(value.const_value.base_dir) or os.curdir)
        return None

    @staticmethod
    def _skeleton(model: ir.Model, base_directory: Optional[str]) -> tuple[bytes, dict[str, Any]]:
        """The serialized model with every top-level initializer that is not read from a file by the native
        core replaced by a stand-in without data, and those tensors by stand-in location."""
        swapped: list[tuple[ir.Value, Any]] = []
        in_memory: dict[str, Any] = {}
        try:
            for i, value in enumerate(model.graph.initializers.values()):
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.StringTensor) or _stays_external(tensor, base_directory):
                    continue
                location = f"{_MARK}{i}"
                in_memory[location] = tensor
                shape: Any = tensor.shape
                stand_in = ir.ExternalTensor(location, 0, tensor.nbytes, tensor.dtype, shape=shape,
                                             name=value.name or "", doc_string=tensor.doc_string,
                                             metadata_props=dict(tensor.metadata_props))
                swapped.append((value, tensor))
                value.const_value = stand_in
            proto = ir.serde.serialize_model(model)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
        return proto.SerializeToString(), in_memory

    @staticmethod
    def _with_tensors(skeleton: bytes, in_memory: dict[str, Any]) -> Any:
        """The skeleton with each stand-in's data written inline (one copy of each in-memory tensor)."""
        if not in_memory:
            return skeleton
        view = memoryview(skeleton)

        def inline(start: int, end: int) -> Optional[list[Any]]:
            location = _external_location(view, start, end)
            if location is None or not location.startswith(_MARK):
                return None
            raw = _raw_bytes(in_memory[location])
            kept = [view[fs:fe] for n, _, fs, _, fe in _fields(view, start, end)
                    if n not in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION)]
            return [*kept, _len_field(_TENSOR_RAW_DATA, len(raw)), raw]

        return _concatenate(_rewrite_initializers(view, inline))

    def _static_shapes(self, model: ir.Model, skeleton: bytes) -> dict[str, list[int]]:
        """Static shapes for pad_correction: the IR's own, then onnx shape inference on the skeleton."""
        from .api import inferred_shapes

        shapes = inferred_shapes(skeleton)
        for value in (*model.graph.inputs, *model.graph.outputs):
            self._add_shape(shapes, value)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for value in node.outputs:
                self._add_shape(shapes, value)
        return shapes

    @staticmethod
    def _add_shape(shapes: dict[str, list[int]], value: ir.Value) -> None:
        if value.name and value.shape is not None and value.name not in shapes:
            dims = [d if isinstance(d, int) else -1 for d in value.shape]
            if all(d >= 0 for d in dims):
                shapes[value.name] = dims

    # -- back from the native core ----------------------------------------------------------------------

    @staticmethod
    def _model_from(out: bytes, original: ir.Model, base_directory: Optional[str],
                    in_memory: Mapping[str, Any]) -> ir.Model:
        """The folded model: the output's graph parsed without its inline tensor data, each inline initializer
        a NumPy view into `out`, each external one, and each in-memory one handed over as a buffer, the input's
        tensor object where it is unchanged."""
        import onnx

        view = memoryview(out)
        views: dict[str, tuple[np.ndarray, int]] = {}

        def strip(start: int, end: int) -> Optional[list[Any]]:
            name = raw = None
            data_type = 0
            dims: list[int] = []
            for number, wire, _, s, e in _fields(view, start, end):
                if number == _TENSOR_NAME:
                    name = bytes(view[s:e]).decode("utf-8", "replace")
                elif number == _TENSOR_DATA_TYPE and wire == 0:
                    data_type = _varint(view, s)[0]
                elif number == _TENSOR_RAW_DATA:
                    raw = (s, e)
                elif number == _TENSOR_DIMS and wire == 0:
                    dims.append(_varint(view, s)[0])
                elif number == _TENSOR_DIMS and wire == _LEN:
                    pos = s
                    while pos < e:
                        dim, pos = _varint(view, pos)
                        dims.append(dim)
            if name is None or raw is None or data_type not in _NUMPY_DTYPES or name in views:
                return None
            dtype = np.dtype(_NUMPY_DTYPES[data_type])
            dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]
            count = (raw[1] - raw[0]) // dtype.itemsize
            size_adds_up = count * dtype.itemsize == raw[1] - raw[0] and int(np.prod(dims, dtype=np.int64)) == count
            if any(d < 0 for d in dims) or not size_adds_up:
                return None  # let onnx and the IR judge a tensor whose size does not add up
            array = np.frombuffer(out, dtype=dtype, count=count, offset=raw[0]).reshape(dims)
            views[name] = (array, data_type)
            return [view[fs:fe] for n, _, fs, _, fe in _fields(view, start, end) if n != _TENSOR_RAW_DATA]

        skeleton = b"".join(_rewrite_initializers(view, strip))
        model = ir.serde.deserialize_model(onnx.ModelProto.FromString(skeleton))

        originals: dict[tuple[str, Optional[int], Optional[int]], Any] = {}
        for value in original.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                originals[(os.fspath(tensor.location), tensor.offset, tensor.length)] = tensor
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if name in views:
                array, data_type = views[name]
                doc = tensor.doc_string if tensor is not None else None
                props = dict(tensor.metadata_props) if tensor is not None else None
                value.const_value = ir.Tensor(array, ir.DataType(data_type), name=name, doc_string=doc,
                                              metadata_props=props)
            elif isinstance(tensor, ir.ExternalTensor):
                location = os.fspath(tensor.location)
                same = originals.get((location, tensor.offset, tensor.length))
                if location in in_memory and not tensor.offset and tensor.length == in_memory[location].nbytes:
                    value.const_value = in_memory[location]
                elif same is not None:
                    value.const_value = same
                elif base_directory is not None:
                    value.const_value = ir.ExternalTensor(
                        tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                        name=name, doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props),
                        base_dir=base_directory)
        return model
