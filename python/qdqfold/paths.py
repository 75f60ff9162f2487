"""Where folded models go: every output-path rule of the command line and of :func:`qdqfold.fold_many`.

One place for the rules, each raised once, in the order the command line applies them:

- a second positional argument is the output when it is the only other thing said (``qdqfold in.onnx
  out.onnx``, the onnxsim / onnxslim habit);
- ``-`` reads a model from standard input, ``-o -`` writes it to standard output (one model only, passing
  through memory: no external data file beside it);
- ``-o DIR/`` (a trailing slash, or an existing directory) is a directory: a model goes to ``DIR/<its name>``;
- ``--in-place`` replaces each input; an output that is its own input needs it;
- a dry run (``--dry-run``, or ``--json`` / ``--explain`` without an output) writes nothing and takes no output;
- with several models, a directory contributes every ``*.onnx`` below it and keeps its layout; no two models
  may be written to one file, nor to the name another output gives its external data (``OUT.data``,
  ``OUT.N.data``), and each output's data file is named after it (``--data-name`` names one model's).

Light on purpose (no dataclasses, no onnx): the command line imports it for every run.
"""

from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    from typing import Iterable

MODEL_SUFFIX = ".onnx"


class OutputPathError(ValueError):
    """An output-path rule refuses the request. ``bad_input``: an input is at fault (the command line's exit
    status 1); otherwise the arguments are (exit status 2)."""

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


def _is_dir(path: str | Path) -> bool:
    """Path.is_dir(), False for a path the system cannot even look at (a name over NAME_MAX, a path over
    PATH_MAX, no permission): the fold then says why, in one line naming it."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def _is_file(path: str | Path) -> bool:
    try:
        return Path(path).is_file()
    except OSError:
        return False


def _exists(path: str | Path) -> bool:
    try:
        return Path(path).exists()
    except OSError:
        return False


def same_file(a: str | Path, b: str | Path) -> bool:
    """``a`` and ``b`` are one file (by their absolute paths when either cannot be looked at)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def names_directory(output: str) -> bool:
    """``-o`` names a directory: it ends with a slash (created if missing) or is an existing directory."""
    return output.endswith(("/", os.sep)) or _is_dir(output)


def positional_output(inputs: list[str], output: str | None, *, in_place: bool, dry_run: bool,
                      report_only: bool) -> tuple[list[str], str | None]:
    """The onnxsim/onnxslim habit ``qdqfold in.onnx out.onnx``: with exactly two inputs and nothing else saying
    where to write (``report_only``: ``--json`` or ``--explain``), the second is the output. Returns the
    inputs and the output."""
    if len(inputs) != 2 or output or in_place or dry_run or report_only:
        return inputs, output
    first, second = inputs
    if first != "-" and _is_dir(first):
        return inputs, output  # a directory and something: two inputs (a usage error later says what is missing)
    return [first], second


def is_single(inputs: list[str]) -> bool:
    """One model: a single input that is standard input or not a directory."""
    return len(inputs) == 1 and (inputs[0] == "-" or not _is_dir(inputs[0]))


def _check_dry_run(output: str | None, in_place: bool, dry_run: bool) -> None:
    """The dry-run rule, for one model and for many."""
    if dry_run and (output or in_place):
        raise OutputPathError("--dry-run writes nothing; drop -o / --in-place")


def check_standard_output(output: str | None, *, json: bool, in_place: bool, dry_run: bool) -> bool:
    """True when ``-o -`` sends the model to standard output, which nothing else may claim."""
    if output != "-":
        return False
    if json or in_place or dry_run:
        raise OutputPathError("-o - writes the model to standard output; it cannot go with --json, --in-place or "
                              "--dry-run")
    return True


def check_through_memory(*, external_data_options: bool) -> None:
    """A model read from standard input or written to standard output passes through memory as one message:
    no external data file is written beside it."""
    if external_data_options:
        raise OutputPathError("external data options need a model file output (-o FILE)")


def single_output(source: str, output: str | None, *, in_place: bool, dry_run: bool,
                  report_only: bool) -> Path | None:
    """Where one model (``source``, ``-`` for standard input) is written: None for a dry run (``report_only``:
    ``--json`` or ``--explain`` without an output is one). ``-o -`` is not handled here."""
    path = Path(source)
    if source == "-" and in_place:
        raise OutputPathError("--in-place: standard input has no file to replace; give -o OUT or -o -")
    if source == "-" and output and names_directory(output):
        raise OutputPathError(f"{output}: a model from standard input has no name to take in a directory; "
                              f"name the output file")
    _check_dry_run(output, in_place, dry_run)
    if dry_run:
        return None
    if in_place:
        if output and not same_file(output, path):
            raise OutputPathError("--in-place and -o name different files; give one of them")
        return path
    if output:
        target = Path(output) / path.name if names_directory(output) else Path(output)
        if _exists(target) and _exists(path) and same_file(target, path):
            raise OutputPathError(f"{target} is the input; pass --in-place to overwrite it")
        return target
    if report_only:
        return None  # asking for a story or for JSON alone is a dry run
    raise OutputPathError("give -o OUTPUT, --in-place, or --dry-run")


def check_many_target(inputs: list[str], output: str | None) -> None:
    """Several models (or a directory): ``-`` and ``-o -`` carry one model, and ``-o`` names a directory."""
    if "-" in inputs:
        raise OutputPathError("'-' (standard input) folds one model; give it alone")
    if output == "-":
        raise OutputPathError("-o - writes one model to standard output; give one input")
    if output and (_is_file(output) or output.endswith(MODEL_SUFFIX)):
        directory = next((p for p in inputs if _is_dir(p)), None)
        if directory is not None:  # one model file expected, a directory given
            raise OutputPathError(f"{directory}: is a directory, not a model file (to fold every model in it, "
                                  f"give -o a directory)", bad_input=True)
        raise OutputPathError(f"{output}: with several models, -o names a directory")


def check_many_request(output: str | None, *, in_place: bool, dry_run: bool, report_only: bool,
                       data_name: str | None = None) -> None:
    """Several models: one of a directory, ``--in-place`` or a dry run (``--json`` alone is one); each output's
    external data is named after it (no ``--data-name``)."""
    _check_dry_run(output, in_place, dry_run)
    if not (output or in_place or dry_run or report_only):
        raise OutputPathError("with several models give -o DIR, --in-place, or --dry-run")
    if in_place and output:
        raise OutputPathError("--in-place and -o: give one of them")
    if data_name:
        raise OutputPathError("--data-name names one data file; with several models each output's data is named "
                              "after it")


def make_output_directory(out_dir: Path) -> None:
    """Creates the output directory of several models (and its parents) and checks it can be written into."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{out_dir}: cannot create the output directory: {e.strerror or e}",
                              bad_input=True) from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputPathError(f"{out_dir}: cannot write into the output directory", bad_input=True)


def _is_within(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def link_out_of_tree(model: Path, tree: Path) -> str | None:
    """Why ``--in-place`` over the directory ``tree`` does not replace ``model`` (found in it): a link (of the
    model, or of a directory on its way) that leads outside ``tree``; None when it stays inside. An in-place
    fold of a tree never writes outside the tree it was given."""
    try:
        real, root = model.resolve(), tree.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return f"{model}: is a symbolic link that cannot be followed; not replaced"
    if real == root or root in real.parents:
        return None
    return (f"{model}: is a link to {real}, outside {tree}; --in-place over a directory replaces only files "
            f"inside it (fold {real} itself, or give -o DIR)")


def plan_outputs(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike | None, *,
                 in_place: bool = False, refused: list[tuple[Path, str]] | None = None) -> list[tuple[Path, Path | None]]:
    """(input, output) for every model: a directory contributes every ``*.onnx`` below it (recursively; a
    model ``D/a/b.onnx`` goes to ``OUT/a/b.onnx``), a file ``F`` goes to ``OUT/<name of F>``. With
    ``in_place`` each model is its own output; with neither ``out_dir`` nor ``in_place``, outputs are None
    (a dry run). A path that does not exist is kept, so that its job reports it. Raises
    :class:`OutputPathError` (a ``ValueError``) when two inputs would be written to the same output, or an
    output to a name another output gives its external data.

    With ``in_place``, a model found in a directory through a link that leads outside that directory is not
    planned (see :func:`link_out_of_tree`): it goes to ``refused`` as (path, one-line reason), or, when no
    ``refused`` list is given, is an :class:`OutputPathError` (bad input)."""
    out = Path(out_dir) if out_dir is not None else None
    plan: list[tuple[Path, Path | None]] = []
    for path in map(Path, paths):
        if _is_dir(path):
            # An output directory inside the input directory holds earlier outputs, not inputs.
            skip = out if out is not None and _is_within(out, path) and out.resolve() != path.resolve() else None
            found = sorted(p for p in path.rglob(f"*{MODEL_SUFFIX}")
                           if p.is_file() and not p.name.startswith(".")
                           and not (skip is not None and _is_within(p, skip)))
            pairs = [(p, p.relative_to(path)) for p in found]
            if in_place:
                outside = [(p, why) for p in found if (why := link_out_of_tree(p, path)) is not None]
                if outside and refused is None:
                    raise OutputPathError(outside[0][1], bad_input=True)
                if outside:
                    refused.extend(outside)
                    left_out = {p for p, _ in outside}
                    pairs = [pair for pair in pairs if pair[0] not in left_out]
        else:
            pairs = [(path, Path(path.name))]
        for src, relative in pairs:
            dst = src if in_place else (out / relative if out is not None else None)
            plan.append((src, dst))
    seen: dict[Path, Path] = {}
    for src, dst in plan:
        if dst is None:
            continue
        key = dst.resolve()
        if key in seen and seen[key] != src:
            raise OutputPathError(f"{seen[key]} and {src} would both be written to {dst}")
        seen[key] = src
        if not in_place and _exists(src) and src.resolve() == key:
            raise OutputPathError(f"{dst} is its own input; pass --in-place to overwrite it")
    # Each output's external data goes to files named after it (<out>.data, <out>.2.data, ...): no output may
    # carry such a name of another.
    for key, src in seen.items():
        for owner in data_name_owners(key):
            if owner in seen and seen[owner] != src:
                raise OutputPathError(f"{src} would be written to {key}, a name that {seen[owner]}'s output "
                                      f"{owner.name} gives its external data")
    return plan


def data_name_owners(path: Path) -> list[Path]:
    """The outputs whose external data qdqfold would write at ``path`` (``<out>.data``, ``<out>.N.data``)."""
    name = path.name
    if not name.endswith(".data") or len(name) <= len(".data"):
        return []
    stem = name[:-len(".data")]
    owners = [path.with_name(stem)]
    head, dot, number = stem.rpartition(".")
    if dot and head and number.isdigit():
        owners.append(path.with_name(head))
    return owners
