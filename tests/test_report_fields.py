"""The report's fields agree wherever they are written down.

The one definition is cpp/core/report_fields.h, shown by ``qdqfold_native.report_fields()``: the binding builds
its dicts by walking it, and the C++ structs (BatchNormRecord, Report, folds::Outcome) are checked against it
when they compile. These tests hold the rest to it: the dicts fold_with_report() and fold_file() actually
return, the stub's TypedDicts (python/qdqfold_native.pyi), the reader in python/qdqfold/report.py and the JSON
schema (docs/report.schema.json). A field added in one of these places and not in the others fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import qdqfold_native
from onnx import TensorProto, helper, numpy_helper

from qdqfold import report as report_py

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "python" / "qdqfold_native.pyi"
SCHEMA = ROOT / "docs" / "report.schema.json"

FIELDS = qdqfold_native.report_fields()
ENTRY = FIELDS["batchnorm"]  # key -> Python type, in the dict's order
REPORT = FIELDS["report"]  # key -> {"type", "fold_with_report", "fold_file"}, in the dict's order
CALLS = ("fold_with_report", "fold_file")


def _model() -> onnx.ModelProto:
    """x -> Conv -> BN (folds backward) -> Relu -> BN (kept: nothing to fold into), and a sum of two Conv branches
    over one input (merged with merge_branches=True, which gives the report its 'merges')."""
    rng = np.random.default_rng(16)
    c = 4
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def bn(name, x, y):
        params = [const(name + "_s", rng.uniform(0.5, 2, c)), const(name + "_b", rng.normal(size=c)),
                  const(name + "_m", rng.normal(size=c)), const(name + "_v", rng.uniform(0.5, 2, c))]
        nodes.append(helper.make_node("BatchNormalization", [x, *params], [y], name=name))

    def conv(name, x, y, k):
        nodes.append(helper.make_node("Conv", [x, const(name + "_w", rng.normal(size=(c, c, k, k)))], [y], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4))

    conv("conv", "x", "c", 3)
    bn("bn_folded", "c", "b")
    nodes.append(helper.make_node("Relu", ["b"], ["r"], name="relu"))
    bn("bn_kept", "r", "k")
    conv("branch3", "k", "k3", 3)
    conv("branch1", "k", "k1", 1)
    nodes.append(helper.make_node("Add", ["k3", "k1"], ["y"], name="sum"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _external(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    return path


# Each Python type report_fields() names, as a check of a value. A type the table gains must be added here.
CHECKS = {
    "str": lambda v: isinstance(v, str),
    "str | None": lambda v: v is None or isinstance(v, str),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
    "bool": lambda v: isinstance(v, bool),
    "bool | str": lambda v: isinstance(v, bool) or v == "bias-rounded",
    "dict[str, float]": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, float)
                                                            for k, x in v.items()),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "list[BatchNormEntry]": lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
    "OpTypes": lambda v: isinstance(v, dict) and set(v) == {"before", "after"},
    "list[FoldAttempt]": lambda v: isinstance(v, list) and all(
        isinstance(a, dict) and list(a) == ["rule", "verdict", "code", "message", "at", "option"]
        and a["verdict"] in ("kept", "folded") and all(isinstance(a[k], str) for k in ("rule", "code", "message"))
        and all(a[k] is None or isinstance(a[k], str) for k in ("at", "option")) for a in v),
}


def _check_entry(entry: dict) -> None:
    assert list(entry) == list(ENTRY)  # the same keys, in the table's order
    for key, value in entry.items():
        assert CHECKS[ENTRY[key]](value), (key, value)


def _check_report(report: dict, call: str) -> None:
    expected = [k for k, f in REPORT.items()
                if f[call] == "always" or (f[call] == "non-empty" and report.get(k))]
    assert sorted(report) == sorted(expected), call
    for key, value in report.items():
        assert CHECKS[REPORT[key]["type"]](value), (call, key, value)
        assert REPORT[key][call] != "non-empty" or value, (call, key)  # never present but empty
    for entry in report["batchnorms"] + report.get("merges", []):
        _check_entry(entry)


def test_the_table_names_each_field_once_with_a_known_type_and_presence():
    assert ENTRY and REPORT
    assert set(ENTRY.values()) <= set(CHECKS), set(ENTRY.values()) - set(CHECKS)
    assert {f["type"] for f in REPORT.values()} <= set(CHECKS)
    for field in REPORT.values():
        assert {field[call] for call in CALLS} <= {"always", "non-empty", "never"}


@pytest.mark.parametrize("options", [{}, {"merge_branches": True}])
def test_fold_with_report_dicts_follow_the_table(tmp_path, options):
    _, report = qdqfold_native.fold_with_report(_model().SerializeToString(), **options)
    _check_report(report, "fold_with_report")
    assert {e["node"]: e["folded"] for e in report["batchnorms"]} == {"bn_folded": True, "bn_kept": False}
    assert ("merges" in report) == bool(options)
    # With external data read: input_files too.
    path = _external(tmp_path)
    _, report = qdqfold_native.fold_with_report(path.read_bytes(), base_directory=tmp_path, **options)
    _check_report(report, "fold_with_report")
    assert report["input_files"]


@pytest.mark.parametrize("options", [{}, {"merge_branches": True}])
@pytest.mark.parametrize("dry_run", [False, True])
def test_fold_file_dicts_follow_the_table(tmp_path, options, dry_run):
    path = _external(tmp_path)
    report = qdqfold_native.fold_file(path, None if dry_run else tmp_path / "out.onnx", **options)
    _check_report(report, "fold_file")
    assert ("merges" in report) == bool(options)
    assert bool(report["data_files"]) != dry_run


def _stub_typed_dicts() -> dict[str, dict[str, str]]:
    """Each TypedDict of the stub: {key: annotation}, its bases' keys included."""
    classes = {n.name: n for n in ast.parse(STUB.read_text()).body if isinstance(n, ast.ClassDef)}

    def keys(name: str) -> dict[str, str]:
        node, out = classes[name], {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(keys(base.id))
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign):
                assert statement.target.id not in out, f"{name}.{statement.target.id} overrides a base's key"
                out[statement.target.id] = ast.unparse(statement.annotation)
        return out

    return {name: keys(name) for name, node in classes.items()
            if any(ast.unparse(b) == "TypedDict" or ast.unparse(b) in classes for b in node.bases)}


def _expected_stub(call: str) -> dict[str, str]:
    return {k: (f["type"] if f[call] == "always" else f"NotRequired[{f['type']}]")
            for k, f in REPORT.items() if f[call] != "never"}


def test_the_stub_declares_every_field_with_its_type():
    stub = _stub_typed_dicts()
    assert stub["BatchNormEntry"] == ENTRY
    assert stub["Report"] == _expected_stub("fold_with_report")  # what fold_with_report returns
    assert stub["FileReport"] == _expected_stub("fold_file")  # what fold_file returns
    _, report = qdqfold_native.fold_with_report(_model().SerializeToString())
    assert set(stub["OpTypes"]) == set(report["op_types"])


def test_report_py_reads_every_field():
    # Each entry: the dataclass has every key of the table, with the same type.
    assert {f.name: f.type for f in dataclasses.fields(report_py.BatchNormEntry)} == ENTRY
    # The report: FoldReport keeps some keys and says which it leaves to others; together they are the table's.
    kept = {f.name for f in dataclasses.fields(report_py.FoldReport)}
    assert not kept & report_py.NATIVE_KEYS_NOT_KEPT
    assert kept | report_py.NATIVE_KEYS_NOT_KEPT == set(REPORT)


def test_report_py_reads_actual_reports(tmp_path):
    path = _external(tmp_path)
    native = qdqfold_native.fold_file(path, tmp_path / "out.onnx", merge_branches=True, target="onnxruntime")
    folded = report_py.FoldReport.from_native(native)
    for name in (f.name for f in dataclasses.fields(report_py.FoldReport)):
        value = getattr(folded, name)
        if isinstance(value, list) and value and isinstance(value[0], report_py.BatchNormEntry):
            value = [dataclasses.asdict(e) for e in value]
        assert value == native[name], name
    assert folded.merges and folded.data_files and folded.target_layers
    # to_dict's document reads back the same.
    assert report_py.FoldReport.from_dict(folded.to_dict()) == folded


@pytest.mark.parametrize("call", CALLS)
def test_target_fields_follow_the_table(tmp_path, call):
    """target="onnxruntime" gives the report its target, target_layers (entries of the same form) and
    target_kernels (an OpTypes dict)."""
    if call == "fold_with_report":
        _, report = qdqfold_native.fold_with_report(_model().SerializeToString(), target="onnxruntime")
    else:
        report = qdqfold_native.fold_file(_external(tmp_path), None, target="onnxruntime")
    _check_report(report, call)
    assert report["target"] == "onnxruntime" and report["target_kernels"]["after"]
    for entry in report["target_layers"]:
        _check_entry(entry)


def test_the_json_schema_describes_every_entry_field():
    batchnorm = json.loads(SCHEMA.read_text())["$defs"]["batchnorm"]
    assert set(batchnorm["required"]) == set(ENTRY)
    assert set(batchnorm["properties"]) == set(ENTRY)
