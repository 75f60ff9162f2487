"""Helpers shared by the tests. Test files import from here, never from each other; conftest.py holds only
fixtures and pytest hooks. What goes where:

- folding.py   THE fold helper: fold(model, **options) -> Folded (.input, .bytes, .model, .report, .records,
               .unchanged) through qdqfold_native.fold_with_report; fold_api() the same through qdqfold.fold_bytes
               (report: a FoldReport); assert_folded() for float models where every BN must fold; assert_kept()
               for a BN kept with a reason code and the model byte-identical.
- onnxrt.py    onnxruntime with graph optimisations off: session, random_inputs, run, assert_same_outputs.
- build.py     small float graphs with onnx.helper (bn_params, bn_node, weight, make_model, vi, gemm_model,
               float_conv_bn, bn_arrays) and questions about a graph (op_types, bn_count).
- qdq.py       quantized layers: Case (a QDQ layer + BN that keeps its numbers), the checks on its folds
               (folded_weight, assert_folded_weight, assert_same), quantized_units, modelopt_f16_layer.
- float_layers.py, forward_models.py, qdq_folds.py, hostile.py, safe_files.py   the builders and checks of
               one family of split test files each (test_fold_float*, test_fold_forward* with test_proven_shapes
               and test_overflow_headroom, test_fold_qdq*, test_hostile_models*, test_safe_files* with
               test_file_promises).
- exporters/   the layouts real exporters write, one module per exporter (tests/test_exporters_*.py and
               tools/exporter_fixtures.py build from them).
- wire.py      protobuf by hand (varint, length_delimited, nested_if_model) for models protobuf refuses.
- samples.py   MODELS, SAMPLE_MODELS: the sample models in tests/models.

A helper used by one test file stays in that file; one used by two moves here. Module-level RNGs here are
shared with the test files that draw from them too (the models depend on the order of the draws), so moving
a builder must move its RNG with it and leave the test file drawing from the same one.
New test files: name them after what they test (test_<feature>.py), import helpers from here.
"""
