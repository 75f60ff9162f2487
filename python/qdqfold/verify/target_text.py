"""The text report's lines for verify's ``target`` section (qdqfold.render prints them after the verify table)."""

from __future__ import annotations

from typing import Any


def _n(x: Any) -> str:
    return "-" if x is None else str(x)


def target_lines(t: dict[str, Any], style: Any) -> list[str]:
    """A few lines: kernels predicted and measured, where they disagree, the rewrites' verdict (with the measured
    deviation of an approximate one against the QAT export), and the saturation check."""
    from ..render import _fmt, _table, wrapped

    at = t["measured_at"]
    lines = [f"  target {t['name']}: integer kernels in the model onnxruntime saves ({at['level']}, "
             f"{at['provider']}), beside the report's prediction"]
    rows = [[r["op"], _n(r["predicted_before"]), str(r["measured_before"]), _n(r["predicted_after"]),
             str(r["measured_after"])] for r in t["kernels"]["rows"]]
    if rows:
        lines += ["  " + line for line in _table(rows, ["kernel", "predicted before", "measured before",
                                                        "predicted after", "measured after"], style, "lrrrr")]
    for d in t["kernels"]["disagreements"]:
        lines.append(style.warn(f"    prediction and measurement disagree: {d['op']} in the {d['model']}: predicted "
                                f"{d['predicted']}, onnxruntime formed {d['measured']}"))
    verdict = t["rewrites"]
    paint = {"exact": style.good, "approximate": style.warn, "differs": style.bad}[verdict]
    if t["approximate"] is None:
        lines.append(f"  rewrites: {paint(verdict.upper())} (judged with the fold above: against the original, "
                     f"rounding twin and certificates)")
    else:
        a = t["approximate"]
        steps = [lay["new_rounding_step"] for lay in a["layers"] if lay["new_rounding_step"]]
        head = (f"  rewrites: {paint(verdict.upper())} ({a['option']}: {len(a['layers'])} layer(s) round their inputs "
                f"anew" + (f", steps up to {max(steps):.3g}" if steps else "") + "); ")
        head += ("the rows above compare with the original given the same roundings, everything else exact "
                 "against it" if a["separated"] else f"not separated ({a['not_separated']}): the rows above "
                 f"compare with the original")
        lines += wrapped(head, "", "    ")
        lines.append("    against the QAT export (optimisations off), beside its rounding twin:")
        rows = [[o["name"], _fmt(o["max_abs"]), _fmt(o["steps"]) + (f" x {o['step']:.3g}" if o["step"] else ""),
                 _fmt(o["of_range"]), _fmt(o["snr_db"]), _fmt(o["floor_max_abs"]), _fmt(o["floor_of_range"]),
                 "-" if o["top1_rows"] is None else f"{o['top1_changed']}/{o['top1_rows']}"] for o in a["outputs"]]
        lines += ["    " + line for line in _table(rows, ["output", "max abs", "last-Q steps", "/range", "SNR dB",
                                                          "twin max abs", "twin/range", "top-1 changed"],
                                                   style, "lrrrrrrr")]
    qz = t["quantizers"]
    lines.append(f"  quantizers: {qz['kept']} of the original's give the same floats, {qz['copies']} added by the "
                 f"target are on the grid of the quantizer each copies"
                 + (f"; not checked: {', '.join(qz['unchecked'][:4])}" if qz["unchecked"] else ""))
    for problem in t["problems"]:
        lines += [style.bad(line) for line in wrapped(f"    {problem}", "", "      ")]
    s = t["saturation"]
    text = (f"  saturation check: {s['checked']} integer layer(s) checked, onnxruntime formed {s['formed']} integer "
            f"GEMM kernel(s)" + (", every one checked" if s["covered"] else
                                ", NOT checked: " + ", ".join(f"{u['node']} ({u['kernel']})" for u in s["uncovered"][:6]))
            + (f"; {s['can_saturate']} can saturate on {s['cpus']}: " + ", ".join(s["flagged"][:6])
               + (" ..." if len(s["flagged"]) > 6 else "") + f" ({s['remedy']} avoids it)" if s["can_saturate"]
               else "; none can saturate"))
    lines += [(style.warn(line) if not s["covered"] else line) for line in wrapped(text, "", "    ")]
    return lines
