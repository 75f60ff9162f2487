"""The ``qdqfold`` command line (also ``python -m qdqfold``)."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import qdqfold_native

from .api import OPTIONS, write_atomically
from .batch import _interrupted  # noqa: PLC2701 (the CLI owns the Ctrl-C of its process)
from .batch import (ModelError, ModelResult, VerifySettings, fold_bytes_result, fold_file_captured, fold_file_result,
                    interrupt_running, plan_outputs, read_for_stdout)
from .report import found_line, with_schema
from .verify import DEFAULT_TOLERANCE, VerifyResult

EXIT_OK = 0
EXIT_FAILED = 1  # bad input, a path that cannot be read or written; in batch mode: any model failed
EXIT_USAGE = 2  # bad arguments (argparse's own code too)
EXIT_MISMATCH = 3  # --verify: the verdict is "differs"
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EXIT_STATUS_HELP = """exit status:
  0  success
  1  bad input (missing file, directory where a file was expected, not a valid ONNX model, missing
     external data) or a path that cannot be read or written; with several models: any model failed
  2  bad arguments (including an unknown --explain node, or an output that would overwrite its input
     without --in-place)
  3  --verify: the verdict is "differs" (a fold over its rounding bound, or an output beyond the rounding floor)
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
}


def _in_cli_words(result: ModelResult) -> ModelResult:
    """The result with its messages worded for the command line (see cli_words)."""
    if result.report is not None:
        result.report.batchnorms = [dataclasses.replace(b, message=cli_words(b.message))
                                    for b in result.report.batchnorms]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdqfold",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    group = parser.add_argument_group("fold options")
    for name in OPTIONS:
        flag, help_text = _option_flag(name)
        group.add_argument(flag, dest=name, action="store_const", const=not OPTIONS[name], default=OPTIONS[name],
                           help=help_text)
    return parser


class UsageError(Exception):
    pass


class InputError(Exception):
    pass


# ---------------------------------------------------------------------------------------------- presentation

_ANSI = re.compile(r"\033\[[0-9;]*m")


class Style:
    """ANSI colour when enabled; plain text otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def good(self, text: str) -> str:
        return self._wrap("32", text)

    def warn(self, text: str) -> str:
        return self._wrap("33", text)

    def bad(self, text: str) -> str:
        return self._wrap("31", text)


def _colour_wanted(choice: str, stream: TextIO) -> bool:
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], header: list[str], style: Style, align: str) -> list[str]:
    """A plain aligned table; ``align`` holds 'l' or 'r' per column. Cells may carry colour codes."""

    def width(cell: str) -> int:
        return len(_ANSI.sub("", cell))

    widths = [max(width(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = []
        for cell, w, a in zip(cells, widths, align):
            pad = " " * (w - width(cell))
            out.append(cell + pad if a == "l" else pad + cell)
        return "  " + "  ".join(out).rstrip()

    return [style.bold(line(header)), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]


def _op_table(before: dict[str, int], after: dict[str, int], size_before: int, size_after: int,
              style: Style) -> list[str]:
    rows = []
    for op in sorted(set(before) | set(after)):
        b, a = before.get(op, 0), after.get(op, 0)
        after_cell = str(a) if a == b else (style.good(str(a)) if a < b else style.warn(str(a)))
        rows.append([op, str(b), after_cell])
    rows.append([style.bold("total nodes"), str(sum(before.values())), str(sum(after.values()))])
    rows.append([style.bold("model size"), _size(size_before), _size(size_after)])
    return _table(rows, ["op type", "before", "after"], style, "lrr")


def _bn_lines(report, style: Style, limit: int = 20) -> list[str]:
    totals = report.totals()
    head = found_line(totals)
    lines = [style.bold(head)]
    if totals["approximate"]:
        lines.append(style.warn(f"  {totals['approximate']} folded APPROXIMATELY (an approximate option was given)"))
    rows = [[style.good("folded"), str(n), code] for code, n in sorted(report.folded_by_fold().items())]
    rows += [[style.warn("kept"), str(n), code] for code, n in sorted(report.kept_by_reason().items())]
    if rows:
        lines += _table(rows, ["", "count", "fold / reason"], style, "lrl")
    # A small model lists every BN; a large one the kept ones (the folded ones are in --report-json).
    shown = report.batchnorms if len(report.batchnorms) <= limit // 2 else report.kept
    for entry in shown[:limit]:
        mark = style.good("+") if entry.folded else style.warn("-")
        lines += _wrapped(f"{mark} {entry.describe()}", "  ", "    ")
    if len(shown) > limit:
        lines.append(style.dim(f"  ... and {len(shown) - limit} more kept (see --report-json)"))
    return lines


def _wrapped(text: str, first: str, rest: str) -> list[str]:
    """``text`` wrapped to the terminal's width (100 columns when not a terminal)."""
    width = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False) or [first]


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.3g}"


def _verify_lines(v: VerifyResult, style: Style) -> list[str]:
    shapes = ", ".join(f"{k} {v2}" for k, v2 in v.input_shapes.items())
    dims = ", ".join(f"{k}={n}" for k, n in v.symbolic_dims.items())
    source = f"{v.input_sets} random input sets, seeds {v.seed}.." if v.input_source == "random" else \
        f"inputs {v.input_source}"
    extra = sum(v.extra_input_sets.values())
    source += f" (+{extra} to decide)" if extra else ""
    lines = [style.bold("verification") + style.dim(f" (onnxruntime, levels {', '.join(v.levels)}; {source}; {shapes}"
                                                    + (f"; symbolic {dims}" if dims else "") + ")")]
    verdict = {"exact": style.good, "approximate": style.warn, "differs": style.bad}[v.verdict](v.verdict.upper())
    lines.append(f"  verdict: {verdict}" + (" (only with onnxruntime's optimisations on)"
                                            if v.only_with_optimisations() else ""))
    rows = []
    for level, outputs in v.levels.items():
        for o in outputs:
            moved = "-" if o.moved is None else f"{o.moved}/{o.elements}"
            floor_moved = "-" if o.floor_moved is None else f"{o.floor_moved}"
            status = {"exact": style.good, "approximate": style.warn, "differs": style.bad}[o.verdict](o.verdict)
            rows.append([o.name, level, _fmt(o.of_range), _fmt(o.floor_of_range), moved, floor_moved,
                         _fmt(o.snr_db), _fmt(o.floor_snr_db), status])
    lines += _table(rows, ["output", "level", "fold/range", "floor/range", "moved", "floor moved", "SNR dB",
                           "floor SNR", "verdict"], style, "llrrrrrrl")
    worst = v.worst_fold
    if worst is not None:
        text = (f"  certificates: {len(v.certificates)} folds checked on the original's activations; worst "
                f"{worst.node}: {worst.ratio:.3g} of its rounding bound (max abs {worst.max_abs:.3g}"
                + (f", channel {worst.channel}" if worst.channel is not None else "") + ")")
        lines.append(text if worst.passed else style.bad(text))
    if v.uncertified:
        lines.append(style.dim(f"  not certified (not isolable): {', '.join(v.uncertified)}"))
    if v.rewritten:
        lines.append(style.dim(f"  compared with {v.rewritten}"))
    for level, why in v.skipped_levels.items():
        lines += [style.warn(line) for line in _wrapped(
            f"not checked at level {level}: onnxruntime cannot build the original model there ({why})", "  ", "    ")]
    if v.units_level is not None:
        before, after = sum(v.quantized_units_before.values()), sum(v.quantized_units_after.values())
        detail = ", ".join(f"{op} {n}" for op, n in v.quantized_units_after.items())
        text = f"  onnxruntime quantized node units ({v.units_level}): before {before}, after {after}"
        text += f" ({detail})" if detail else ""
        lines.append(text if after >= before else style.bad(text))
    return lines


def _print_single(result: ModelResult, style: Style, out: TextIO) -> None:
    assert result.report is not None
    target = {None: "dry run, nothing written", "-": "standard output"}.get(result.output, result.output)
    print(f"{style.bold(result.input)} -> {target}" + style.dim(f"  ({result.seconds:.2f} s)"), file=out)
    for line in _bn_lines(result.report, style):
        print(line, file=out)
    print(file=out)
    for line in _op_table(result.ops_before, result.ops_after, result.size_before, result.size_after, style):
        print(line, file=out)
    if result.verification is not None:
        print(file=out)
        for line in _verify_lines(result.verification, style):
            print(line, file=out)
    if result.written:
        data = result.report.data_files
        where = "the model to standard output" if result.output == "-" else result.output
        print(f"wrote {where}" + (f" and its external data {', '.join(data)}" if data else ""), file=out)
    for path in result.report.removed_files:
        print(f"removed {path} (data the folded model no longer uses)", file=out)


# ---------------------------------------------------------------------------------------------- running

def _options(args: argparse.Namespace) -> dict[str, bool]:
    return {name: getattr(args, name) for name in OPTIONS}


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
    levels = ("off", "default") if args.ort_level == "both" else (args.ort_level,)
    files = list(args.input_files)
    return VerifySettings(args.tolerance, args.seed, args.symbolic_size, dict(args.dim), files, levels)


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _names_directory(output: str) -> bool:
    """``-o`` names a directory: it ends with a slash (created if missing) or is an existing directory."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def _single_output(args: argparse.Namespace) -> Path | None:
    source = Path(args.inputs[0])
    if args.inputs[0] == "-" and args.in_place:
        raise UsageError("--in-place: standard input has no file to replace; give -o OUT or -o -")
    if args.inputs[0] == "-" and args.output and _names_directory(args.output):
        raise UsageError(f"{args.output}: a model from standard input has no name to take in a directory; "
                         f"name the output file")
    if args.dry_run:
        if args.output or args.in_place:
            raise UsageError("--dry-run writes nothing; drop -o / --in-place")
        return None
    if args.in_place:
        if args.output and not _same_file(args.output, source):
            raise UsageError("--in-place and -o name different files; give one of them")
        return source
    if args.output:
        output = Path(args.output) / source.name if _names_directory(args.output) else Path(args.output)
        if output.exists() and source.exists() and _same_file(output, source):
            raise UsageError(f"{output} is the input; pass --in-place to overwrite it")
        return output
    if args.explain or args.json:
        return None  # asking for a story or for JSON alone is a dry run
    raise UsageError("give -o OUTPUT, --in-place, or --dry-run")


def _run_interruptibly(function, *arguments, **keywords):
    """Runs ``function`` on a worker thread so that Ctrl-C reaches this one at once: it then stops the fold
    (batch.interrupt_running: no partial output, temporary files removed), waits for the worker to give up,
    and raises KeyboardInterrupt."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(function, *arguments, **keywords)
        try:
            return future.result()
        except KeyboardInterrupt:
            interrupt_running()
            concurrent.futures.wait([future])
            raise


def _write_json(path: str, data: Any) -> None:
    try:
        write_atomically(path, (json.dumps(data, indent=2) + "\n").encode())
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from e


def _verification_failure(result: ModelResult) -> str | None:
    v = result.verification
    if v is None or v.passed:
        return None
    return f"{result.input}: verification failed: {v.failure_message()}"


def run_single(args: argparse.Namespace, style: Style) -> int:
    source = args.inputs[0]
    to_stdout = args.output == "-"
    if to_stdout and (args.json or args.in_place or args.dry_run):
        raise UsageError("-o - writes the model to standard output; it cannot go with --json, --in-place or --dry-run")
    folded: bytes | None = None
    try:
        if source == "-" or to_stdout:  # the model passes through memory
            if args.external_data or args.size_threshold is not None or args.data_name:
                raise UsageError("external data options need a model file output (-o FILE)")
            if source == "-":
                data, base = sys.stdin.buffer.read(), None
            else:
                data, base = read_for_stdout(Path(source))
            output = None if to_stdout else _single_output(args)
            result, folded = _run_interruptibly(fold_bytes_result, data, source, output, _options(args),
                                                verification=_verification(args), base_directory=base)
        else:
            output = _single_output(args)
            result = _run_interruptibly(fold_file_result, source, output, _options(args),
                                        verification=_verification(args), make_parents=True, force=args.force,
                                        storage=_storage(args), model_info=bool(args.explain))
    except ModelError as e:
        raise InputError(str(e)) from e
    _in_cli_words(result)
    if to_stdout:
        result.output, result.written = "-", True
    report_stream = sys.stderr if to_stdout else sys.stdout
    data = with_schema(result.to_dict())
    if args.report_json:
        _write_json(args.report_json, data)
    if args.json:
        print(json.dumps(data, indent=2))
    if args.explain:
        try:
            story = result.report.explain(args.explain, result.model_info)
        except KeyError as e:
            raise UsageError(e.args[0]) from e
        if not args.json:
            for line in story.splitlines():
                print("\n".join(_wrapped(line, "", " " * 10)), file=report_stream)
    elif not args.quiet and not args.json:
        _print_single(result, style, report_stream)
    if to_stdout and folded is not None:
        sys.stdout.buffer.write(folded)
        sys.stdout.buffer.flush()
    failure = _verification_failure(result)
    if failure:
        print(f"qdqfold: {failure}", file=sys.stderr)
        return EXIT_MISMATCH
    return EXIT_OK


def _many_summary(results: list[ModelResult], style: Style) -> list[str]:
    ok = [r for r in results if r.ok]
    bns = Counter()
    kept = Counter()
    folded_by = Counter()
    before, after = Counter(), Counter()
    for r in ok:
        bns.update(r.report.totals())
        kept.update(r.report.kept_by_reason())
        folded_by.update(r.report.folded_by_fold())
        before.update(r.ops_before)
        after.update(r.ops_after)
    lines = [style.bold(f"{len(results)} models: {len(ok)} folded, {len(results) - len(ok)} failed"),
             style.bold(found_line(bns))]
    rows = [[style.good("folded"), str(n), code] for code, n in sorted(folded_by.items())]
    rows += [[style.warn("kept"), str(n), code] for code, n in sorted(kept.items())]
    if rows:
        lines += _table(rows, ["", "count", "fold / reason"], style, "lrl")
    if ok:
        lines.append("")
        lines += _op_table(dict(before), dict(after), sum(r.size_before for r in ok), sum(r.size_after for r in ok),
                           style)
    return lines


def _model_line(result: ModelResult, style: Style) -> str:
    if not result.ok:
        return f"{style.bad('FAIL')} {result.error}"
    t = result.report.totals()
    target = f" -> {result.output}" if result.output and result.output != result.input else ""
    text = f"{style.good('ok')}   {result.input}{target}: {t['folded']}/{t['batchnorms'] + t.get('elementwise', 0)} BN folded"
    if result.verification is not None:
        text += ", verified" if result.verification.passed else ", " + style.bad("verification FAILED")
    return text


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


def run_many(args: argparse.Namespace, style: Style) -> int:
    if args.explain:
        raise UsageError("--explain takes one model file")
    if args.dry_run and (args.output or args.in_place):
        raise UsageError("--dry-run writes nothing; drop -o / --in-place")
    if not (args.output or args.in_place or args.dry_run or args.json):
        raise UsageError("with several models give -o DIR, --in-place, or --dry-run")
    if args.in_place and args.output:
        raise UsageError("--in-place and -o: give one of them")
    if args.data_name:
        raise UsageError("--data-name names one data file; with several models each output's data is named after it")
    storage = _storage(args)
    out_dir = Path(args.output) if args.output else None
    try:
        plan = plan_outputs(args.inputs, out_dir, in_place=args.in_place)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not plan:
        raise InputError(f"{', '.join(args.inputs)}: no *.onnx model found")
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{out_dir}: cannot create the output directory: {e.strerror or e}") from e
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise InputError(f"{out_dir}: cannot write into the output directory")

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
                               _verification(args), True, args.debug, args.force, storage): index
                   for index, (src, dst) in enumerate(plan)}
        try:
            for future in concurrent.futures.as_completed(futures):
                result = _in_cli_words(future.result())
                results[futures[future]] = result
                bar.update(1)
                bar.set_postfix_str(Path(result.input).name, refresh=False)
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
                if future.cancelled():
                    src, dst = plan[index]
                    results[index] = ModelResult(str(src), str(dst) if dst is not None else None,
                                                 error=f"{src}: not folded: interrupted")
                elif results[index] is None:
                    results[index] = _in_cli_words(future.result())
        finally:
            pool.shutdown(wait=True)
            if client is not None:
                client.close()
    done = [r for r in results if r is not None]
    failed = [r for r in done if not r.ok]
    mismatched = [m for m in map(_verification_failure, done) if m]

    data = with_schema({
        "models": [r.to_dict() for r in done if r.ok],
        "failed": [{"input": r.input, "output": r.output, "error": r.error} for r in failed],
        "totals": {"models": len(done), "folded": len(done) - len(failed), "failed": len(failed)},
    })
    if args.report_json:
        _write_json(args.report_json, data)
    if args.json:
        print(json.dumps(data, indent=2))
    elif not args.quiet:
        for r in done:
            print(_model_line(r, style))
        print()
        for line in _many_summary(done, style):
            print(line)
    for r in failed:
        if args.debug and r.traceback:
            print(r.traceback, file=sys.stderr, end="")
    if failed:
        print(f"qdqfold: {len(failed)} of {len(done)} models failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.error}", file=sys.stderr)
    for m in mismatched:
        print(f"qdqfold: {m}", file=sys.stderr)
    if interrupted:
        print("qdqfold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if failed:
        return EXIT_FAILED
    return EXIT_MISMATCH if mismatched else EXIT_OK


def _take_positional_output(args: argparse.Namespace) -> None:
    """The onnxsim/onnxslim habit ``qdqfold in.onnx out.onnx``: with exactly two inputs and nothing else saying
    where to write, the second is the output."""
    if len(args.inputs) != 2 or args.output or args.in_place or args.dry_run or args.json or args.explain:
        return
    first, second = args.inputs
    if first != "-" and Path(first).is_dir():
        return  # a directory and something: two inputs (the usage error below says what is missing)
    args.inputs, args.output = [first], second


def run(args: argparse.Namespace) -> int:
    _interrupted.clear()  # an earlier run's Ctrl-C (main() called again in one process) does not carry over
    _take_positional_output(args)
    style = Style(_colour_wanted(args.color, sys.stderr if args.output == "-" else sys.stdout))
    if len(args.inputs) == 1 and (args.inputs[0] == "-" or not Path(args.inputs[0]).is_dir()):
        return run_single(args, style)
    if "-" in args.inputs:
        raise UsageError("'-' (standard input) folds one model; give it alone")
    if args.output == "-":
        raise UsageError("-o - writes one model to standard output; give one input")
    if args.output and (Path(args.output).is_file() or args.output.endswith(".onnx")):
        directory = next((p for p in args.inputs if Path(p).is_dir()), None)
        if directory is not None:  # one model file expected, a directory given
            raise InputError(f"{directory}: is a directory, not a model file (to fold every model in it, "
                             f"give -o a directory)")
        raise UsageError(f"{args.output}: with several models, -o names a directory")
    return run_many(args, style)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        if args.debug:
            raise
        parser.print_usage(sys.stderr)
        print(f"qdqfold: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as e:
        if args.debug:
            raise
        print(f"qdqfold: error: {cli_words(str(e))}", file=sys.stderr)
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
        print(f"qdqfold: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
