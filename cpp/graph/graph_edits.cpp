// Graph edits. Every edit keeps the producer/consumer index current, so a fold sees the graph as the folds
// before it left it.
#include <algorithm>
#include <cstring>

#include "../wire/fields.h"
#include "../wire/writer.h"
#include "edit_record.h"
#include "graph.h"

namespace qdqfold::graph {

using namespace wire;

// ---------------------------------------------------------------- Graph: edits

void Graph::mark_dirty() {
  for (Graph* g = this; g && !g->edits_.dirty; g = g->parent) g->edits_.dirty = true;
}

void Graph::set_input(int node, int slot, const std::string& value) {
  Node& n = nodes_[node];
  if (slot >= static_cast<int>(n.inputs.size())) n.inputs.resize(slot + 1);
  remove_use(n.inputs[slot], Use{node, slot});
  n.inputs[slot] = value;
  add_use(value, Use{node, slot});
  n.edits_.edited = true;
  mark_dirty();
}

void Graph::set_output(int node, int slot, const std::string& value) {
  Node& n = nodes_[node];
  auto it = producer_.find(n.outputs[slot]);
  if (it != producer_.end() && it->second == node) producer_.erase(it);
  n.outputs[slot] = value;
  producer_[value] = node;
  n.edits_.edited = true;
  mark_dirty();
}

void Graph::set_op_type(int node, const std::string& op_type) {
  nodes_[node].op_type = op_type;
  nodes_[node].edits_.edited = true;
  mark_dirty();
}

void Graph::set_attribute(int node, const std::string& name, std::string payload) {
  Node& n = nodes_[node];
  for (auto& [k, v] : n.edits_.set_attributes)
    if (k == name) { v = std::move(payload); mark_dirty(); return; }
  n.edits_.set_attributes.emplace_back(name, std::move(payload));
  n.edits_.edited = true;
  mark_dirty();
}

// The parsed attribute `name` of `n`, added when the node has none.
static Attribute& parsed_attribute(Node& n, const std::string& name, AttributeType type) {
  for (auto& a : n.attributes)
    if (a.name == name) return a;
  Attribute a;
  a.name = name;
  a.type = static_cast<int>(type);
  n.attributes.push_back(std::move(a));
  return n.attributes.back();
}

void Graph::set_int_attribute(int node, const std::string& name, int64_t value) {
  std::string a;
  put_bytes_field(a, num(AttributeField::Name), name);
  put_varint_field(a, num(AttributeField::I), static_cast<uint64_t>(value));
  put_varint_field(a, num(AttributeField::Type), static_cast<uint64_t>(AttributeType::Int));
  set_attribute(node, name, std::move(a));
  Attribute& parsed = parsed_attribute(nodes_[node], name, AttributeType::Int);
  parsed.has_i = true;
  parsed.i = value;
}

void Graph::set_float_attribute(int node, const std::string& name, float value) {
  std::string a;
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  put_bytes_field(a, num(AttributeField::Name), name);
  put_fixed32_field(a, num(AttributeField::F), bits);
  put_varint_field(a, num(AttributeField::Type), static_cast<uint64_t>(AttributeType::Float));
  set_attribute(node, name, std::move(a));
  Attribute& parsed = parsed_attribute(nodes_[node], name, AttributeType::Float);
  parsed.has_f = true;
  parsed.f = value;
}

void Graph::set_ints_attribute(int node, const std::string& name, const std::vector<int64_t>& values) {
  std::string a;
  put_bytes_field(a, num(AttributeField::Name), name);
  for (int64_t v : values) put_varint_field(a, num(AttributeField::Ints), static_cast<uint64_t>(v));
  put_varint_field(a, num(AttributeField::Type), static_cast<uint64_t>(AttributeType::Ints));
  set_attribute(node, name, std::move(a));
  parsed_attribute(nodes_[node], name, AttributeType::Ints).ints = values;
}

void Graph::set_floats_attribute(int node, const std::string& name, const std::vector<float>& values) {
  std::string a;
  put_bytes_field(a, num(AttributeField::Name), name);
  for (float v : values) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    put_fixed32_field(a, num(AttributeField::Floats), bits);
  }
  put_varint_field(a, num(AttributeField::Type), static_cast<uint64_t>(AttributeType::Floats));
  set_attribute(node, name, std::move(a));
  parsed_attribute(nodes_[node], name, AttributeType::Floats).floats = values;
}

void Graph::set_string_attribute(int node, const std::string& name, const std::string& value) {
  std::string a;
  put_bytes_field(a, num(AttributeField::Name), name);
  put_bytes_field(a, num(AttributeField::S), value);
  put_varint_field(a, num(AttributeField::Type), static_cast<uint64_t>(AttributeType::String));
  set_attribute(node, name, std::move(a));
  attribute_storage_.push_back(std::make_unique<std::string>(value));
  Attribute& parsed = parsed_attribute(nodes_[node], name, AttributeType::String);
  parsed.has_s = true;
  parsed.s = *attribute_storage_.back();
}

// Name, type, then the tensor: the order Constant nodes' values are written in (add_tensor, write_constant).
void Graph::set_tensor_attribute(int node, const std::string& name, const std::string& tensor_payload) {
  std::string a;
  put_bytes_field(a, num(AttributeField::Name), name);
  put_varint_field(a, num(AttributeField::Type), static_cast<uint64_t>(AttributeType::Tensor));
  put_bytes_field(a, num(AttributeField::T), tensor_payload);
  set_attribute(node, name, std::move(a));
  attribute_storage_.push_back(std::make_unique<std::string>(tensor_payload));
  Attribute& parsed = parsed_attribute(nodes_[node], name, AttributeType::Tensor);
  parsed.has_t = true;
  parsed.t = *attribute_storage_.back();
}

void Graph::remove_node(int node) {
  Node& n = nodes_[node];
  if (n.removed()) return;
  for (size_t s = 0; s < n.inputs.size(); ++s) remove_use(n.inputs[s], Use{node, static_cast<int>(s)});
  for (const auto& sub : n.subgraphs)
    for (const auto& v : sub->outer_reads) remove_use(v, Use{node, -1});
  for (const auto& o : n.outputs) {
    auto it = producer_.find(o);
    if (it != producer_.end() && it->second == node) producer_.erase(it);
  }
  n.edits_.removed = true;
  mark_dirty();
}

int Graph::add_node(Node node, int insert_before) {
  node.edits_.created = true;
  node.edits_.insert_before = insert_before;
  int k = static_cast<int>(nodes_.size());
  nodes_.push_back(std::move(node));
  const Node& n = nodes_.back();
  for (const auto& o : n.outputs) {
    producer_[o] = k;
    model->note_name(o);
  }
  for (size_t s = 0; s < n.inputs.size(); ++s) add_use(n.inputs[s], Use{k, static_cast<int>(s)});
  mark_dirty();
  return k;
}

int Graph::add_node_before(Node node, int reader) {
  const NodeEdits& r = nodes_[reader].edits_;
  return add_node(std::move(node), r.created ? r.insert_before : reader);
}

// The initializer write_constant replaces in place: an initializer of this graph that only `readers` read
// (and that is not a graph output). Its index, else -1; `ref` is its ConstRef.
static int replaceable_initializer(Graph& g, const std::vector<Use>& readers, const std::string& old,
                                   std::optional<ConstRef>& ref) {
  if (old.empty()) return -1;
  ref = g.constant(old);
  const auto& uses = g.uses(old);
  bool only_ours = !g.is_graph_output(old) && uses.size() == readers.size();
  for (const Use& u : uses)
    only_ours = only_ours && std::any_of(readers.begin(), readers.end(),
                                         [&](const Use& r) { return r.node == u.node && r.slot == u.slot; });
  return ref && ref->graph == &g && ref->initializer >= 0 && only_ours ? ref->initializer : -1;
}

Graph::WrittenConstant Graph::write_constant(const std::vector<Use>& readers, std::string old,
                                             int32_t data_type, const std::vector<int64_t>& dims,
                                             const std::string& raw, const std::string& base,
                                             bool keep_constant_node) {
  std::optional<ConstRef> ref;
  if (int k = replaceable_initializer(*this, readers, old, ref); k >= 0) {
    if (ref->tensor.dims != dims) remove_value_info(old);  // its recorded shape would be stale
    replace_initializer(k, reencode_tensor(ref->tensor, data_type, dims, raw));
    return {old, false};
  }
  if (keep_constant_node && ref && ref->graph == this && ref->constant_node >= 0 && !ref->through_identity &&
      !is_graph_output(old)) {
    const auto& uses = this->uses(old);
    bool only_ours = uses.size() == readers.size();
    for (const Use& u : uses)
      only_ours = only_ours && std::any_of(readers.begin(), readers.end(),
                                           [&](const Use& r) { return r.node == u.node && r.slot == u.slot; });
    if (only_ours) {
      if (ref->tensor.dims != dims) remove_value_info(old);
      set_tensor_attribute(ref->constant_node, "value", reencode_tensor(ref->tensor, data_type, dims, raw));
      return {old, false};
    }
  }
  const std::string name = model->fresh_name((old.empty() ? base : old) + "_bnfolded");
  add_tensor(name, encode_tensor(name, data_type, dims, raw));
  for (const Use& u : readers) set_input(u.node, u.slot, name);
  if (!old.empty()) drop_if_unused(old);
  return {name, true};
}

Graph::WrittenConstant Graph::write_constant(const std::vector<Use>& readers, std::string old,
                                             int32_t data_type, const std::vector<int64_t>& dims, LazyBytes data,
                                             const std::string& base) {
  std::optional<ConstRef> ref;
  if (int k = replaceable_initializer(*this, readers, old, ref); k >= 0) {
    if (ref->tensor.dims != dims) remove_value_info(old);  // its recorded shape would be stale
    replace_initializer_lazy(k, reencode_tensor_header(ref->tensor, data_type, dims), std::move(data));
    return {old, false};
  }
  const std::string name = model->fresh_name((old.empty() ? base : old) + "_bnfolded");
  add_tensor_lazy(name, encode_tensor_header(name, data_type, dims), std::move(data));
  for (const Use& u : readers) set_input(u.node, u.slot, name);
  if (!old.empty()) drop_if_unused(old);
  return {name, true};
}

void Graph::add_tensor(const std::string& name, std::string tensor_payload) {
  model->note_name(name);
  if (kind == GraphKind::Function) {
    Node c;
    c.op_type = "Constant";
    c.name = name;  // node names are free-form; the value name is unique, so it serves
    c.outputs = {name};
    std::string attr;
    put_bytes_field(attr, num(AttributeField::Name), "value");
    put_varint_field(attr, num(AttributeField::Type), static_cast<uint64_t>(AttributeType::Tensor));
    put_bytes_field(attr, num(AttributeField::T), tensor_payload);
    c.edits_.set_attributes.emplace_back("value", std::move(attr));
    add_node(std::move(c), 0);
    return;
  }
  edits_.initializer_added.push_back(std::make_unique<std::string>(std::move(tensor_payload)));
  // Index it as a constant: parse back the payload we just wrote (cheap: header fields only).
  const std::string& stored = *edits_.initializer_added.back();
  Tensor parsed = parse_tensor(stored, stored.data(), path + " new initializer");
  index_added_initializer(name, std::move(parsed));
}

void Graph::index_added_initializer(const std::string& name, Tensor tensor) {
  if (kind == GraphKind::Main && !parent && model && model->policy.initializers_are_inputs) {
    // Every initializer is also a graph input (IR version < 4, core/edit_policy.cpp).
    std::string shape, tensor_type, type, info;
    for (int64_t d : tensor.dims) {
      std::string dim;
      put_varint_field(dim, num(DimensionField::DimValue), static_cast<uint64_t>(d));
      put_bytes_field(shape, num(ShapeField::Dim), dim);
    }
    put_varint_field(tensor_type, num(TensorTypeField::ElemType), static_cast<uint64_t>(tensor.data_type));
    put_bytes_field(tensor_type, num(TensorTypeField::Shape), shape);
    put_bytes_field(type, num(TypeField::TensorType), tensor_type);
    put_bytes_field(info, num(ValueInfoField::Name), name);
    put_bytes_field(info, num(ValueInfoField::Type), type);
    edits_.inputs_added.emplace_back(name, std::move(info));
    graph_inputs_.insert(name);
  }
  int k = static_cast<int>(initializers_.size());
  initializers_.push_back(std::move(tensor));
  edits_.initializer_removed.push_back(false);
  edits_.initializer_replaced.push_back(nullptr);
  edits_.initializer_lazy.push_back(nullptr);
  initializer_index_[name] = k;
  mark_dirty();
}

// A Tensor for a lazily produced payload: its header fields, and data that materializes on demand.
static Tensor lazy_tensor(const std::string& header, const std::shared_ptr<const LazyBytes>& data,
                          const std::string& where) {
  Tensor t = parse_tensor(header, header.data(), where);
  t.lazy = data;
  t.has_raw = false;
  t.typed_field = 0;
  t.typed_payloads.clear();
  return t;
}

void Graph::add_tensor_lazy(const std::string& name, std::string header, LazyBytes data) {
  if (kind == GraphKind::Function) {  // functions hold constants as Constant nodes: materialize
    std::string raw(data.size, '\0');
    data.fill(raw.data());
    std::string payload = std::move(header);
    put_bytes_field(payload, num(TensorField::RawData), raw);
    add_tensor(name, std::move(payload));
    return;
  }
  model->note_name(name);
  auto lazy = std::make_unique<LazyInitializer>();
  lazy->header = std::move(header);
  lazy->data = std::make_shared<const LazyBytes>(std::move(data));
  Tensor t = lazy_tensor(lazy->header, lazy->data, path + " new initializer");
  edits_.initializer_added.push_back(nullptr);
  index_added_initializer(name, std::move(t));
  edits_.initializer_lazy.back() = std::move(lazy);
}

void Graph::replace_initializer_lazy(int index, std::string header, LazyBytes data) {
  drop_replaced_input(initializers_[index].name);
  auto lazy = std::make_unique<LazyInitializer>();
  lazy->header = std::move(header);
  lazy->data = std::make_shared<const LazyBytes>(std::move(data));
  initializers_[index] = lazy_tensor(lazy->header, lazy->data, path + " replaced initializer");
  edits_.initializer_replaced[index] = nullptr;
  edits_.initializer_lazy[index] = std::move(lazy);
  mark_dirty();
}

void Graph::replace_initializer(int index, std::string tensor_payload) {
  drop_replaced_input(initializers_[index].name);
  edits_.initializer_replaced[index] = std::make_unique<std::string>(std::move(tensor_payload));
  edits_.initializer_lazy[index] = nullptr;
  const std::string& stored = *edits_.initializer_replaced[index];
  initializers_[index] = parse_tensor(stored, stored.data(), path + " replaced initializer");
  mark_dirty();
}

void Graph::remove_value_info(const std::string& value) {
  auto refs = value_info_refs_.find(value);
  if (refs == value_info_refs_.end()) return;
  for (int k : refs->second.value_info)
    if (!edits_.value_info_removed[k]) {
      edits_.value_info_removed[k] = true;
      mark_dirty();
    }
}

void Graph::release_outer_read(int owner, const std::string& value) {
  for (const auto& sub : nodes_[owner].subgraphs)
    if (sub->reader_count(value) > 0) return;
  remove_use(value, Use{owner, -1});
  for (const auto& sub : nodes_[owner].subgraphs) sub->outer_reads.erase(value);
  if (!defines(value) && parent && uses(value).empty()) {
    outer_reads.erase(value);
    parent->release_outer_read(owner_node, value);
    return;
  }
  drop_if_unused(value);
}

void Graph::drop_if_unused(const std::string& value) {
  if (value.empty() || reader_count(value) > 0) return;
  auto init = initializer_index_.find(value);
  if (init != initializer_index_.end()) {
    if ((graph_inputs_.count(value) && !frozen(value)) || edits_.initializer_removed[init->second]) return;
    drop_graph_input(value);
    edits_.initializer_removed[init->second] = true;
    initializer_index_.erase(init);
    mark_dirty();
    return;
  }
  int p = producer(value);
  if (p >= 0 && nodes_[p].is("Constant") && nodes_[p].outputs.size() == 1) {
    remove_node(p);
  } else if (p >= 0 && model && model->policy.removal && model->policy.removal->goes_with_last_reader(*this, p, value)) {
    // A producer the policy lets go with its last reader (core/edit_policy.cpp): its inputs may go in turn.
    const std::vector<std::string> inputs_of_p = nodes_[p].inputs;
    remove_node(p);
    for (const auto& in : inputs_of_p) drop_if_unused(in);
  } else if (p < 0 && parent && !defines(value)) {
    parent->release_outer_read(owner_node, value);
  }
}

}  // namespace qdqfold::graph
