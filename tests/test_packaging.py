"""Packaging: one version everywhere, the licence shipped, the type stub's imports declared, the build kept
out of the checkout, and the wheel configuration naming test files that exist.

The checks on source files (pyproject.toml, CMakeLists.txt, the stub) skip where those files are not beside
the tests (cibuildwheel copies only tests/ and pyproject.toml next to an installed wheel)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest

import qdqfold
import qdqfold_native

ROOT = Path(__file__).resolve().parent.parent


def _source(relative: str) -> Path:
    path = ROOT / relative
    if not path.is_file():
        pytest.skip(f"{relative} is not beside the tests (an installed wheel is being tested)")
    return path


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads(_source("pyproject.toml").read_text())


def test_one_version_for_the_package_the_native_module_and_the_metadata():
    metadata = importlib.metadata.version("qdqfold")
    assert qdqfold.__version__ == metadata
    assert qdqfold_native.__version__ == metadata
    assert re.fullmatch(r"\d+(\.\d+)*([abc]|rc|\.dev|\.post)?\d*", metadata)


def test_the_version_is_written_in_one_file_that_pyproject_and_cmake_both_read():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    provider = project["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["provider"] == "scikit_build_core.metadata.regex"
    version_file = provider["input"]
    text = _source(version_file).read_text()
    cmake = _source("CMakeLists.txt").read_text()
    assert version_file in cmake
    project_call = re.search(r"^project\(([^)]*)\)", cmake, re.M).group(1)
    assert not re.search(r"\d+\.\d+", project_call), project_call  # no second copy of the number
    # The file holds exactly the version the build reported.
    assert re.findall(r'^__version__ = "([^"]+)"$', text, re.M) == [qdqfold_native.__version__]


def test_licence_is_apache_2_in_the_checkout_and_the_installed_distribution():
    dist = importlib.metadata.distribution("qdqfold")
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    files = [str(f) for f in (dist.files or [])]
    licence_files = [f for f in files if f.endswith("licenses/LICENSE")]
    if not files:
        pytest.skip("the installed distribution lists no files")
    assert licence_files, files
    text = Path(dist.locate_file(licence_files[0])).read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    if (ROOT / "LICENSE").is_file():
        assert (ROOT / "LICENSE").read_text() == text


def test_metadata_has_classifiers_and_urls():
    meta = importlib.metadata.metadata("qdqfold")
    classifiers = meta.get_all("Classifier") or []
    for minor in range(9, 14):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Issues"} <= set(urls)


def test_stub_imports_only_declared_modules():
    """typing_extensions is imported by the stub only where typing lacks Unpack, and declared for exactly
    those Pythons."""
    stub = _source("python/qdqfold_native.pyi")
    tree = ast.parse(stub.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "sys.version_info" in ast.unparse(node.test):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom):
                    guarded.add(inner.module)
    top_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    top_level |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert top_level <= {"typing", "mmap", "os", "sys", "collections.abc"}, top_level
    assert "typing_extensions" in guarded
    guard = next(n for n in tree.body if isinstance(n, ast.If))
    assert ast.unparse(guard.test) == "sys.version_info >= (3, 11)"
    declared = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("typing_extensions")]
    assert declared and "python_version<'3.11'" in declared[0].replace(" ", "")


def test_stub_lists_every_native_option():
    tree = ast.parse(_source("python/qdqfold_native.pyi").read_text())
    options = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Options")
    stubbed = {n.target.id for n in options.body if isinstance(n, ast.AnnAssign)}
    assert set(qdqfold_native.options()) <= stubbed


def test_stub_names_every_public_native_function_and_class():
    tree = ast.parse(_source("python/qdqfold_native.pyi").read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    public = {name for name, value in vars(qdqfold_native).items()
              if not name.startswith("_") and (callable(value) or isinstance(value, type))}
    assert public <= stubbed, public - stubbed


def test_pip_install_builds_outside_the_checkout():
    scikit_build = _pyproject()["tool"]["scikit-build"]
    build_dir = scikit_build.get("build-dir")
    # scikit-build-core's default (no build-dir) is a temporary directory; a relative one is in the checkout.
    assert build_dir is None or Path(build_dir).is_absolute(), build_dir
    excluded = set(scikit_build.get("sdist", {}).get("exclude", []))
    assert {"build", ".ci-venv"} <= excluded


def test_extras_install_what_the_optional_tests_import():
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in extras["test"]}
    assert {"pytest", "hypothesis", "distributed", "onnx-ir"} <= names
    assert any(d.startswith("onnx-ir") for d in extras["ir"])


def test_wheel_test_command_names_test_files_that_exist():
    cibw = _pyproject()["tool"]["cibuildwheel"]
    assert set(cibw["build"]) == {f"cp3{m}-*" for m in range(9, 14)}
    assert cibw["manylinux-x86_64-image"] == cibw["manylinux-aarch64-image"] == "manylinux_2_28"
    command = " ".join(cibw["test-command"]) if isinstance(cibw["test-command"], list) else cibw["test-command"]
    files = [a for a in shlex.split(command) if a.startswith("tests/")]
    assert len(files) >= 10
    for f in files:
        assert (ROOT / f).is_file(), f
    assert "tests/test_packaging.py" in files and "tests/test_onnx_ir_pass.py" in files


def test_wheels_workflow_builds_every_platform():
    text = _source(".github/workflows/wheels.yml").read_text()
    assert "pypa/cibuildwheel@" in text
    runners = set(re.findall(r"^\s+- (\S+)\s+#", text, re.M))
    assert runners == {"ubuntu-24.04", "ubuntu-24.04-arm", "macos-15-intel", "macos-15", "windows-2025"}
