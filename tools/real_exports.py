"""Folds every exported model under a directory with qdqfold, verifies each fold with qdqfold's own verification
(qdqfold.verify: a certificate per fold on the original's activations, and every output against a rounding twin
of the original), and prints a markdown table: per exporter and model, BNs found / folded / kept by reason, and
the folded model's deviation against the rounding floor.

    python tools/real_exports.py /work/exports                    # DIR/<exporter>/<model>.onnx, from
    python tools/real_exports.py /work/exports --out table.md      #   tools/make_real_exports.py
    python tools/real_exports.py /work/exports --json rows.json --pad-correction

Needs only qdqfold (with its verify extras: numpy, onnx, onnxruntime), not the exporters. Columns:

- found / folded / kept: BatchNormalization nodes (qdqfold's report totals); "kept by reason": the report's
  codes with their counts.
- deviation / floor: the largest output difference as a share of the output's range, for the folded model and
  for the rounding twin (the original with every touched BN and weight scale one ulp off, not folded), the
  worst over input sets and onnxruntime levels (off and its default level); "verdict" is verify's.
- worst fold: the largest certificate ratio (a folded layer's difference from the original BN output over its
  float-rounding bound; <= 1 passes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _fmt(x: float | None) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.2g}")


def measure(path: Path, options: dict[str, bool], levels: tuple[str, ...] = ("off", "default"),
            input_sets: int = 3) -> dict[str, Any]:
    """One model: the fold's report totals and, when something folded, verify's figures."""
    import qdqfold

    row: dict[str, Any] = {"exporter": path.parent.name, "model": path.stem, "file": str(path)}
    try:
        folded, report = qdqfold.fold_model(str(path), report=True, **options)
    except Exception as e:  # noqa: BLE001 (one line per model qdqfold refuses)
        row["error"] = f"fold: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        return row
    totals = report.totals()
    row.update(found=totals["batchnorms"], folded=totals["folded"], kept=totals["kept"],
               kept_by_reason=dict(sorted(report.kept_by_reason().items())),
               folded_by_fold=dict(sorted(report.folded_by_fold().items())))
    if not totals["folded"]:
        return row
    try:
        result = qdqfold.verify(str(path), folded, report=report, levels=levels, input_sets=input_sets)
    except Exception as e:  # noqa: BLE001 (onnxruntime cannot run the model: say so in the table)
        row["error"] = f"verify: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        return row
    checks = [o for outs in (result.levels.values() or [result.outputs]) for o in outs]
    worst = max(checks, key=lambda o: o.of_range)
    worst_fold = result.worst_fold
    row.update(verdict=result.verdict, deviation=worst.of_range, floor=worst.floor_of_range,
               level=worst.level, moved=worst.moved, floor_moved=worst.floor_moved,
               worst_fold_ratio=None if worst_fold is None else worst_fold.ratio,
               certified=len(result.certificates), uncertified=len(result.uncertified),
               rewritten=result.rewritten, units_before=sum(result.quantized_units_before.values()),
               units_after=sum(result.quantized_units_after.values()))
    if not result.passed:
        row["why"] = result.failure_message()
    return row


def _counts(r: dict[str, Any] | None) -> str:
    if r is None or "found" not in r:
        return "-"
    kept = ", ".join(f"{n} {code}" for code, n in r["kept_by_reason"].items())
    return f"{r['folded']} folded" + (f"; {kept}" if kept else "")


def table(rows: list[dict[str, Any]], before: list[dict[str, Any]] | None = None) -> str:
    """The markdown table; with ``before`` (rows of an earlier run, e.g. of main), a column of its counts."""
    old = {(r["exporter"], r["model"]): r for r in before or []}
    head = ("| exporter | model | BNs found | folded | kept by reason | verdict | deviation / range | "
            "rounding floor | worst fold (ratio to bound) | certified |" + (" before |" if before else ""))
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        if "found" not in r:
            lines.append(f"| {r['exporter']} | {r['model']} | - | - | {r['error']} | - | - | - | - | - |"
                         + (f" {_counts(old.get((r['exporter'], r['model'])))} |" if before else ""))
            continue
        kept = ", ".join(f"{n} {code}" for code, n in r["kept_by_reason"].items()) or "-"
        verdict = r.get("verdict", "-" if not r["folded"] else "")
        if "error" in r:
            verdict = r["error"]
        cert = f"{r['certified']}" + (f" (+{r['uncertified']} not isolated)" if r.get("uncertified") else "") \
            if "certified" in r else "-"
        lines.append(f"| {r['exporter']} | {r['model']} | {r['found']} | {r['folded']} | {kept} | {verdict} | "
                     f"{_fmt(r.get('deviation'))} | {_fmt(r.get('floor'))} | {_fmt(r.get('worst_fold_ratio'))} | "
                     f"{cert} |" + (f" {_counts(old.get((r['exporter'], r['model'])))} |" if before else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import qdqfold

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="exports: DIR/<exporter>/<model>.onnx")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--json", type=Path, help="write every row (all figures) as JSON here")
    parser.add_argument("--levels", default="off,default", help="onnxruntime levels to verify at (off,default)")
    parser.add_argument("--input-sets", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="only these exporters (directory names)")
    parser.add_argument("--before", type=Path, help="the --json rows of an earlier run (e.g. with main's build): "
                                                     "adds a column of its folded / kept counts")
    for name, default in qdqfold.OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_const", const=not default,
                            default=default)
    args = parser.parse_args(argv)
    options = {name: getattr(args, name) for name in qdqfold.OPTIONS}
    paths = sorted(p for p in args.directory.glob("*/*.onnx") if not args.only or p.parent.name in args.only)
    if not paths:
        print(f"{args.directory}: no <exporter>/<model>.onnx files", file=sys.stderr)
        return 1
    rows = []
    for path in paths:
        print(f"{path} ...", file=sys.stderr, flush=True)
        rows.append(measure(path, options, tuple(args.levels.split(",")), args.input_sets))
    before = json.loads(args.before.read_text()) if args.before else None
    text = f"qdqfold {qdqfold.__version__}\n\n" + table(rows, before)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
