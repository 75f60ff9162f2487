#!/usr/bin/env bash
# The strict-POSIX check of the core (issue 15, "A portable core"), without Python:
#
#   1. no source outside cpp/platform/ includes an operating system header (they are all behind
#      cpp/core/file_io.h);
#   2. the core compiles with -U_GNU_SOURCE -D_POSIX_C_SOURCE=200809L and the plain-POSIX file backend
#      (QDQFOLD_PORTABLE_IO): cpp/platform/ as it is, the rest with tools/posix_strict_shim.h force-included
#      (two glibc declarations GCC's <mutex> needs, see there);
#   3. the objects call nothing Linux-only (copy_file_range, mkstemps, madvise, ...; nm);
#   4. tools/fold_file_main.cpp linked against them folds a model with external data, and the output (model
#      and data file) is byte for byte what the installed qdqfold_native writes (when Python can import it).
#
#   tools/check_portable.sh            # BUILD_DIR (default build/strict-posix), CXX (default g++), JOBS (2)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build/strict-posix}"
cxx="${CXX:-g++}"
jobs="${JOBS:-2}"
mkdir -p "$build/obj"
cd "$root"

echo "== 1. operating system headers only in cpp/platform/"
if grep -rnE '#include <(sys/|unistd\.h|fcntl\.h|signal\.h|pthread\.h|dirent\.h|windows\.h|io\.h|dlfcn\.h)' cpp \
     | grep -v '^cpp/platform/'; then
  echo "an operating system header outside cpp/platform/ (above)" >&2
  exit 1
fi

echo "== 2. strict-POSIX compile (-U_GNU_SOURCE -D_POSIX_C_SOURCE=200809L, QDQFOLD_PORTABLE_IO)"
strict=(-std=c++17 -O1 -Wall -Wextra -Wno-unused-parameter -Icpp -DQDQFOLD_PORTABLE_IO=1 -U_GNU_SOURCE
        -D_POSIX_C_SOURCE=200809L)
export build cxx
export STRICT="${strict[*]}"
compile() {  # source -> object; cpp/platform/ without the shim
  local src="$1" obj="$build/obj/$(echo "$1" | tr / _).o" extra=()
  case "$src" in cpp/platform/*) ;; *) extra=(-include "$PWD/tools/posix_strict_shim.h") ;; esac
  # shellcheck disable=SC2086
  "$cxx" $STRICT "${extra[@]}" -c "$src" -o "$obj" || { echo "FAILED: $src" >&2; return 1; }
}
export -f compile
sources=$(ls cpp/graph/*.cpp cpp/folds/*.cpp cpp/folds/*/*.cpp cpp/folds/*/*/*.cpp cpp/targets/*.cpp cpp/predict/*.cpp cpp/kernels/*.cpp cpp/core/*.cpp cpp/platform/*.cpp tools/fold_file_main.cpp)
echo "$sources" | xargs -P "$jobs" -I{} bash -c 'compile {}'
"$cxx" -o "$build/qdqfold_fold_file" "$build"/obj/*.o -pthread
echo "compiled $(echo "$sources" | wc -l) sources"

echo "== 3. no Linux-only call"
linux_only='copy_file_range|mkstemps|mkostemps?|madvise|sendfile|splice|fallocate|statx|memfd_create|syncfs|getrandom'
if nm -u "$build"/obj/*.o | grep -wE "$linux_only"; then
  echo "the portable build calls a Linux-only function (above)" >&2
  exit 1
fi
echo "none of: $(echo "$linux_only" | tr "|" " ")"

echo "== 4. fold a model with external data"
work="$build/run"
rm -rf "$work" && mkdir -p "$work/in" "$work/out"
python3 - "$root/tests/models/bn_conv_cases.onnx" "$work/in/model.onnx" <<'PY'
import sys, onnx
onnx.save(onnx.load(sys.argv[1]), sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
          location="model.weights", size_threshold=0)
PY
"$build/qdqfold_fold_file" "$work/in/model.onnx" "$work/out/model.onnx" | tail -3
test -s "$work/out/model.onnx.data"
if python3 -c "import qdqfold_native" 2>/dev/null; then
  mkdir -p "$work/reference"
  python3 -c "import sys, qdqfold_native as q; q.fold_file(sys.argv[1], sys.argv[2])" \
    "$work/in/model.onnx" "$work/reference/model.onnx"
  cmp "$work/out/model.onnx" "$work/reference/model.onnx"
  cmp "$work/out/model.onnx.data" "$work/reference/model.onnx.data"
  echo "same bytes as $(python3 -c 'import qdqfold_native as q; print(q.__file__)')"
fi
echo "strict-POSIX core: OK"
