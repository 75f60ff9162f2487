// Reading elements, for quantized.cpp and quantized_columns.cpp: the 4-bit types, and float32/16 or bfloat16
// elements as float32.
#pragma once

#include <cstdint>
#include <cstring>

#include "../wire/fields.h"
#include "numeric.h"

namespace qdqfold::kernels::detail {

inline bool is_4bit(int32_t t) {
  return t == static_cast<int32_t>(wire::DataType::Int4) || t == static_cast<int32_t>(wire::DataType::Uint4);
}

// Float element `i` of a float32/16 or bfloat16 tensor.
inline float load_float(const char* src, int32_t t, int64_t i) {
  if (t == static_cast<int32_t>(wire::DataType::Float)) {
    float f;
    std::memcpy(&f, src + i * 4, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, src + i * 2, 2);
  return t == static_cast<int32_t>(wire::DataType::Float16) ? half_to_float(h) : bf16_to_float(h);
}

// Elements [first, first + k) as float32, k <= 1024.
inline void load_floats(const char* src, int32_t t, int64_t first, int64_t k, float* out) {
  if (t == static_cast<int32_t>(wire::DataType::Float)) {
    std::memcpy(out, src + first * 4, static_cast<size_t>(k) * 4);
    return;
  }
  for (int64_t i = 0; i < k; ++i) out[i] = load_float(src, t, first + i);
}

}  // namespace qdqfold::kernels::detail
