"""What the command line prints: tables, lines, colour, and the JSON documents.

Nothing here decides anything: :mod:`qdqfold.cli` runs the folds and hands the results over. Imported only
when something is shown (a run with ``-q`` and no JSON report never loads it).
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from collections import Counter
from typing import TYPE_CHECKING, Any, TextIO

from .arguments import terminal_columns
from .files import one_line
from .report import found_line, with_schema

if TYPE_CHECKING:
    from .batch import ModelResult
    from .report import FoldAttempt
    from .verify import VerifyResult

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


def colour_wanted(choice: str, stream: TextIO) -> bool:
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
        lines += wrapped(f"{mark} {entry.describe()}", "  ", "    ")
    if len(shown) > limit:
        lines.append(style.dim(f"  ... and {len(shown) - limit} more kept (see --report-json)"))
    target = report.target_lines()
    if target:
        lines += [style.bold(target[0]), *target[1:]]
    return lines


def wrapped(text: str, first: str, rest: str) -> list[str]:
    """``text`` wrapped to the terminal's width (100 columns when not a terminal)."""
    width = max(60, terminal_columns(100) - 1)
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
    verdict = {"exact": style.good, "approximate": style.warn, "uncertified": style.warn,
               "differs": style.bad}[v.verdict](v.verdict.upper())
    lines.append(f"  verdict: {verdict}" + (" (only with onnxruntime's optimisations on)"
                                            if v.only_with_optimisations() else "")
                 + (" (the fold; this CPU's integer kernels move the outputs, see below)" if v.kernel_warning else ""))
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
        lines += [style.warn(line) for line in wrapped(
            f"not checked at level {level}: onnxruntime cannot build the original model there ({why})", "  ", "    ")]
    if v.units_level is not None:
        before, after = sum(v.quantized_units_before.values()), sum(v.quantized_units_after.values())
        detail = ", ".join(f"{op} {n}" for op, n in v.quantized_units_after.items())
        text = f"  onnxruntime quantized node units ({v.units_level}): before {before}, after {after}"
        text += f" ({detail})" if detail else ""
        lines.append(text if after >= before else style.bad(text))
    if v.kernels is not None:
        lines += _kernel_verify_lines(v.kernels, style)
    if v.target is not None:
        from .verify.target_text import target_lines

        lines += target_lines(v.target, style)
    return lines


def _kernel_verify_lines(k: dict[str, Any], style: Style) -> list[str]:
    """What this CPU's integer kernels do to the folded model (VerifyResult.kernels)."""
    lines = [style.warn(f"  integer kernels on this CPU (level {k['level']}): the rows above for that level are the "
                        f"fold run with {k['option']}; as deployed, without it:")]
    rows = [[o["name"], _fmt(o["of_range"]), "-" if o["moved"] is None else f"{o['moved']}/{o['elements']}",
             _fmt(o["snr_db"]),
             _fmt(o["with_option_of_range"])] for o in k["outputs"]]
    lines += _table(rows, ["output", "kernels/range", "moved", "SNR dB", "with option/range"], style, "lrrrr")
    moved = [lay for lay in k["layers"] if lay.get("moved")]
    for lay in moved:
        lines.append(style.warn(f"    {lay['node']} ({lay['kernel']}): {lay['moved']}/{lay['elements']} output "
                                f"integers off by up to {lay['max_steps']} steps, alone on the same inputs "
                                f"(16-bit pair sums saturate)"))
    if not moved and k["layers"]:
        lines.append(style.dim(f"    no integer layer moves alone: the difference comes from their requantization"))
    for remedy in k["remedies"]:
        lines += wrapped(f"- {remedy}", "    ", "      ")
    return lines


def explain_kernels(result: ModelResult, node: str) -> str:
    """For --explain: the static saturation check of the layer(s) the BN ``node`` was folded into, when
    onnxruntime will run them as integer kernels (empty otherwise)."""
    if not result.integer_kernels or result.report is None:
        return ""
    into = {name for r in result.report.batchnorms if r.node == node for name in (r.into or [])}
    lines = []
    for lay in result.integer_kernels:
        if lay.node not in into:
            continue
        verdict = (f"can saturate on x86-64 CPUs without VNNI: {lay.channels} output channels have a pair of "
                   f"int8 weights whose products over activation bytes {lay.activation_range[0]}..{lay.activation_range[1]} "
                   f"reach {lay.pair_min}..{lay.pair_max}, beyond int16 (session.x64quantprecision=1 avoids it)"
                   if lay.can_saturate else
                   f"cannot saturate ({lay.why_not})" if lay.why_not else
                   f"cannot saturate: its pair sums stay within {lay.pair_min}..{lay.pair_max}")
        lines.append(f"\n  {lay.node} runs as {lay.kernel} in onnxruntime after the fold; it {verdict}")
    return "".join(lines)


def kernel_check_lines(layers: list[Any], style: Style) -> list[str]:
    """The static saturation check (qdqfold.kernels) of the folded model's integer layers."""
    if not layers:
        return []
    flagged = [lay for lay in layers if lay.can_saturate]
    by_kernel = Counter(lay.kernel for lay in layers)
    head = (f"integer kernels onnxruntime will form: {len(layers)} ("
            + ", ".join(f"{op} {n}" for op, n in sorted(by_kernel.items())) + ")")
    if not flagged:
        return [head + "; none can saturate on x86-64 without VNNI"]
    names = ", ".join(lay.node for lay in flagged[:6]) + (" ..." if len(flagged) > 6 else "")
    return [head] + [style.warn(line) for line in wrapped(
        f"{len(flagged)} can saturate on x86-64 CPUs without VNNI (AVX2, AVX-512 without VNNI): {names}; "
        f"there, run with the session option session.x64quantprecision=1 (see --explain, or --verify to measure)",
        "  ", "    ")]


def print_single(result: ModelResult, style: Style, out: TextIO) -> None:
    assert result.report is not None
    target = {None: "dry run, nothing written", "-": "standard output"}.get(result.output, result.output)
    print(f"{style.bold(one_line(result.input))} -> {one_line(target)}" + style.dim(f"  ({result.seconds:.2f} s)"),
          file=out)
    for line in _bn_lines(result.report, style):
        print(line, file=out)
    print(file=out)
    for line in _op_table(result.ops_before, result.ops_after, result.size_before, result.size_after, style):
        print(line, file=out)
    if result.integer_kernels:
        print(file=out)
        for line in kernel_check_lines(result.integer_kernels, style):
            print(line, file=out)
    if result.verification is not None:
        print(file=out)
        for line in _verify_lines(result.verification, style):
            print(line, file=out)
    if result.written:
        data = result.report.data_files
        where = "the model to standard output" if result.output == "-" else result.output
        print(one_line(f"wrote {where}" + (f" and its external data {', '.join(data)}" if data else "")), file=out)
    for path in result.report.removed_files:
        print(f"removed {one_line(path)} (data the folded model no longer uses)", file=out)




def many_summary(results: list[ModelResult], style: Style) -> list[str]:
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


def model_line(result: ModelResult, style: Style) -> str:
    if not result.ok:
        return f"{style.bad('FAIL')} {one_line(result.error or '')}"
    t = result.report.totals()
    target = f" -> {one_line(result.output)}" if result.output and result.output != result.input else ""
    text = f"{style.good('ok')}   {one_line(result.input)}{target}: {t['folded']}/{t['batchnorms'] + t.get('elementwise', 0)} BN folded"
    if result.verification is not None:
        text += ", verified" if result.verification.passed else ", " + style.bad("verification FAILED")
    return text


# ---------------------------------------------------------------------------------------------- JSON

def single_document(result: ModelResult) -> dict[str, Any]:
    """The JSON report of one model."""
    return with_schema(result.to_dict())


def many_document(done: list[ModelResult]) -> dict[str, Any]:
    """The JSON report of several models: the folded ones in full, the failed ones by their error."""
    failed = [r for r in done if not r.ok]
    return with_schema({
        "models": [r.to_dict() for r in done if r.ok],
        "failed": [{"input": r.input, "output": r.output, "error": r.error} for r in failed],
        "totals": {"models": len(done), "folded": len(done) - len(failed), "failed": len(failed)},
    })


def json_text(document: dict[str, Any]) -> str:
    """A JSON document as printed and as written to --report-json (without the final newline)."""
    import json  # here: a run that prints no JSON does not load it

    return json.dumps(document, indent=2)


# ---------------------------------------------------------------------------------------------- whole runs

def attempt_lines(attempts: list[FoldAttempt]) -> list[str]:
    """The lines of ``--explain`` for a BN's attempts: every fold rule that looked at it, in order, with its
    verdict, the node or value at fault and the option that would change it."""
    if not attempts:
        return []
    lines = ["  rules that looked at it, in order:"]
    for k, a in enumerate(attempts, 1):
        where = f" at {a['at']}" if a.get("at") else ""
        option = f" (option: {a['option']})" if a.get("option") else ""
        lines.append(f"  {k}. {a['rule']}: {a['verdict']} [{a['code']}]{where}{option} {a['message']}")
    return lines


def print_explain(story: str, out: TextIO) -> None:
    """One BN's story (``FoldReport.explain``), each line wrapped to the terminal."""
    for line in story.splitlines():
        print("\n".join(wrapped(line, "", " " * 10)), file=out)


def print_many(done: list[ModelResult], style: Style) -> None:
    """Several models on standard output: one line each, then the summary."""
    for r in done:
        print(model_line(r, style))
    print()
    for line in many_summary(done, style):
        print(line)


def print_many_failures(done: list[ModelResult], mismatched: list[str], *, interrupted: bool,
                        debug: bool) -> None:
    """Several models on standard error: tracebacks (``debug``), the failed models, the verifications that
    failed, and an interruption."""
    failed = [r for r in done if not r.ok]
    for r in failed:
        if debug and r.traceback:
            print(r.traceback, file=sys.stderr, end="")
    if failed:
        print(f"qdqfold: {len(failed)} of {len(done)} models failed:", file=sys.stderr)
        for r in failed:
            print(f"  {one_line(r.error or '')}", file=sys.stderr)
    for m in mismatched:
        print(f"qdqfold: {one_line(m)}", file=sys.stderr)
    if interrupted:
        print("qdqfold: interrupted", file=sys.stderr)
