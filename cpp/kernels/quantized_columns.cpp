// The per-column kernels of quantized.h: a mirror with a constant per column, and extremes per column, over
// row-major weights (MatMul's [K, N], a column per output channel).
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../wire/fields.h"
#include "element_access.h"
#include "numeric.h"
#include "per_channel.h"
#include "quantized.h"

namespace qdqfold::kernels {

using wire::DataType;
using detail::is_4bit;
using detail::load_floats;

// ---------------------------------------------------------------- per-column mirror and extremes

namespace {

template <class U>
void put(std::string& out, size_t j, U v) {
  std::memcpy(out.data() + j * sizeof(U), &v, sizeof(U));
}

// (q ^ flip[j]) + add[j] over n elements of width sizeof(U).
template <class U>
void mirror_columns_of(const char* src, char* dst, int64_t n, const char* flip, const char* add) {
  constexpr int64_t kChunk = 1024;
  U buf[kChunk], f[kChunk], a[kChunk];
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    const auto bytes = static_cast<size_t>(k) * sizeof(U);
    std::memcpy(buf, src + done * sizeof(U), bytes);
    std::memcpy(f, flip + done * sizeof(U), bytes);
    std::memcpy(a, add + done * sizeof(U), bytes);
    for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<U>((buf[i] ^ f[i]) + a[i]);
    std::memcpy(dst + done * sizeof(U), buf, bytes);
  }
}

template <class T>
void column_extremes_of(const char* src, int64_t first, int64_t rows, int64_t n, int64_t* lo, int64_t* hi) {
  constexpr int64_t kChunk = 1024;
  T buf[kChunk], tlo[kChunk], thi[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {  // a slice of columns at a time: its accumulators stay in L1
    const int64_t k = std::min(kChunk, n - c0);
    std::fill(tlo, tlo + k, std::numeric_limits<T>::max());
    std::fill(thi, thi + k, std::numeric_limits<T>::lowest());
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(buf, src + (first + r * n + c0) * static_cast<int64_t>(sizeof(T)), static_cast<size_t>(k) * sizeof(T));
      for (int64_t i = 0; i < k; ++i) {
        tlo[i] = buf[i] < tlo[i] ? buf[i] : tlo[i];
        thi[i] = buf[i] > thi[i] ? buf[i] : thi[i];
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      lo[c0 + i] = std::min<int64_t>(lo[c0 + i], tlo[i]);
      hi[c0 + i] = std::max<int64_t>(hi[c0 + i], thi[i]);
    }
  }
}

}  // namespace

MirrorColumns mirror_columns(int32_t t, const std::vector<int64_t>& c, const std::vector<char>& negated) {
  const size_t n = c.size(), w = std::max<size_t>(quantized_width(t), 1);
  MirrorColumns m;
  m.flip.assign(n * w, '\0');
  m.add.assign(n * w, '\0');
  for (size_t j = 0; j < n; ++j) {
    if (!negated[j]) continue;
    const auto add = static_cast<uint64_t>(c[j] + 1);
    switch (w) {
      case 1: put<uint8_t>(m.flip, j, is_4bit(t) ? 0x0f : 0xff); put<uint8_t>(m.add, j, static_cast<uint8_t>(add & (is_4bit(t) ? 0x0f : 0xff))); break;
      case 2: put<uint16_t>(m.flip, j, 0xffff); put<uint16_t>(m.add, j, static_cast<uint16_t>(add)); break;
      default: put<uint32_t>(m.flip, j, 0xffffffffu); put<uint32_t>(m.add, j, static_cast<uint32_t>(add)); break;
    }
  }
  if (is_4bit(t)) {
    m.pair_flip.assign(n / 2, '\0');
    m.pair_add_low.assign(n / 2, '\0');
    m.pair_add_high.assign(n / 2, '\0');
    for (size_t p = 0; p < n / 2; ++p) {
      m.pair_flip[p] = static_cast<char>(m.flip[2 * p] | (m.flip[2 * p + 1] << 4));
      m.pair_add_low[p] = m.add[2 * p];
      m.pair_add_high[p] = static_cast<char>(m.add[2 * p + 1] << 4);
    }
  }
  return m;
}

void mirror_integers(const char* src, char* dst, int32_t t, int64_t first, int64_t n, int64_t dst_first,
                     const MirrorColumns& m, int64_t column0) {
  if (is_4bit(t)) {
    const auto* p = reinterpret_cast<const uint8_t*>(src);
    auto* d = reinterpret_cast<uint8_t*>(dst);
    int64_t j = 0;
    if (first % 2 == 0 && column0 % 2 == 0) {  // whole bytes, two columns each
      const auto* f = reinterpret_cast<const uint8_t*>(m.pair_flip.data()) + column0 / 2;
      const auto* lo = reinterpret_cast<const uint8_t*>(m.pair_add_low.data()) + column0 / 2;
      const auto* hi = reinterpret_cast<const uint8_t*>(m.pair_add_high.data()) + column0 / 2;
      const uint8_t* s = p + first / 2;
      uint8_t* o = d + (first - dst_first) / 2;
      const int64_t bytes = n / 2;
      for (int64_t b = 0; b < bytes; ++b) {
        const auto x = static_cast<uint8_t>(s[b] ^ f[b]);
        o[b] = static_cast<uint8_t>(((x + lo[b]) & 0x0f) | (((x & 0xf0) + hi[b]) & 0xf0));
      }
      j = 2 * bytes;
    }
    const auto* f = reinterpret_cast<const uint8_t*>(m.flip.data()) + column0;
    const auto* a = reinterpret_cast<const uint8_t*>(m.add.data()) + column0;
    for (; j < n; ++j) {
      const int64_t i = first + j;
      const int nibble = (i & 1) ? p[i >> 1] >> 4 : p[i >> 1] & 0x0f;
      d[(i - dst_first) >> 1] |= static_cast<uint8_t>((((nibble ^ f[j]) + a[j]) & 0x0f) << (4 * ((i - dst_first) & 1)));
    }
    return;
  }
  const size_t w = quantized_width(t);
  const char* s = src + first * w;
  char* o = dst + (first - dst_first) * w;
  const char* f = m.flip.data() + column0 * w;
  const char* a = m.add.data() + column0 * w;
  switch (w) {
    case 1: mirror_columns_of<uint8_t>(s, o, n, f, a); break;
    case 2: mirror_columns_of<uint16_t>(s, o, n, f, a); break;
    default: mirror_columns_of<uint32_t>(s, o, n, f, a); break;
  }
}

void integer_column_extremes(const char* src, int32_t t, int64_t first, int64_t rows, int64_t n, int64_t* lo,
                             int64_t* hi) {
  switch (static_cast<DataType>(t)) {
    case DataType::Int8: return column_extremes_of<int8_t>(src, first, rows, n, lo, hi);
    case DataType::Uint8: return column_extremes_of<uint8_t>(src, first, rows, n, lo, hi);
    case DataType::Int16: return column_extremes_of<int16_t>(src, first, rows, n, lo, hi);
    case DataType::Uint16: return column_extremes_of<uint16_t>(src, first, rows, n, lo, hi);
    case DataType::Int32: return column_extremes_of<int32_t>(src, first, rows, n, lo, hi);
    default: break;
  }
  const auto* p = reinterpret_cast<const uint8_t*>(src);
  const bool is_signed = t == static_cast<int32_t>(DataType::Int4);
  if (first % 2 == 0 && n % 2 == 0) {  // 4-bit rows of whole bytes: even columns in the low nibbles
    const int64_t bytes = n / 2;
    std::vector<int8_t> lo_even(bytes, 127), hi_even(bytes, -128), lo_odd(bytes, 127), hi_odd(bytes, -128);
    const int8_t sign = is_signed ? 8 : 0;  // (v ^ 8) - 8 sign-extends a nibble
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* row = p + (first + r * n) / 2;
      for (int64_t b = 0; b < bytes; ++b) {
        const auto even = static_cast<int8_t>(((row[b] & 0x0f) ^ sign) - sign);
        const auto odd = static_cast<int8_t>(((row[b] >> 4) ^ sign) - sign);
        lo_even[b] = even < lo_even[b] ? even : lo_even[b];
        hi_even[b] = even > hi_even[b] ? even : hi_even[b];
        lo_odd[b] = odd < lo_odd[b] ? odd : lo_odd[b];
        hi_odd[b] = odd > hi_odd[b] ? odd : hi_odd[b];
      }
    }
    for (int64_t b = 0; b < bytes; ++b) {
      lo[2 * b] = std::min<int64_t>(lo[2 * b], lo_even[b]);
      hi[2 * b] = std::max<int64_t>(hi[2 * b], hi_even[b]);
      lo[2 * b + 1] = std::min<int64_t>(lo[2 * b + 1], lo_odd[b]);
      hi[2 * b + 1] = std::max<int64_t>(hi[2 * b + 1], hi_odd[b]);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t v = int4_at(p, first + r * n + j, is_signed);
      lo[j] = std::min(lo[j], v);
      hi[j] = std::max(hi[j], v);
    }
}

void float_column_extremes(const char* src, int32_t t, int64_t first, int64_t rows, int64_t n, float* lo, float* hi,
                           char* nan) {
  constexpr int64_t kChunk = 1024;
  float buf[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t k = std::min(kChunk, n - c0);
    float* l = lo + c0;
    float* h = hi + c0;
    char* bad = nan + c0;
    for (int64_t r = 0; r < rows; ++r) {
      load_floats(src, t, first + r * n + c0, k, buf);
      for (int64_t i = 0; i < k; ++i) {
        const float x = buf[i];
        bad[i] |= static_cast<char>(x != x);  // NaN compares false below, so min and max skip it
        l[i] = x < l[i] ? x : l[i];
        h[i] = x > h[i] ? x : h[i];
      }
    }
  }
}

}  // namespace qdqfold::kernels
