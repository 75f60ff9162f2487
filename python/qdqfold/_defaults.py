"""Defaults shared by verification and the places that only name them (the command line, batch settings),
kept apart so that naming them does not import :mod:`qdqfold.verify`."""

#: Default tolerance: the largest difference allowed, as a share of each output's range, where the rounding
#: floor is smaller (float models).
DEFAULT_TOLERANCE = 1e-5

#: onnxruntime optimisation levels verified by default (by the names the CLI takes).
DEFAULT_LEVELS = ("off", "default")
