"""What ``--verify`` costs (issue 13): seconds and peak memory of qdqfold.verify on a synthetic VGG-BN model,
with everything (twin, certificates, optimisations off and default) and with the checks the former verify
made (one input set, optimisations off, no twin, no certificates), each in a fresh process.

Usage: ``python bench/verify_cost.py [KIND] [SIZE_MB]`` (default ``vgg 300``; KIND as in make_models.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, resource, sys, time
import qdqfold_native
from qdqfold.verify import verify
src, dst, mode = sys.argv[1:4]
report = qdqfold_native.fold_file(src, dst)
kwargs = {} if mode == "full" else dict(input_sets=1, levels=("off",), twin=False, certificates=False)
start = time.perf_counter()
result = verify(src, dst, report=report, **kwargs)
print(json.dumps({"seconds": time.perf_counter() - start, "verdict": result.verdict,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "vgg"
    size = sys.argv[2] if len(sys.argv) > 2 else "300"
    with tempfile.TemporaryDirectory(prefix="qdqfold-verify-cost-") as tmp:
        src, dst = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model.folded.onnx")
        subprocess.run([sys.executable, os.path.join(HERE, "make_models.py"), kind, size, "-o", src], check=True)
        for mode in ("former", "full"):
            out = subprocess.run([sys.executable, "-c", _CHILD, src, dst, mode], check=True, capture_output=True,
                                 text=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            print(f"{kind} {size} MB, verify {mode:6s}: {figures['seconds']:.2f} s, peak {figures['peak_mb']:.0f} MB, "
                  f"verdict {figures['verdict']}")


if __name__ == "__main__":
    main()
