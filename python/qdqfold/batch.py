"""Folding model files: one (``fold_file_result``) or many in parallel (``fold_many``).

Every model of a batch goes through :func:`fold_file_result`, which folds one file (through
:func:`qdqfold.files.fold_file`, the one place a file is folded), gathers its op types, sizes and report, and
(on request) verifies it, and reports any failure as a :class:`ModelError` naming the path. It is a plain
module-level function taking plain arguments, so any ``concurrent.futures.Executor`` can run it: threads (the
native fold releases the GIL), processes, or a Dask ``Client.get_executor()``. (The command line's quiet
single fold calls qdqfold.files directly: it needs no result.)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import qdqfold_native
from qdqfold_native import FoldError

from ._defaults import DEFAULT_LEVELS, DEFAULT_TOLERANCE
from .api import with_inferred_shapes
from .files import STORAGE_KEYWORDS, ModelError, interrupt_running  # noqa: F401 (part of this module's API)
from .files import _interrupted  # noqa: F401 (the command line clears it)
from .files import check_source as _check_source
from .files import fold_file as _fold_file  # the one place a file is folded (tests wrap it here)
from .files import make_parent as _make_parent
from .files import native_error as _native_error
from .files import raise_if_interrupted as _raise_if_interrupted
from .paths import MODEL_SUFFIX, plan_outputs  # noqa: F401 (plan_outputs: every output-path rule, in paths)
from .report import FoldReport

# verify (numpy, onnx, onnxruntime), graphinfo, tempfile, traceback and concurrent.futures are imported where
# they are used: a plain file -> file fold needs none of them.
if TYPE_CHECKING:
    import concurrent.futures

    from .graphinfo import ModelInfo
    from .verify import VerifyResult


@dataclass
class VerifySettings:
    """How to verify a fold (see :func:`qdqfold.verify`)."""

    tolerance: float = DEFAULT_TOLERANCE
    seed: int = 0
    symbolic_size: int | None = None  # None: batch 1, other symbolic dimensions 32
    dims: dict[str, int] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # .npz / .npy files, one input set each (else random sets)
    levels: tuple[str, ...] = DEFAULT_LEVELS  # onnxruntime optimisation levels to run


@dataclass
class ModelResult:
    """What happened to one model file. ``error`` is set (and ``report`` is None) when it failed."""

    input: str
    output: str | None  # None for a dry run
    written: bool = False
    report: FoldReport | None = None
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    verification: VerifyResult | None = None
    error: str | None = None
    traceback: str | None = None
    model_info: ModelInfo | None = field(default=None, repr=False)  # the original's nodes, for --explain
    #: The folded model's layers that onnxruntime will run as integer kernels, with the static saturation
    #: check (qdqfold.kernels); None when not checked (a model without quantizers, or the quiet CLI path).
    integer_kernels: list | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"input": self.input, "output": self.output, "written": self.written}
        if self.error is not None:
            data["error"] = self.error
            return data
        assert self.report is not None
        data.update(self.report.to_dict())
        data["op_types"] = {"before": self.ops_before, "after": self.ops_after}
        data["size"] = {"before": self.size_before, "after": self.size_after}
        data["seconds"] = round(self.seconds, 6)
        if self.integer_kernels is not None:
            from .kernels import summary

            data["integer_kernels"] = summary(self.integer_kernels)
        if self.verification is not None:
            data["verify"] = self.verification.to_dict()
        return data


def _missing_external_data(src: Path) -> list[str]:
    """The external data files a model names that do not exist beside it."""
    import onnx

    model = onnx.load_model(str(src), load_external_data=False)
    missing = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):  # noqa: SLF001 (onnx's own walker)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            path = src.parent / location
            if not path.is_file() and str(path) not in missing:
                missing.append(str(path))
    return missing


#: The protobuf limit: a ModelProto this large or larger cannot be serialized as one message.
PROTOBUF_LIMIT = 2**31 - 1


def _read_model(src: Path) -> bytes:
    """The model at ``src`` as bytes, external data (if any) loaded in."""
    from .api import load_model_bytes

    _check_source(src)
    try:
        return load_model_bytes(src)
    except OSError as e:
        raise ModelError(f"{src}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # onnx's external-data loader raises its own types
        try:
            missing = _missing_external_data(src)
        except Exception:
            missing = []
        if missing:
            raise ModelError(f"{src}: external data file missing: {', '.join(missing)}") from e
        raise ModelError(f"{src}: cannot load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _model_info(path: Path) -> ModelInfo:
    """The nodes of the model file at ``path``, read through a mapping (its weights are skipped, not read)."""
    from .graphinfo import read_model_info

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return read_model_info(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return read_model_info(mapped)


def _check_dim_names(src: Path, info: ModelInfo | None, dims: dict[str, int]) -> None:
    """A ``--dim`` that names no symbolic dimension of the inputs is an error before anything is written, in
    the words verification would use after the fold."""
    from .graphinfo import WireFormatError
    from .verify import VerifyError, check_dim_names

    try:
        names = (info or _model_info(src)).input_dim_params
    except WireFormatError:
        return  # not a model: the fold says so, in the native core's words
    except OSError as e:
        raise ModelError(f"{src}: cannot read: {e.strerror or e}") from e
    try:
        check_dim_names(dims, names)
    except VerifyError as e:
        raise ModelError(f"{src}: cannot verify: {e}") from e


def _fold_in_memory(src: Path, options: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """A dry run: folds the mapped model in memory, its external data read by the core under the same rules as a
    file-to-file fold (folded tensors come back inline, others keep their references; the mapping is guarded,
    so a file that shrinks meanwhile is an error, not a signal). Returns the native report and the bytes."""
    with open(src, "rb") as f:
        data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    try:
        folded, native = qdqfold_native.fold_with_report(data, base_directory=str(src.parent),
                                                         **with_inferred_shapes(src, options))
        return native, folded
    except FoldError as e:
        raise ModelError(_native_error(e, src)) from e
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _files_size(model: Path, data_files: Iterable[str]) -> int:
    return model.stat().st_size + sum(os.path.getsize(p) for p in data_files)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def fold_file_result(src: str | os.PathLike, dst: str | os.PathLike | None, options: dict[str, Any] | None = None,
                     *, verification: VerifySettings | None = None, make_parents: bool = False,
                     force: bool = False, storage: dict[str, Any] | None = None,
                     model_info: bool = False) -> ModelResult:
    """Folds the model file ``src`` into ``dst`` (None: a dry run, nothing written) and, with
    ``verification``, runs both in onnxruntime. ``force`` lets the output's data files replace existing files
    that are not from an earlier run of the same output; ``storage`` holds the fold_file keywords of
    :data:`STORAGE_KEYWORDS`; ``model_info`` also lists the original's nodes (for ``--explain``). Everything
    else (op types, sizes, data files) comes from the native core, which reads the input under its guard.
    Raises :class:`ModelError` (one line naming the path)."""
    start = time.perf_counter()
    src, dst = Path(src), (Path(dst) if dst is not None else None)
    options = dict(options or {})
    _check_source(src)
    in_place = dst is not None and _same_file(src, dst)
    info = None
    if model_info:
        from .graphinfo import WireFormatError

        try:
            info = _model_info(src)
        except WireFormatError:
            info = None  # not a model: the fold below says so, in the native core's words
        except OSError as e:
            raise ModelError(f"{src}: cannot read: {e.strerror or e}") from e
    if verification is not None and verification.dims:
        _check_dim_names(src, info, verification.dims)
    # The original must be read before an in-place fold replaces it; that takes it whole into memory.
    original: Any = None
    if verification is not None and in_place:
        original = _read_model_for_verify(src)

    # A dry run with verification folds into a private directory (removed after), so that models with external
    # data or over 2 GB are verified from files, as onnxruntime loads them.
    if dst is None and verification is not None:
        import tempfile

        scratch: Any = tempfile.TemporaryDirectory(prefix="qdqfold-")
    else:
        scratch = contextlib.nullcontext(None)
    with scratch as scratch_dir:
        target = dst if dst is not None else (Path(scratch_dir) / src.name if scratch_dir else None)
        if target is None:
            native, folded = _fold_in_memory(src, options)
        else:
            native, folded = _fold_file(src, target, options, make_parents=make_parents, force=force,
                                        storage=storage), None
        report = FoldReport.from_native(native)
        size_before = native["input_bytes"]  # the model and its data files, as the core read them
        # In memory the folded tensors come back inline and the others stay in the input's data files.
        size_after = len(folded) + size_before - src.stat().st_size if folded is not None \
            else _files_size(target, report.data_files)
        if dst is None:
            report.data_files = []  # the scratch files are not outputs
        result = ModelResult(input=str(src), output=str(dst) if dst is not None else None, written=dst is not None,
                             report=report, ops_before=dict(native["op_types"]["before"]),
                             ops_after=dict(native["op_types"]["after"]), size_before=size_before,
                             size_after=size_after, model_info=info)
        result.integer_kernels = _kernel_check(target, folded, result.ops_after, src.parent)
        if verification is not None:
            _raise_if_interrupted(src, dst)
            result.verification = _verify(original if original is not None else src, target, verification, report,
                                          src)
    result.seconds = time.perf_counter() - start
    return result


def _verify(original: Any, folded: Any, settings: VerifySettings, report: FoldReport, label: str | Path) -> VerifyResult:
    """:func:`qdqfold.verify` with the settings of a CLI or batch run; a model it cannot run is a ModelError."""
    from .verify import VerifyError, verify

    try:
        return verify(original, folded, tolerance=settings.tolerance, seed=settings.seed,
                      symbolic_size=settings.symbolic_size, dims=settings.dims, report=report,
                      inputs=settings.inputs or None, levels=settings.levels)
    except VerifyError as e:
        raise ModelError(f"{label}: cannot verify: {e}") from e


def _read_model_for_verify(src: Path) -> bytes:
    """The original of an in-place fold with --verify, read whole before the fold replaces it."""
    try:
        return _read_model(src)
    except ModelError as e:
        if "serialize" in str(e).lower():
            raise ModelError(f"{src}: --verify with --in-place must hold the original in memory, and it is over "
                             f"protobuf's 2 GB limit; fold to another file (-o) and verify that") from e
        raise


def fold_bytes_result(data: bytes, label: str, dst: str | os.PathLike | None, options: dict[str, Any] | None = None,
                      *, verification: VerifySettings | None = None, base_directory: str | os.PathLike | None = None,
                      make_parents: bool = True) -> tuple[ModelResult, bytes]:
    """Folds a serialized model held in memory (standard input, or a file folded for standard output) and,
    with ``dst``, writes it there atomically. ``label`` names the model in messages ("-" for standard input).
    ``base_directory``: where its external data lives (None: external weights are not read and their BNs are
    kept). Returns the result and the folded bytes. Raises :class:`ModelError`."""
    from .api import write_atomically
    from .graphinfo import WireFormatError, read_model_info

    start = time.perf_counter()
    try:
        info_before = read_model_info(data)  # for --explain (the bytes are in memory: a plain read)
    except WireFormatError:
        info_before = None
    try:
        folded, native = qdqfold_native.fold_with_report(
            data, **({"base_directory": str(base_directory)} if base_directory else {}),
            **with_inferred_shapes(data, dict(options or {})))
    except FoldError as e:
        raise ModelError(e.args[0] if isinstance(e, qdqfold_native.FileError)
                         else f"{label}: not a valid ONNX model: {e}") from e
    report = FoldReport.from_native(native)
    if dst is not None:
        dst = Path(dst)
        if dst.exists() and not dst.is_file():
            raise ModelError(f"{dst}: is not a regular file; qdqfold replaces only regular files")
        _make_parent(dst, make_parents)
        try:
            write_atomically(dst, folded)
        except OSError as e:
            raise ModelError(f"{dst}: cannot write: {e.strerror or e}") from e
    result = ModelResult(input=label, output=str(dst) if dst is not None else None, written=dst is not None,
                         report=report, ops_before=dict(native["op_types"]["before"]),
                         ops_after=dict(native["op_types"]["after"]), size_before=len(data), size_after=len(folded),
                         model_info=info_before)
    result.integer_kernels = _kernel_check(None, folded, result.ops_after, base_directory)
    if verification is not None:
        result.verification = _verify(data, folded, verification, report, label)
    result.seconds = time.perf_counter() - start
    return result, folded


def _kernel_check(path: Path | None, data: bytes | None, ops_after: dict[str, int],
                  folder: str | os.PathLike | None = None) -> list | None:
    """The static saturation check of the folded model (qdqfold.kernels), for a model with quantizers and
    layers only (a float model is not read again). A model it cannot read is not checked (None)."""
    if not ops_after.get("DequantizeLinear") or not any(ops_after.get(op) for op in ("Conv", "MatMul", "Gemm")):
        return None
    from . import kernels

    try:
        if data is not None:  # folded in memory: the tensors it did not change are still in the input's files
            return kernels.check_bytes(data, folder)
        return kernels.check_file(path) if path is not None else None
    except Exception:  # noqa: BLE001 - the check is advice: a model onnx cannot read is reported without it
        return None


def external_locations(data: bytes) -> set[str]:
    """The external data locations a serialized model names (none when it is not a model qdqfold reads)."""
    from .graphinfo import WireFormatError, read_model_info

    try:
        return set(read_model_info(data).external_locations)
    except WireFormatError:
        return set()


def fold_spooled_result(data: bytes, label: str, base_directory: str | os.PathLike, dst: str | os.PathLike,
                        options: dict[str, Any] | None = None, *, force: bool = False,
                        make_parents: bool = True) -> ModelResult:
    """Folds a serialized model that keeps weights in external data but has no directory of its own (standard
    input) into the file ``dst``: the bytes are spooled to a private temporary file and folded file to file,
    external data read from ``base_directory`` under the usual rules and written to data files named after
    ``dst``, so that the output never names a data file qdqfold did not write. Raises :class:`ModelError`."""
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qdqfold-stdin-") as scratch:
        spool = Path(scratch) / "model.onnx"
        spool.write_bytes(data)
        native = _fold_file(spool, Path(dst), dict(options or {}), make_parents=make_parents, force=force,
                            base_directory=base_directory, label=label)
    report = FoldReport.from_native(native)
    result = ModelResult(input=label, output=str(dst), written=True, report=report,
                         ops_before=dict(native["op_types"]["before"]), ops_after=dict(native["op_types"]["after"]),
                         size_before=native["input_bytes"], size_after=_files_size(Path(dst), report.data_files))
    result.integer_kernels = _kernel_check(Path(dst), None, result.ops_after)
    result.seconds = time.perf_counter() - start
    return result


def read_for_stdout(src: Path) -> tuple[bytes, Path]:
    """The bytes of the model file ``src`` for a fold whose output goes to standard output (one message, so no
    external data in the output: tensors the fold does not change would still point at the input's files)."""
    from .graphinfo import WireFormatError, read_model_info

    _check_source(src)
    data = src.read_bytes()
    try:
        locations = read_model_info(data).external_locations
    except WireFormatError:
        locations = set()
    if locations:
        raise ModelError(f"{src}: keeps weights in external data ({', '.join(sorted(locations))}), which cannot "
                         f"be written to standard output; give -o FILE")
    return data, src.parent


def fold_file_captured(src: str, dst: str | None, options: dict[str, Any] | None = None,
                       verification: VerifySettings | None = None, make_parents: bool = True,
                       keep_traceback: bool = False, force: bool = False,
                       storage: dict[str, Any] | None = None) -> ModelResult:
    """As :func:`fold_file_result`, but a failure comes back as a result with ``error`` set, never raised.
    Unexpected exceptions are caught too, so one bad model never stops a batch."""
    import traceback

    try:
        _raise_if_interrupted(src)
        result = fold_file_result(src, dst, options, verification=verification, make_parents=make_parents,
                                  force=force, storage=storage)
        result.model_info = None  # not needed by batch callers; keeps results small to send between processes
        return result
    except ModelError as e:
        return ModelResult(input=str(src), output=dst, error=str(e),
                           traceback=traceback.format_exc() if keep_traceback else None)
    except Exception as e:  # a bug: still one line, the traceback on request
        return ModelResult(input=str(src), output=dst, error=f"{src}: internal error: {type(e).__name__}: {e}",
                           traceback=traceback.format_exc() if keep_traceback else None)


def iter_fold_many(plan: list[tuple[Path, Path | None]], executor: concurrent.futures.Executor, *,
                   options: dict[str, bool] | None = None, verification: VerifySettings | None = None,
                   keep_traceback: bool = False, force: bool = False) -> Iterator[tuple[int, ModelResult]]:
    """Submits every (input, output) of ``plan`` to ``executor`` and yields (index in plan, result) as each
    finishes. A model that fails yields a result with ``error`` set; the others go on."""
    import concurrent.futures

    futures = {
        executor.submit(fold_file_captured, str(src), str(dst) if dst is not None else None, dict(options or {}),
                        verification=verification, make_parents=True, keep_traceback=keep_traceback,
                        force=force): index
        for index, (src, dst) in enumerate(plan)
    }
    for future in concurrent.futures.as_completed(futures):
        index = futures[future]
        try:
            result = future.result()
        except Exception as e:  # the executor itself failed (e.g. a worker died)
            src, dst = plan[index]
            result = ModelResult(input=str(src), output=str(dst) if dst is not None else None,
                                 error=f"{src}: the executor failed: {type(e).__name__}: {e}")
        yield index, result


def fold_many(paths: Iterable[str | os.PathLike] | str | os.PathLike, out_dir: str | os.PathLike | None,
              executor: concurrent.futures.Executor | None = None, *, dry_run: bool = False, in_place: bool = False,
              verification: VerifySettings | None = None, force: bool = False, **options: bool) -> list[ModelResult]:
    """Folds every model among ``paths`` (files, or directories searched recursively for ``*.onnx``) into
    ``out_dir``, keeping each directory's relative layout, and returns one :class:`ModelResult` per model in
    the order of the plan. Models that fail have ``error`` set; the others are folded all the same.

    ``executor`` is any ``concurrent.futures.Executor`` (default: a thread pool with one thread per core):
    e.g. a Dask ``Client.get_executor()`` to spread a model zoo over a cluster that sees the same files.
    ``dry_run`` folds and reports without writing; ``in_place`` overwrites each model. Keyword ``options`` are
    those of :data:`qdqfold.OPTIONS`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if out_dir is None and not (dry_run or in_place):
        raise ValueError("give out_dir, or dry_run=True, or in_place=True")
    import concurrent.futures

    refused: list[tuple[Path, str]] = []  # in_place: models reached through a link out of their directory
    plan = plan_outputs(paths, None if dry_run else out_dir, in_place=in_place and not dry_run, refused=refused)
    results: list[ModelResult | None] = [None] * len(plan)
    own = executor is None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) if own else executor
    try:
        for index, result in iter_fold_many(plan, pool, options=options, verification=verification, force=force):
            results[index] = result
    finally:
        if own:
            pool.shutdown()
    return [ModelResult(input=str(src), output=None, error=why) for src, why in refused] + [
        r for r in results if r is not None]
