// Graph queries and the index behind them (the edits are in graph_edits.cpp), and the Model's helpers.
#include <algorithm>
#include <cstring>

#include "../wire/fields.h"
#include "../wire/writer.h"
#include "edit_record.h"
#include "graph.h"

namespace qdqfold::graph {

using namespace wire;

// ---------------------------------------------------------------- Node

const Attribute* Node::attr(std::string_view n) const {
  for (const auto& a : attributes)
    if (a.name == n) return &a;
  return nullptr;
}
int64_t Node::attr_int(std::string_view n, int64_t fallback) const {
  const Attribute* a = attr(n);
  return a && a->has_i ? a->i : fallback;
}
float Node::attr_float(std::string_view n, float fallback) const {
  const Attribute* a = attr(n);
  return a && a->has_f ? a->f : fallback;
}
std::vector<int64_t> Node::attr_ints(std::string_view n) const {
  const Attribute* a = attr(n);
  return a ? a->ints : std::vector<int64_t>{};
}
std::string Node::attr_string(std::string_view n, std::string fallback) const {
  const Attribute* a = attr(n);
  return a && a->has_s ? std::string(a->s) : fallback;
}
std::string Node::display_name(int index) const {
  return name.empty() ? op_type + "#" + std::to_string(index) : name;
}

// ---------------------------------------------------------------- Graph: index

static const std::vector<Use> kNoUses;

void Graph::add_use(const std::string& value, Use use) {
  if (!value.empty()) uses_[value].push_back(use);
}
void Graph::remove_use(const std::string& value, Use use) {
  auto it = uses_.find(value);
  if (it == uses_.end()) return;
  auto& v = it->second;
  auto pos = std::find_if(v.begin(), v.end(), [&](const Use& u) { return u.node == use.node && u.slot == use.slot; });
  if (pos != v.end()) v.erase(pos);
}

bool Graph::is_overridable_initializer(const std::string& value) const {
  return graph_inputs_.count(value) && initializer_index_.count(value);
}

size_t Graph::overridable_initializer_count() const {
  size_t n = 0;
  for (const auto& [name, index] : initializer_index_) n += graph_inputs_.count(name) && !edits_.initializer_removed[index];
  return n;
}

// A frozen initializer's graph input goes when the initializer is replaced or removed: a caller feeding the
// input would otherwise override the folded value with the unfolded one.
void Graph::drop_graph_input(const std::string& value) {
  if (!graph_inputs_.erase(value)) return;
  for (auto& [name, payload] : edits_.inputs_added)
    if (name == value) payload.clear();  // written only when not empty
  for (size_t k = 0; k < inputs.size(); ++k)
    if (inputs[k].name == value && k < edits_.input_removed.size()) edits_.input_removed[k] = true;
  mark_dirty();
}

// A frozen initializer replaced by a fold leaves the graph inputs, except where every initializer stays listed
// as one (EditPolicy::initializers_are_inputs: the new value is its default).
void Graph::drop_replaced_input(const std::string& value) {
  if (frozen(value) && !model->policy.initializers_are_inputs) drop_graph_input(value);
}

bool Graph::frozen(const std::string& value) const {
  return kind == GraphKind::Main && parent == nullptr && model && model->policy.freeze_initializer_inputs &&
         graph_inputs_.count(value);
}

bool Graph::defines(const std::string& value) const {
  return producer_.count(value) || initializer_index_.count(value) || graph_inputs_.count(value);
}

void Graph::build_index() {
  producer_.clear();
  initializer_index_.clear();
  uses_.clear();
  graph_inputs_.clear();
  graph_outputs_.clear();
  outer_reads.clear();
  for (size_t k = 0; k < initializers_.size(); ++k) initializer_index_[initializers_[k].name] = static_cast<int>(k);
  for (const auto& v : inputs) graph_inputs_.insert(v.name);
  for (const auto& v : outputs) graph_outputs_.insert(v.name);
  value_info_refs_.clear();
  const std::vector<ValueInfo>* lists[3] = {&inputs, &value_info_, &outputs};
  for (int l = 0; l < 3; ++l)
    for (size_t k = 0; k < lists[l]->size(); ++k) {
      const ValueInfo& v = (*lists[l])[k];
      ValueInfoRefs& refs = value_info_refs_[v.name];
      if (refs.first[l] < 0 && !v.body.empty()) refs.first[l] = static_cast<int>(k);
      if (l == 1) refs.value_info.push_back(static_cast<int>(k));
    }
  for (size_t k = 0; k < nodes_.size(); ++k) {
    const Node& n = nodes_[k];
    if (n.removed()) continue;
    for (const auto& o : n.outputs)
      if (!o.empty()) producer_[o] = static_cast<int>(k);
  }
  for (size_t k = 0; k < nodes_.size(); ++k) {
    const Node& n = nodes_[k];
    if (n.removed()) continue;
    for (size_t s = 0; s < n.inputs.size(); ++s) {
      add_use(n.inputs[s], Use{static_cast<int>(k), static_cast<int>(s)});
      if (!n.inputs[s].empty() && !defines(n.inputs[s])) outer_reads.insert(n.inputs[s]);
    }
    // Values read inside a subgraph but defined outside it are reads by this node.
    std::unordered_set<std::string> seen;
    for (const auto& sub : n.subgraphs)
      for (const auto& v : sub->outer_reads)
        if (seen.insert(v).second) {
          add_use(v, Use{static_cast<int>(k), -1});
          if (!defines(v)) outer_reads.insert(v);
        }
  }
  for (const auto& v : outputs)
    if (!defines(v.name)) outer_reads.insert(v.name);
}

const std::vector<Use>& Graph::uses(const std::string& value) const {
  auto it = uses_.find(value);
  return it == uses_.end() ? kNoUses : it->second;
}
int Graph::producer(const std::string& value) const {
  auto it = producer_.find(value);
  return it == producer_.end() ? -1 : it->second;
}
size_t Graph::reader_count(const std::string& value) const {
  return uses(value).size() + (is_graph_output(value) ? 1 : 0);
}

int64_t Graph::opset(const std::string& domain) const {
  const std::string d = domain == "ai.onnx" ? "" : domain;
  if (kind == GraphKind::Function) {
    auto it = function_opsets.find(d);
    if (it != function_opsets.end()) return it->second;
  }
  const Graph* g = this;
  while (g->parent) g = g->parent;
  if (g->kind == GraphKind::Function) {
    auto it = g->function_opsets.find(d);
    if (it != g->function_opsets.end()) return it->second;
  }
  auto it = model->opsets.find(d);
  return it == model->opsets.end() ? 0 : it->second;
}

// A Constant node a fold wrote (functions hold new tensors that way): its value is in set_attributes, so a
// later fold (a BN chain) can read it like any other constant.
std::optional<ConstRef> Graph::created_constant(int node, const std::string& value) {
  for (const auto& [name, payload] : nodes_[node].edits_.set_attributes) {
    if (name != "value") continue;
    Reader r(payload, payload.data());
    while (!r.done()) {
      Field f = r.next("attribute");
      if (f.number != num(AttributeField::T) || f.type != WireType::Bytes) continue;
      ConstRef ref{this, -1, node, {}, false};
      ref.tensor = parse_tensor(f.bytes, payload.data(), path + " Constant written by a fold");
      ref.tensor.name = value;
      return ref;
    }
  }
  return std::nullopt;
}

std::optional<ConstRef> Graph::constant(const std::string& value) {
  if (value.empty()) return std::nullopt;
  auto init = initializer_index_.find(value);
  if (init != initializer_index_.end()) {
    // An initializer that is also a graph input can be overridden at run time: not a constant (unless frozen).
    if ((graph_inputs_.count(value) && !frozen(value)) || edits_.initializer_removed[init->second]) return std::nullopt;
    return ConstRef{this, init->second, -1, initializers_[init->second], false};
  }
  int p = producer(value);
  if (p >= 0) {
    const Node& n = nodes_[p];
    if (n.is("Constant") && (n.created() || n.edits_.edited)) {  // a value a fold wrote (write_constant)
      if (auto written = created_constant(p, value)) return written;
    }
    if (n.is_plain_identity()) {
      // Follow the chain in this graph; a cyclic one (malformed) is not a constant.
      std::string from = n.inputs[0];
      for (size_t steps = 0; steps <= nodes_.size(); ++steps) {
        const int q = producer(from);
        if (q < 0 || !nodes_[q].is_plain_identity()) break;
        if (steps == nodes_.size()) return std::nullopt;
        from = nodes_[q].inputs[0];
      }
      auto source = constant(from);
      if (!source) return std::nullopt;
      source->initializer = -1;
      source->constant_node = -1;
      source->through_identity = true;
      source->tensor.name = value;
      return source;
    }
    if (!n.is("Constant")) return std::nullopt;
    ConstRef ref{this, -1, p, {}, false};
    const std::string where = path + " Constant '" + n.display_name(p) + "'";
    if (const Attribute* a = n.attr("value"); a && a->has_t) {
      ref.tensor = parse_tensor(a->t, model->buffer.data(), where, model->external);
      ref.tensor.name = value;
      return ref;
    }
    return std::nullopt;  // value_float(s)/value_int(s) and sparse constants: not read as weights
  }
  if (graph_inputs_.count(value)) return std::nullopt;
  if (parent) {
    auto outer = parent->constant(value);
    return outer;
  }
  return std::nullopt;
}

namespace {

// The last length-delimited field `field` of message `body`, or nullopt.
std::optional<std::string_view> sub_message(std::string_view body, uint32_t field, const char* base) {
  Reader r(body, base);
  std::optional<std::string_view> found;
  while (!r.done()) {
    Field f = r.next("value_info");
    if (f.number == field && f.type == WireType::Bytes) found = f.bytes;
  }
  return found;
}

// ValueInfoProto.type -> TypeProto.tensor_type, or nullopt.
std::optional<std::string_view> tensor_type(const ValueInfo& v, const char* base) {
  auto type = sub_message(v.body, num(ValueInfoField::Type), base);
  if (!type) return std::nullopt;
  return sub_message(*type, num(TypeField::TensorType), base);
}

// The dims of a ValueInfoProto's tensor shape, -1 where a dim is symbolic or unknown; nullopt without a shape.
std::optional<std::vector<int64_t>> declared_dims(const ValueInfo& v, const char* base) {
  // ValueInfoProto.type -> TypeProto.tensor_type -> shape -> dim*
  auto tensor = tensor_type(v, base);
  if (!tensor) return std::nullopt;
  auto shape = sub_message(*tensor, num(TensorTypeField::Shape), base);
  if (!shape) return std::nullopt;
  std::vector<int64_t> dims;
  Reader r(*shape, base);
  while (!r.done()) {
    Field f = r.next("shape");
    if (f.number != num(ShapeField::Dim) || f.type != WireType::Bytes) continue;
    int64_t d = -1;
    Reader dr(f.bytes, base);
    while (!dr.done()) {
      Field g = dr.next("dim");
      if (g.number == num(DimensionField::DimValue) && g.type == WireType::Varint) d = static_cast<int64_t>(g.scalar);
    }
    dims.push_back(d < 0 ? -1 : d);
  }
  return dims;
}

}  // namespace

// ValueInfoProto.type -> TypeProto.tensor_type -> elem_type, or nullopt.
static std::optional<int32_t> declared_elem_type(const ValueInfo& v, const char* base) {
  auto tensor = tensor_type(v, base);
  if (!tensor) return std::nullopt;
  std::optional<int32_t> elem;
  Reader r(*tensor, base);
  while (!r.done()) {
    Field f = r.next("tensor_type");
    if (f.number == num(TensorTypeField::ElemType) && f.type == WireType::Varint)
      elem = static_cast<int32_t>(f.scalar);
  }
  return elem;
}

std::optional<int32_t> Graph::declared_type(const std::string& value) const {
  auto refs = value_info_refs_.find(value);
  if (refs != value_info_refs_.end()) {
    const std::vector<ValueInfo>* lists[3] = {&inputs, &value_info_, &outputs};
    for (int l = 0; l < 3; ++l)
      if (int k = refs->second.first[l]; k >= 0)
        if (auto t = declared_elem_type((*lists[l])[k], model->buffer.data()); t && *t != 0) return t;
  }
  if (parent && !defines(value)) return parent->declared_type(value);
  return std::nullopt;
}

std::optional<std::vector<int64_t>> Graph::input_shape(const std::string& value) const {
  auto refs = value_info_refs_.find(value);
  if (refs == value_info_refs_.end() || refs->second.first[0] < 0) return std::nullopt;
  return declared_dims(inputs[refs->second.first[0]], model->buffer.data());
}

std::optional<std::vector<int64_t>> Graph::shape_of(const std::string& value) const {
  auto from = [&](const ValueInfo& v) { return declared_dims(v, model->buffer.data()); };
  auto refs = value_info_refs_.find(value);
  if (refs != value_info_refs_.end()) {
    const std::vector<ValueInfo>* lists[3] = {&inputs, &value_info_, &outputs};  // the order they are consulted
    for (int l = 0; l < 3; ++l)
      if (int k = refs->second.first[l]; k >= 0)
        if (auto s = from((*lists[l])[k])) return s;
  }
  // A name this graph does not define is an enclosing graph's value (If/Loop/Scan bodies read outer values):
  // its shape is declared there. Functions have no parent: their inputs have no shapes.
  if (parent && !defines(value)) return parent->shape_of(value);
  return std::nullopt;
}

// ---------------------------------------------------------------- Model

bool Model::outlives_writing(std::string_view bytes) const {
  const bool in_buffer = bytes.data() >= buffer.data() && bytes.data() + bytes.size() <= buffer.data() + buffer.size();
  return in_buffer || (external && external->holds(bytes));
}

PinnedBytes Model::pin(std::string_view bytes, std::shared_ptr<const std::string> storage) const {
  if (outlives_writing(bytes)) return PinnedBytes({}, bytes);
  if (storage && storage->data() == bytes.data()) return PinnedBytes(std::move(storage), bytes);
  auto copy = std::make_shared<const std::string>(bytes);
  return PinnedBytes(copy, *copy);
}

std::string Model::fresh_name(const std::string& base) {
  std::string name = base;
  for (int k = 1; names_.count(name); ++k) name = base + "_" + std::to_string(k);
  names_.insert(name);
  return name;
}

std::vector<Graph*> Model::all_graphs() {
  std::vector<Graph*> out;
  auto visit = [&](auto&& self, Graph* g) -> void {
    out.push_back(g);
    for (auto& n : g->nodes())
      for (auto& s : n.subgraphs) self(self, s.get());
  };
  visit(visit, graph.get());
  for (auto& f : functions) visit(visit, f.get());
  return out;
}

}  // namespace qdqfold::graph
