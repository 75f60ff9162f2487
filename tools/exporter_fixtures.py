"""Writes one small model per exporter pattern of issue 14 (the layouts the tests in tests/test_exporters_*.py
build with onnx.helper) into a directory, for bench/samples.py to run every folder on:

    python tools/exporter_fixtures.py /tmp/exporters
    python bench/samples.py --models-dir /tmp/exporters --models all

The fixtures are built by the tests' own builders (tests/helpers/exporters/, which tests/test_exporters_*.py use),
so the bench measures exactly the layouts the tests check. TensorRT's custom-domain models are left out:
onnxruntime cannot run the original.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

TESTS = Path(__file__).resolve().parents[1] / "tests"


def fixtures() -> dict[str, onnx.ModelProto]:
    sys.path.insert(0, str(TESTS))
    from onnx import TensorProto

    from helpers.exporters import affine, aimet, brevitas, int4, levit, mixnet, ortq, torchscript
    from helpers.qdq import Case  # the tests' quantized-layer builder

    int4_case = Case(form="int", qtype=TensorProto.INT4, per_channel=True)
    int4.rewrite_as_int32_data(int4_case.model, {"w_q", "w_zero"})  # int4 stored in int32_data, as onnx.helper writes it

    return {
        "torch_identity_dedup": torchscript.vgg_like(),                       # 1. constants behind Identity
        "frozen_batchnorm": affine.frozen_bn(),                               # 2. FrozenBatchNorm2d Mul/Add
        "brevitas_qcdq_clip": brevitas.with_clip(                             # 3. int W -> Clip -> DQ
            Case(form="int", qtype=TensorProto.INT8, zero=0, opset=13), -127, 127).model,
        "brevitas_initializer_inputs": brevitas.keep_initializers_as_inputs_model(),  # 4. (kept by default)
        "mixnet_concat_bn": mixnet.mixed_conv_bn(),                           # 6. BN after a channel Concat
        "levit_linear_norm": levit.levit_linear_norm(),                       # 7. MatMul -> Flatten -> BN
        "int4_in_int32_data": int4_case.model,                                # 9. int4 weights in int32_data
        "aimet_full_range_int8": aimet.aimet_case().model,                    # 10. (kept by default)
        "ortq_quantizer_before_bn_relu": ortq.with_relu_after_bn(             # 11. Conv -> Q -> DQ -> BN -> Relu
            Case(form="int", act_between=True)).model,
    }


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "exporter-fixtures")
    out.mkdir(parents=True, exist_ok=True)
    for name, model in fixtures().items():
        onnx.save(model, out / f"{name}.onnx")
        print(out / f"{name}.onnx")


if __name__ == "__main__":
    main()
