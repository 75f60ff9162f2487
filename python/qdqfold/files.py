"""One model file folded into another: the checks on the input, the native call and its errors, and the
process's Ctrl-C switch.

:func:`fold_file` is the one place where a file is folded file to file; :mod:`qdqfold.batch` builds its
results around it, and the command line calls it directly for a run that shows nothing (``-q``): this module
is light on purpose (no dataclasses, no report, no onnx), so that such a run imports little more than Python
itself (tests/test_cli_imports.py keeps it so).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import qdqfold_native
from qdqfold_native import FoldError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    from qdqfold_native import FileReport


class ModelError(Exception):
    """One model could not be folded; the message is one line that names the path."""


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}

#: Keywords of qdqfold_native.fold_file that choose how the output stores its tensor data.
STORAGE_KEYWORDS = ("save_as_external_data", "size_threshold", "data_name")


def check_source(src: Path) -> None:
    """A model file must be a regular file: a FIFO or a device is refused before anything opens it (an open
    or a read would block, or read something that is not a file)."""
    try:
        mode = os.stat(src).st_mode
    except FileNotFoundError:
        raise ModelError(f"{src}: no such file") from None
    except OSError as e:
        raise ModelError(f"{src}: cannot read: {e.strerror or e}") from e
    if stat.S_ISDIR(mode):
        raise ModelError(f"{src}: is a directory, not a model file")
    if not stat.S_ISREG(mode):
        raise ModelError(f"{src}: is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a model file "
                         f"(qdqfold reads regular files only)")


def native_error(error: FoldError, src: Path) -> str:
    """One line naming the file at fault: a FileError's message starts with that file's path (the input, one of
    its data files, the output or one of its data files); any other FoldError means the model is invalid."""
    if isinstance(error, qdqfold_native.FileError):
        return str(error)
    return f"{src}: not a valid ONNX model: {error}"


def make_parent(dst: Path, make_parents: bool) -> None:
    if make_parents:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelError(f"{dst}: cannot write: cannot create the directory {dst.parent}: {e.strerror or e}") from e


def with_shapes(model: str | os.PathLike, options: dict) -> dict:
    """``options`` plus the static shapes ``pad_correction`` needs (qdqfold.api.with_inferred_shapes, which
    loads onnx: only then)."""
    if options.get("pad_correction") and "shapes" not in options:
        from .api import with_inferred_shapes

        return with_inferred_shapes(model, options)
    return options


def fold_file(src: Path, dst: Path, options: dict, make_parents: bool = False, force: bool = False,
              storage: dict | None = None) -> FileReport:
    """Folds ``src`` into ``dst`` file to file in the native core (input mapped, output written once, external
    data in files named after ``dst``, or as ``storage`` says): the one place where a file is folded. Returns
    the native report; raises :class:`ModelError`."""
    make_parent(dst, make_parents)
    try:
        native = qdqfold_native.fold_file(src, dst, force=force, **(storage or {}), **with_shapes(src, options))
    except FoldError as e:
        raise ModelError(native_error(e, src)) from e
    return native


# Ctrl-C (see interrupt_running): set once for the process; a CLI run ends after it.
_interrupted = threading.Event()


def interrupt_running() -> None:
    """Stops this process's folds: every running ``fold_file`` stops at its next chunk and removes its temporary
    files (no partial output), models not yet started are not folded, and a verification not yet started is
    skipped. For the command line's Ctrl-C."""
    _interrupted.set()
    qdqfold_native.interrupt()


def raise_if_interrupted(src: Path | str = "", written: Path | str | None = None) -> None:
    if _interrupted.is_set():
        done = f"; {written} was written but not verified" if written is not None else ""
        raise ModelError(f"{src}: interrupted{done}")
