"""Loading: models as onnxruntime should load them (by path, weights referred to in place), and sessions."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Union

from .result import VerifyError

if TYPE_CHECKING:
    import numpy as np
    import onnx

# numpy, onnx and onnxruntime are imported where they are used: folding without --verify never loads them.
ModelLike = Union["onnx.ModelProto", bytes, bytearray, memoryview, str, os.PathLike]

#: onnxruntime optimisation levels by the names the CLI takes.
LEVELS = {"off": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "default": "ORT_ENABLE_ALL", "all": "ORT_ENABLE_ALL"}

_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


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

    from .. import wire

    spans: dict[str, tuple[int, int]] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                for graph in wire.nested(buf, (0, len(buf)), wire.MODEL_GRAPH):
                    for tensor in wire.nested(buf, graph, wire.GRAPH_INITIALIZER):
                        name, raw = None, None
                        for t_number, t_wire, value in wire.fields(buf, *tensor):
                            if t_number == wire.TENSOR_NAME and t_wire == wire.LENGTH:
                                name = wire.text(buf, value)
                            elif t_number == wire.TENSOR_RAW_DATA and t_wire == wire.LENGTH:
                                raw = value
                        if name is not None and raw is not None and raw[1] - raw[0] >= _IN_PLACE_BYTES:
                            spans[name] = raw
            finally:
                buf.release()
    except (OSError, ValueError):  # wire.WireFormatError is a ValueError
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
    from ..trt_compat import TRT_OPS, TrtCompatError, standard_qdq

    def data(m: _Model) -> bytes:
        source = m.source()
        if isinstance(source, str):
            from ..api import load_model_bytes

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
