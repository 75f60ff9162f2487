"""The static saturation check (qdqfold_native.integer_kernels) against what onnxruntime's integer kernels do on
an AVX2-only CPU (issue 21).

For each model: fold it, list the integer layers the static check flags as able to saturate on x86-64 CPUs
without VNNI, then measure every integer layer alone (qdqfold.kernels.measure: its kernel at onnxruntime's
default level against the same kernel in 16-bit precision, session.x64quantprecision=1) on an emulated
AVX2-only CPU (qemu-x86_64 -cpu EPYC-Rome: AVX2, no AVX-512, no VNNI), on two kinds of input:

- random: standard normal inputs (what the generated net's quantizers were calibrated on);
- full-range: inputs uniform over the input quantizer's whole range.

Prints per model: integer layers, flagged, saturating (moved alone), saturating and flagged (the hit rate:
must be all), flagged but never saturating (false alarms). Models: the bundled samples with integer layers
after the fold, and a generated MobileNetV2-sized net (torchvision's MobileNetV2 widths, 52 convs, BN after
each, ReLU6 as Relu, uint8 activation quantizers after every activation as onnxruntime's quantize_static
writes them, per-channel int8 weights from He-initialised float weights behind Q -> DQ).

    python bench/saturation.py [--qemu qemu-x86_64] [--cpu EPYC-Rome] [--sets 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ["qat_input_bn_net.onnx", "qat_seed_prebn.onnx", "ortq_seed_prebn_pc.onnx", "ortq_seed_prebn_pt.onnx",
           "qat_bn_conv_cases.onnx", "qat_arcface_head.onnx"]

# torchvision MobileNetV2: (expansion t, channels c, repeats n, stride s)
_MBV2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class _Net:
    """A float MobileNetV2 with BN, then quantizers calibrated on random inputs."""

    def __init__(self, size: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.count = 0
        self.size = size
        self.act_points: list[str] = []  # values that get a uint8 activation quantizer (after Relu / Add)

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def conv_bn(self, x: str, c_in: int, c_out: int, k: int, stride: int, group: int, relu: bool) -> str:
        n = self.name("conv")
        fan_in = c_in // group * k * k
        w = (self.rng.standard_normal((c_out, c_in // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, f"{n}.w"))
        self.nodes.append(helper.make_node("Conv", [x, f"{n}.w"], [f"{n}.c"], name=f"/{n}/Conv", kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4, group=group))
        for p, v in (("g", self.rng.uniform(0.5, 1.5, c_out)), ("b", self.rng.normal(0, 0.1, c_out)),
                     ("m", self.rng.normal(0, 0.1, c_out)), ("v", self.rng.uniform(0.5, 1.5, c_out))):
            self.inits.append(numpy_helper.from_array(v.astype(np.float32), f"{n}.{p}"))
        self.nodes.append(helper.make_node("BatchNormalization", [f"{n}.c", f"{n}.g", f"{n}.b", f"{n}.m", f"{n}.v"],
                                           [f"{n}.bn"], name=f"/{n}/BatchNormalization"))
        out = f"{n}.bn"
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{n}.r"], name=f"/{n}/Relu"))
            out = f"{n}.r"
        self.act_points.append(out)
        return out

    def build(self) -> onnx.ModelProto:
        x = self.conv_bn("input", 3, 32, 3, 2, 1, True)
        c = 32
        for t, c_out, n, s in _MBV2:
            for i in range(n):
                stride = s if i == 0 else 1
                h = x
                if t != 1:
                    h = self.conv_bn(h, c, c * t, 1, 1, 1, True)
                h = self.conv_bn(h, c * t, c * t, 3, stride, c * t, True)
                h = self.conv_bn(h, c * t, c_out, 1, 1, 1, False)
                if stride == 1 and c == c_out:
                    a = self.name("add")
                    self.nodes.append(helper.make_node("Add", [x, h], [a], name=f"/{a}/Add"))
                    self.act_points.append(a)
                    h = a
                x, c = h, c_out
        x = self.conv_bn(x, c, 1280, 1, 1, 1, True)
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
        graph = helper.make_graph(self.nodes, "mobilenetv2_qdq",
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, self.size, self.size])],
                                  [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 1280])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _quantize(model: onnx.ModelProto, act_points: list[str], size: int, seed: int) -> onnx.ModelProto:
    """Calibrates a uint8 quantizer (zero point 0 after Relu, 128 elsewhere) at the input and at every activation
    point on random inputs (largest magnitude seen), and puts every conv weight behind per-channel int8 Q -> DQ."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for p in act_points:
        probe.graph.output.append(helper.make_empty_tensor_value_info(p))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    peak = {p: 0.0 for p in act_points}
    for _ in range(4):
        outs = sess.run(None, {"input": rng.standard_normal((1, 3, size, size)).astype(np.float32)})
        for p, v in zip(act_points, outs[1:]):
            peak[p] = max(peak[p], float(np.abs(v).max()))
    relu_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Relu"}
    g = model.graph
    new_nodes, inits = [], list(g.initializer)
    weights = {t.name: t for t in g.initializer if t.name.endswith(".w")}

    def quantizer(value: str, scale: float, zp: int) -> list:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{value}.s"))
        inits.append(numpy_helper.from_array(np.array(zp, np.uint8), f"{value}.z"))
        return [helper.make_node("QuantizeLinear", [value, f"{value}.s", f"{value}.z"], [f"{value}.q"]),
                helper.make_node("DequantizeLinear", [f"{value}.q", f"{value}.s", f"{value}.z"], [f"{value}.dq"])]

    rename = {"input": "input.dq"}
    new_nodes += quantizer("input", 4.0 / 127, 128)
    for node in g.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            arr = numpy_helper.to_array(w)
            s = (np.abs(arr).reshape(arr.shape[0], -1).max(axis=1) / 127).astype(np.float32)
            inits += [numpy_helper.from_array(s, f"{w.name}.s"), numpy_helper.from_array(np.zeros(len(s), np.int8),
                                                                                        f"{w.name}.z")]
            new_nodes += [helper.make_node("QuantizeLinear", [w.name, f"{w.name}.s", f"{w.name}.z"], [f"{w.name}.q"],
                                           axis=0),
                          helper.make_node("DequantizeLinear", [f"{w.name}.q", f"{w.name}.s", f"{w.name}.z"],
                                           [f"{w.name}.dq"], axis=0)]
            node.input[1] = f"{w.name}.dq"
        new_nodes.append(node)
        for out in node.output:
            if out in peak:
                relu = out in relu_outputs
                scale = max(peak[out], 1e-3) / (255 if relu else 127)
                new_nodes += quantizer(out, scale, 0 if relu else 128)
                rename[out] = f"{out}.dq"
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def mobilenet_v2(size: int = 64, seed: int = 0) -> onnx.ModelProto:
    net = _Net(size, seed)
    return _quantize(net.build(), net.act_points, size, seed + 1)


def _inputs(model_path: Path, kind: str, sets: int) -> list[dict]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    model = onnx.load(str(model_path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    rng = np.random.default_rng(11)
    out = []
    for _ in range(sets):
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            if kind == "random":
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
                continue
            # Full range: uniform over the first quantizer that reads the input.
            q = next((n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == i.name), None)
            lo, hi = -4.0, 4.0
            if q is not None:
                s = float(np.max((inits.get(q.input[1]) if q.input[1] in inits else consts.get(q.input[1]))))
                zp_v = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] in inits else consts.get(
                    q.input[2] if len(q.input) > 2 else "", np.array(0, np.uint8))
                zp = int(np.asarray(zp_v).reshape(-1)[0])
                tmin, tmax = (-128, 127) if np.asarray(zp_v).dtype == np.int8 else (0, 255)
                lo, hi = (tmin - zp) * s, (tmax - zp) * s
            feeds[i.name] = rng.uniform(lo, hi, shape).astype(np.float32)
        out.append(feeds)
    del producers
    return out


def measure_here(folder: Path, sets: int) -> dict:
    """Run on the (emulated) CPU: every folded model in ``folder``, both input kinds."""
    from qdqfold import kernels

    results = {}
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path))
        layers = kernels.check_file(path)
        results[path.name] = {kind: kernels.measure(model, None, _inputs(path, kind, sets), layers)
                              for kind in ("random", "full-range")}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu", default=shutil.which("qemu-x86_64"), help="qemu-x86_64 (Debian's qemu-user)")
    parser.add_argument("--cpu", default="EPYC-Rome", help="the emulated CPU (default EPYC-Rome: AVX2, no VNNI)")
    parser.add_argument("--sets", type=int, default=3, help="input sets per kind (default 3)")
    parser.add_argument("--size", type=int, default=64, help="the generated net's input size (default 64)")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run under the emulated CPU
    args = parser.parse_args()
    if args.measure:
        json.dump(measure_here(Path(args.measure), args.sets), sys.stdout)
        return 0
    import qdqfold_native
    from qdqfold import kernels

    with tempfile.TemporaryDirectory(prefix="qdqfold-saturation-") as tmp:
        tmp = Path(tmp)
        sources = {name: (ROOT / "tests" / "models" / name).read_bytes() for name in SAMPLES}
        sources["mobilenet_v2_qdq.onnx"] = mobilenet_v2(args.size).SerializeToString()
        flagged = {}
        for name, data in sources.items():
            folded = qdqfold_native.fold(data)
            layers = kernels.check_bytes(folded)
            if layers:
                (tmp / name).write_bytes(folded)
                flagged[name] = layers
        if args.qemu is None:
            print("qemu-x86_64 not found (apt-get install qemu-user): measuring on this CPU instead")
            command = [sys.executable]
        else:
            command = [args.qemu, "-cpu", args.cpu, sys.executable]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
        done = subprocess.run([*command, __file__, "--measure", str(tmp), "--sets", str(args.sets)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        measured = json.loads(done.stdout)
    where = f"{args.cpu} under {Path(args.qemu).name}" if args.qemu else "this CPU"
    print(f"static saturation check vs onnxruntime's integer kernels on {where}, {args.sets} input sets per kind")
    header = f"{'model':28} {'inputs':10} {'layers':>6} {'flagged':>7} {'saturate':>8} {'hit':>7} {'false alarms':>12}"
    print(header)
    print("-" * len(header))
    table = {}
    for name, layers in flagged.items():
        flags = {lay.node for lay in layers if lay.can_saturate}
        for kind, rows in measured[name].items():
            moved = {r["node"] for r in rows if r["moved"]}
            hit = len(moved & flags)
            table.setdefault(name, {})[kind] = {"layers": len(layers), "flagged": len(flags), "saturating": len(moved),
                                                "saturating_flagged": hit, "missed": sorted(moved - flags),
                                                "false_alarms": len(flags - moved)}
            print(f"{name:28} {kind:10} {len(layers):6} {len(flags):7} {len(moved):8} {hit:3}/{len(moved):<3} "
                  f"{len(flags - moved):12}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": where, "models": table}, indent=2) + "\n")
    missed = [(n, k) for n, kinds in table.items() for k, t in kinds.items() if t["missed"]]
    print("every saturating layer flagged" if not missed else f"MISSED: {missed}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
