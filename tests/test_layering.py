"""The C++ sources are layered: a file may include only files of its own layer or of a layer below it.

LAYERS below is the order, lowest first (written down here, checked on every `#include "..."` of cpp/). A row
with several layers holds siblings: each may include the rows below, neither may include the other (the two
fold directions share what they share through folds/common). A file that no layer claims fails the test, so
a new folder is placed on purpose.

    wire          the ONNX wire format (protobuf fields, reader, writer)
    kernels       scalar conversions, per-channel arithmetic, integer (de)quantization
    graph         the graph index: parse, query, edit, write
    core-basics   options and report types the folds fill in (core/options, core/report, core/report_fields),
                  and what a caller lends the folds (core/fold_hooks)
    folds/common  what every fold shares: the contract (fold.h, expected.h), reasons, edits, layer kinds,
                  proven shapes, and the graph-level helpers in folds/common/ (constants, ranks, conv geometry)
    folds/sources where (a, t) comes from: BatchNormalization, elementwise affine nodes
    folds/weights a layer's weight and how a per-channel factor enters it (reads BatchNormAffine)
    folds/directions/backward | folds/directions/forward   the folds, one direction each
    folds         the fold list (registry.cpp) and the branch merge (merge_branches/)
    predict       which integer kernels onnxruntime forms from a QDQ graph: one predictor, read by both rows above
                  (the target's kernel counts and the saturation check's layers), so it sits below them
    targets | analysis   what a runtime computes (onnxruntime); the integer-kernel analysis
    core          fold_model / fold_file: the driver and the file path
    platform      the file backends behind core/file_io.h
    bindings      the Python module
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Each layer: (name, patterns) where a pattern is a path under cpp/ (a folder ending in "/", or
# a file stem matching any extension). The first layer (in this order) with a matching pattern owns a file.
LAYERS: list[list[tuple[str, list[str]]]] = [
    [("wire", ["wire/"])],
    [("kernels", ["kernels/"])],
    [("graph", ["graph/"])],
    [("core-basics", ["core/options", "core/report", "core/report_fields", "core/fold_hooks"])],
    [("folds/common", ["folds/common/", "folds/fold", "folds/expected", "folds/reasons", "folds/edits",
                       "folds/layer_kinds", "folds/shapes", "folds/shapes_ops"])],
    [("folds/sources", ["folds/sources/"])],
    [("folds/weights", ["folds/weights/"])],
    [("folds/directions/backward", ["folds/directions/backward/"]),
     ("folds/directions/forward", ["folds/directions/forward/"])],
    [("folds", ["folds/"])],
    [("predict", ["predict/"])],
    [("targets", ["targets/"]), ("analysis", ["analysis/"])],
    [("core", ["core/"])],
    [("platform", ["platform/"])],
    [("bindings", ["bindings/"])],
]

SOURCE_SUFFIXES = {".h", ".hpp", ".cpp", ".cc"}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _matches(rel: str, pattern: str) -> bool:
    if pattern.endswith("/"):
        return rel.startswith(pattern)
    return rel.rsplit(".", 1)[0] == pattern


def layer_of(rel: str) -> tuple[int, str] | None:
    """(rank, layer name) of the file at `rel` (a path under cpp/), or None when no layer claims it."""
    for rank, row in enumerate(LAYERS):
        for name, patterns in row:
            if any(_matches(rel, p) for p in patterns):
                return rank, name
    return None


def _resolve(cpp: Path, source: Path, target: str) -> Path | None:
    for base in (source.parent, cpp):  # relative to the including file, then to cpp/ (the include path)
        candidate = (base / target).resolve()
        if candidate.is_file():
            return candidate
    return None


def violations(cpp: Path) -> list[str]:
    """Every include under `cpp` that goes up the layering or sideways between siblings, every include that
    names no file, and every file no layer claims: one line each."""
    cpp = cpp.resolve()
    found = []
    for source in sorted(p for p in cpp.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        rel = source.relative_to(cpp).as_posix()
        own = layer_of(rel)
        if own is None:
            found.append(f"{rel}: in no layer (add its folder to LAYERS in tests/test_layering.py)")
            continue
        for target in INCLUDE.findall(source.read_text(encoding="utf-8", errors="replace")):
            resolved = _resolve(cpp, source, target)
            if resolved is None or cpp not in resolved.parents:
                found.append(f'{rel}: #include "{target}" names no file under cpp/')
                continue
            trel = resolved.relative_to(cpp).as_posix()
            theirs = layer_of(trel)
            if theirs is None or theirs == own:
                continue  # an unclaimed target is reported as a file of its own
            if theirs[0] > own[0]:
                found.append(f'{rel} ({own[1]}) includes "{target}" of the higher layer {theirs[1]}')
            elif theirs[0] == own[0]:
                found.append(f'{rel} ({own[1]}) includes "{target}" of its sibling layer {theirs[1]}')
    return found


def test_cpp_includes_follow_the_layering():
    assert violations(ROOT / "cpp") == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    cpp = tmp_path / "cpp"
    for rel, text in files.items():
        (cpp / rel).parent.mkdir(parents=True, exist_ok=True)
        (cpp / rel).write_text(text)
    return cpp


def test_an_upward_include_fails(tmp_path):
    cpp = _tree(tmp_path, {
        "graph/graph.h": '#include "folds/fold.h"\n',
        "folds/fold.h": '#include "graph/graph.h"\n#include <vector>\n',
    })
    assert violations(cpp) == ['graph/graph.h (graph) includes "folds/fold.h" of the higher layer folds/common']


def test_an_include_between_the_directions_fails(tmp_path):
    cpp = _tree(tmp_path, {
        "folds/directions/forward/forward.h": '#include "folds/directions/backward/backward.h"\n',
        "folds/directions/backward/backward.h": '#include "../../fold.h"\n',
        "folds/fold.h": "",
    })
    assert violations(cpp) == [
        'folds/directions/forward/forward.h (folds/directions/forward) includes '
        '"folds/directions/backward/backward.h" of its sibling layer folds/directions/backward']


def test_a_fold_including_the_driver_fails_and_relative_paths_resolve(tmp_path):
    cpp = _tree(tmp_path, {
        "folds/directions/backward/conv_bn.cpp": '#include "../../registry.h"\n#include "../../common/values.h"\n',
        "folds/registry.h": "",
        "folds/common/values.h": "",
    })
    assert violations(cpp) == [
        'folds/directions/backward/conv_bn.cpp (folds/directions/backward) includes "../../registry.h" '
        'of the higher layer folds']


def test_an_unknown_folder_and_a_missing_file_fail(tmp_path):
    cpp = _tree(tmp_path, {"newthing/x.cpp": "", "graph/a.cpp": '#include "graph/missing.h"\n'})
    assert violations(cpp) == ['graph/a.cpp: #include "graph/missing.h" names no file under cpp/',
                               "newthing/x.cpp: in no layer (add its folder to LAYERS in tests/test_layering.py)"]


@pytest.mark.parametrize("rel, layer", [("folds/shapes.cpp", "folds/common"), ("folds/registry.cpp", "folds"),
                                        ("core/options.h", "core-basics"), ("core/api.cpp", "core")])
def test_files_land_in_their_layer(rel, layer):
    assert layer_of(rel)[1] == layer
