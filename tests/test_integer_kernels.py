"""The integer kernels onnxruntime forms after a fold, and what they do on CPUs without VNNI (issue 21).

The static check (qdqfold_native.integer_kernels) is tested on layers whose pair sums sit just inside or just
outside int16, and its list of layers against the QLinearConv onnxruntime really forms. What the kernels do on
a CPU is measured where it can be: on this machine (every layer that moves alone must be flagged, whatever the
CPU), and on an AVX2-only CPU emulated by qemu-x86_64 (-cpu EPYC-Rome: AVX2, no AVX-512, no VNNI), where
--verify must call the fold exact and name the saturating layers."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold import kernels
from qdqfold.verify import verify

from helpers.qdq import quantized_units
from helpers.samples import MODELS

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _qdq_conv(w: np.ndarray, group: int = 1, output_q: bool = True, relu_before: bool = False,
              act=TensorProto.INT8, weight_type=np.int8, relu_after: bool = False, out_zp: int = 0) -> onnx.ModelProto:
    """float x -> [Relu] -> Q -> DQ -> Conv(DQ(int W)) -> [Q -> DQ] -> y: one layer, a per-tensor activation
    quantizer, per-tensor weight scale."""
    c_in = w.shape[1] * group
    zp_act = np.array(0, np.int8 if act == TensorProto.INT8 else np.uint8)
    inits = [numpy_helper.from_array(w.astype(weight_type), "W"), numpy_helper.from_array(np.array(0.01, np.float32), "sw"),
             numpy_helper.from_array(np.zeros((), weight_type), "zw"),
             numpy_helper.from_array(np.array(0.05, np.float32), "sx"), numpy_helper.from_array(zp_act, "zx"),
             numpy_helper.from_array(np.array(0.1, np.float32), "sy"),
             numpy_helper.from_array(np.array(out_zp, zp_act.dtype), "zy")]
    nodes = []
    x = "x"
    if relu_before:
        nodes.append(helper.make_node("Relu", ["x"], ["xr"]))
        x = "xr"
    nodes += [helper.make_node("QuantizeLinear", [x, "sx", "zx"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
              helper.make_node("DequantizeLinear", ["W", "sw", "zw"], ["wd"]),
              helper.make_node("Conv", ["xd", "wd"], ["c"], name="layer", group=group)]
    out = "c"
    if relu_after:
        nodes.append(helper.make_node("Relu", ["c"], ["cr"]))
        out = "cr"
    if output_q:
        nodes += [helper.make_node("QuantizeLinear", [out, "sy", "zy"], ["cq"]),
                  helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 4, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _pair_weight(a: int, b: int, c_out: int = 4) -> np.ndarray:
    """[c_out, 2, 1, 1]: the two input channels are one pair of the reduction in every output channel."""
    w = np.zeros((c_out, 2, 1, 1), np.int64)
    w[:, 0, 0, 0], w[:, 1, 0, 0] = a, b
    return w


@pytest.mark.parametrize("a, b, saturates", [
    (65, 64, True),     # 255 * 129 = 32895 > 32767
    (64, 64, False),    # 255 * 128 = 32640
    (-65, -64, True),   # -32895 < -32768
    (-64, -64, False),
    (127, -128, False),  # opposite signs never add up
    (127, 2, True),
])
def test_the_static_check_bounds_each_pair_against_int16(a, b, saturates):
    layers = qdqfold_native.integer_kernels(_qdq_conv(_pair_weight(a, b)).SerializeToString())
    assert [lay["node"] for lay in layers] == ["layer"]
    lay = layers[0]
    assert lay["kernel"] == "QLinearConv" and lay["activation_range"] == (0, 255)  # int8 runs shifted
    assert lay["can_saturate"] is saturates
    assert lay["channels"] == (4 if saturates else 0)
    assert lay["pair_max"] == 255 * (max(a, 0) + max(b, 0))
    assert lay["pair_min"] == 255 * (min(a, 0) + min(b, 0))


def test_a_relu_before_the_quantizer_narrows_the_activation_range():
    # Relu -> Q(zero point 0, int8): the integers are 0..127, bytes 128..255 after onnxruntime's shift.
    layers = qdqfold_native.integer_kernels(_qdq_conv(_pair_weight(65, 64), relu_before=True).SerializeToString())
    assert layers[0]["activation_range"] == (128, 255) and layers[0]["can_saturate"]
    layers = qdqfold_native.integer_kernels(_qdq_conv(_pair_weight(-65, 64), relu_before=True).SerializeToString())
    # Each product at its own extreme over bytes 128..255; the largest sum is the second pairing's (64, padding).
    assert layers[0]["pair_min"] == -65 * 255 + 64 * 128 and layers[0]["pair_max"] == 64 * 255


def test_depthwise_uint8_weight_and_float_output_layers():
    depthwise = np.full((4, 1, 3, 3), 127, np.int64)
    lay = qdqfold_native.integer_kernels(_qdq_conv(depthwise, group=4).SerializeToString())[0]
    assert not lay["can_saturate"] and "depthwise" in lay["why_not"] and lay["pair_max"] > 32767
    lay = qdqfold_native.integer_kernels(
        _qdq_conv(_pair_weight(200, 200), weight_type=np.uint8).SerializeToString())[0]
    assert lay["weight"] == "uint8" and not lay["can_saturate"] and lay["why_not"]
    # No QuantizeLinear after the Conv: onnxruntime keeps it in float, and the check lists nothing.
    assert qdqfold_native.integer_kernels(_qdq_conv(_pair_weight(65, 64), output_q=False).SerializeToString()) == []


@pytest.mark.skipif(not X86, reason="which layers onnxruntime fuses with int8 activations differs off x86-64")
@pytest.mark.parametrize("act, zp, fused", [(TensorProto.UINT8, 0, True), (TensorProto.INT8, -128, True),
                                            (TensorProto.INT8, 0, False)])
def test_a_relu_before_the_output_quantizer_is_fused_only_at_the_types_minimum(act, zp, fused):
    """onnxruntime removes Relu -> Q only where Q's zero point is its type's minimum (ReluQuantFusion)."""
    data = _qdq_conv(_pair_weight(65, 64), act=act, relu_after=True, out_zp=zp).SerializeToString()
    listed = qdqfold_native.integer_kernels(data)
    assert len(listed) == quantized_units(data) == int(fused)


@pytest.mark.skipif(not X86, reason="which layers onnxruntime fuses with int8 activations differs off x86-64")
@pytest.mark.parametrize("name", ["qat_input_bn_net.onnx", "qat_seed_prebn.onnx", "ortq_seed_prebn_pc.onnx",
                                  "ortq_seed_prebn_pt.onnx", "qat_bn_conv_cases.onnx", "qat_arcface_head.onnx"])
def test_the_layers_listed_are_the_integer_kernels_onnxruntime_forms(name):
    for data in ((MODELS / name).read_bytes(), qdqfold_native.fold((MODELS / name).read_bytes())):
        listed = qdqfold_native.integer_kernels(data)
        assert len(listed) == quantized_units(data), [lay["node"] for lay in listed]


def test_every_layer_that_moves_alone_on_this_cpu_is_flagged():
    """Measured on this machine's CPU: any integer layer whose kernel output differs from the 16-bit precision
    kernel's must have been flagged by the static check (on a CPU with VNNI nothing moves)."""
    data = qdqfold_native.fold((MODELS / "qat_input_bn_net.onnx").read_bytes())
    model = onnx.load_from_string(data)
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    measured = kernels.measure(model, None, feeds)
    assert [m["node"] for m in measured] == [lay.node for lay in kernels.check_bytes(data)]
    assert all(m["elements"] > 0 for m in measured)
    for m in measured:
        assert m["moved"] == 0 or m["can_saturate"], m


def _unnamed_conv_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array((rng.random(8) + 0.5).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "m"),
             numpy_helper.from_array((rng.random(8) + 0.5).astype(np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_certificates_do_not_depend_on_node_names():
    model = _unnamed_conv_bn()
    data = model.SerializeToString()
    folded, report = qdqfold_native.fold_with_report(data)
    result = verify(data, folded, report=report, levels=("off",))
    assert result.verdict == "exact" and len(result.certificates) == 1 and not result.uncertified
    # A wrong fold of the same unnamed layers is caught by that certificate.
    broken = onnx.load_from_string(folded)
    bias = next(t for t in broken.graph.initializer if t.name.endswith("_bnfolded"))
    values = numpy_helper.to_array(bias).copy()
    values[3] += 0.05 * (np.abs(values).max() + 1)
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    bad = verify(data, broken.SerializeToString(), report=report, levels=("off",))
    assert bad.verdict == "differs" and not bad.certificates[0].passed and bad.certificates[0].channel == 3


def _qemu_avx2() -> list[str] | None:
    qemu = shutil.which("qemu-x86_64")
    # Under the sanitizer build (tools/sanitize.sh LD_PRELOADs ASan) the emulated interpreter is killed: ASan's
    # shadow memory does not map under qemu-user. The plain suite runs this test.
    if not X86 or qemu is None or os.environ.get("QDQFOLD_SANITIZED"):
        return None
    return [qemu, "-cpu", "EPYC-Rome", sys.executable]


@pytest.mark.skipif(_qemu_avx2() is None, reason="needs qemu-x86_64 (Debian's qemu-user) on x86-64: .ci/run installs it")
def test_on_an_avx2_only_cpu_verify_calls_the_fold_exact_and_names_the_saturating_layers(tmp_path):
    out = tmp_path / "o.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    done = subprocess.run([*_qemu_avx2(), "-m", "qdqfold", str(MODELS / "qat_input_bn_net.onnx"), "-o", str(out),
                           "--verify", "--json", "--strict-kernels"], capture_output=True, text=True, timeout=900,
                          env=env)
    assert done.returncode == 4, done.stderr[-2000:]  # exact fold (not 3), kernels saturate (--strict-kernels)
    document = json.loads(done.stdout)
    v = document["verify"]
    assert v["verdict"] == "exact" and v["passed"] and v["kernel_warning"]
    k = v["kernels"]
    assert k["option"] == "session.x64quantprecision=1" and k["level"] == "default"
    # The deployed model moves beyond the floor; the fold under the option does not.
    assert all(o["of_range"] > o["with_option_of_range"] for o in k["outputs"])
    moved = {lay["node"] for lay in k["layers"] if lay["moved"]}
    flagged = {lay["node"] for lay in document["integer_kernels"]["layers"] if lay["can_saturate"]}
    assert moved and moved <= flagged  # every layer that saturates there was flagged statically
    assert "saturate" in done.stderr and "/c1/Conv" in done.stderr
