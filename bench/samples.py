"""What each BatchNormalization folder leaves behind on the exporter-made sample models (tests/models).

For every sample and tool: BatchNormalization nodes left / before (and per-channel Mul/Add/Sub/Div after a
layer, FrozenBatchNorm2d's form, where a model has them), and the max |output deviation| from the original, both judged by onnxruntime with graph optimizations off on one seeded random input. Every tool
run and every check is a fresh child process (bench/tools.py), so a tool that crashes shows as `failed`.

    python bench/samples.py                        # the float samples, every installed tool
    python bench/samples.py --models qat_seed_prebn,ortq_seed_prebn_pc --tools qdqfold,onnxruntime
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
TOOLS_SCRIPT = BENCH_DIR / "tools.py"
SAMPLES = REPO_DIR / "tests" / "models"
DEFAULT_MODELS = "unet_up,arcface_head,input_bn_net,seed_prebn,bn_conv_cases"
DEFAULT_TOOLS = "qdqfold,onnxruntime,onnxoptimizer,onnxsim,onnxslim,onnxscript"


def _child(args: list[str], env: dict) -> tuple[bool, str]:
    p = subprocess.run([sys.executable, str(TOOLS_SCRIPT), *args], env=env, capture_output=True, text=True)
    lines = (p.stderr or p.stdout).strip().splitlines()
    return p.returncode == 0, (lines[-1][:60] if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help="sample names (without .onnx), comma-separated; 'all' for every model in --models-dir")
    parser.add_argument("--models-dir", type=Path, default=SAMPLES,
                        help="where the models are (default tests/models; tools/exporter_fixtures.py writes the "
                             "exporter patterns' fixtures)")
    parser.add_argument("--tools", default=DEFAULT_TOOLS, help="tools of bench/tools.py, comma-separated")
    parser.add_argument("--native-path", action="append", default=[],
                        help="put DIR on the children's PYTHONPATH (e.g. a build dir holding qdqfold_native)")
    args = parser.parse_args()
    env = dict(os.environ)
    paths = args.native_path + [str(REPO_DIR / "python")] + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    models = sorted(p.stem for p in args.models_dir.glob("*.onnx")) if args.models == "all" else args.models.split(",")
    tools = args.tools.split(",")

    cells: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="qdqfold-samples-") as tmp:
        work = Path(tmp)
        result = work / "result.json"
        for model in models:
            src = args.models_dir / f"{model}.onnx"
            ref = work / f"{model}.ref.npz"
            ok, note = _child(["reference", str(src), str(ref), str(result)], env)
            if not ok:
                raise SystemExit(f"{model}: the original does not run: {note}")
            reference = json.loads(result.read_text())
            total, affines = reference["bn"], reference.get("affine", 0)
            for tool in tools:
                dst = work / f"{model}.{tool}.onnx"
                ok, note = _child(["run", tool, str(src), str(dst), str(result)], env)
                if ok:
                    ok, note = _child(["verify", str(dst), str(ref), str(result)], env)
                if not ok:
                    cells[model, tool] = f"failed: {note}"
                    continue
                check = json.loads(result.read_text())
                left = f"{check['bn_left']}/{total}"
                if affines:  # Mul/Add/Sub/Div affines after a layer, counted beside the BNs
                    left += f" + {check['affine_left']}/{affines} Mul/Add"
                cells[model, tool] = f"{left} ({check['max_dev']:.1g})"
    print("| model | " + " | ".join(tools) + " |")
    print("|---" * (len(tools) + 1) + "|")
    for model in models:
        print(f"| {model} | " + " | ".join(cells[model, t] for t in tools) + " |")


if __name__ == "__main__":
    main()
