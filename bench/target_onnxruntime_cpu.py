"""The machine bench/target_onnxruntime.py runs on, and the targeted models on an emulated AVX2-only CPU.

``machine()``: lscpu's model name and which of the flags that decide onnxruntime's u8s8 kernels (avx2, avx512f,
avx512_vnni, avx_vnni) /proc/cpuinfo lists. ``on_avx2_only(qemu, models, feeds)``: each model runs at
onnxruntime's default level, one thread, here and under ``qemu -cpu EPYC-Rome`` (AVX2, no AVX-512, no VNNI),
there also with ``session.x64quantprecision=1`` (16-bit products: the kernels cannot saturate); per model and
output, the largest difference from this CPU's output as a share of its range and the elements that differ.
Where this CPU has VNNI its kernels do not saturate, so a difference is what the AVX2-only kernels do.

    python bench/target_onnxruntime_cpu.py --run DIR     # internal: run DIR/*.onnx on DIR/feeds.npz
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
CPU = "EPYC-Rome"


def machine() -> dict:
    name = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        pass
    try:
        words = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        words = []
    return {"model_name": name, "flags": {f: f in words for f in FLAGS}, "cores": os.cpu_count()}


def session_options(saved: str | None = None, quant_precision: bool = False):
    """The benches' onnxruntime options: default level, one thread, quiet; ``saved``: where onnxruntime writes the
    model it optimised; ``quant_precision``: ``session.x64quantprecision=1`` (16-bit products, no saturation)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if saved:
        so.optimized_model_filepath = saved
    if quant_precision:
        so.add_session_config_entry("session.x64quantprecision", "1")
    return so


def _outputs(path: Path, feeds: dict, option: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    so = session_options(quant_precision=option)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _run(folder: Path, option: bool) -> None:
    feeds = dict(np.load(folder / "feeds.npz"))
    tag = "option" if option else "default"
    for path in sorted(folder.glob("*.onnx")):
        outs = _outputs(path, feeds, option)
        np.savez(folder / f"{path.stem}.{tag}.npz", *outs)


def _compare(here: list[np.ndarray], there: list[np.ndarray]) -> dict:
    worst = {"of_range": 0.0, "max_abs": 0.0, "differ": 0, "elements": 0}
    for a, b in zip(here, there):
        span = float(a.max() - a.min()) or 1.0
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst["of_range"] = max(worst["of_range"], float(d.max()) / span)
        worst["max_abs"] = max(worst["max_abs"], float(d.max()))
        worst["differ"] += int((d > 0).sum())
        worst["elements"] += int(d.size)
    return {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in worst.items()}


def on_avx2_only(qemu: str, models: dict[str, bytes], feeds: dict) -> dict:
    """Per model: {"default": deviation under qemu at the default level, "option": the same with
    session.x64quantprecision=1}, each against this CPU's default-level outputs; or {"error": ...}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    with tempfile.TemporaryDirectory(prefix="qdqfold-avx2-") as tmp:
        folder = Path(tmp)
        np.savez(folder / "feeds.npz", **feeds)
        for name, data in models.items():
            (folder / f"{name}.onnx").write_bytes(data)
        results = {}
        for option in (False, True):
            flag = ["--option"] if option else []
            done = subprocess.run([qemu, "-cpu", CPU, sys.executable, __file__, "--run", str(folder), *flag],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        for name in models:
            here = _outputs(folder / f"{name}.onnx", feeds, False)
            results[name] = {}
            for tag in ("default", "option"):
                there = np.load(folder / f"{name}.{tag}.npz")
                results[name][tag] = _compare(here, [there[f"arr_{i}"] for i in range(len(there.files))])
        return results


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--run":
        _run(Path(sys.argv[2]), "--option" in sys.argv[3:])
        sys.exit(0)
    print(machine())
