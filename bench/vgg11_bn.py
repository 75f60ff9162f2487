"""VGG-11-BN with torchvision's shapes (132.9 M parameters, a 531 MB file), random weights, no torch needed.

Eight Conv(3x3, pad 1) -> BatchNormalization -> Relu layers (64, M, 128, M, 256, 256, M, 512, 512, M, 512,
512, M), AveragePool to 7x7 (as AdaptiveAvgPool2d on a 224x224 input), Flatten, then three Gemm layers
(25088 -> 4096 -> 4096 -> 1000) with no BN: a fold rewrites the conv weights (37 MB) and copies the fully
connected ones (494 MB) unchanged, the case of issue 23's speed item.

    python bench/vgg11_bn.py -o /tmp/qdqfold-bench/vgg11-bn-s0.onnx [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
FC = (25088, 4096, 4096, 1000)


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    x, cin, k = "input", 3, 0
    for item in CONFIG:
        if item == "M":
            y = f"pool{k}"
            nodes.append(helper.make_node("MaxPool", [x], [y], kernel_shape=[2, 2], strides=[2, 2]))
            x = y
            continue
        cout = int(item)
        w = const(f"features.{k}.weight", rng.standard_normal((cout, cin, 3, 3), dtype=np.float32)
                  * np.float32(np.sqrt(2.0 / (cin * 9))))
        b = const(f"features.{k}.bias", rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01))
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{k}"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        gamma = rng.uniform(0.5, 1.5, cout).astype(np.float32) * np.where(rng.random(cout) < 0.1, -1, 1)
        bn = [const(f"bn{k}.{n}", v) for n, v in (
            ("weight", gamma), ("bias", rng.standard_normal(cout) * 0.1),
            ("running_mean", rng.standard_normal(cout) * 0.1), ("running_var", rng.uniform(0.5, 2.0, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{k}", *bn], [f"bn{k}"], epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [f"bn{k}"], [f"relu{k}"]))
        x, cin, k = f"relu{k}", cout, k + 1
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))  # 512 x 7 x 7 on a 224 x 224 input
    x = "flat"
    for j, (fin, fout) in enumerate(zip(FC[:-1], FC[1:])):
        w = const(f"classifier.{j}.weight", rng.standard_normal((fout, fin), dtype=np.float32)
                  * np.float32(np.sqrt(2.0 / fin)))
        b = const(f"classifier.{j}.bias", rng.standard_normal(fout, dtype=np.float32) * np.float32(0.01))
        nodes.append(helper.make_node("Gemm", [x, w, b], [f"fc{j}"], transB=1))
        x = f"fc{j}"
        if j < len(FC) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"fc_relu{j}"]))
            x = f"fc_relu{j}"
    graph = helper.make_graph(
        nodes, "vgg11_bn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, FC[-1]])], initializer=inits)
    # The 7x7 AdaptiveAvgPool of torchvision is the identity on a 224 x 224 input (the features end at 7x7).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qdqfold-bench")
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build(args.seed)
    onnx.save(model, args.output)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"{args.output}: {params / 1e6:.1f} M parameters, "
          f"{sum(n.op_type == 'BatchNormalization' for n in model.graph.node)} BatchNormalization")


if __name__ == "__main__":
    main()
