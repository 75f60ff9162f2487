"""The wire core and the native module: byte-identical pass-through, report shape, options, inputs."""

from __future__ import annotations

import mmap
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native

from helpers.samples import SAMPLE_MODELS


def test_sample_models_come_back_byte_identical_when_nothing_folds(sample_model_path):
    data = sample_model_path.read_bytes()
    # With both fold directions off nothing may change: the output is the input, byte for byte.
    out = qdqfold_native.fold(data, fold_backward=False, fold_forward=False)
    assert out == data


def test_report_lists_every_batchnorm_with_a_reason(sample_model_path):
    data = sample_model_path.read_bytes()
    model = onnx.load_from_string(data)
    _, report = qdqfold_native.fold_with_report(data, fold_backward=False, fold_forward=False)
    bn_names = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert [r["node"] for r in report["batchnorms"]] == bn_names
    for entry in report["batchnorms"]:
        assert entry["folded"] is False
        assert entry["code"] and entry["message"]
        assert entry["graph"] == "main"


def _every_field_kind_model() -> onnx.ModelProto:
    """A model that uses every kind of field: attributes of every type, subgraphs, functions, metadata,
    external-data references, sparse initializers, doc strings and value_info."""
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["then_out"])], "then",
        [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2])])
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"])], "else",
        [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])])
    tensor_attr = numpy_helper.from_array(np.arange(3, dtype=np.float32), "t_attr")
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "sv"),
        numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "si"), [4])
    custom = helper.make_node(
        "Custom", ["x"], ["custom_out"], domain="test.domain", name="custom",
        f=1.5, i=3, s=b"bytes", t=tensor_attr, floats=[1.0, 2.0], ints=[1, 2, 3], strings=[b"a", b"b"],
        tensors=[tensor_attr], g=then_graph, graphs=[then_graph, else_graph], sparse_tensor=sparse,
        sparse_tensors=[sparse], tp=helper.make_tensor_type_proto(TensorProto.FLOAT, [2]),
        type_protos=[helper.make_tensor_type_proto(TensorProto.INT8, [1])], doc_string="a custom node")
    if_node = helper.make_node("If", ["cond"], ["if_out"], then_branch=then_graph, else_branch=else_graph)
    external = TensorProto(name="ext_weight", data_type=TensorProto.FLOAT, dims=[4])
    for key, value in {"location": "weights.bin", "offset": "0", "length": "16"}.items():
        entry = external.external_data.add()
        entry.key, entry.value = key, value
    external.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [custom, if_node], "every_field",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("if_out", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.ones(2, dtype=np.float16), "half"), external],
        value_info=[helper.make_tensor_value_info("custom_out", TensorProto.FLOAT, ["N"])],
        doc_string="graph doc", sparse_initializer=[sparse])
    fn = helper.make_function("test.domain", "MyFn", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)], ["alpha"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.domain", 1)],
                              functions=[fn], producer_name="qdqfold-tests", doc_string="model doc")
    helper.set_model_props(model, {"author": "tests", "purpose": "round trip"})
    return model


def test_every_field_kind_comes_back_byte_identical():
    data = _every_field_kind_model().SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    assert out == data
    assert report["batchnorms"] == []


def test_unknown_fields_pass_through_byte_identical():
    data = _every_field_kind_model().SerializeToString()
    # Append an unknown field (number 999, varint) to the ModelProto: protobuf keeps unknown fields, so must we.
    unknown = bytes([0xB8, 0x3E, 0x05])  # tag (999 << 3 | 0) as varint, value 5
    data_with_unknown = data + unknown
    assert qdqfold_native.fold(data_with_unknown) == data_with_unknown


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "mmap"])
def test_fold_takes_any_bytes_like(kind, tmp_path):
    data = SAMPLE_MODELS[0].read_bytes()
    if kind == "bytes":
        arg = data
    elif kind == "bytearray":
        arg = bytearray(data)
    elif kind == "memoryview":
        arg = memoryview(data)
    else:
        path = tmp_path / "m.onnx"
        path.write_bytes(data)
        f = open(path, "rb")
        arg = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = qdqfold_native.fold(arg, fold_backward=False, fold_forward=False)
    assert isinstance(out, bytes) and out == data


def test_fold_rejects_a_str_path_and_unknown_options():
    with pytest.raises(TypeError, match="not a str path"):
        qdqfold_native.fold("model.onnx")
    with pytest.raises(TypeError, match="unknown option 'fold_everything'"):
        qdqfold_native.fold(b"", fold_everything=True)
    with pytest.raises(TypeError, match="takes True or False"):
        qdqfold_native.fold(b"", pad_correction=1)


def test_module_surface():
    assert isinstance(qdqfold_native.__version__, str) and qdqfold_native.__version__.count(".") == 2
    assert issubclass(qdqfold_native.FoldError, ValueError)
    options = qdqfold_native.options()
    assert options["fold_backward"] is True and options["drop_activation_quantizers"] is False


@pytest.mark.parametrize("order", [["onnx", "onnxruntime", "qdqfold_native"],
                                   ["qdqfold_native", "onnxruntime", "onnx"],
                                   ["onnxruntime", "qdqfold_native", "onnx"]])
def test_imports_in_any_order_share_one_process(order):
    code = "\n".join(f"import {m}" for m in order) + (
        "\nimport onnx, qdqfold_native"
        "\nm = onnx.helper.make_model(onnx.helper.make_graph([], 'g', [], []))"
        "\nassert qdqfold_native.fold(m.SerializeToString()) == m.SerializeToString()"
        "\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
