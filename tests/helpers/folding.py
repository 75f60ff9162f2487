"""THE fold helper of the tests: one call, one result shape.

    folded = fold(model, **options)       # qdqfold_native.fold_with_report (the native module)
    folded = fold_api(model, **options)   # qdqfold.fold_bytes (the Python API: shapes inferred for
                                          # pad_correction, a FoldReport)

`model` is an onnx.ModelProto or its serialized bytes; the options go to the fold unchanged (none added), so a
test folds exactly what it says. Both return a `Folded`:

    folded.input     the serialized input (bytes)
    folded.bytes     the folded model, serialized (bytes)
    folded.model     the folded model, parsed (onnx.ModelProto; parsed at once, so an unparsable output fails)
    folded.report    the report as the call returned it: a dict from fold(), a qdqfold.report.FoldReport from
                     fold_api()
    folded.records   the report's entries by node name: {name: dict} from fold(), {name: BatchNormEntry} from
                     fold_api()
    folded.unchanged True when the output is the input, byte for byte

Tests of the native API itself (qdqfold_native.fold, fold_file, argument handling) call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

import qdqfold
import qdqfold_native
from helpers.build import bn_count
from helpers.onnxrt import assert_same_outputs


@dataclass
class Folded:
    """One fold's input, output and report (see the module's docstring)."""

    input: bytes
    bytes: bytes
    model: onnx.ModelProto
    report: Any

    @property
    def records(self) -> dict[str, Any]:
        if isinstance(self.report, dict):
            return {r["node"]: r for r in self.report["batchnorms"]}
        return {entry.node: entry for entry in self.report.batchnorms}

    @property
    def unchanged(self) -> bool:
        return self.bytes == self.input


def _serialized(model: onnx.ModelProto | bytes) -> bytes:
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else bytes(model)


def fold(model: onnx.ModelProto | bytes, **options) -> Folded:
    """Folds through qdqfold_native.fold_with_report; the report is the native dict."""
    data = _serialized(model)
    out, report = qdqfold_native.fold_with_report(data, **options)
    return Folded(data, out, onnx.load_from_string(out), report)


def fold_api(model: onnx.ModelProto | bytes, **options) -> Folded:
    """Folds through qdqfold.fold_bytes; the report is a qdqfold.report.FoldReport."""
    data = _serialized(model)
    out, report = qdqfold.fold_bytes(data, **options)
    return Folded(data, out, onnx.load_from_string(out), report)


def assert_folded(model: onnx.ModelProto, rtol=1e-5, expect_codes=None, **options) -> tuple[onnx.ModelProto, dict]:
    """Folds `model` (fold()), asserts every BN is gone (with `expect_codes`, the codes in order), the result
    passes the full checker and matches the original in onnxruntime within `rtol` of each output's range.
    Returns the folded model and the report dict."""
    folded = fold(model, **options)
    entries = folded.report["batchnorms"]
    assert entries and all(e["folded"] for e in entries), [(e["node"], e["code"], e["message"]) for e in entries]
    if expect_codes is not None:
        assert [e["code"] for e in entries] == expect_codes
    assert bn_count(folded.model) == 0
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model, rtol_of_range=rtol)
    return folded.model, folded.report


def assert_kept(model: onnx.ModelProto | bytes, code: str, *words: str, node: str | None = None, api: bool = False,
                **options) -> Any:
    """Folds `model` (fold(), or fold_api() with api=True) and asserts its BN (the only one, or the one named
    `node`) is kept with reason `code` and a message naming each of `words`, the model byte-identical. Returns
    that report entry: a dict, or a BatchNormEntry with api=True."""
    folded = (fold_api if api else fold)(model, **options)
    records = folded.records
    if node is None:
        assert len(records) == 1, list(records)
        entry = next(iter(records.values()))
    else:
        entry = records[node]
    fields = vars(entry) if api else entry
    assert fields["folded"] is False and fields["code"] == code, (fields["code"], fields["message"])
    assert fields["message"]
    for word in words:
        assert word in fields["message"], fields["message"]
    assert folded.unchanged, "a kept BN must leave the model byte-identical"
    return entry


#: A driver for `python -c`: fold_file(argv[1], argv[2]) under a file-size limit of argv[3] bytes (as a full disk
#: would stop a write). Prints "FoldError: ..." and exits 3 when the fold fails, else prints "no error".
FOLD_FILE_UNDER_SIZE_LIMIT = """
import resource, signal, sys
import qdqfold_native
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    qdqfold_native.fold_file(sys.argv[1], sys.argv[2])
except qdqfold_native.FoldError as e:
    print("FoldError:", e)
    sys.exit(3)
print("no error")
"""
