"""One model on the command line: a file, standard input or standard output; the quiet file -> file fold
(nothing shown: the native call and its checks only), and the reported one (results, report, verification)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import files, paths
from .arguments import (EXIT_KERNELS, EXIT_MISMATCH, EXIT_OK, InputError, UsageError, options_of, path_rule,
                        storage_of, style_of, verification_of)
from .files import ModelError
from .interrupts import run_interruptibly

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    import argparse


def _fold_quietly(source: Path, output: Path, options: dict[str, bool], force: bool,
                  storage: dict[str, object]) -> None:
    """A file -> file fold whose result nobody reads (``-q``, no JSON, no verification): the checks and the
    native call of batch.fold_file_result, without the result (op counts, sizes, the report's records)."""
    files.check_source(source)
    files.fold_file(source, output, options, make_parents=True, force=force, storage=storage)


def _check_stdin_external_data(args: argparse.Namespace, locations: list[str], to_stdout: bool) -> None:
    """A model from standard input that keeps weights in external data: read from --base-dir, or refused (it has
    no directory; an output naming those files would read whatever carries their names beside it)."""
    stdin, names = files.STDIN_LABEL, ", ".join(locations)
    if args.base_dir is None:
        raise InputError(f"{stdin}: keeps weights in external data ({names}); a model from standard input has no "
                         f"directory to read them from: give --base-dir DIR (the directory that holds them), or "
                         f"fold the model file itself")
    if to_stdout:
        raise InputError(f"{stdin}: keeps weights in external data ({names}), which cannot be written to standard "
                         f"output; give -o FILE")
    if args.verify:
        raise InputError(f"{stdin}: keeps weights in external data ({names}); --verify runs models from their "
                         f"files: fold {os.path.join(args.base_dir, 'MODEL.onnx')} itself to verify")


def run_single(args: argparse.Namespace) -> int:
    source = args.inputs[0]
    if args.base_dir is not None and source != "-":
        raise UsageError("--base-dir is for a model from standard input ('-'); a model file's external data is read "
                         "from its own directory")
    report_only = bool(args.explain or args.json)
    to_stdout = path_rule(paths.check_standard_output, args.output, json=args.json, in_place=args.in_place,
                          dry_run=args.dry_run)
    where = {"in_place": args.in_place, "dry_run": args.dry_run, "report_only": report_only}
    shown = args.report_json or args.json or args.explain or not args.quiet
    if not (shown or args.verify or args.strict_kernels or source == "-" or to_stdout):
        output = path_rule(paths.single_output, source, args.output, **where)
        if output is not None:
            try:
                run_interruptibly(_fold_quietly, Path(source), output, options_of(args), args.force, storage_of(args))
            except ModelError as e:
                raise InputError(str(e)) from e
            return EXIT_OK

    from .batch import external_locations, fold_bytes_result, fold_file_result, fold_spooled_result, read_for_stdout
    from .outcomes import in_cli_words, kernel_warning, print_missing_weights, verification_failure, write_json

    folded: bytes | None = None
    try:
        if source == "-" or to_stdout:  # the model passes through memory
            path_rule(paths.check_through_memory, external_data_options=bool(
                args.external_data or args.size_threshold is not None or args.data_name))
            label = source
            if source == "-":
                data, base, label = sys.stdin.buffer.read(), args.base_dir, files.STDIN_LABEL
            else:
                data, base = read_for_stdout(Path(source))
            output = None if to_stdout else path_rule(paths.single_output, source, args.output, **where)
            locations = external_locations(data) if source == "-" else set()
            if locations:
                _check_stdin_external_data(args, sorted(locations), to_stdout)
            if locations and output is not None:  # folded file to file: its data files are its own
                result = run_interruptibly(fold_spooled_result, data, label, base, output, options_of(args),
                                           force=args.force)
            else:
                result, folded = run_interruptibly(fold_bytes_result, data, label, output, options_of(args),
                                                   verification=verification_of(args), base_directory=base)
        else:
            output = path_rule(paths.single_output, source, args.output, **where)
            result = run_interruptibly(fold_file_result, source, output, options_of(args),
                                       verification=verification_of(args), make_parents=True, force=args.force,
                                       storage=storage_of(args), model_info=bool(args.explain))
    except ModelError as e:
        raise InputError(str(e)) from e
    print_missing_weights([result])
    if shown:
        from . import render

        in_cli_words(result)
        if to_stdout:
            result.output, result.written = "-", True
        report_stream = sys.stderr if to_stdout else sys.stdout
        if args.report_json or args.json:
            document = render.single_document(result)
            if args.report_json:
                write_json(args.report_json, document)
            if args.json:
                print(render.json_text(document))
        if args.explain:
            try:
                story = result.report.explain(args.explain, result.model_info)
            except KeyError as e:
                raise UsageError(e.args[0]) from e
            story += render.explain_kernels(result, args.explain)
            if not args.json:
                render.print_explain(story, report_stream)
        elif not args.quiet and not args.json:
            render.print_single(result, style_of(args), report_stream)
    if to_stdout and folded is not None:
        sys.stdout.buffer.write(folded)
        sys.stdout.buffer.flush()
    failure = verification_failure(result)
    if failure:
        print(f"qdqfold: {failure}", file=sys.stderr)
        return EXIT_MISMATCH
    warning = kernel_warning(result)
    if warning and not args.quiet:
        print(f"qdqfold: warning: {warning}", file=sys.stderr)
    if warning and args.strict_kernels:
        return EXIT_KERNELS
    return EXIT_OK
