"""qdqfold: fold BatchNormalization into ONNX layers, quantized (QDQ) weights included, exactly.

The work is done by the native module ``qdqfold_native``; this package adds a model-level API
(:func:`fold_model`), a report (:class:`FoldReport`) and the ``qdqfold`` command line.
"""

from qdqfold_native import FoldError, __version__

from .api import OPTIONS, fold_bytes, fold_model
from .report import BatchNormEntry, FoldReport

__all__ = [
    "BatchNormEntry",
    "FoldError",
    "FoldReport",
    "OPTIONS",
    "__version__",
    "fold_bytes",
    "fold_model",
]
