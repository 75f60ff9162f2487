"""The ``qdqfold`` command line (also ``python -m qdqfold``): its arguments, its flow and its exit statuses.

Where outputs go is decided by :mod:`qdqfold.paths` (every output-path rule), what is printed by
:mod:`qdqfold.render` (tables, lines, colour, JSON), the folds themselves by :mod:`qdqfold.batch`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import qdqfold_native

from . import files, paths
from ._defaults import DEFAULT_TOLERANCE, OPTIONS
from .files import _interrupted  # noqa: PLC2701 (the CLI owns the Ctrl-C of its process)
from .files import ModelError, interrupt_running

# Only what every run needs is imported here. The results and their report (qdqfold.batch, qdqfold.report:
# dataclasses), the rendering (qdqfold.render), verification (numpy, onnx, onnxruntime), concurrent.futures
# and tqdm load when a run uses them: a quiet file -> file fold imports little more than argparse and the
# native module (tests/test_cli_imports.py keeps it so).
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    from typing import Any

    from .batch import ModelResult, VerifySettings
    from .render import Style

EXIT_OK = 0
EXIT_FAILED = 1  # bad input, a path that cannot be read or written; in batch mode: any model failed
EXIT_USAGE = 2  # bad arguments (argparse's own code too)
EXIT_MISMATCH = 3  # --verify: the verdict is "differs"
EXIT_KERNELS = 4  # --strict-kernels: onnxruntime's integer kernels can saturate (or, with --verify, did)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EXIT_STATUS_HELP = """exit status:
  0  success
  1  bad input (missing file, directory where a file was expected, not a valid ONNX model, missing
     external data) or a path that cannot be read or written; with several models: any model failed
  2  bad arguments (including an unknown --explain node, or an output that would overwrite its input
     without --in-place)
  3  --verify: the verdict is "differs" (a fold over its rounding bound, or an output beyond the rounding floor)
  4  --strict-kernels: the fold is exact, but a layer onnxruntime runs as an integer kernel can saturate on
     x86-64 CPUs without VNNI (static check), or with --verify moved the outputs on this CPU
  130  interrupted (Ctrl-C): nothing partial is left; with several models, the failures list what was not done"""

# Flags for the fold options of qdqfold_native.options(): a flag turns the default around. An option the
# native module has and this table lacks still gets a flag (see _option_flag); tests/test_cli.py fails on it.
OPTION_FLAGS = {
    "fold_backward": ("--no-backward", "do not fold BN into the layer that produces its input"),
    "fold_forward": ("--no-forward", "do not fold BN into the layer(s) that read its output"),
    "freeze_initializer_inputs": ("--freeze-initializer-inputs",
                                  "read initializers listed as graph inputs as constants; folded ones leave the inputs"),
    "fold_affine": ("--no-affine", "do not fold Mul/Add/Sub/Div by a per-channel constant (FrozenBatchNorm2d)"),
    "pad_correction": ("--pad-correction",
                       "fold BN into a padded conv after it, adding the exact border correction as one Add"),
    "allow_opset_upgrade": ("--allow-opset-upgrade",
                            "raise the opset to 13 where a per-tensor scale must become per-channel"),
    "allow_nonzero_zero_point": ("--allow-nonzero-zero-point",
                                 "negative BN factor on an int8 channel holding -128: use the exact complement "
                                 "form, which gives a nonzero zero point"),
    "materialize_quantized_weights": ("--materialize-quantized-weights",
                                      "write folded QAT weights as integers behind DequantizeLinear (dq-only form)"),
    "drop_activation_quantizers": ("--drop-activation-quantizers",
                                   "APPROXIMATE: drop a Q/DQ pair between a layer and its BN to fold it"),
    "merge_branches": ("--merge-branches", "merge parallel conv/BN/identity branches summed over one input into one "
                       "conv (RepVGG, MobileOne, ACNet, RepMixer), exactly"),
    "requantize_merged": ("--requantize-merged", "APPROXIMATE: with --merge-branches, merge branches with quantized "
                          "weights too, re-quantizing the merged kernel per output channel"),
    "requantize_residuals": ("--requantize-residuals", "APPROXIMATE: with --target, quantize the float inputs of "
                             "residual Adds / Concats so they and the convs feeding them become integer kernels"),
    "store_float_weights": ("--store-float-weights", "with --target, a layer left in float reads its weight as the "
                            "float constant its DequantizeLinear computes (exact; no DQ per inference)"),
}


def _in_cli_words(result: ModelResult) -> ModelResult:
    """The result with its messages worded for the command line (see cli_words)."""
    import dataclasses

    if result.report is not None:
        result.report.batchnorms = [dataclasses.replace(b, message=cli_words(b.message), attempts=[
            {**a, "message": cli_words(a["message"])} for a in b.attempts]) for b in result.report.batchnorms]
    if result.error is not None:
        result.error = cli_words(result.error)
    return result


def cli_words(text: str) -> str:
    """``text`` (a message of the core or the Python layer) with each Python keyword (``pad_correction=True``)
    replaced by the command line's flag (``--pad-correction``), so messages in the CLI name what to type."""
    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2) == "True"
        if name == "force":
            return "--force" if value else match.group(0)
        if name in OPTIONS and value != OPTIONS[name]:
            return _option_flag(name)[0]
        return match.group(0)

    text = re.sub(r"\b([a-z_]+)=(True|False)\b", flag, text)
    # An option named bare ("drop_activation_quantizers would drop ...") whose flag turns it on.
    for name, default in OPTIONS.items():
        if not default and name in text:
            text = re.sub(rf"(?<![-\w]){name}\b", _option_flag(name)[0], text)
    return text


def _option_flag(name: str) -> tuple[str, str]:
    if name in OPTION_FLAGS:
        return OPTION_FLAGS[name]
    dashed = name.replace("_", "-")
    return (f"--no-{dashed}" if OPTIONS[name] else f"--{dashed}"), f"turn the native option {name} " + (
        "off" if OPTIONS[name] else "on")


def _dim(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N >= 1, got {text!r}")
    return name, int(value)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of bytes, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


#: --dask-timeout's default: a batch on Dask gives up when no model finished for this long.
DASK_TIMEOUT = 900.0


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns, read as shutil reads it (COLUMNS, else standard output's terminal,
    else 80) without importing shutil, which loads the compression modules (a few milliseconds of every run)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # AttributeError: no sys.__stdout__ (None), as shutil has it
            columns = 80
    return columns


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter at the width argparse would choose. argparse makes one for every add_argument (to
    check it) and asks shutil for the width, so building the parser imported shutil; this asks os."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else _terminal_columns() - 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdqfold",
        formatter_class=_HelpFormatter,
        description="Fold BatchNormalization into neighbouring layers of an ONNX model, quantized (QDQ)\n"
                    "weights included, exactly. Prints what was folded and what was kept, and why.\n\n"
                    "  qdqfold model.onnx -o folded.onnx --verify\n"
                    "  qdqfold models/ more.onnx -o folded/ --jobs 4     (directories recurse; layout kept)",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version",
                        version=f"qdqfold {qdqfold_native.__version__} (qdqfold_native at {qdqfold_native.__file__})")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="ONNX model file(s), or directories searched recursively for *.onnx; '-' reads a "
                             "model from standard input. With exactly two and no -o/--in-place/--dry-run, the "
                             "second is the output (qdqfold in.onnx out.onnx, as onnxsim and onnxslim take it)")
    parser.add_argument("--base-dir", metavar="DIR",
                        help="with '-' (standard input): the directory that holds the model's external data files "
                             "(a model from standard input has no directory of its own; without --base-dir one "
                             "that keeps weights in external data is refused)")
    where = parser.add_argument_group("where to write")
    where.add_argument("-o", "--output", metavar="OUT",
                       help="the folded model (one input; '-' writes it to standard output and the report to "
                            "standard error), or the directory to write into (several inputs, a directory, or OUT "
                            "ending in /; missing directories are created); external data goes to OUT.data beside it")
    where.add_argument("--in-place", action="store_true",
                       help="replace each input (and its external data files) with its folded model")
    where.add_argument("--force", action="store_true",
                       help="let the output's external data file (OUT.data) replace an existing file that is not "
                            "from an earlier run of the same output")
    where.add_argument("-n", "--dry-run", action="store_true", help="fold and report, write no model")
    store = parser.add_argument_group("how the output stores its weights (default: as the input did)")
    layout = store.add_mutually_exclusive_group()
    layout.add_argument("--save-as-external-data", dest="external_data", action="store_const", const=True,
                        default=None, help="every initializer of at least --size-threshold bytes in one data file "
                                           "beside the output (OUT.data, or --data-name)")
    layout.add_argument("--no-external-data", dest="external_data", action="store_const", const=False,
                        help="every tensor inline in the model file (an error past protobuf's 2 GB limit)")
    store.add_argument("--size-threshold", type=_non_negative_int, metavar="BYTES",
                       help="with external data: tensors of at least BYTES go to the data file (default 1024)")
    store.add_argument("--data-name", metavar="NAME",
                       help="with external data: the data file's name, beside the output (default OUT.data)")
    show = parser.add_argument_group("what to print")
    show.add_argument("--report-json", metavar="PATH", help="write the full report as JSON to PATH")
    show.add_argument("--json", action="store_true", help="print the full report as JSON on stdout, nothing else")
    show.add_argument("--explain", metavar="NODE", help="print the story of one BatchNormalization node")
    show.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                      help="colour the output: auto (default) colours a terminal unless NO_COLOR is set")
    show.add_argument("--no-progress", action="store_true", help="no progress bar with several models")
    show.add_argument("--debug", action="store_true", help="show a traceback on errors")
    check = parser.add_argument_group("verification (onnxruntime, optimisations off and at its default level)")
    check.add_argument("--verify", action="store_true",
                       help="check each fold on the original's activations against a float-rounding bound, and "
                            "every output against a rounding twin of the original (BN and weight scales one ulp "
                            "off, not folded), on the same inputs; verdict exact / approximate / differs (exit "
                            "status 3); count onnxruntime's quantized node units before and after")
    check.add_argument("--strict-kernels", action="store_true",
                       help="exit status 4 when a layer onnxruntime will run as an integer kernel can saturate its "
                            "16-bit pair sums on x86-64 CPUs without VNNI (or, with --verify, moved the outputs on "
                            "this CPU); without it that is a warning")
    check.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="T",
                       help="difference always allowed, as a share of each output's range, where the rounding "
                            "floor is smaller (float models; default %(default)g)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    check.add_argument("--dim", type=_dim, action="append", default=[], metavar="NAME=N",
                       help="size of the symbolic dimension NAME in the random inputs (repeatable)")
    check.add_argument("--symbolic-size", type=_positive_int, default=None, metavar="N",
                       help="size of every other symbolic dimension (default: 1 for the leading (batch) one, "
                            "32 for the others)")
    check.add_argument("--inputs", dest="input_files", action="append", default=[], metavar="FILE",
                       help="verify on these inputs instead of random ones: .npz keyed by input name, or .npy for a "
                            "single input; one input set per file (repeat the option for several)")
    check.add_argument("--ort-level", choices=("both", "off", "default", "basic", "extended"), default="both",
                       help="onnxruntime graph optimisations to verify at: off, its default level (ORT_ENABLE_ALL), "
                            "basic, extended, or both off and default (the default)")
    many = parser.add_argument_group("several models")
    many.add_argument("-j", "--jobs", type=_positive_int, default=1, metavar="N",
                      help="fold N models at a time (threads; default 1)")
    many.add_argument("--dask", metavar="ADDRESS",
                      help="fold on the workers of a running Dask scheduler (e.g. tcp://host:8786) instead of "
                           "threads; the workers must see the inputs and the output directory at the same paths "
                           "(needs: pip install 'qdqfold[dask]')")
    many.add_argument("--dask-timeout", type=_positive_float, default=DASK_TIMEOUT, metavar="SECONDS",
                      help="with --dask: give up on the models left when none has finished for SECONDS (workers "
                           "that keep dying, a model that never ends); they are listed as failed (default "
                           "%(default)g)")
    group = parser.add_argument_group("fold options")
    group.add_argument("--target", choices=("onnxruntime",), default=None,
                       help="after folding, rewrite the model into the shape this runtime turns into integer "
                            "kernels, exactly (onnxruntime: output quantizers after layers whose output reaches "
                            "activation quantizers through Relu / Clip / MaxPool / reshapes)")
    for name in OPTIONS:
        flag, help_text = _option_flag(name)
        group.add_argument(flag, dest=name, action="store_const", const=not OPTIONS[name], default=OPTIONS[name],
                           help=help_text)
    return parser


class UsageError(Exception):
    pass


class InputError(Exception):
    pass



# ---------------------------------------------------------------------------------------------- running

def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {name: getattr(args, name) for name in OPTIONS}
    if getattr(args, "target", None):
        options["target"] = args.target
    return options


def _storage(args: argparse.Namespace) -> dict[str, object]:
    """fold_file's storage keywords from --save-as-external-data / --no-external-data / --size-threshold /
    --data-name (the last two imply external data)."""
    if args.external_data is False and (args.size_threshold is not None or args.data_name):
        raise UsageError("--size-threshold and --data-name describe external data; not with --no-external-data")
    storage: dict[str, object] = {}
    if args.external_data is not None:
        storage["save_as_external_data"] = args.external_data
    if args.size_threshold is not None:
        storage["size_threshold"] = args.size_threshold
    if args.data_name:
        storage["data_name"] = args.data_name
    return storage


def _verification(args: argparse.Namespace) -> VerifySettings | None:
    if not args.verify:
        return None
    from .batch import VerifySettings

    levels = ("off", "default") if args.ort_level == "both" else (args.ort_level,)
    return VerifySettings(tolerance=args.tolerance, seed=args.seed, symbolic_size=args.symbolic_size,
                          dims=dict(args.dim), inputs=list(args.input_files), levels=levels)


def _style(args: argparse.Namespace) -> Style:
    """Colour for the stream the report goes to (standard error when the model goes to standard output)."""
    from .render import Style, colour_wanted

    return Style(colour_wanted(args.color, sys.stderr if args.output == "-" else sys.stdout))


def _run_interruptibly(function, *arguments, **keywords):
    """Runs ``function`` on a worker thread so that Ctrl-C reaches this one at once: it then stops the fold
    (files.interrupt_running: no partial output, temporary files removed), waits for the worker to give up,
    and raises KeyboardInterrupt. (A plain thread: concurrent.futures costs a run some milliseconds to import.)

    The wait is on an Event, not Thread.join: on Python 3.11 a Ctrl-C that interrupts join() marks the still
    running thread as stopped, so the process would exit under a fold still writing (and abort)."""
    import threading

    outcome: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = function(*arguments, **keywords)
        except BaseException as e:  # handed to the caller, as a future's result() would
            outcome["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=work, name="qdqfold-fold")
    worker.start()
    try:
        _wait_for(done)
    except KeyboardInterrupt:
        interrupt_running()
        _wait_for(done, stoppable=False)
        raise
    finally:
        if done.is_set():
            worker.join()
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["value"]


#: How often a wait of the main thread wakes up: a SIGINT the system delivered to another thread of the process
#: is handled by Python only when the main thread runs, which a wait on a lock alone would postpone.
_POLL_SECONDS = 0.1


def _wait_for(event, stoppable: bool = True) -> None:
    """Waits for ``event``, waking every _POLL_SECONDS so that Ctrl-C is seen at once. Not ``stoppable``: a
    Ctrl-C meanwhile (a second one, after the folds were told to stop) does not end the wait."""
    while True:
        try:
            if event.wait(_POLL_SECONDS):
                return
        except KeyboardInterrupt:
            if stoppable:
                raise


def _on_ctrl_c(signum, frame) -> None:  # noqa: ARG001 (a signal handler's signature)
    """SIGINT while the command line runs: the folds are told to stop at once (no partial output), whatever
    the main thread is doing, and the main thread gets KeyboardInterrupt (once: a second Ctrl-C while the
    folds give up is not another exception). The exit status is 130 even if a library swallows the exception."""
    first = not _interrupted.is_set()
    interrupt_running()
    if first:
        raise KeyboardInterrupt


def _handle_ctrl_c():
    """Installs _on_ctrl_c; returns the handler to restore, or None when this is not the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _on_ctrl_c)


def _write_json(path: str, data: Any) -> None:
    from .api import write_atomically
    from .render import json_text

    try:
        write_atomically(path, (json_text(data) + "\n").encode())
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from e


def _verification_failure(result: ModelResult) -> str | None:
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


def _path_rule(function, *arguments, **keywords):
    """``function`` of qdqfold.paths, its refusal turned into the command line's usage or input error."""
    try:
        return function(*arguments, **keywords)
    except paths.OutputPathError as e:
        raise (InputError if e.bad_input else UsageError)(str(e)) from e


def _fold_quietly(source: Path, output: Path, options: dict[str, bool], force: bool,
                  storage: dict[str, object]) -> None:
    """A file -> file fold whose result nobody reads (``-q``, no JSON, no verification): the checks and the
    native call of batch.fold_file_result, without the result (op counts, sizes, the report's records)."""
    files.check_source(source)
    files.fold_file(source, output, options, make_parents=True, force=force, storage=storage)


def _warn_missing_weights(results: list[ModelResult]) -> None:
    """A warning on standard error for each model whose BNs were kept because their weights are not there."""
    for result in results:
        if result.report is not None:
            kept = files.missing_weights(result.report.batchnorms)
            if kept:
                message = files.missing_weights_message(
                    result.input, len(kept), "give --base-dir DIR (the directory holding the data files) with '-', "
                    "or fold the model file where its data files are")
                print(f"qdqfold: warning: {files.one_line(message)}", file=sys.stderr)


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
    to_stdout = _path_rule(paths.check_standard_output, args.output, json=args.json, in_place=args.in_place,
                           dry_run=args.dry_run)
    where = {"in_place": args.in_place, "dry_run": args.dry_run, "report_only": report_only}
    shown = args.report_json or args.json or args.explain or not args.quiet
    if not (shown or args.verify or args.strict_kernels or source == "-" or to_stdout):
        output = _path_rule(paths.single_output, source, args.output, **where)
        if output is not None:
            try:
                _run_interruptibly(_fold_quietly, Path(source), output, _options(args), args.force, _storage(args))
            except ModelError as e:
                raise InputError(str(e)) from e
            return EXIT_OK

    from .batch import external_locations, fold_bytes_result, fold_file_result, fold_spooled_result, read_for_stdout

    folded: bytes | None = None
    try:
        if source == "-" or to_stdout:  # the model passes through memory
            _path_rule(paths.check_through_memory, external_data_options=bool(
                args.external_data or args.size_threshold is not None or args.data_name))
            label = source
            if source == "-":
                data, base, label = sys.stdin.buffer.read(), args.base_dir, files.STDIN_LABEL
            else:
                data, base = read_for_stdout(Path(source))
            output = None if to_stdout else _path_rule(paths.single_output, source, args.output, **where)
            locations = external_locations(data) if source == "-" else set()
            if locations:
                _check_stdin_external_data(args, sorted(locations), to_stdout)
            if locations and output is not None:  # folded file to file: its data files are its own
                result = _run_interruptibly(fold_spooled_result, data, label, base, output, _options(args),
                                            force=args.force)
            else:
                result, folded = _run_interruptibly(fold_bytes_result, data, label, output, _options(args),
                                                    verification=_verification(args), base_directory=base)
        else:
            output = _path_rule(paths.single_output, source, args.output, **where)
            result = _run_interruptibly(fold_file_result, source, output, _options(args),
                                        verification=_verification(args), make_parents=True, force=args.force,
                                        storage=_storage(args), model_info=bool(args.explain))
    except ModelError as e:
        raise InputError(str(e)) from e
    _warn_missing_weights([result])
    if shown:
        from . import render

        _in_cli_words(result)
        if to_stdout:
            result.output, result.written = "-", True
        report_stream = sys.stderr if to_stdout else sys.stdout
        if args.report_json or args.json:
            document = render.single_document(result)
            if args.report_json:
                _write_json(args.report_json, document)
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
            render.print_single(result, _style(args), report_stream)
    if to_stdout and folded is not None:
        sys.stdout.buffer.write(folded)
        sys.stdout.buffer.flush()
    failure = _verification_failure(result)
    if failure:
        print(f"qdqfold: {failure}", file=sys.stderr)
        return EXIT_MISMATCH
    warning = kernel_warning(result)
    if warning and not args.quiet:
        print(f"qdqfold: warning: {warning}", file=sys.stderr)
    if warning and args.strict_kernels:
        return EXIT_KERNELS
    return EXIT_OK


def _dask_client(address: str):
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
    _path_rule(paths.check_many_request, args.output, in_place=args.in_place, dry_run=args.dry_run,
               report_only=args.json, data_name=args.data_name)
    storage = _storage(args)
    out_dir = Path(args.output) if args.output else None
    refused: list[tuple[Path, str]] = []  # --in-place: models reached through a link out of their tree
    try:
        plan = plan_outputs(args.inputs, out_dir, in_place=args.in_place, refused=refused)
    except ValueError as e:  # paths.OutputPathError: two models to one file, or to another's data file name
        raise UsageError(str(e)) from e
    if not plan and not refused:
        raise InputError(f"{', '.join(args.inputs)}: no *.onnx model found")
    if out_dir is not None:
        _path_rule(paths.make_output_directory, out_dir)

    style = _style(args)
    show_progress = not (args.quiet or args.json or args.no_progress) and sys.stderr.isatty()
    terminal = shutil.get_terminal_size((80, 24))  # a terminal that reports 0 x 0 gets 80 x 24, not no bar
    results: list[ModelResult | None] = [None] * len(plan)
    from tqdm import tqdm

    interrupted = False
    client = _dask_client(args.dask) if args.dask else None
    pool = client.get_executor() if client is not None else concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    with tqdm(total=len(plan), unit="model", file=sys.stderr, disable=not show_progress, leave=False,
              ncols=min(terminal.columns, 100), nrows=terminal.lines) as bar:
        futures = {pool.submit(fold_file_captured, str(src), str(dst) if dst is not None else None, _options(args),
                               verification=_verification(args), make_parents=True, keep_traceback=args.debug,
                               force=args.force, storage=storage): index
                   for index, (src, dst) in enumerate(plan)}
        try:
            pending = set(futures)
            progress = time.monotonic()  # when a model last finished (or the batch began)
            while pending:
                finished, pending = concurrent.futures.wait(pending, timeout=_POLL_SECONDS,
                                                            return_when=concurrent.futures.FIRST_COMPLETED)
                if finished:
                    progress = time.monotonic()
                for future in finished:
                    try:
                        result = _in_cli_words(future.result())
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
                    results[index] = _in_cli_words(future.result())
        finally:
            pool.shutdown(wait=client is None)  # a Dask future given up on may never end
            if client is not None:
                client.close()
    done = [ModelResult(input=str(src), output=None, error=why) for src, why in refused]
    done += [r for r in results if r is not None]
    _warn_missing_weights(done)
    failed = [r for r in done if not r.ok]
    mismatched = [m for m in map(_verification_failure, done) if m]

    document = render.many_document(done)
    if args.report_json:
        _write_json(args.report_json, document)
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


def run(args: argparse.Namespace) -> int:
    _interrupted.clear()  # an earlier run's Ctrl-C (main() called again in one process) does not carry over
    previous = _handle_ctrl_c()
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
    _path_rule(paths.check_many_target, args.inputs, args.output)
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
