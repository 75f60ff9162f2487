"""Unchanged bytes copied file to file (io::OutputFile::copy_from): on Linux, ranges of 1 MB and more at offsets
that are not page-aligned go through a pipe of qdqfold's own (splice), aligned ones through copy_file_range.
Whatever the way, the output is the bytes fold() gives in memory, and a write that fails inside such a range is
a FoldError naming the output, with no file left."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from helpers.folding import FOLD_FILE_UNDER_SIZE_LIMIT
from helpers.onnxrt import assert_same_outputs


def conv_bn_then_gemm(pad_name: str = "", fc: tuple[int, int] = (1100, 800)) -> onnx.ModelProto:
    """Conv -> BN (folded: 8 x 8 x 3 x 3 floats) -> Flatten -> Gemm whose weight (3.5 MB, unchanged) starts at
    an offset that depends on `pad_name`'s length, so that some layouts are page-aligned and most are not."""
    rng = np.random.default_rng(3)
    c, hw = 8, 10
    fin = c * hw * hw
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w" + pad_name),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var"),
             numpy_helper.from_array(rng.standard_normal((fc[0], fin)).astype(np.float32), "fc_a"),
             numpy_helper.from_array(rng.standard_normal((fc[1], fc[0])).astype(np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w" + pad_name], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
             helper.make_node("Flatten", ["b"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_a"], ["g"], transB=1),
             helper.make_node("Gemm", ["g", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, fc[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pad", [0, 1, 7, 100])
def test_large_unchanged_ranges_copy_to_the_bytes_fold_gives(tmp_path, pad):
    model = conv_bn_then_gemm("_" * pad)
    data = model.SerializeToString()
    (tmp_path / "m.onnx").write_bytes(data)
    report = qdqfold_native.fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert [b["folded"] for b in report["batchnorms"]] == [True]
    assert (tmp_path / "out.onnx").read_bytes() == qdqfold_native.fold(data)


def test_large_unchanged_ranges_of_an_external_data_file(tmp_path):
    """The data file keeps every offset: the stretches between folded tensors are copied from odd offsets."""
    model = conv_bn_then_gemm("_x")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    inline = qdqfold_native.fold(model.SerializeToString())
    w = model.graph.initializer[0]
    folded_size = int(np.prod(w.dims)) * 4
    onnx.save(onnx.load_from_string(model.SerializeToString()), src / "m.onnx", save_as_external_data=True,
              location="m.data", size_threshold=0)
    qdqfold_native.fold_file(src / "m.onnx", out / "m.onnx")
    folded, expected = onnx.load(out / "m.onnx").graph, onnx.load_from_string(inline).graph
    assert [n.SerializeToString() for n in folded.node] == [n.SerializeToString() for n in expected.node]
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in folded.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in expected.initializer}
    data_in, data_out = (src / "m.data").read_bytes(), (out / "m.onnx.data").read_bytes()
    assert len(data_in) == len(data_out)
    assert data_out[folded_size:] == data_in[folded_size:]  # everything after the folded weight, unchanged
    assert_same_outputs(model, onnx.load(out / "m.onnx"))


@pytest.mark.parametrize("limit", [1_000_000, 3_000_000, 5_000_000])
def test_a_write_that_fails_inside_a_copied_range_leaves_no_file(tmp_path, limit):
    """The file-size limit (as a full disk would) falls inside fc_a (3.5 MB, from about 2.3 KB on) or fc_b."""
    model = conv_bn_then_gemm("_y")
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(model, tmp_path / "in" / "m.onnx")
    done = subprocess.run([sys.executable, "-c", FOLD_FILE_UNDER_SIZE_LIMIT, str(tmp_path / "in" / "m.onnx"),
                           str(tmp_path / "out" / "folded.onnx"), str(limit)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert "folded.onnx: cannot write" in done.stdout
    assert list((tmp_path / "out").iterdir()) == []
