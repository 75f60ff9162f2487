// The graph index: a parsed view of a ModelProto that folds query and edit. Names, op types and attributes
// are small copies; tensor data and every untouched message stay views into the caller's buffer. Edits go
// through Graph's methods, which record them (NodeEdits, Graph::GraphEdits: private to graph/, reached by the
// parser and the writer through edit_record.h) and keep the index current; the writer (write.cpp) applies them
// and copies everything else through as byte ranges.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "../wire/reader.h"
#include "../wire/writer.h"
#include "tensor.h"

namespace qdqfold::graph {

struct Attribute {
  std::string name;
  int type = 0;  // AttributeProto.type as written (0 when the exporter left it out)
  bool has_i = false, has_f = false, has_s = false, has_t = false;
  int64_t i = 0;
  float f = 0;
  std::string_view s;
  std::string_view t;  // TensorProto payload
  std::vector<int64_t> ints;
  std::vector<float> floats;
  int graph_count = 0;  // how many graphs (g or graphs) it holds
};

class Graph;
class Model;
struct ExternalOutput;  // external_output.h

// Decides, for Model::EditPolicy::removal, whether a producer goes with the last reader of its output.
class RemovalPolicy {
 public:
  virtual ~RemovalPolicy() = default;
  // True when node `node` of `g`, the producer of `value`, which nothing reads any more, goes too.
  virtual bool goes_with_last_reader(Graph& g, int node, const std::string& value) const = 0;
};

// What folds changed on a node, applied by the writer (write.cpp). Only graph/ reads or writes it.
struct NodeEdits {
  bool removed = false;
  bool edited = false;                      // inputs, outputs, op_type or attributes changed
  std::vector<std::pair<std::string, std::string>> set_attributes;  // name -> AttributeProto payload
  bool created = false;                     // made by a fold; written from the fields above
  int insert_before = -1;                   // for created nodes: position among the original nodes
};

struct Node {
  std::string name, op_type, domain;
  std::vector<std::string> inputs, outputs;
  std::vector<Attribute> attributes;
  std::vector<std::unique_ptr<Graph>> subgraphs;
  std::string_view body;  // NodeProto payload (empty for nodes a fold created)

  // The edit record (NodeEdits) is private to graph/: folds edit through Graph's methods.
  bool removed() const { return edits_.removed; }
  bool created() const { return edits_.created; }  // made by a fold (Graph::add_node)

  bool is(std::string_view op) const { return op_type == op && (domain.empty() || domain == "ai.onnx"); }
  // An Identity of one value, not removed (torch's exporter shares equal initializers through them).
  bool is_plain_identity() const {
    return is("Identity") && inputs.size() == 1 && outputs.size() == 1 && subgraphs.empty() && !removed();
  }
  const Attribute* attr(std::string_view n) const;
  int64_t attr_int(std::string_view n, int64_t fallback) const;
  float attr_float(std::string_view n, float fallback) const;
  std::vector<int64_t> attr_ints(std::string_view n) const;
  std::string attr_string(std::string_view n, std::string fallback = "") const;
  std::string display_name(int index) const;

 private:
  friend class Graph;
  friend struct EditRecord;
  NodeEdits edits_;
};

enum class GraphKind { Main, Subgraph, Function };

struct Use {
  int node;
  int slot;  // input position; -1 when the value is read inside one of the node's subgraphs
};

// Where a constant came from, and its tensor.
struct ConstRef {
  Graph* graph = nullptr;  // the graph that holds it (may be an outer graph of the one asked)
  int initializer = -1;    // index into graph->initializers(), or
  int constant_node = -1;  // index of the Constant node in graph->nodes()
  Tensor tensor;
  // Read through Identity nodes (torch's exporter shares equal initializers that way): the tensor is another
  // value's, so `initializer` and `constant_node` are -1 and nothing edits it in place.
  bool through_identity = false;
};

struct ValueInfo {
  std::string name;
  std::string_view body;
};

class Graph {
 public:
  GraphKind kind = GraphKind::Main;
  Graph* parent = nullptr;
  Model* model = nullptr;
  std::string path;        // for reports: "main", "main/If_0:then_branch", "function:domain.name"
  std::string_view body;   // GraphProto / FunctionProto payload
  int owner_node = -1;  // for subgraphs: the node of `parent` that holds this graph,
  int owner_attribute = -1, owner_position = -1;  // in which attribute, at which position

  std::vector<ValueInfo> inputs, outputs;
  std::map<std::string, int64_t> function_opsets;  // FunctionProto.opset_import (functions only)

  struct FieldRef {
    uint32_t number;
    std::string_view whole;
    int index;  // position in nodes / initializers / value_info for those fields, else -1
  };

  // ---- the contents, read-only: every change goes through the edits below, which keep the index current
  const std::vector<Node>& nodes() const { return nodes_; }
  const std::vector<Tensor>& initializers() const { return initializers_; }
  const std::vector<ValueInfo>& value_info() const { return value_info_; }
  const std::vector<FieldRef>& fields() const { return fields_; }  // the GraphProto's fields, in order

  std::vector<ExternalRef> original_external;  // per original initializer: where its data lived, if external

  // Replacement or added data produced lazily (see LazyBytes): the TensorProto is `header` + raw_data.
  struct LazyInitializer {
    std::string header;
    std::shared_ptr<const LazyBytes> data;
  };
  // True when a fold edited this graph or a graph nested in it (the writer re-encodes it then).
  bool dirty() const { return edits_.dirty; }

  // ---- queries
  const std::vector<Use>& uses(const std::string& value) const;
  int producer(const std::string& value) const;  // node index, or -1
  bool is_graph_output(const std::string& value) const { return graph_outputs_.count(value) > 0; }
  bool is_graph_input(const std::string& value) const { return graph_inputs_.count(value) > 0; }
  // An initializer also listed as a graph input (a default the caller may override): not a constant, unless
  // the model freezes such inputs (Model::EditPolicy::freeze_initializer_inputs).
  bool is_overridable_initializer(const std::string& value) const;
  // How many initializers of this graph are overridable graph inputs.
  size_t overridable_initializer_count() const;
  // Number of readers of a value: node inputs, subgraph reads and graph outputs.
  size_t reader_count(const std::string& value) const;
  // A constant by name: an initializer (not overridable as a graph input) or a Constant node's value, here
  // or in an enclosing graph when this graph does not define the name, also read through Identity nodes
  // (and chains of them); see ConstRef::through_identity.
  std::optional<ConstRef> constant(const std::string& value);
  // Static shape from value_info / inputs / outputs: dims, -1 where a dim is symbolic or unknown.
  // A name this graph does not define (no producer, initializer or input here) is read from an enclosing
  // graph, whose shape information shape_of then consults.
  std::optional<std::vector<int64_t>> shape_of(const std::string& value) const;
  // The shape a graph input of this graph declares (its type, which runtimes check feeds against), and nothing
  // else: no value_info or output claim. nullopt when `value` is no input here or declares no shape.
  std::optional<std::vector<int64_t>> input_shape(const std::string& value) const;
  // The element type (TensorProto.DataType) graph inputs / value_info / outputs declare for `value`, or nullopt.
  std::optional<int32_t> declared_type(const std::string& value) const;
  // True when this graph itself defines `value`: a node output, an initializer or a graph input.
  bool defines(const std::string& value) const;
  int64_t opset(const std::string& domain = "") const;

  // ---- edits (each keeps the index current and marks the graph dirty)
  void set_input(int node, int slot, const std::string& value);
  void set_output(int node, int slot, const std::string& value);
  void set_op_type(int node, const std::string& op_type);
  // One setter per attribute kind: each sets the attribute both in the written node and in its parsed view
  // (Node::attr), so a later fold reading the node (a second BN folded into the same layer) sees the new value.
  // An attribute of that name is replaced (where it was), else added.
  void set_int_attribute(int node, const std::string& name, int64_t value);
  void set_float_attribute(int node, const std::string& name, float value);
  void set_ints_attribute(int node, const std::string& name, const std::vector<int64_t>& values);
  void set_floats_attribute(int node, const std::string& name, const std::vector<float>& values);
  void set_string_attribute(int node, const std::string& name, const std::string& value);
  // `tensor_payload`: a TensorProto (encode_tensor, reencode_tensor).
  void set_tensor_attribute(int node, const std::string& name, const std::string& tensor_payload);
  void remove_node(int node);
  int add_node(Node node, int insert_before);
  // Adds `node` where the writer puts it just before node `reader` (an original node, or one a fold created).
  int add_node_before(Node node, int reader);
  // The one constant writer: makes the inputs `readers` (which all read `old`, or nothing when `old` is empty)
  // read a constant of `data_type` and `dims`. `old` is replaced in place when it is an initializer of this
  // graph that only `readers` read (and not a graph output); otherwise the constant is stored under a fresh
  // name derived from `old` (or `base` when `old` is empty) + "_bnfolded" (an initializer; a Constant node in
  // a function), the readers are rewired to it, and `old` is dropped if nothing reads it any more. Its value
  // info is dropped when the dims change. Returns the name read now, and whether it is a new tensor. `old` is
  // taken by value: it is often a node's input, which the rewiring changes.
  struct WrittenConstant {
    std::string name;
    bool is_new = false;
  };
  // `keep_constant_node`: where `old` is the output of a Constant node of this graph that only `readers` read
  // (and not a graph output), that node's value is replaced in place instead, so the exporter's form stays
  // (ModelOpt writes its weight scales as Constant nodes).
  WrittenConstant write_constant(const std::vector<Use>& readers, std::string old, int32_t data_type,
                                 const std::vector<int64_t>& dims, const std::string& raw, const std::string& base,
                                 bool keep_constant_node = false);
  // The same with data produced when the output is written.
  WrittenConstant write_constant(const std::vector<Use>& readers, std::string old, int32_t data_type,
                                 const std::vector<int64_t>& dims, LazyBytes data, const std::string& base);
  // Stores a tensor under `name` (a fresh name): an initializer in a graph, a Constant node in a function.
  void add_tensor(const std::string& name, std::string tensor_payload);
  void replace_initializer(int index, std::string tensor_payload);
  // The same, with data produced when the output is written: `header` is every TensorProto field but the
  // data (reencode_tensor_header / encode_tensor_header).
  void replace_initializer_lazy(int index, std::string header, LazyBytes data);
  void add_tensor_lazy(const std::string& name, std::string header, LazyBytes data);
  void remove_value_info(const std::string& value);
  // Removes the initializer or Constant node behind `value` if nothing reads it any more.
  void drop_if_unused(const std::string& value);
  void mark_dirty();

  // Built by the parser.
  void build_index();
  std::unordered_set<std::string> outer_reads;  // names read here (or in nested graphs) but defined outside

 private:
  friend struct EditRecord;
  std::vector<Node> nodes_;
  std::vector<Tensor> initializers_;
  std::vector<ValueInfo> value_info_;
  std::vector<FieldRef> fields_;
  // The raw setter behind the typed ones: `payload` is the whole AttributeProto.
  void set_attribute(int node, const std::string& name, std::string payload);
  // Heap copies of the strings and tensors the typed setters gave: the parsed views (Attribute::s, ::t)
  // point into them.
  std::vector<std::unique_ptr<std::string>> attribute_storage_;
  // What folds changed on initializers, value_info and inputs, applied by the writer. Only graph/ sees it
  // (graph/edit_record.h): folds edit through the methods above.
  struct GraphEdits {
    std::vector<bool> initializer_removed;
    // New TensorProto payloads; heap strings, because the parsed Tensor views point into them.
    std::vector<std::unique_ptr<std::string>> initializer_replaced;  // null where unchanged
    std::vector<std::unique_ptr<std::string>> initializer_added;    // null where added lazily
    std::vector<std::unique_ptr<LazyInitializer>> initializer_lazy;  // null where not lazy
    std::vector<bool> value_info_removed;
    std::vector<bool> input_removed;  // graph inputs dropped (frozen initializers a fold replaced or removed)
    // ValueInfoProto payloads of graph inputs a fold added: IR version < 4 lists every initializer as an input.
    std::vector<std::pair<std::string, std::string>> inputs_added;  // name, payload (empty: dropped again)
    size_t original_initializer_count = 0;  // initializers past this index were added by folds
    bool dirty = false;
  } edits_;
  std::unordered_map<std::string, int> producer_;
  std::unordered_map<std::string, int> initializer_index_;
  std::unordered_map<std::string, std::vector<Use>> uses_;
  std::unordered_set<std::string> graph_inputs_, graph_outputs_;
  void add_use(const std::string& value, Use use);
  bool frozen(const std::string& value) const;      // a graph input read as a constant (freeze_initializer_inputs)
  void drop_graph_input(const std::string& value);
  void drop_replaced_input(const std::string& value);
  void index_added_initializer(const std::string& name, Tensor tensor);
  void remove_use(const std::string& value, Use use);
  // Called by a subgraph of node `owner` that no longer reads outer value `value`: when no subgraph of that
  // node reads it any more, the node's read goes, and the value is dropped if nothing else reads it.
  void release_outer_read(int owner, const std::string& value);
  std::optional<ConstRef> created_constant(int node, const std::string& value);
  // Per name: the first entry with a body in inputs, value_info and outputs (-1: none), and every value_info
  // entry; so that shape_of and remove_value_info do not scan (100,000-node models stay linear).
  struct ValueInfoRefs {
    int first[3] = {-1, -1, -1};
    std::vector<int> value_info;
  };
  std::unordered_map<std::string, ValueInfoRefs> value_info_refs_;
};

class Model {
 public:
  std::string_view buffer;
  ExternalResolver* external = nullptr;         // maps external data (file mode); null for bytes in memory
  struct FieldRef {
    uint32_t number;
    std::string_view whole;
    int index;  // graph: 0; functions: position in `functions`; else -1
  };
  std::vector<FieldRef> fields;
  int64_t ir_version = 0;
  // How edits treat what the index alone cannot decide, set by whoever runs the folds (core/edit_policy.h,
  // from the options and the model); the defaults are the plain index's.
  struct EditPolicy {
    // Initializers listed as graph inputs of the main graph are read as constants, and a folded one leaves
    // the graph inputs.
    bool freeze_initializer_inputs = false;
    // Every initializer of the main graph is also a graph input: an added one is listed as one too, and a
    // replaced one stays listed (its new value is the input's default).
    bool initializers_are_inputs = false;
    // Which producers (beyond Constant nodes, which always do) go with their last reader when drop_if_unused
    // drops a value, their inputs then dropped in turn if nothing else reads them. Null: Constant nodes only.
    const RemovalPolicy* removal = nullptr;
  };
  EditPolicy policy;
  std::map<std::string, int64_t> opsets;
  // Opset versions a fold raised (domain "" is the default domain); the writer rewrites those opset_import
  // entries. raise_opset also updates `opsets`, so later queries see the new version.
  std::map<std::string, int64_t> raised_opsets;
  void raise_opset(const std::string& domain, int64_t version) {
    opsets[domain] = version;
    raised_opsets[domain] = version;
  }
  std::unique_ptr<Graph> graph;
  std::vector<std::unique_ptr<Graph>> functions;

  // True when `bytes` stay valid until the output is written: a view of the input buffer or of a mapped
  // external data file. A fold's data generator may then keep the view instead of a copy.
  bool outlives_writing(std::string_view bytes) const;
  // `bytes` held for a generator that runs when the output is written: the view itself when it outlives
  // writing; else `storage` when `bytes` starts its contents (bytes a Tensor decoded into it); else a copy.
  PinnedBytes pin(std::string_view bytes, std::shared_ptr<const std::string> storage = {}) const;

  // A name used nowhere in the model yet, derived from `base`.
  std::string fresh_name(const std::string& base);
  void note_name(const std::string& name) { names_.insert(name); }

  // Every graph, outer before inner, then every function and its subgraphs.
  std::vector<Graph*> all_graphs();

 private:
  std::unordered_set<std::string> names_;
};

// Serializes the model with its edits: untouched fields as views of the input, the rest re-encoded.
// `external_output` (file mode, external_output.h): where tensor data goes; null keeps every tensor as it was.
wire::Pieces write_model(Model& model, wire::Arena& arena, ExternalOutput* external_output = nullptr);

// Parses a serialized ModelProto. Throws wire::WireError naming the problem and its byte offset. External
// data is mapped through `external` when given.
std::unique_ptr<Model> parse_model(std::string_view buffer, ExternalResolver* external = nullptr);

}  // namespace qdqfold::graph
