"""One model file folded into another: the checks on the input, the native call and its errors, and the
process's Ctrl-C switch.

:func:`fold_file` is the one place where a file is folded file to file; :mod:`qdqfold.batch` builds its
results around it, and the command line calls it directly for a run that shows nothing (``-q``): this module
is light on purpose (no dataclasses, no report, no onnx), so that such a run imports little more than Python
itself (tests/test_cli_imports.py keeps it so).
"""

from __future__ import annotations

import errno
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

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class MissingWeightsWarning(UserWarning):
    """BatchNormalization nodes were kept because their weights are not there: the model keeps them in external
    data that was not read (a ModelProto loaded with ``load_external_data=False``, bytes without
    ``base_directory``). The message says what to pass instead."""


#: A label for a model read from standard input, in messages.
STDIN_LABEL = "<stdin>"

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def one_line(text: str) -> str:
    """``text`` with control characters escaped (a newline in a path prints as ``\\n``), as the native core's
    messages are."""
    if text.isprintable() or not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return text
    return "".join(_ESCAPES.get(c, f"\\x{ord(c):02x}") if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)


def missing_weights(batchnorms: list) -> list:
    """The kept entries (dicts of the native report, or BatchNormEntry) whose weights are not there."""
    def field(entry, name):
        return entry[name] if isinstance(entry, dict) else getattr(entry, name)

    return [b for b in batchnorms if not field(b, "folded") and field(b, "code") == "unreadable-weight"
            and "external data" in field(b, "message")]


def missing_weights_message(label: str, count: int, instead: str) -> str:
    return (f"{label}: {count} BatchNormalization node{'s' if count != 1 else ''} kept because the weights are not "
            f"there (external data not read); {instead}")


def warn_missing_weights(batchnorms: list, label: str, instead: str, stacklevel: int = 3) -> None:
    """A :class:`MissingWeightsWarning` when BNs were kept because their weights are not there."""
    kept = missing_weights(batchnorms)
    if kept:
        import warnings

        warnings.warn(missing_weights_message(label, len(kept), instead), MissingWeightsWarning,
                      stacklevel=stacklevel)


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_mode(fd: int, destination: str | os.PathLike) -> None:
    """The mode ``cp`` and ``install`` give: an existing regular ``destination``'s mode (and owner and group
    where permitted); else the umask's (0666 & ~umask), whatever the input's mode. (The native core does the
    same for the files it writes.)"""
    try:
        existing = os.stat(destination)
    except OSError:
        existing = None
    if existing is not None and stat.S_ISREG(existing.st_mode):
        if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, existing.st_uid, existing.st_gid)
            except OSError:
                try:
                    os.fchown(fd, -1, existing.st_gid)
                except OSError:
                    pass  # another user's file: the new one is this user's, as cp's is
        os.fchmod(fd, stat.S_IMODE(existing.st_mode))
    else:
        os.fchmod(fd, 0o666 & ~current_umask())


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
        if e.errno == errno.ENAMETOOLONG:
            raise ModelError(f"{src}: cannot read: {e.strerror}") from e
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
              storage: dict | None = None, *, base_directory: str | os.PathLike | None = None,
              label: str | None = None) -> FileReport:
    """Folds ``src`` into ``dst`` file to file in the native core (input mapped, output written once, external
    data in files named after ``dst``, or as ``storage`` says): the one place where a file is folded. Returns
    the native report; raises :class:`ModelError`. ``base_directory`` and ``label``: for a model without a
    directory of its own (standard input, spooled to ``src``), where its external data lives and its name in
    messages."""
    make_parent(dst, make_parents)
    extra: dict = {}
    if base_directory is not None:
        extra["base_directory"] = os.fspath(base_directory)
    if label is not None:
        extra["model_label"] = label
    try:
        native = qdqfold_native.fold_file(src, dst, force=force, **(storage or {}), **extra,
                                          **with_shapes(src, options))
    except FoldError as e:
        raise ModelError(native_error(e, Path(label) if label is not None else src)) from e
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
