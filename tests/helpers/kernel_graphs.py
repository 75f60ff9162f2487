"""Small QDQ graphs, one per rule of onnxruntime's integer-kernel formation (the rules cpp/predict/ models).

`Net` builds a graph a step at a time: an activation quantizer (`Net.act`), an integer weight behind its
DequantizeLinear (`Net.weight`), a layer, an output quantizer (`Net.quant`); `CASES` is the family the kernel
predictor is checked on against the model onnxruntime saves (tests/test_kernel_predictor.py). Every case has
random weights (a fixed seed) and per-tensor activation quantizers with constant scalar parameters.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

NP = {T.INT8: np.int8, T.UINT8: np.uint8}
C = 4


class Net:
    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str | tuple[str, int]] = []
        self.opset = opset
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def const(self, value, stem: str = "c") -> str:
        name = self.name(stem)
        self.inits.append(nh.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs, stem: str | None = None, **attrs) -> str:
        out = self.name(stem or op.lower())
        self.nodes.append(h.make_node(op, list(inputs), [out], name=out + "_node", **attrs))
        return out

    def input(self, shape=(1, C, 6, 6)) -> str:
        name = self.name("x")
        self.inputs.append(h.make_tensor_value_info(name, T.FLOAT, list(shape)))
        return name

    def quantize(self, x: str, scale=0.05, zero=0, qtype=T.INT8) -> tuple[str, str, str]:
        s, z = self.const(np.float32(scale), "s"), self.const(NP[qtype](zero), "z")
        return self.node("QuantizeLinear", [x, s, z], "q"), s, z

    def act(self, x: str, scale=0.05, zero=0, qtype=T.INT8) -> str:
        """x -> Q -> DQ: the DequantizeLinear's output."""
        q, s, z = self.quantize(x, scale, zero, qtype)
        return self.node("DequantizeLinear", [q, s, z], "dq")

    def weight(self, shape, per_channel=True, axis=0, wtype=T.INT8) -> str:
        lo, hi = (-127, 128) if wtype == T.INT8 else (0, 256)
        w = self.const(self.rng.integers(lo, hi, shape).astype(NP[wtype]), "w")
        n = shape[axis] if per_channel else 1
        scales = self.rng.uniform(0.002, 0.004, n).astype(np.float32)
        zeros = np.full(n, 0 if wtype == T.INT8 else 128, NP[wtype])
        s = self.const(scales if per_channel else scales[0], "sw")
        z = self.const(zeros if per_channel else zeros[0], "zw")
        return self.node("DequantizeLinear", [w, s, z], "wd", **({"axis": axis} if per_channel else {}))

    def int32_bias(self, x_scale: float, w: str, n: int) -> str:
        """An int32 bias behind a DequantizeLinear at scale x_scale * 0.003 (per tensor)."""
        b = self.const(self.rng.integers(-500, 500, n).astype(np.int32), "b")
        s = self.const(np.float32(x_scale * 0.003), "sb")
        return self.node("DequantizeLinear", [b, s], "bd")

    def conv(self, x: str, bias=None, per_channel=True, wtype=T.INT8) -> str:
        inputs = [x, self.weight((C, C, 3, 3), per_channel, 0, wtype)]
        if bias == "float":
            inputs.append(self.const((self.rng.standard_normal(C) * 0.3).astype(np.float32), "b"))
        return self.node("Conv", inputs, "conv", pads=[1, 1, 1, 1])

    def matmul(self, x: str) -> str:
        return self.node("MatMul", [x, self.weight((8, 6), True, 1)], "mm")

    def gemm(self, x: str, bias=None, x_scale=0.05, **attrs) -> str:
        inputs = [x, self.weight((6, 8), True, 0)]
        if bias == "int32":
            inputs.append(self.int32_bias(x_scale, inputs[1], 6))
        elif bias == "float":
            inputs.append(self.const((self.rng.standard_normal(6) * 0.3).astype(np.float32), "b"))
        return self.node("Gemm", inputs, "gemm", transB=1, **attrs)

    def quant(self, y: str, scale=0.04, zero=0, qtype=T.INT8) -> str:
        return self.act(y, scale, zero, qtype)

    def clip(self, x: str, lo, hi) -> str:
        ins = [x, self.const(np.float32(lo), "lo") if lo is not None else "",
               self.const(np.float32(hi), "hi") if hi is not None else ""]
        while ins and ins[-1] == "":
            ins.pop()
        return self.node("Clip", ins, "clip")

    def output(self, *names) -> None:
        """Graph outputs: names of float values, or (name, element type)."""
        self.outputs.extend(names)

    def model(self) -> onnx.ModelProto:
        outs = [h.make_tensor_value_info(*(o if isinstance(o, tuple) else (o, T.FLOAT)), None) for o in self.outputs]
        graph = h.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        return h.make_model(graph, opset_imports=[h.make_opsetid("", self.opset)])


def _conv_case(zero=0, qtype=T.INT8, chain=None, out_zero=None, out_scale=0.04, **conv):
    """x -> Q -> DQ -> Conv -> `chain` -> Q -> DQ -> y."""
    n = Net()
    y = n.conv(n.act(n.input(), zero=zero, qtype=qtype), **conv)
    if chain:
        y = chain(n, y)
    n.output(n.quant(y, out_scale, zero if out_zero is None else out_zero, qtype))
    return n.model()


def _shared_q(qtype):
    """One activation Q read by two DequantizeLinear nodes, each before its own conv."""
    n = Net()
    q, s, z = n.quantize(n.input(), qtype=qtype)
    for _ in range(2):
        d = n.node("DequantizeLinear", [q, s, z], "dq")
        n.output(n.quant(n.conv(d), qtype=qtype))
    return n.model()


def _shared_dq(qtype):
    """One activation Q -> DQ read by two convs (onnxruntime copies the DQ: the Q then has two readers)."""
    n = Net()
    d = n.act(n.input(), qtype=qtype)
    n.output(n.quant(n.conv(d), qtype=qtype), n.quant(n.conv(d), qtype=qtype))
    return n.model()


def _q_graph_output(qtype):
    n = Net()
    q, s, z = n.quantize(n.input(), qtype=qtype)
    d = n.node("DequantizeLinear", [q, s, z], "dq")
    n.output((q, qtype), n.quant(n.conv(d), qtype=qtype))
    return n.model()


def _output_q_shared(qtype):
    """The conv's output Q read by two DequantizeLinear nodes (int8: not converted, unlike the input's)."""
    n = Net()
    q, s, z = n.quantize(n.conv(n.act(n.input(), qtype=qtype)), 0.04, 0, qtype)
    for _ in range(2):
        n.output(n.node("Relu", [n.node("DequantizeLinear", [q, s, z], "dq")]))
    return n.model()


def _gemm(quantized_out, bias=None, qtype=T.INT8, beta=1.0, relu=False):
    n = Net()
    y = n.gemm(n.act(n.input((2, 8)), qtype=qtype), bias=bias, **({} if beta == 1.0 else {"beta": beta}))
    if relu:
        y = n.node("Relu", [y])
    n.output(n.quant(y, qtype=qtype) if quantized_out else y)
    return n.model()


def _matmul(quantized_out, qtype=T.INT8, relu=False):
    n = Net()
    y = n.matmul(n.act(n.input((2, 8)), qtype=qtype))
    if relu:
        y = n.node("Relu", [y])
    n.output(n.quant(y, qtype=qtype) if quantized_out else y)
    return n.model()


def _binary(op, qtype=T.INT8, out_q=True, same_scale=False):
    n = Net()
    a = n.act(n.input(), 0.05, 0, qtype)
    b = n.act(n.input(), 0.05 if same_scale else 0.03, 0, qtype)
    y = n.node(op, [a, b] if op != "Concat" else [a, b], **({"axis": 1} if op == "Concat" else {}))
    n.output(n.quant(y, 0.07, 0, qtype) if out_q else y)
    return n.model()


def _integer_clip(qtype, lo, hi):
    """conv -> Q -> Clip(integers) -> DQ -> conv -> Q -> DQ: the Clip runs on the quantized tensor."""
    n = Net()
    q, s, z = n.quantize(n.conv(n.act(n.input(), qtype=qtype)), 0.04, 0 if qtype == T.INT8 else 128, qtype)
    c = n.node("Clip", [q, n.const(NP[qtype](lo), "lo"), n.const(NP[qtype](hi), "hi")], "iclip")
    d = n.node("DequantizeLinear", [c, s, z], "dq")
    n.output(n.quant(n.conv(d), qtype=qtype))
    return n.model()


def _two_output_q(same: bool, identical: bool = False):
    """A conv read by two QuantizeLinear nodes: the same inputs (onnxruntime merges the two), equal parameters in
    separate initializers, or different ones."""
    n = Net()
    y = n.conv(n.act(n.input()))
    if identical:
        s, z = n.const(np.float32(0.04), "s"), n.const(np.int8(0), "z")
        for _ in range(2):
            n.output(n.node("DequantizeLinear", [n.node("QuantizeLinear", [y, s, z], "q"), s, z], "dq"))
        return n.model()
    n.output(n.quant(y), n.quant(y, 0.04 if same else 0.03))
    return n.model()


def _shared_q_any(op, qtype=T.INT8):
    """Each input's Q read by two DequantizeLinear nodes (int8 pairs stay int8), into `op` and a Relu."""
    n = Net()
    dqs = []
    for _ in range(2):
        q, s, z = n.quantize(n.input((2, 8)), qtype=qtype)
        dqs.append(n.node("DequantizeLinear", [q, s, z], "dq"))
        n.output(n.node("Relu", [n.node("DequantizeLinear", [q, s, z], "dq")]))
    if op == "Gemm":
        y = n.gemm(dqs[0])
    else:
        y = n.node(op, dqs, **({"axis": 1} if op == "Concat" else {}))
    n.output(n.quant(y, 0.07, 0, qtype))
    return n.model()


def _relu_q_without_zero_point():
    """Conv -> Relu -> Q(scale only: uint8, zero point 0): the Relu stays until the selector absorbs it."""
    n = Net()
    y = n.node("Relu", [n.conv(n.act(n.input(), zero=128, qtype=T.UINT8))])
    s = n.const(np.float32(0.04), "s")
    n.output(n.node("DequantizeLinear", [n.node("QuantizeLinear", [y, s], "q"), s], "dq"))
    return n.model()


def _relu(n, y):
    return n.node("Relu", [y])


def _clip(lo, hi):
    return lambda n, y: n.clip(y, lo, hi)


U8 = T.UINT8
CASES = {
    "conv": lambda: _conv_case(),
    "conv-uint8": lambda: _conv_case(qtype=U8, zero=128),
    "conv-per-tensor-weight": lambda: _conv_case(per_channel=False),
    "conv-float-bias": lambda: _conv_case(bias="float"),
    "conv-uint8-weight": lambda: _conv_case(wtype=U8),
    "conv-uint8-act-uint8-weight": lambda: _conv_case(qtype=U8, zero=128, wtype=U8),
    "conv-no-output-q": lambda: (lambda n: (n.output(n.conv(n.act(n.input()))), n.model())[1])(Net()),
    "conv-mixed-output-type": lambda: _mixed(),
    "relu-int8-zp-128": lambda: _conv_case(chain=_relu, out_zero=-128),
    "relu-int8-zp0": lambda: _conv_case(chain=_relu),
    "relu-uint8-zp0": lambda: _conv_case(chain=_relu, qtype=U8, zero=128, out_zero=0),
    "clip-int8-zp-128-on-boundary": lambda: _conv_case(chain=_clip(0, 6), out_zero=-128, out_scale=6 / 255),
    "clip-int8-zp-128-narrower": lambda: _conv_case(chain=_clip(0, 6), out_zero=-128, out_scale=0.04),
    "clip-int8-zp0-relu6": lambda: _conv_case(chain=_clip(0, 6), out_scale=6 / 127),
    "clip-int8-zp0-wide": lambda: _conv_case(chain=_clip(-10, 10), out_scale=0.04),
    "clip-uint8-zp10-lower-bound": lambda: _conv_case(chain=_clip(-0.4, None), qtype=U8, zero=128, out_zero=10),
    "clip-uint8-zp10-inside": lambda: _conv_case(chain=_clip(-0.3, None), qtype=U8, zero=128, out_zero=10),
    "clip-no-bounds": lambda: _conv_case(chain=_clip(None, None)),
    "clip-int8-zp-128-min-within-half-step": lambda: _conv_case(chain=_clip(0.01, 20), out_zero=-128),
    "clip-int8-zp-128-min-beyond-half-step": lambda: _conv_case(chain=_clip(0.03, 20), out_zero=-128),
    "relu-q-without-zero-point": _relu_q_without_zero_point,
    "two-output-q-identical": lambda: _two_output_q(True, identical=True),
    "two-output-q-same": lambda: _two_output_q(True),
    "two-output-q-different": lambda: _two_output_q(False),
    "gemm-shared-q-int8": lambda: _shared_q_any("Gemm"),
    "add-shared-q-int8": lambda: _shared_q_any("Add"),
    "concat-shared-q-int8": lambda: _shared_q_any("Concat"),
    "add-shared-q-uint8": lambda: _shared_q_any("Add", U8),
    "shared-q-int8": lambda: _shared_q(T.INT8),
    "shared-q-uint8": lambda: _shared_q(U8),
    "shared-dq-int8": lambda: _shared_dq(T.INT8),
    "shared-dq-uint8": lambda: _shared_dq(U8),
    "q-graph-output-int8": lambda: _q_graph_output(T.INT8),
    "q-graph-output-uint8": lambda: _q_graph_output(U8),
    "output-q-shared-int8": lambda: _output_q_shared(T.INT8),
    "gemm-q": lambda: _gemm(True),
    "gemm-no-q": lambda: _gemm(False),
    "gemm-no-q-int32-bias": lambda: _gemm(False, "int32"),
    "gemm-q-int32-bias": lambda: _gemm(True, "int32"),
    "gemm-q-float-bias": lambda: _gemm(True, "float"),
    "gemm-no-q-float-bias": lambda: _gemm(False, "float"),
    "gemm-q-int32-bias-beta2": lambda: _gemm(True, "int32", beta=2.0),
    "gemm-no-q-uint8": lambda: _gemm(False, qtype=U8),
    "gemm-relu-no-q": lambda: _gemm(False, relu=True),
    "gemm-relu-q-kept": lambda: _gemm(True, relu=True),
    "gemm-relu-q-removed": lambda: _gemm(True, "float", qtype=U8, relu=True),
    "matmul-q": lambda: _matmul(True),
    "matmul-relu-q-kept": lambda: _matmul(True, relu=True),
    "matmul-no-q": lambda: _matmul(False),
    "matmul-relu-no-q": lambda: _matmul(False, relu=True),
    "matmul-uint8-no-q": lambda: _matmul(False, qtype=U8),
    "add": lambda: _binary("Add"),
    "add-uint8": lambda: _binary("Add", U8),
    "add-no-output-q": lambda: _binary("Add", out_q=False),
    "mul": lambda: _binary("Mul"),
    "concat": lambda: _binary("Concat"),
    "concat-uint8": lambda: _binary("Concat", U8),
    "integer-clip-uint8": lambda: _integer_clip(U8, 128, 255),
    "integer-clip-int8": lambda: _integer_clip(T.INT8, 0, 127),
}


def _mixed():
    """An int8 input quantizer with a uint8 output quantizer (int8 pairs run as uint8 on x86-64)."""
    n = Net()
    n.output(n.quant(n.conv(n.act(n.input())), 0.04, 128, U8))
    return n.model()
