"""The runtime's kernels: a difference at an optimisation level attributed to onnxruntime's integer kernels."""

from __future__ import annotations

from typing import Any, Mapping

from .judge import _figures
from .loading import _Model, _level, _run, _session
from .result import OutputCheck


#: Session options under which onnxruntime's integer kernels cannot saturate: 16-bit precision for x86-64's
#: u8s8 kernels (the same graph and kernels, no saturating pair sums). Not ``session.disable_quant_qdq``: it also
#: turns off onnxruntime's other QDQ rewrites (its float16 bias quantization, say), so it would excuse
#: deployment hazards that are the fold's to avoid (tests/test_verify_levels.py).
KERNEL_OPTIONS = (("session.x64quantprecision", "1"),)

#: Runs of each session when the cost of the session option is measured.
_COST_RUNS = 5


def _attribute_to_kernels(base: _Model, fold: _Model, lv: str, names: list[str], feed_sets: list[dict[str, Any]],
                          steps: Mapping[str, float], deployed: list[OutputCheck], judge) -> tuple | None:
    """At level ``lv`` the folded model differs from the original beyond the floor. When onnxruntime's integer
    kernels are the cause (the folded model lets it form kernels the original did not have), the fold run
    under one of :data:`KERNEL_OPTIONS` is within the floor: then the fold is exact and the difference is this
    CPU's kernels'. Returns the level's checks under that option and the ``kernels`` section (the deployed
    figures, each integer layer measured alone, and what the option costs), or None when no option explains
    the difference (it stays "differs")."""
    import time

    import numpy as np

    from .. import kernels as kernel_check

    level = _level(lv)
    original = _session(base.source(), level, external_folder=base.folder)
    outs_original = [_run(original, feeds) for feeds in feed_sets]
    for key, value in KERNEL_OPTIONS:
        folded = _session(fold.source(), level, external_folder=fold.folder, config={key: value})
        replaced: dict[str, list] = {name: [] for name in names}
        for feeds, out_o in zip(feed_sets, outs_original):
            out_f = _run(folded, feeds)
            for k, name in enumerate(names):
                replaced[name].append(_figures(out_o[k], out_f[k], steps.get(name)))
        checks = judge(replaced)
        if any(c.verdict == "differs" for c in checks):
            continue
        # The cost of the option: the folded model's run time with it over without it (interleaved runs).
        plain = _session(fold.source(), level, external_folder=fold.folder)
        timing = {"plain": [], "option": []}
        for _ in range(_COST_RUNS):
            for which, sess in (("plain", plain), ("option", folded)):
                t0 = time.perf_counter()
                _run(sess, feed_sets[0])
                timing[which].append(time.perf_counter() - t0)
        cost = float(np.median(timing["option"]) / max(np.median(timing["plain"]), 1e-12))
        proto = fold.proto()
        source = fold.source()  # the file as written (mapped by check_file), or the bytes verify was given
        layers = kernel_check.check_file(source) if isinstance(source, str) else kernel_check.check_bytes(source)
        try:
            measured = kernel_check.measure(proto, fold.folder, feed_sets[:3], layers)
        except Exception:  # noqa: BLE001 - onnxruntime cannot build the isolated layers: report without them
            measured = [{"node": lay.node, "kernel": lay.kernel, "can_saturate": lay.can_saturate, "moved": None,
                         "elements": None, "max_steps": None} for lay in layers]
        section = {
            "level": lv, "option": f"{key}={value}",
            "outputs": [{"name": d.name, "of_range": d.of_range, "max_abs": d.max_abs, "moved": d.moved,
                         "elements": int(np.prod(np.shape(outs_original[0][k]))),
                         "snr_db": d.snr_db, "with_option_of_range": c.of_range}
                        for k, (d, c) in enumerate(zip(deployed, checks))],
            "layers": measured, "option_cost": cost,
            "remedies": [f"run with the session option {key}={value} (measured here: {cost:.2f}x the run time)",
                         "deploy on a CPU with VNNI (AVX-VNNI or AVX512-VNNI), whose integer kernels do not saturate",
                         "keep the saturating layers in float (no output QuantizeLinear after them)"],
        }
        return checks, section
    return None
