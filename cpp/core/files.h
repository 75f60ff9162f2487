// File to file: the input is mapped, not read; the output is written in one pass to a temporary file beside
// the destination and renamed over it, so a failure never leaves a half-written file. Bytes copied through
// unchanged go file to file inside the kernel (copy_file_range) without passing through this process.
// External data files are mapped too; their output copies keep every offset, and folded tensors of the same
// size overwrite their old bytes in place.
#pragma once

#include <string>

#include "api.h"

namespace qdqfold {

// Folds the model at `src` into `dst` (which may equal `src`). Throws FoldError for an invalid model and
// for files that cannot be read or written (the message names the path).
Report fold_file(const std::string& src, const std::string& dst, const Options& options);

}  // namespace qdqfold
