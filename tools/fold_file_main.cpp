// qdqfold_fold_file: the core's fold_file (cpp/core/files.h) as a small program, without Python. It is how the
// backends that Python does not load here are run: the strict-POSIX build (tools/check_portable.sh) and the
// Windows build under Wine (tools/check_windows.sh). Same file rules as the CLI (docs/files.md).
//
//   qdqfold_fold_file [--force] [--pad-correction] IN.onnx OUT.onnx
//
// Prints one line per BatchNormalization ("folded <node> (<fold>)" or "kept <node> (<reason>)"), then the
// data files written and removed. Exit status: 0 done, 1 the fold failed (the message on standard error),
// 2 bad arguments.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "core/files.h"

int main(int argc, char** argv) {
  qdqfold::Options options;
  qdqfold::FileOptions file_options;
  std::vector<std::string> paths;
  for (int k = 1; k < argc; ++k) {
    const std::string arg = argv[k];
    if (arg == "--force") file_options.force = true;
    else if (arg == "--pad-correction") options.pad_correction = true;
    else if (arg.size() > 1 && arg[0] == '-') {
      std::fprintf(stderr, "qdqfold_fold_file: unknown option %s\n", arg.c_str());
      return 2;
    } else paths.push_back(arg);
  }
  if (paths.size() != 2) {
    std::fprintf(stderr, "usage: qdqfold_fold_file [--force] [--pad-correction] IN.onnx OUT.onnx\n");
    return 2;
  }
  try {
    const qdqfold::Report report = qdqfold::fold_file(paths[0], paths[1], options, file_options);
    for (const auto& bn : report.batchnorms)
      std::printf("%s %s (%s)\n", bn.folded ? "folded" : "kept", bn.node.c_str(), bn.code.c_str());
    for (const auto& f : report.data_files) std::printf("wrote %s\n", f.c_str());
    for (const auto& f : report.removed_files) std::printf("removed %s\n", f.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qdqfold_fold_file: %s\n", e.what());
    return 1;
  }
}
