// A constant tensor: a view of a TensorProto (initializer, Constant node value, or attribute), validated on
// parse so that folds can trust dims, element count and data size.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "../wire/fields.h"
#include "../wire/reader.h"

namespace qdqfold::graph {

using wire::DataType;

// Bytes per element, or 0 for types qdqfold never reads as numbers (string, complex, sub-byte floats).
// 4-bit integers report 0 here; see is_packed_4bit().
size_t element_size(int32_t data_type);
bool is_packed_4bit(int32_t data_type);
bool is_float_type(int32_t data_type);    // float32/16/64, bfloat16
bool is_integer_type(int32_t data_type);  // 8/16/32-bit and 4-bit integers
const char* data_type_name(int32_t data_type);

struct Tensor {
  std::string name;
  int32_t data_type = 0;
  std::vector<int64_t> dims;
  int64_t count = 1;             // product of dims
  bool external = false;         // data_location == EXTERNAL: the bytes live in another file
  bool has_raw = false;
  std::string_view raw;          // raw_data payload
  uint32_t typed_field = 0;      // which *_data field holds the values when there is no raw_data
  std::vector<std::string_view> typed_payloads;  // that field's occurrences (packed or single values)
  std::string_view body;         // the whole TensorProto payload

  // The element bytes in raw_data layout (little-endian, 4-bit types packed two per byte). A view when the
  // tensor has raw_data, otherwise decoded into `storage`. Returns nullopt for external data or typed data
  // qdqfold cannot decode.
  std::optional<std::string_view> bytes(std::string& storage) const;
  // Element values as doubles (float and integer types). nullopt where bytes() is nullopt or the type has
  // no numeric meaning for qdqfold.
  std::optional<std::vector<double>> values() const;
};

// Parses and validates a TensorProto payload. `context` names where it was found, for error messages.
Tensor parse_tensor(std::string_view body, const char* base, const std::string& context);

// Encodes a TensorProto with the given name, type, dims and raw element bytes.
std::string encode_tensor(const std::string& name, int32_t data_type, const std::vector<int64_t>& dims,
                          std::string_view raw);
// Re-encodes `original` with new dims, type and raw data, keeping every other field (doc_string,
// metadata_props, unknown fields) as it was. `name` replaces the name when given.
std::string reencode_tensor(const Tensor& original, int32_t data_type, const std::vector<int64_t>& dims,
                            std::string_view raw, const std::string* name = nullptr);

}  // namespace qdqfold::graph
