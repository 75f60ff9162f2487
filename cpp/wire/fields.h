// Field numbers of the ONNX messages qdqfold reads, from the onnx.proto that the onnx wheel ships.
// One enum per message, so no field number appears as a bare literal elsewhere.
#pragma once

#include <cstdint>

namespace qdqfold::wire {

enum class ModelField : uint32_t {
  IrVersion = 1, ProducerName = 2, ProducerVersion = 3, Domain = 4, ModelVersion = 5, DocString = 6,
  Graph = 7, OpsetImport = 8, MetadataProps = 14, TrainingInfo = 20, Functions = 25, Configuration = 26,
};
enum class OpsetField : uint32_t { Domain = 1, Version = 2 };
enum class GraphField : uint32_t {
  Node = 1, Name = 2, Initializer = 5, DocString = 10, Input = 11, Output = 12, ValueInfo = 13,
  QuantizationAnnotation = 14, SparseInitializer = 15, MetadataProps = 16,
};
enum class FunctionField : uint32_t {
  Name = 1, Input = 4, Output = 5, Attribute = 6, Node = 7, DocString = 8, OpsetImport = 9, Domain = 10,
  AttributeProto = 11, ValueInfo = 12, Overload = 13, MetadataProps = 14,
};
enum class NodeField : uint32_t {
  Input = 1, Output = 2, Name = 3, OpType = 4, Attribute = 5, DocString = 6, Domain = 7, Overload = 8,
  MetadataProps = 9, DeviceConfigurations = 10,
};
enum class AttributeField : uint32_t {
  Name = 1, F = 2, I = 3, S = 4, T = 5, G = 6, Floats = 7, Ints = 8, Strings = 9, Tensors = 10, Graphs = 11,
  DocString = 13, Tp = 14, TypeProtos = 15, Type = 20, RefAttrName = 21, SparseTensor = 22, SparseTensors = 23,
};
enum class AttributeType : int {
  Undefined = 0, Float = 1, Int = 2, String = 3, Tensor = 4, Graph = 5, Floats = 6, Ints = 7, Strings = 8,
  Tensors = 9, Graphs = 10, SparseTensor = 11, SparseTensors = 12, TypeProto = 13, TypeProtos = 14,
};
enum class TensorField : uint32_t {
  Dims = 1, DataType = 2, Segment = 3, FloatData = 4, Int32Data = 5, StringData = 6, Int64Data = 7, Name = 8,
  RawData = 9, DoubleData = 10, Uint64Data = 11, DocString = 12, ExternalData = 13, DataLocation = 14,
  MetadataProps = 16,
};
enum class StringStringField : uint32_t { Key = 1, Value = 2 };
enum class ValueInfoField : uint32_t { Name = 1, Type = 2, DocString = 3, MetadataProps = 4 };
enum class TypeField : uint32_t { TensorType = 1 };
enum class TensorTypeField : uint32_t { ElemType = 1, Shape = 2 };
enum class ShapeField : uint32_t { Dim = 1 };
enum class DimensionField : uint32_t { DimValue = 1, DimParam = 2 };

// TensorProto.DataType
enum class DataType : int32_t {
  Undefined = 0, Float = 1, Uint8 = 2, Int8 = 3, Uint16 = 4, Int16 = 5, Int32 = 6, Int64 = 7, String = 8, Bool = 9,
  Float16 = 10, Double = 11, Uint32 = 12, Uint64 = 13, Complex64 = 14, Complex128 = 15, Bfloat16 = 16,
  Float8E4M3FN = 17, Float8E4M3FNUZ = 18, Float8E5M2 = 19, Float8E5M2FNUZ = 20, Uint4 = 21, Int4 = 22,
  Float4E2M1 = 23, Float8E8M0 = 24, Uint2 = 25, Int2 = 26, Float6E2M3 = 27, Float6E3M2 = 28,
};

template <class E>
constexpr uint32_t num(E e) { return static_cast<uint32_t>(e); }

}  // namespace qdqfold::wire
