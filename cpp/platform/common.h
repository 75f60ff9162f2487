// Helpers the backends of cpp/core/file_io.h share (cpp/platform/common.cpp).
#pragma once

#include <cstddef>
#include <string>

namespace qdqfold::io::detail {

// `n` letters and digits, different on every call in this process and unlikely to repeat in another one:
// the variable part of a temporary file's name (".<name>.<letters>.tmp"), created exclusively.
std::string unique_letters(size_t n);

}  // namespace qdqfold::io::detail
