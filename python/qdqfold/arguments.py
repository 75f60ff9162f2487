"""The command line's arguments: the exit statuses, the flags of the fold options (one table), the parser,
and what a run's settings are, read from the parsed arguments.

Light on purpose (argparse, os, re and the native module's option table): every run of the command line
imports it. A native option needs one line in OPTION_FLAGS (a flag and its help); one missing from the table
still gets a flag (see _option_flag), and tests/test_cli.py fails until the table names it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import qdqfold_native

from . import paths
from ._defaults import DEFAULT_TOLERANCE, OPTIONS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    from typing import Any

    from .batch import VerifySettings
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


def terminal_columns(fallback: int = 80) -> int:
    """shutil.get_terminal_size((fallback, 24)).columns, read as shutil reads it (COLUMNS, else standard output's
    terminal, else ``fallback``) without importing shutil, which loads the compression modules (a few
    milliseconds of every run)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns or fallback  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # AttributeError: no sys.__stdout__ (None), as shutil has it
            columns = fallback
    return columns


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter at the width argparse would choose. argparse makes one for every add_argument (to
    check it) and asks shutil for the width, so building the parser imported shutil; this asks os."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else terminal_columns() - 2)


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
    """Bad arguments: the usage line and one error line, exit status 2 (EXIT_USAGE)."""


class InputError(Exception):
    """Bad input, or a path that cannot be read or written: one error line, exit status 1 (EXIT_FAILED)."""


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {name: getattr(args, name) for name in OPTIONS}
    if getattr(args, "target", None):
        options["target"] = args.target
    else:
        for name in ("requantize_residuals", "store_float_weights"):
            if options.get(name):
                raise UsageError(f"{OPTION_FLAGS[name][0]} needs a deployment target: add --target onnxruntime")
    if options.get("requantize_merged") and not options.get("merge_branches"):
        raise UsageError(f"{OPTION_FLAGS['requantize_merged'][0]} needs {OPTION_FLAGS['merge_branches'][0]}")
    return options


def storage_of(args: argparse.Namespace) -> dict[str, object]:
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


def verification_of(args: argparse.Namespace) -> VerifySettings | None:
    if not args.verify:
        return None
    from .batch import VerifySettings

    levels = ("off", "default") if args.ort_level == "both" else (args.ort_level,)
    return VerifySettings(tolerance=args.tolerance, seed=args.seed, symbolic_size=args.symbolic_size,
                          dims=dict(args.dim), inputs=list(args.input_files), levels=levels)


def style_of(args: argparse.Namespace) -> Style:
    """Colour for the stream the report goes to (standard error when the model goes to standard output)."""
    from .render import Style, colour_wanted

    return Style(colour_wanted(args.color, sys.stderr if args.output == "-" else sys.stdout))


def path_rule(function, *arguments, **keywords):
    """``function`` of qdqfold.paths, its refusal turned into the command line's usage or input error."""
    try:
        return function(*arguments, **keywords)
    except paths.OutputPathError as e:
        raise (InputError if e.bad_input else UsageError)(str(e)) from e
