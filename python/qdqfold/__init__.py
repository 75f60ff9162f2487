"""qdqfold: fold BatchNormalization into ONNX layers, quantized (QDQ) weights included, exactly.

The work is done by the native module ``qdqfold_native``; this package adds a model-level API
(:func:`fold_model`, :func:`fold_many`), a report (:class:`FoldReport`), verification against onnxruntime
(:func:`verify`) and the ``qdqfold`` command line.
"""

from qdqfold_native import FoldError

from ._version import __version__
from .api import OPTIONS, fold_bytes, fold_model
from .batch import ModelResult, VerifySettings, fold_many
from .report import BatchNormEntry, FoldReport
from .verify import VerifyError, VerifyResult, verify

__all__ = [
    "BatchNormEntry",
    "FoldError",
    "FoldReport",
    "ModelResult",
    "OPTIONS",
    "VerifyError",
    "VerifyResult",
    "VerifySettings",
    "__version__",
    "fold_bytes",
    "fold_many",
    "fold_model",
    "verify",
]
