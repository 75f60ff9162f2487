"""Several models on the command line (files, directories searched for *.onnx): the plan of outputs, the
folds on threads or a Dask cluster with a progress bar, Ctrl-C and the Dask timeout, the summary."""

from __future__ import annotations

import sys
from pathlib import Path

from . import paths
from .arguments import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_KERNELS, EXIT_MISMATCH, EXIT_OK, InputError, UsageError,
                        options_of, path_rule, storage_of, style_of, verification_of)
from .files import interrupt_running
from .interrupts import POLL_SECONDS
from .outcomes import in_cli_words, kernel_warning, print_missing_weights, verification_failure, write_json

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    import argparse


def dask_client(address: str):
    """A client of the Dask scheduler at ``address``, or an InputError saying what is missing."""
    try:
        from distributed import Client
    except ImportError as e:
        raise InputError("--dask needs the distributed package: pip install 'qdqfold[dask]'") from e
    try:
        return Client(address, timeout="10s")
    except Exception as e:  # OSError, TimeoutError, ValueError for a bad address
        raise InputError(f"{address}: cannot reach the Dask scheduler: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def run_many(args: argparse.Namespace) -> int:
    import concurrent.futures
    import shutil
    import time

    from . import render
    from .batch import ModelResult, fold_file_captured, plan_outputs

    if args.explain:
        raise UsageError("--explain takes one model file")
    if args.base_dir is not None:
        raise UsageError("--base-dir is for a model from standard input ('-')")
    path_rule(paths.check_many_request, args.output, in_place=args.in_place, dry_run=args.dry_run,
              report_only=args.json, data_name=args.data_name)
    storage = storage_of(args)
    out_dir = Path(args.output) if args.output else None
    refused: list[tuple[Path, str]] = []  # --in-place: models reached through a link out of their tree
    try:
        plan = plan_outputs(args.inputs, out_dir, in_place=args.in_place, refused=refused)
    except ValueError as e:  # paths.OutputPathError: two models to one file, or to another's data file name
        raise UsageError(str(e)) from e
    if not plan and not refused:
        raise InputError(f"{', '.join(args.inputs)}: no *.onnx model found")
    if out_dir is not None:
        path_rule(paths.make_output_directory, out_dir)

    style = style_of(args)
    show_progress = not (args.quiet or args.json or args.no_progress) and sys.stderr.isatty()
    terminal = shutil.get_terminal_size((80, 24))  # a terminal that reports 0 x 0 gets 80 x 24, not no bar
    results: list[ModelResult | None] = [None] * len(plan)
    from tqdm import tqdm

    interrupted = False
    client = dask_client(args.dask) if args.dask else None
    pool = client.get_executor() if client is not None else concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    with tqdm(total=len(plan), unit="model", file=sys.stderr, disable=not show_progress, leave=False,
              ncols=min(terminal.columns, 100), nrows=terminal.lines) as bar:
        futures = {pool.submit(fold_file_captured, str(src), str(dst) if dst is not None else None, options_of(args),
                               verification=verification_of(args), make_parents=True, keep_traceback=args.debug,
                               force=args.force, storage=storage): index
                   for index, (src, dst) in enumerate(plan)}
        try:
            pending = set(futures)
            progress = time.monotonic()  # when a model last finished (or the batch began)
            while pending:
                finished, pending = concurrent.futures.wait(pending, timeout=POLL_SECONDS,
                                                            return_when=concurrent.futures.FIRST_COMPLETED)
                if finished:
                    progress = time.monotonic()
                for future in finished:
                    try:
                        result = in_cli_words(future.result())
                    except Exception as e:  # noqa: BLE001 (the executor itself failed: a Dask worker died)
                        src, dst = plan[futures[future]]
                        result = ModelResult(input=str(src), output=str(dst) if dst is not None else None,
                                             error=f"{src}: not folded: the executor failed: {type(e).__name__}: {e}")
                    results[futures[future]] = result
                    bar.update(1)
                    bar.set_postfix_str(Path(result.input).name, refresh=False)
                if client is not None and pending and time.monotonic() - progress > args.dask_timeout:
                    # Workers that keep dying (or models that never end): give up on what is left, and say so.
                    for future in pending:
                        future.cancel()
                        src, dst = plan[futures[future]]
                        results[futures[future]] = ModelResult(
                            input=str(src), output=str(dst) if dst is not None else None,
                            error=f"{src}: not folded: gave up after {args.dask_timeout:g} s on Dask with no model "
                                  f"finishing (workers dying, or a model slower than --dask-timeout)")
                    pending = set()
        except KeyboardInterrupt:
            # Ctrl-C: models not started are cancelled, running folds stop at their next chunk (no partial
            # output), verifications not started are skipped; the summary says what was not done.
            interrupted = True
            interrupt_running()
            try:
                pool.shutdown(wait=False, cancel_futures=True)
            except TypeError:  # an executor without cancel_futures (Dask's): cancel them one by one
                for future in futures:
                    future.cancel()
            # (a future cancelled here never counts as done for wait(): only the others are waited for)
            concurrent.futures.wait([f for f in futures if not f.cancelled()])
            for future, index in futures.items():
                if results[index] is not None:
                    continue
                if future.cancelled():
                    src, dst = plan[index]
                    results[index] = ModelResult(input=str(src), output=str(dst) if dst is not None else None,
                                                 error=f"{src}: not folded: interrupted")
                elif results[index] is None:
                    results[index] = in_cli_words(future.result())
        finally:
            pool.shutdown(wait=client is None)  # a Dask future given up on may never end
            if client is not None:
                client.close()
    done = [ModelResult(input=str(src), output=None, error=why) for src, why in refused]
    done += [r for r in results if r is not None]
    print_missing_weights(done)
    failed = [r for r in done if not r.ok]
    mismatched = [m for m in map(verification_failure, done) if m]

    document = render.many_document(done)
    if args.report_json:
        write_json(args.report_json, document)
    if args.json:
        print(render.json_text(document))
    elif not args.quiet:
        render.print_many(done, style)
    render.print_many_failures(done, mismatched, interrupted=interrupted, debug=args.debug)
    if interrupted:
        return EXIT_INTERRUPTED
    if failed:
        return EXIT_FAILED
    if mismatched:
        return EXIT_MISMATCH
    warnings = [w for w in map(kernel_warning, done) if w]
    if not args.quiet and not args.json:
        for warning in warnings:
            print(f"qdqfold: warning: {warning}", file=sys.stderr)
    return EXIT_KERNELS if warnings and args.strict_kernels else EXIT_OK
