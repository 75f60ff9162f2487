#include "tensor.h"

#include <cstring>
#include <limits>

#include "../kernels/numeric.h"
#include "../wire/writer.h"

namespace qdqfold::graph {

using wire::Field;
using wire::num;
using wire::Reader;
using wire::TensorField;
using wire::WireError;
using wire::WireType;

size_t element_size(int32_t t) {
  switch (static_cast<DataType>(t)) {
    case DataType::Float: case DataType::Int32: case DataType::Uint32: return 4;
    case DataType::Double: case DataType::Int64: case DataType::Uint64: return 8;
    case DataType::Float16: case DataType::Bfloat16: case DataType::Int16: case DataType::Uint16: return 2;
    case DataType::Int8: case DataType::Uint8: case DataType::Bool: case DataType::Float8E4M3FN:
    case DataType::Float8E4M3FNUZ: case DataType::Float8E5M2: case DataType::Float8E5M2FNUZ:
    case DataType::Float8E8M0: return 1;
    case DataType::Complex64: return 8;
    case DataType::Complex128: return 16;
    default: return 0;
  }
}

bool is_packed_4bit(int32_t t) {
  auto d = static_cast<DataType>(t);
  return d == DataType::Int4 || d == DataType::Uint4 || d == DataType::Float4E2M1;
}
bool is_float_type(int32_t t) {
  auto d = static_cast<DataType>(t);
  return d == DataType::Float || d == DataType::Float16 || d == DataType::Double || d == DataType::Bfloat16;
}
bool is_integer_type(int32_t t) {
  switch (static_cast<DataType>(t)) {
    case DataType::Int8: case DataType::Uint8: case DataType::Int16: case DataType::Uint16:
    case DataType::Int32: case DataType::Uint32: case DataType::Int64: case DataType::Uint64:
    case DataType::Int4: case DataType::Uint4: return true;
    default: return false;
  }
}

const char* data_type_name(int32_t t) {
  static const char* names[] = {"undefined", "float32", "uint8", "int8", "uint16", "int16", "int32", "int64",
                                "string", "bool", "float16", "float64", "uint32", "uint64", "complex64",
                                "complex128", "bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2",
                                "float8e5m2fnuz", "uint4", "int4", "float4e2m1", "float8e8m0", "uint2", "int2",
                                "float6e2m3", "float6e3m2"};
  if (t >= 0 && t < static_cast<int32_t>(sizeof(names) / sizeof(names[0]))) return names[t];
  return "unknown";
}

// Size in bytes of `count` elements in raw_data layout, or nullopt where the type has no fixed layout.
static std::optional<uint64_t> raw_size(int32_t t, int64_t count) {
  if (is_packed_4bit(t)) return (static_cast<uint64_t>(count) + 1) / 2;
  size_t es = element_size(t);
  if (es == 0) return std::nullopt;
  // count * es can pass 2**64 (dims [2**62] of float32 is 0 bytes modulo 2**64): no buffer is that large.
  if (static_cast<uint64_t>(count) > std::numeric_limits<uint64_t>::max() / es)
    return std::numeric_limits<uint64_t>::max();
  return static_cast<uint64_t>(count) * es;
}

static WireType expected_scalar_wire_type(TensorField field) {
  if (field == TensorField::FloatData) return WireType::Fixed32;
  if (field == TensorField::DoubleData) return WireType::Fixed64;
  if (field == TensorField::StringData) return WireType::Bytes;
  return WireType::Varint;
}

static ExternalRef parse_external_entry(ExternalRef ref, std::string_view entry, const char* base, const char* where) {
  std::string key, value;
  Reader r(entry, base);
  while (!r.done()) {
    Field f = r.next(where);
    if (f.type != WireType::Bytes) continue;
    if (f.number == num(wire::StringStringField::Key)) key = std::string(f.bytes);
    else if (f.number == num(wire::StringStringField::Value)) value = std::string(f.bytes);
  }
  auto number = [&](const std::string& text) -> int64_t {
    if (text.empty() || text.size() > 18 || text.find_first_not_of("0123456789") != std::string::npos)
      throw WireError(std::string(where) + ": external_data " + key + " '" + text + "' is not a non-negative integer");
    return std::stoll(text);
  };
  if (key == "location") ref.location = value;
  else if (key == "offset") ref.offset = number(value);
  else if (key == "length") ref.length = number(value);
  return ref;
}

Tensor parse_tensor(std::string_view body, const char* base, const std::string& context, ExternalResolver* external) {
  Tensor t;
  t.body = body;
  Reader r(body, base);
  const std::string where = context + " (TensorProto)";
  while (!r.done()) {
    Field f = r.next(where.c_str());
    switch (static_cast<TensorField>(f.number)) {
      case TensorField::Dims:
        wire::for_each_varint(f, base, where.c_str(), [&](uint64_t v) { t.dims.push_back(static_cast<int64_t>(v)); });
        break;
      case TensorField::DataType:
        if (f.type != WireType::Varint) r.fail(where.c_str(), f.whole.data(), "data_type has the wrong wire type");
        t.data_type = static_cast<int32_t>(f.scalar);
        break;
      case TensorField::Name:
        if (f.type != WireType::Bytes) r.fail(where.c_str(), f.whole.data(), "name has the wrong wire type");
        t.name = std::string(f.bytes);
        break;
      case TensorField::RawData:
        if (f.type != WireType::Bytes) r.fail(where.c_str(), f.whole.data(), "raw_data has the wrong wire type");
        t.has_raw = true;
        t.raw = f.bytes;
        break;
      case TensorField::DataLocation:
        t.external = f.type == WireType::Varint && f.scalar == 1;
        break;
      case TensorField::ExternalData:
        if (f.type != WireType::Bytes) r.fail(where.c_str(), f.whole.data(), "external_data has the wrong wire type");
        t.external_ref = parse_external_entry(t.external_ref, f.bytes, base, where.c_str());
        break;
      case TensorField::FloatData: case TensorField::Int32Data: case TensorField::Int64Data:
      case TensorField::DoubleData: case TensorField::Uint64Data: case TensorField::StringData:
        if (t.typed_field != 0 && t.typed_field != f.number)
          r.fail(where.c_str(), f.whole.data(), "tensor holds values in two different *_data fields");
        t.typed_field = f.number;
        if (f.type != WireType::Bytes && f.type != expected_scalar_wire_type(static_cast<TensorField>(f.number)))
          r.fail(where.c_str(), f.whole.data(), "a *_data field has the wrong wire type");
        t.typed_payloads.push_back(f.bytes);  // packed content, or one unpacked value's encoding
        break;
      default: break;  // other fields (doc_string, segment, external_data, metadata) pass through untouched
    }
  }
  // Validate the shape: no negative dims, no overflowing product.
  int64_t count = 1;
  for (int64_t d : t.dims) {
    if (d < 0) throw WireError(where + " '" + t.name + "': negative dimension " + std::to_string(d));
    if (d != 0 && count > std::numeric_limits<int64_t>::max() / d)
      throw WireError(where + " '" + t.name + "': the product of its dims overflows");
    count *= d;
  }
  t.count = count;
  if (t.external) {
    if (t.external_ref.location.empty())
      throw WireError(where + " '" + t.name + "': external data without a location");
    t.has_raw = false;
    t.raw = {};
    if (external) {
      t.raw = external->resolve(t.external_ref, t.name);
      t.has_raw = true;
      t.external_ref.length = static_cast<int64_t>(t.raw.size());
    }
  }
  if (t.has_raw) {
    auto expected = raw_size(t.data_type, count);
    if (expected && *expected != t.raw.size())
      throw WireError(where + " '" + t.name + "': raw_data holds " + std::to_string(t.raw.size()) +
                      " bytes but dims and data_type (" + data_type_name(t.data_type) + ") need " +
                      std::to_string(*expected));
  }
  return t;
}

namespace {

// The bytes a tensor's typed *_data field occupies: every value takes at least one, so a count beyond this
// is wrong and must not size an allocation (dims of 2**40 with one value in float_data).
size_t typed_payload_bytes(const Tensor& t) {
  size_t bytes = 0;
  for (auto payload : t.typed_payloads) bytes += payload.size();
  return bytes;
}

// Calls `f` with every entry of a tensor's int32_data (packed or one value per occurrence).
template <class F>
void for_each_int32_entry(const Tensor& t, F&& f) {
  for (auto payload : t.typed_payloads) {
    wire::Field field;
    field.type = WireType::Bytes;
    field.bytes = payload;
    field.whole = payload;
    wire::for_each_varint(field, payload.data(), "int32_data", f);
  }
}

// Decodes the values of a typed *_data field into raw_data layout.
bool decode_typed(const Tensor& t, std::string& out) {
  const auto dt = static_cast<DataType>(t.data_type);
  const size_t es = element_size(t.data_type);
  const auto field = static_cast<TensorField>(t.typed_field);
  if (t.typed_field == 0) return t.count == 0;
  if (is_packed_4bit(t.data_type)) {
    // int32_data holds two 4-bit values per entry, one byte's worth: the first in the low nibble (onnx.proto,
    // and what onnx.helper.make_tensor writes).
    if (field != TensorField::Int32Data) return false;
    const uint64_t bytes = (static_cast<uint64_t>(t.count) + 1) / 2;
    if (bytes > typed_payload_bytes(t)) return false;
    out.clear();
    out.reserve(static_cast<size_t>(bytes));
    bool ok = true;
    for_each_int32_entry(t, [&](uint64_t v) {
      if (v > 0xFF) ok = false;  // only the two nibbles of one byte may be set
      out.push_back(static_cast<char>(static_cast<uint8_t>(v)));
    });
    return ok && out.size() == bytes;
  }
  if (es == 0) return false;
  if (static_cast<uint64_t>(t.count) > typed_payload_bytes(t)) return false;
  out.clear();
  out.reserve(static_cast<size_t>(t.count) * es);
  auto push = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  if (field == TensorField::FloatData || field == TensorField::DoubleData) {
    size_t w = field == TensorField::FloatData ? 4 : 8;
    if ((dt == DataType::Float && w == 4) || (dt == DataType::Double && w == 8)) {
      for (auto payload : t.typed_payloads) {
        if (payload.size() % w) return false;
        out.append(payload.data(), payload.size());
      }
    } else {
      return false;
    }
  } else if (field == TensorField::Int32Data) {
    // int32_data holds int32, and (widened) the 8/16-bit integers, bool, and float16/bfloat16 bit patterns.
    bool ok = true;
    for_each_int32_entry(t, [&](uint64_t v) {
      auto x = static_cast<int32_t>(static_cast<uint32_t>(v));
      switch (es) {
        case 4: push(&x, 4); break;
        case 2: { auto y = static_cast<uint16_t>(x); push(&y, 2); break; }
        case 1: { auto y = static_cast<uint8_t>(x); push(&y, 1); break; }
        default: ok = false;
      }
    });
    if (!ok || is_packed_4bit(t.data_type)) return false;
  } else if (field == TensorField::Int64Data || field == TensorField::Uint64Data) {
    if (es != 8) return false;
    for (auto payload : t.typed_payloads) {
      wire::Field f;
      f.type = WireType::Bytes;
      f.bytes = payload;
      f.whole = payload;
      wire::for_each_varint(f, payload.data(), "int64_data", [&](uint64_t v) { push(&v, 8); });
    }
  } else {
    return false;
  }
  return out.size() == static_cast<size_t>(t.count) * es;
}

}  // namespace

std::optional<std::string_view> Tensor::bytes(std::string& storage) const {
  if (lazy) {
    storage.resize(lazy->size);
    lazy->fill(storage.data());
    return std::string_view(storage);
  }
  if (has_raw) return raw;
  if (external) return std::nullopt;
  if (!decode_typed(*this, storage)) return std::nullopt;
  return std::string_view(storage);
}

std::optional<std::vector<double>> Tensor::values() const {
  // Types without a fixed element size skip the raw_data size check: never size an allocation by them.
  if (!is_float_type(data_type) && !is_integer_type(data_type)) return std::nullopt;
  std::string storage;
  auto b = bytes(storage);
  if (!b) return std::nullopt;
  std::vector<double> v(static_cast<size_t>(count));
  const char* p = b->data();
  auto load = [&](auto tag, size_t i) {
    decltype(tag) x;
    std::memcpy(&x, p + i * sizeof(x), sizeof(x));
    return x;
  };
  for (size_t i = 0; i < v.size(); ++i) {
    switch (static_cast<DataType>(data_type)) {
      case DataType::Float: v[i] = load(float{}, i); break;
      case DataType::Double: v[i] = load(double{}, i); break;
      case DataType::Float16: v[i] = kernels::half_to_float(load(uint16_t{}, i)); break;
      case DataType::Bfloat16: v[i] = kernels::bf16_to_float(load(uint16_t{}, i)); break;
      case DataType::Int8: v[i] = load(int8_t{}, i); break;
      case DataType::Uint8: v[i] = load(uint8_t{}, i); break;
      case DataType::Int16: v[i] = load(int16_t{}, i); break;
      case DataType::Uint16: v[i] = load(uint16_t{}, i); break;
      case DataType::Int32: v[i] = load(int32_t{}, i); break;
      case DataType::Uint32: v[i] = load(uint32_t{}, i); break;
      case DataType::Int64: v[i] = static_cast<double>(load(int64_t{}, i)); break;
      case DataType::Int4: case DataType::Uint4:
        v[i] = kernels::int4_at(reinterpret_cast<const uint8_t*>(p), static_cast<int64_t>(i),
                                data_type == static_cast<int32_t>(DataType::Int4));
        break;
      default: return std::nullopt;
    }
  }
  return v;
}

std::string encode_tensor_header(const std::string& name, int32_t data_type, const std::vector<int64_t>& dims) {
  std::string out;
  for (int64_t d : dims) wire::put_varint_field(out, num(TensorField::Dims), static_cast<uint64_t>(d));
  wire::put_varint_field(out, num(TensorField::DataType), static_cast<uint64_t>(data_type));
  wire::put_bytes_field(out, num(TensorField::Name), name);
  return out;
}

std::string encode_tensor(const std::string& name, int32_t data_type, const std::vector<int64_t>& dims,
                          std::string_view raw) {
  std::string out = encode_tensor_header(name, data_type, dims);
  wire::put_bytes_field(out, num(TensorField::RawData), raw);
  return out;
}

std::string reencode_tensor(const Tensor& original, int32_t data_type, const std::vector<int64_t>& dims,
                            std::string_view raw, const std::string* name) {
  std::string out = reencode_tensor_header(original, data_type, dims, name);
  wire::put_bytes_field(out, num(TensorField::RawData), raw);
  return out;
}

double float_element(int32_t data_type, std::string_view raw, size_t i) {
  switch (static_cast<DataType>(data_type)) {
    case DataType::Float: { float v; std::memcpy(&v, raw.data() + 4 * i, 4); return v; }
    case DataType::Double: { double v; std::memcpy(&v, raw.data() + 8 * i, 8); return v; }
    case DataType::Float16: { uint16_t v; std::memcpy(&v, raw.data() + 2 * i, 2); return kernels::half_to_float(v); }
    case DataType::Bfloat16: { uint16_t v; std::memcpy(&v, raw.data() + 2 * i, 2); return kernels::bf16_to_float(v); }
    default: return 0.0;
  }
}

std::string reencode_tensor_header(const Tensor& original, int32_t data_type, const std::vector<int64_t>& dims,
                                   const std::string* name) {
  std::string out;
  for (int64_t d : dims) wire::put_varint_field(out, num(TensorField::Dims), static_cast<uint64_t>(d));
  wire::put_varint_field(out, num(TensorField::DataType), static_cast<uint64_t>(data_type));
  Reader r(original.body, original.body.data());
  while (!r.done()) {
    Field f = r.next("tensor");
    switch (static_cast<TensorField>(f.number)) {
      case TensorField::Dims: case TensorField::DataType: case TensorField::RawData: case TensorField::FloatData:
      case TensorField::Int32Data: case TensorField::Int64Data: case TensorField::DoubleData:
      case TensorField::Uint64Data: case TensorField::ExternalData: case TensorField::DataLocation:
        break;  // replaced below
      case TensorField::Name:
        if (name) wire::put_bytes_field(out, num(TensorField::Name), *name);
        else out.append(f.whole);
        break;
      default: out.append(f.whole);
    }
  }
  return out;
}

}  // namespace qdqfold::graph
