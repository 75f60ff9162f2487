// A constant tensor: a view of a TensorProto (initializer, Constant node value, or attribute), validated on
// parse so that folds can trust dims, element count and data size.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
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

// Where an external tensor's bytes live (TensorProto.external_data).
struct ExternalRef {
  std::string location;
  int64_t offset = 0;
  int64_t length = -1;  // -1: up to the end of the file
};

// Maps external data files (relative to the model's directory) and returns a tensor's bytes. Throws
// wire::WireError naming the file when it is missing, escapes the model's directory, or is too short.
class ExternalResolver {
 public:
  virtual ~ExternalResolver() = default;
  virtual std::string_view resolve(const ExternalRef& ref, const std::string& tensor_name) = 0;
  // True when `bytes` lie inside a file this resolver mapped (such views stay valid while it lives).
  virtual bool holds(std::string_view bytes) const = 0;
};

// Bytes a fold computes from other bytes. They are produced when the output is written, straight into the
// output buffer, so a folded weight is written once and never held twice; a later fold that reads the
// tensor materializes them.
struct LazyBytes {
  size_t size = 0;
  std::function<void(char* dst)> fill;
  // Optional: writes bytes [begin, end) to dst, so a file can be written a chunk at a time.
  std::function<void(char* dst, size_t begin, size_t end)> fill_range;
};

// Bytes a data generator (LazyBytes) reads when the output is written, after the fold that made it returned.
// The lifetime is part of the type: either a view that stays valid until then (the input buffer, a mapped
// external data file: Model::outlives_writing) or a copy that every copy of this object shares. Only
// Model::pin makes one, so a generator cannot be handed a view that dies with the fold.
class PinnedBytes {
 public:
  PinnedBytes() = default;
  std::string_view view() const { return view_; }
  const char* data() const { return view_.data(); }
  size_t size() const { return view_.size(); }
  char operator[](size_t i) const { return view_[i]; }
  bool owned() const { return owner_ != nullptr; }

 private:
  friend class Model;
  PinnedBytes(std::shared_ptr<const std::string> owner, std::string_view view)
      : owner_(std::move(owner)), view_(view) {}
  std::shared_ptr<const std::string> owner_;
  std::string_view view_;
};

struct Tensor {
  std::string name;
  int32_t data_type = 0;
  std::vector<int64_t> dims;
  int64_t count = 1;             // product of dims
  bool external = false;         // data_location == EXTERNAL: the bytes live in another file
  ExternalRef external_ref;      // where, when `external` (raw views the mapped file once resolved)
  std::shared_ptr<const LazyBytes> lazy;  // set for tensors a fold produces lazily (raw is then empty)
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

// Element i of raw data of a float type (float32, float64, float16, bfloat16) as a double; 0 for other types.
double float_element(int32_t data_type, std::string_view raw, size_t i);

// Parses and validates a TensorProto payload. `context` names where it was found, for error messages.
// External data is resolved (mapped) through `external` when given; without it the bytes stay unknown.
Tensor parse_tensor(std::string_view body, const char* base, const std::string& context,
                    ExternalResolver* external = nullptr);

// Encodes a TensorProto with the given name, type, dims and raw element bytes.
std::string encode_tensor(const std::string& name, int32_t data_type, const std::vector<int64_t>& dims,
                          std::string_view raw);
// Every field of such a tensor but raw_data.
std::string encode_tensor_header(const std::string& name, int32_t data_type, const std::vector<int64_t>& dims);
// Re-encodes `original` with new dims, type and raw data, keeping every other field (doc_string,
// metadata_props, unknown fields) as it was. `name` replaces the name when given.
std::string reencode_tensor(const Tensor& original, int32_t data_type, const std::vector<int64_t>& dims,
                            std::string_view raw, const std::string* name = nullptr);
// Every field of that re-encoding but raw_data (and the external-data fields): the writer appends the data,
// inline or as external_data entries.
std::string reencode_tensor_header(const Tensor& original, int32_t data_type, const std::vector<int64_t>& dims,
                                   const std::string* name = nullptr);

}  // namespace qdqfold::graph
