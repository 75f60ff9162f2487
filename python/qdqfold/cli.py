"""The ``qdqfold`` command line (also ``python -m qdqfold``): its flow and its exit statuses.

The arguments, the exit statuses and the option flags are in :mod:`qdqfold.arguments`, one model's run in
:mod:`qdqfold.single`, several models' in :mod:`qdqfold.many`, Ctrl-C in :mod:`qdqfold.interrupts`, what a
finished fold says in :mod:`qdqfold.outcomes`. Where outputs go is decided by :mod:`qdqfold.paths` (every
output-path rule), what is printed by :mod:`qdqfold.render` (tables, lines, colour, JSON), the folds themselves
by :mod:`qdqfold.batch`.
"""

from __future__ import annotations

import os
import sys

from . import files, paths
from .arguments import (DASK_TIMEOUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_KERNELS, EXIT_MISMATCH,  # noqa: F401
                        EXIT_OK, EXIT_STATUS_HELP, EXIT_USAGE, OPTION_FLAGS, InputError, UsageError, build_parser,
                        cli_words, path_rule)
from .files import _interrupted  # noqa: PLC2701 (the CLI owns the Ctrl-C of its process)
from .interrupts import handle_ctrl_c
from .single import run_single

# Only what every run needs is imported here. The results and their report (qdqfold.batch, qdqfold.report:
# dataclasses), the rendering (qdqfold.render), verification (numpy, onnx, onnxruntime), concurrent.futures
# and tqdm load when a run uses them: a quiet file -> file fold imports little more than argparse and the
# native module (tests/test_cli_imports.py keeps it so).
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    import argparse


def run(args: argparse.Namespace) -> int:
    _interrupted.clear()  # an earlier run's Ctrl-C (main() called again in one process) does not carry over
    previous = handle_ctrl_c()
    try:
        status = _run(args)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGINT, previous)
    if _interrupted.is_set() and status != EXIT_INTERRUPTED:  # a Ctrl-C some library swallowed
        print("qdqfold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


def _run(args: argparse.Namespace) -> int:
    args.inputs, args.output = paths.positional_output(args.inputs, args.output, in_place=args.in_place,
                                                       dry_run=args.dry_run,
                                                       report_only=bool(args.json or args.explain))
    if paths.is_single(args.inputs):
        return run_single(args)
    path_rule(paths.check_many_target, args.inputs, args.output)
    from .many import run_many

    return run_many(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        if args.debug:
            raise
        parser.print_usage(sys.stderr)
        print(f"qdqfold: error: {files.one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as e:
        if args.debug:
            raise
        print(f"qdqfold: error: {files.one_line(cli_words(str(e)))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("qdqfold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as e:  # a bug in qdqfold: still one line, the traceback with --debug
        if args.debug:
            raise
        print(f"qdqfold: internal error: {type(e).__name__}: {files.one_line(str(e))} (run with --debug for the "
              f"traceback)", file=sys.stderr)
        return EXIT_FAILED
