"""The model-level API: fold an ``onnx.ModelProto``, serialized bytes, or a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import qdqfold_native

if TYPE_CHECKING:
    import onnx

    from .report import FoldReport

# onnx is imported where it is used, so the command line starts without it (about 0.1 s); so are tempfile and
# the report's dataclasses (qdqfold.report), which a command-line run may not need.

#: Every fold option and its default (keyword arguments of fold_model, fold_bytes and qdqfold_native.fold).
from ._defaults import OPTIONS  # noqa: E402 (defined where the command line reads it without this module)

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


def fold_bytes(data: bytes | bytearray | memoryview, *, stacklevel: int = 3, **options: Any) -> tuple[bytes, FoldReport]:
    """Folds a serialized model; returns the new model's bytes and the report. With ``pad_correction`` the
    static shapes the correction needs come from onnx shape inference (on a copy) unless ``shapes`` is given.
    ``base_directory``: the directory external data locations are relative to; without it, BNs whose weights
    are in external data are kept and a :class:`qdqfold.MissingWeightsWarning` says so."""
    from .files import warn_missing_weights
    from .report import FoldReport

    out, report = qdqfold_native.fold_with_report(data, **with_inferred_shapes(data, options))
    if options.get("base_directory") is None:
        warn_missing_weights(report["batchnorms"], "the model in memory", _INSTEAD, stacklevel=stacklevel)
    return out, FoldReport.from_native(report)


#: What to do instead, when a model in memory had its weights' data elsewhere.
_INSTEAD = ("pass base_directory=DIR (the directory holding its data files), or load the model with its data "
            "(onnx.load(path), or fold_model(path))")


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
    """Writes ``data`` to a temporary file beside ``path`` and renames it, so ``path`` is never half-written. An
    existing ``path`` keeps its mode (and owner where permitted); a new one gets 0666 & ~umask."""
    import tempfile

    from .files import give_mode

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            give_mode(f.fileno(), path)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


#: protobuf refuses to serialize or parse one message of this size or more.
PROTOBUF_LIMIT = 2**31 - 1


def _too_big_for_a_proto(path: Path) -> bool:
    """True when the model at ``path``, its external data counted, is close to protobuf's 2 GB limit."""
    from .graphinfo import read_model_info

    size = path.stat().st_size
    if size == 0:
        return False
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            locations = read_model_info(mapped).external_locations
        except ValueError:
            return False
    files = {(path.parent / location).resolve() for location in locations}
    return size + sum(p.stat().st_size for p in files if p.is_file()) >= PROTOBUF_LIMIT * 3 // 4


def _fold_path_to_proto(path: Path, options: dict[str, Any]) -> tuple[onnx.ModelProto, FoldReport]:
    """A model file folded into a ModelProto with every tensor loaded. A model near or over 2 GB goes through a
    private temporary directory (``fold_file`` there, then ``onnx.load``), since such a model cannot pass
    through one serialized message; a smaller one is folded in memory, the core reading its external data."""
    import mmap
    import tempfile

    import onnx

    from .report import FoldReport

    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError as e:  # a name over NAME_MAX, a path over PATH_MAX
        raise qdqfold_native.FileError(f"{path}: cannot read: {e.strerror or e}") from e
    if not is_file:
        raise qdqfold_native.FileError(f"{path}: no such model file" if not exists
                                       else f"{path}: is not a regular file")
    if _too_big_for_a_proto(path):
        with tempfile.TemporaryDirectory(prefix="qdqfold-") as scratch:
            target = Path(scratch) / path.name
            native = qdqfold_native.fold_file(path, target, **with_inferred_shapes(path, options))
            return onnx.load(str(target)), FoldReport.from_native(native)
    with open(path, "rb") as f:
        data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    try:
        folded_bytes, rep = fold_bytes(data, base_directory=str(path.parent), **options)  # no warning: a directory
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    result = onnx.ModelProto()
    result.ParseFromString(folded_bytes)
    # The tensors no fold changed still refer to the input's data files: loaded from there, as onnx.load would.
    if _has_external_data(result):
        onnx.load_external_data_for_model(result, str(path.parent))
    return result, rep


def fold_model(model: ModelLike, *, output: str | os.PathLike | None = None, report: bool = False,
               force: bool = False, **options: bool) -> Any:
    """Folds BatchNormalization nodes of ``model`` and returns the folded model in the same kind:

    - an ``onnx.ModelProto`` gives a new ``onnx.ModelProto`` (the argument is not modified);
    - bytes-like gives ``bytes``;
    - a path gives a ``ModelProto`` with every tensor loaded (external data read by the core under
      ``fold_file``'s rules; a model over 2 GB goes through a temporary directory), or, when ``output`` is
      given, is folded file to file by ``qdqfold_native.fold_file`` (the input mapped, the output written
      atomically, external data in files named after ``output``) and returns ``output`` as a ``Path``.
      ``force`` lets those data files replace existing files that are not from an earlier run.

    An in-memory model (ModelProto or bytes) that keeps weights in external data reads them from
    ``base_directory=DIR``; a ModelProto result then has every tensor loaded. Without it, the BNs whose weights
    are not there are kept and a :class:`qdqfold.MissingWeightsWarning` (a UserWarning) says what to pass.

    With ``report=True`` the result is a pair ``(folded, FoldReport)``. Keyword options are those of
    :data:`OPTIONS`. Raises :class:`qdqfold.FoldError` for input that is not a valid ONNX model, and
    ``qdqfold_native.FileError`` (a FoldError) naming the file for files that cannot be read or written.
    """
    import onnx

    from .report import FoldReport

    if isinstance(model, onnx.ModelProto):
        try:
            serialized = model.SerializeToString()
        except Exception as e:  # google.protobuf.message.EncodeError: over the 2 GB limit
            raise qdqfold_native.FoldError(
                "the ModelProto is over protobuf's 2 GB limit and cannot be serialized for folding; save it with "
                "external data (onnx.save(model, path, save_as_external_data=True)) and call "
                "fold_model(path, output=...)") from e
        folded_bytes, rep = fold_bytes(serialized, stacklevel=4, **options)
        result: Any = onnx.ModelProto()
        result.ParseFromString(folded_bytes)
        base = options.get("base_directory")
        if base is not None and _has_external_data(result):
            # The tensors no fold changed, loaded from base_directory as for a path: the result names no data file.
            onnx.load_external_data_for_model(result, os.fspath(base))
    elif isinstance(model, (bytes, bytearray, memoryview)):
        result, rep = fold_bytes(model, stacklevel=4, **options)
    elif isinstance(model, (str, os.PathLike)):
        if output is not None:  # file to file in the native core: mapped, external data kept external
            native = qdqfold_native.fold_file(model, output, force=force, **with_inferred_shapes(model, options))
            return (Path(output), FoldReport.from_native(native)) if report else Path(output)
        result, rep = _fold_path_to_proto(Path(model), options)
    else:
        raise TypeError(f"fold_model() takes an onnx.ModelProto, bytes or a path, not {type(model).__name__}")
    return (result, rep) if report else result
