"""The model-level API: fold an ``onnx.ModelProto``, serialized bytes, or a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import qdqfold_native

if TYPE_CHECKING:
    import onnx

# onnx is imported where it is used, so the command line starts without it (about 0.1 s).

from .report import FoldReport

#: Every fold option and its default (keyword arguments of fold_model, fold_bytes and qdqfold_native.fold).
OPTIONS: dict[str, bool] = qdqfold_native.options()

ModelLike = Union["onnx.ModelProto", bytes, bytearray, memoryview, str, os.PathLike]


def inferred_shapes(model: bytes | bytearray | memoryview | str | os.PathLike) -> dict[str, list[int]]:
    """Static shapes onnx shape inference finds for the values of a serialized model or a model file ({} if
    it fails; a file's external data is not loaded).

    It runs on a copy: the model's own value_info is never altered. Unknown dims are -1.
    """
    import onnx

    try:
        proto = (onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, (str, os.PathLike))
                 else onnx.load_from_string(bytes(model)))
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 (a model shape inference cannot read simply gets no shapes)
        return {}
    shapes: dict[str, list[int]] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for info in (*graph.input, *graph.value_info, *graph.output):
            tensor = info.type.tensor_type
            if info.type.HasField("tensor_type") and tensor.HasField("shape"):
                shapes.setdefault(info.name, [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim])
        for node in graph.node:
            for attribute in node.attribute:
                for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    collect(sub)

    collect(inferred.graph)
    return shapes


def with_inferred_shapes(model: bytes | bytearray | memoryview | str | os.PathLike,
                         options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus ``shapes`` from onnx shape inference when ``pad_correction`` needs static sizes and the
    caller gave none."""
    if options.get("pad_correction") and "shapes" not in options:
        return {**options, "shapes": inferred_shapes(model)}
    return options


def fold_bytes(data: bytes | bytearray | memoryview, **options: Any) -> tuple[bytes, FoldReport]:
    """Folds a serialized model; returns the new model's bytes and the report. With ``pad_correction`` the
    static shapes the correction needs come from onnx shape inference (on a copy) unless ``shapes`` is given."""
    out, report = qdqfold_native.fold_with_report(data, **with_inferred_shapes(data, options))
    return out, FoldReport.from_native(report)


def _has_external_data(model: onnx.ModelProto) -> bool:
    import onnx

    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)  # noqa: SLF001 (onnx's own walker)
    )


def load_model_bytes(path: str | os.PathLike) -> bytes:
    """The serialized model at ``path``, with external data (if any) loaded through onnx's helpers."""
    import onnx

    path = Path(path)
    data = path.read_bytes()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # not parseable by protobuf either: let the native core name the problem
        return data
    if not _has_external_data(model):
        return data
    onnx.load_external_data_for_model(model, str(path.parent))
    return model.SerializeToString()


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it, so ``path`` is never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fold_model(model: ModelLike, *, output: str | os.PathLike | None = None, report: bool = False,
               **options: bool) -> Any:
    """Folds BatchNormalization nodes of ``model`` and returns the folded model in the same kind:

    - an ``onnx.ModelProto`` gives a new ``onnx.ModelProto`` (the argument is not modified);
    - bytes-like gives ``bytes``;
    - a path gives a ``ModelProto`` (external data loaded through onnx's helpers), or, when ``output`` is
      given, is folded file to file by ``qdqfold_native.fold_file`` (the input mapped, the output written
      atomically, external data kept external beside it) and returns ``output`` as a ``Path``.

    With ``report=True`` the result is a pair ``(folded, FoldReport)``. Keyword options are those of
    :data:`OPTIONS`. Raises :class:`qdqfold.FoldError` for input that is not a valid ONNX model.
    """
    import onnx

    if isinstance(model, onnx.ModelProto):
        folded_bytes, rep = fold_bytes(model.SerializeToString(), **options)
        result: Any = onnx.ModelProto()
        result.ParseFromString(folded_bytes)
    elif isinstance(model, (bytes, bytearray, memoryview)):
        result, rep = fold_bytes(model, **options)
    elif isinstance(model, (str, os.PathLike)):
        if output is not None:  # file to file in the native core: mapped, external data kept external
            native = qdqfold_native.fold_file(model, output, **with_inferred_shapes(model, options))
            return (Path(output), FoldReport.from_native(native)) if report else Path(output)
        folded_bytes, rep = fold_bytes(load_model_bytes(model), **options)
        result = onnx.ModelProto()
        result.ParseFromString(folded_bytes)
    else:
        raise TypeError(f"fold_model() takes an onnx.ModelProto, bytes or a path, not {type(model).__name__}")
    return (result, rep) if report else result
