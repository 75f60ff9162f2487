"""The ``qdqfold`` command line (also ``python -m qdqfold``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qdqfold_native import FoldError

from .api import OPTIONS, fold_bytes, load_model_bytes, write_atomically

EXIT_OK = 0
EXIT_FAILED = 1  # bad input, unreadable or unwritable path
EXIT_USAGE = 2  # argparse's own code for bad arguments

# Flags for the fold options: a flag turns the default around.
OPTION_FLAGS = {
    "fold_backward": ("--no-backward", "do not fold BN into the layer that produces its input"),
    "fold_forward": ("--no-forward", "do not fold BN into the layer(s) that read its output"),
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdqfold",
        description="Fold BatchNormalization into neighbouring layers of an ONNX model, quantized (QDQ) weights "
                    "included, exactly. Prints what was folded and what was kept, and why.",
        epilog="exit status: 0 success; 1 bad input or a path that cannot be read or written; 2 bad arguments.",
    )
    parser.add_argument("input", help="the ONNX model to fold")
    parser.add_argument("-o", "--output", help="where to write the folded model")
    parser.add_argument("--in-place", action="store_true", help="overwrite INPUT with the folded model")
    parser.add_argument("--report-json", metavar="PATH", help="write the full report as JSON to PATH")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    group = parser.add_argument_group("fold options")
    for name, (flag, help_text) in OPTION_FLAGS.items():
        group.add_argument(flag, dest=name, action="store_const", const=not OPTIONS[name], default=OPTIONS[name],
                           help=help_text)
    return parser


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def run(args: argparse.Namespace) -> int:
    if args.in_place:
        if args.output and not _same_file(args.output, args.input):
            raise UsageError("--in-place and -o name different files; give one of them")
        output = args.input
    elif args.output:
        output = args.output
        if os.path.exists(output) and _same_file(output, args.input):
            raise UsageError(f"{output} is the input; pass --in-place to overwrite it")
    else:
        raise UsageError("give -o OUTPUT (or --in-place to overwrite the input)")

    source = Path(args.input)
    if not source.exists():
        raise InputError(f"{source}: no such file")
    if source.is_dir():
        raise InputError(f"{source}: is a directory, not a model file")
    options = {name: getattr(args, name) for name in OPTION_FLAGS}
    try:
        data = load_model_bytes(source)
    except OSError as e:
        raise InputError(f"{source}: cannot read: {e.strerror or e}") from e
    try:
        folded, report = fold_bytes(data, **options)
    except FoldError as e:
        raise InputError(f"{source}: not a valid ONNX model: {e}") from e
    try:
        write_atomically(output, folded)
    except OSError as e:
        raise InputError(f"{output}: cannot write: {e.strerror or e}") from e
    if args.report_json:
        try:
            write_atomically(args.report_json, report.to_json().encode())
        except OSError as e:
            raise InputError(f"{args.report_json}: cannot write: {e.strerror or e}") from e
    if not args.quiet:
        print(report.summary())
        for entry in report.kept:
            print(f"  - {entry.describe()}")
        print(f"wrote {output}")
    return EXIT_OK


class UsageError(Exception):
    pass


class InputError(Exception):
    pass


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
        print(f"qdqfold: error: {e}", file=sys.stderr)
        return EXIT_FAILED
