"""The release: the one place it is written. pyproject.toml (scikit-build-core's regex provider) and
CMakeLists.txt (which passes it to qdqfold_native) both read it from this line."""

__version__ = "0.1.0"
