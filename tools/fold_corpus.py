"""Folds every model of a corpus under every option set and prints one hash line per (model, options), to
prove a refactoring changes no output byte (compare two runs with `diff`):

    python tools/fold_corpus.py --make /tmp/corpus            # sample, example, exporter and bench models
    python tools/fold_corpus.py /tmp/corpus > before.txt      # on the old code
    python tools/fold_corpus.py /tmp/corpus > after.txt       # on the new code
    diff before.txt after.txt && echo identical

Each line: the model's path relative to the corpus, the option set's name, a hash of the folded model
(fold_file's output file and data files), and a hash of the report's per-BN outcomes. tools/record_folds.py
does the same for every fold the test suite runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPTION_SETS = {
    "default": {},
    "no-forward": {"fold_forward": False},
    "no-backward": {"fold_backward": False},
    "no-affine": {"fold_affine": False},
    "pad": {"pad_correction": True},
    "opset": {"allow_opset_upgrade": True},
    "zero-point": {"allow_nonzero_zero_point": True},
    "materialize": {"materialize_quantized_weights": True},
    "drop-aq": {"drop_activation_quantizers": True},
    "freeze": {"freeze_initializer_inputs": True},
    "merge": {"merge_branches": True},
    "merge-requant": {"merge_branches": True, "requantize_merged": True},
    "everything": {"pad_correction": True, "allow_opset_upgrade": True, "allow_nonzero_zero_point": True,
                   "freeze_initializer_inputs": True, "merge_branches": True, "requantize_merged": True},
}

BENCH_KINDS = ("vgg", "resnet", "vgg-qat", "vgg-int", "resnet-qat", "resnet-int")


def make(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for name, source in (("tests-models", ROOT / "tests" / "models"), ("examples", ROOT / "examples"),
                         ("shared-models", ROOT.parent / "shared" / "models")):
        if source.is_dir():
            shutil.copytree(source, corpus / name, dirs_exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "tools" / "exporter_fixtures.py"), str(corpus / "exporters")],
                   check=True, stdout=subprocess.DEVNULL)
    bench = corpus / "bench"
    bench.mkdir(exist_ok=True)
    for kind in BENCH_KINDS:
        for seed in (0, 1):
            subprocess.run([sys.executable, str(ROOT / "bench" / "make_models.py"), kind, "3", "--seed", str(seed),
                            "-o", str(bench / f"{kind}-{seed}.onnx")], check=True, stdout=subprocess.DEVNULL)


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:20]


def outcome_rows(report: dict) -> list:
    """What the report says of each BN and of each merged sum (merge_branches): the fields a refactoring must
    keep (tools/record_folds.py compares the same rows)."""
    return [[entry.get(key) for key in ("graph", "node", "folded", "direction", "code", "message", "exact", "into")]
            for entries in ("batchnorms", "merges") for entry in report.get(entries, [])]


def outcomes(report: dict) -> str:
    return hashlib.sha256(json.dumps(outcome_rows(report), sort_keys=True, default=str).encode()).hexdigest()[:20]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--make", action="store_true", help="write the corpus into the directory first")
    args = parser.parse_args()
    if args.make:
        make(args.corpus)
        return 0
    import qdqfold_native

    models = sorted(p for p in args.corpus.rglob("*.onnx") if p.is_file())
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for name, options in OPTION_SETS.items():
                out = Path(tmp) / "out.onnx"
                try:
                    report = qdqfold_native.fold_file(str(model), str(out), force=True, **options)
                    files = [out] + [Path(p) for p in report.get("data_files", [])]
                    line = f"{digest(files)} {outcomes(report)}"
                except Exception as e:  # noqa: BLE001 - the error is the result to compare
                    line = f"error {type(e).__name__}: {e}"
                print(f"{model.relative_to(args.corpus)} {name} {line}", flush=True)
                for p in Path(tmp).iterdir():
                    p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
