"""What a finished fold says on the command line: its messages in the command line's words, the warnings
(weights not there, integer kernels that can saturate), a failed verification, the JSON report file.
Imported once a fold has results (qdqfold.batch is loaded by then)."""

from __future__ import annotations

import sys

from . import files
from .arguments import InputError, cli_words

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    from typing import Any

    from .batch import ModelResult


def in_cli_words(result: ModelResult) -> ModelResult:
    """The result with its messages worded for the command line (see cli_words)."""
    import dataclasses

    if result.report is not None:
        result.report.batchnorms = [dataclasses.replace(b, message=cli_words(b.message), attempts=[
            {**a, "message": cli_words(a["message"])} for a in b.attempts]) for b in result.report.batchnorms]
    if result.error is not None:
        result.error = cli_words(result.error)
    return result


def write_json(path: str, data: Any) -> None:
    from .api import write_atomically
    from .render import json_text

    try:
        write_atomically(path, (json_text(data) + "\n").encode())
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from e


def verification_failure(result: ModelResult) -> str | None:
    v = result.verification
    if v is None or v.passed:
        return None
    return f"{result.input}: verification failed: {v.failure_message()}"


def kernel_warning(result: ModelResult) -> str | None:
    """One line when onnxruntime's integer kernels can move this model on some CPU (static check) or did on
    this one (--verify); None otherwise."""
    v = result.verification
    if v is not None and v.kernel_warning:
        return f"{result.input}: {v.kernel_message()}"
    flagged = [lay.node for lay in result.integer_kernels or [] if lay.can_saturate]
    if flagged:
        return (f"{result.input}: {len(flagged)} integer layer(s) can saturate on x86-64 CPUs without VNNI: "
                f"{', '.join(flagged[:6])}{' ...' if len(flagged) > 6 else ''} (session.x64quantprecision=1 "
                f"avoids it)")
    return None


def print_missing_weights(results: list[ModelResult]) -> None:
    """A warning on standard error for each model whose BNs were kept because their weights are not there."""
    for result in results:
        if result.report is not None:
            kept = files.missing_weights(result.report.batchnorms)
            if kept:
                message = files.missing_weights_message(
                    result.input, len(kept), "give --base-dir DIR (the directory holding the data files) with '-', "
                    "or fold the model file where its data files are")
                print(f"qdqfold: warning: {files.one_line(message)}", file=sys.stderr)
