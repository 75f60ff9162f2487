#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option QDQFOLD_SANITIZE) and
# runs the test suite against it.
#
#   tools/sanitize.sh                      # the whole suite
#   tools/sanitize.sh tests/test_hostile_models.py -k nan   # any pytest arguments (paths relative to the repo root)
#
# Environment: BUILD_DIR (default build/sanitize in the repository), CXX (default g++; clang++ works too), JOBS (ninja -j,
# default 2).
#
# Python itself is not instrumented, so the sanitizer runtime has to be in the process before anything else:
# it is LD_PRELOADed. Leak checking is off (the interpreter keeps its arenas to the end); every other ASan
# check is on, and UBSan stops at the first report (-fno-sanitize-recover). Any report fails the run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build/sanitize}"
cxx="${CXX:-g++}"

mkdir -p "$build"
pybind11_dir="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DQDQFOLD_SANITIZE=ON -Dpybind11_DIR="$pybind11_dir" >"$build/cmake.log" 2>&1 \
  || { cat "$build/cmake.log"; exit 1; }
ninja -C "$build" -j "${JOBS:-2}" qdqfold_native

# The ASan runtime of the compiler that built the extension (plus, for GCC, its UBSan runtime).
case "$("$cxx" --version | head -1)" in
  *clang*) preload="$("$cxx" -print-file-name=libclang_rt.asan-x86_64.so)" ;;
  *) preload="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libubsan.so)" ;;
esac
for lib in $preload; do
  [ -e "$lib" ] || { echo "sanitizer runtime not found: $lib" >&2; exit 1; }
done

export LD_PRELOAD="$preload"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$build:$root/python${PYTHONPATH:+:$PYTHONPATH}"
export QDQFOLD_SANITIZED=1  # lets tests skip what is meaningless under ASan (timing, memory ceilings)

cd "$root"
if [ $# -eq 0 ]; then set -- tests; fi
python3 -m pytest -q -p no:cacheprovider "$@"
