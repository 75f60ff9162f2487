#!/usr/bin/env bash
# The Windows backend (cpp/platform/windows.cpp), checked on Linux: the core and tools/fold_file_main.cpp
# cross-compiled with MinGW-w64, then run under Wine on a test model with external data, into a fresh
# directory and again over its own output (an earlier run's data file is replaced, MoveFileExW over an
# existing file), in place twice, refusals of unsafe paths, with every byte compared with what the Linux
# build writes.
#
#   tools/check_windows.sh        # BUILD_DIR (default build/windows), JOBS (default 2)
#
# Needs x86_64-w64-mingw32-g++-posix (Debian: g++-mingw-w64-x86-64-posix) and wine (Debian: wine64);
# exits 0 with a note when either is missing, so .ci/run can call it unconditionally.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build/windows}"
jobs="${JOBS:-2}"
cxx="${MINGW_CXX:-x86_64-w64-mingw32-g++-posix}"
wine="$(command -v wine64 || command -v wine || ls /usr/lib/wine/wine64 2>/dev/null || true)"
if ! command -v "$cxx" >/dev/null || [ -z "$wine" ]; then
  echo "check_windows: skipped (needs $cxx and wine)"
  exit 0
fi
mkdir -p "$build/obj"
cd "$root"

echo "== cross-compile the core and the driver ($cxx)"
export cxx build
compile() {
  "$cxx" -std=c++17 -O1 -Wall -Wextra -Wno-unused-parameter -Icpp -c "$1" -o "$build/obj/$(echo "$1" | tr / _).o" \
    || { echo "FAILED: $1" >&2; return 1; }
}
export -f compile
ls cpp/graph/*.cpp cpp/folds/*.cpp cpp/folds/*/*.cpp cpp/folds/*/*/*.cpp cpp/targets/*.cpp cpp/predict/*.cpp cpp/kernels/*.cpp cpp/core/*.cpp cpp/platform/*.cpp tools/fold_file_main.cpp \
  | xargs -P "$jobs" -I{} bash -c 'compile {}'
# Static: the program runs under a bare Wine prefix with no MinGW DLLs beside it.
"$cxx" -o "$build/qdqfold_fold_file.exe" "$build"/obj/*.o -static -static-libgcc -static-libstdc++

echo "== run it under Wine"
export WINEPREFIX="$build/wineprefix" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
work="$build/run"
rm -rf "$work" && mkdir -p "$work/in/sub" "$work/out"
python3 - "$root/tests/models/bn_conv_cases.onnx" "$work/in/model.onnx" <<'PY'
import sys, onnx
onnx.save(onnx.load(sys.argv[1]), sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
          location="sub/model.weights", size_threshold=0)
PY
cd "$work"
run() { "$wine" "$build/qdqfold_fold_file.exe" "$@"; }
run in/model.onnx out/model.onnx | tr -d '\r' | tail -2
test -s out/model.onnx && test -s out/model.onnx.data
run in/model.onnx out/model.onnx >/dev/null  # again: replaces the output and its data file of the first run
ls -a out | grep -q '\.tmp$' && { echo "temporary files left behind" >&2; exit 1; }
# In place, twice: the second run replaces the data file it reads (both are mapped: let_go_of), and the
# first removes the input's old data file.
cp -r in inplace
run inplace/model.onnx inplace/model.onnx | tr -d '\r' | grep -q "^removed inplace/sub/model.weights"
run inplace/model.onnx inplace/model.onnx >/dev/null
test ! -e inplace/sub/model.weights && test -s inplace/model.onnx.data
ls -a inplace | grep -q '\.tmp$' && { echo "temporary files left behind" >&2; exit 1; }
# Refusals: a location outside the model's directory, and the input as its own output.
python3 - "$work/in/model.onnx" "$work/in/escape.onnx" <<'PY'
import sys, onnx
m = onnx.load(sys.argv[1], load_external_data=False)
for t in m.graph.initializer:
    for e in t.external_data:
        if e.key == "location": e.value = "../out/model.onnx.data"
onnx.save(m, sys.argv[2])
PY
if run in/escape.onnx out/escape.onnx 2>err.txt; then echo "a location outside the directory was read" >&2; exit 1; fi
grep -q "not a path inside the model's directory" err.txt
if run in/model.onnx in/sub/model.weights 2>err.txt; then echo "the input's data file was replaced" >&2; exit 1; fi
grep -q "never replaces" err.txt

if python3 -c "import qdqfold_native" 2>/dev/null; then
  mkdir -p reference
  python3 -c "import sys, qdqfold_native as q; q.fold_file(sys.argv[1], sys.argv[2])" in/model.onnx reference/model.onnx
  cmp out/model.onnx reference/model.onnx
  cmp out/model.onnx.data reference/model.onnx.data
  cp -r in reference/inplace
  for _ in 1 2; do
    python3 -c "import sys, qdqfold_native as q; q.fold_file(sys.argv[1], sys.argv[1])" reference/inplace/model.onnx
  done
  cmp inplace/model.onnx reference/inplace/model.onnx
  cmp inplace/model.onnx.data reference/inplace/model.onnx.data
  echo "same bytes as the Linux build ($(python3 -c 'import qdqfold_native as q; print(q.__file__)'))"
fi
echo "Windows backend under Wine: OK"
