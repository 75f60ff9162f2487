"""Defaults shared by the API, verification and the places that only name them (the command line, batch
settings), kept apart so that naming them imports neither :mod:`qdqfold.api` nor :mod:`qdqfold.verify`."""

from __future__ import annotations

import qdqfold_native

#: Every fold option and its default (keyword arguments of fold_model, fold_bytes and qdqfold_native.fold);
#: also ``qdqfold.OPTIONS`` and ``qdqfold.api.OPTIONS``.
OPTIONS: dict[str, bool] = qdqfold_native.options()

#: Default tolerance: the largest difference allowed, as a share of each output's range, where the rounding
#: floor is smaller (float models).
DEFAULT_TOLERANCE = 1e-5

#: onnxruntime optimisation levels verified by default (by the names the CLI takes).
DEFAULT_LEVELS = ("off", "default")
