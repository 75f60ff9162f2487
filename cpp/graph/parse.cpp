// ModelProto -> Model: walks the wire format once, keeping views into the buffer.
#include <algorithm>

#include "../wire/fields.h"
#include "edit_record.h"
#include "graph.h"

namespace qdqfold::graph {

using namespace wire;

namespace {

// Deeper nesting of graphs in attributes than any real model has; stops hostile input from exhausting
// the stack.
constexpr int kMaxGraphDepth = 128;

// What ONNX requires of a graph and a fold relies on: every value defined once, no cycle, and (in a graph
// nothing encloses) no read of a value nothing defines. onnxruntime refuses models that break these; a fold
// on one could rewire the wrong writer of a name or close a loop, so they are FoldErrors.
void check_structure(const Graph& g) {
  auto node_name = [&](size_t k) { return "node '" + g.nodes()[k].display_name(static_cast<int>(k)) + "'"; };
  for (size_t k = 0; k < g.nodes().size(); ++k)
    for (const auto& o : g.nodes()[k].outputs)
      if (!o.empty() && (g.producer(o) != static_cast<int>(k) || g.is_graph_input(o)))
        throw WireError(g.path + ": " + node_name(k) + " writes '" + o + "', which " +
                        (g.is_graph_input(o) ? "is a graph input" : "another node also writes"));
  for (const auto& t : g.initializers())
    if (int p = g.producer(t.name); p >= 0)
      throw WireError(g.path + ": " + node_name(p) + " writes '" + t.name + "', which is also an initializer");
  // Kahn's algorithm over the edges writer -> reader (reads inside a node's subgraphs included).
  std::vector<size_t> pending(g.nodes().size(), 0);
  for (const auto& n : g.nodes())
    for (const auto& o : n.outputs)
      if (!o.empty())
        for (const Use& u : g.uses(o)) ++pending[u.node];
  std::vector<size_t> ready;
  for (size_t k = 0; k < g.nodes().size(); ++k)
    if (pending[k] == 0) ready.push_back(k);
  size_t sorted = 0;
  while (!ready.empty()) {
    const size_t k = ready.back();
    ready.pop_back();
    ++sorted;
    for (const auto& o : g.nodes()[k].outputs)
      if (!o.empty())
        for (const Use& u : g.uses(o))
          if (--pending[u.node] == 0) ready.push_back(u.node);
  }
  if (sorted != g.nodes().size()) {
    const size_t k = std::find_if(pending.begin(), pending.end(), [](size_t p) { return p > 0; }) - pending.begin();
    throw WireError(g.path + ": the graph has a cycle through " + node_name(k));
  }
  if (g.kind != GraphKind::Subgraph && !g.outer_reads.empty()) {
    const std::string& v = *std::min_element(g.outer_reads.begin(), g.outer_reads.end());
    throw WireError(g.path + ": '" + v + "' is read, but no node, initializer or graph input defines it");
  }
}

struct Parser {
  const char* base;
  Model& model;

  std::string str(const Field& f, Reader& r, const char* where) {
    if (f.type != WireType::Bytes) r.fail(where, f.whole.data(), "field " + std::to_string(f.number) + " should be a string");
    return std::string(f.bytes);
  }
  int64_t int_value(const Field& f, Reader& r, const char* where) {
    if (f.type != WireType::Varint) r.fail(where, f.whole.data(), "field " + std::to_string(f.number) + " should be a varint");
    return static_cast<int64_t>(f.scalar);
  }
  void need_bytes(const Field& f, Reader& r, const char* where) {
    if (f.type != WireType::Bytes) r.fail(where, f.whole.data(), "field " + std::to_string(f.number) + " should be a message");
  }

  // Checks a message is well-formed wire data all the way down is too costly for tensors; for the small
  // messages we do not interpret (value_info types, metadata) we check the top level of their fields.
  void check_fields(std::string_view body, const char* where) {
    Reader r(body, base);
    while (!r.done()) r.next(where);
  }

  Attribute parse_attribute(std::string_view body, Node& node, int node_index, Graph& owner, int attr_index, int depth,
                            const std::string& where) {
    Attribute a;
    Reader r(body, base);
    const char* w = where.c_str();
    std::vector<std::pair<std::string_view, int>> graphs;  // payload, position
    while (!r.done()) {
      Field f = r.next(w);
      switch (static_cast<AttributeField>(f.number)) {
        case AttributeField::Name: a.name = str(f, r, w); break;
        case AttributeField::Type: a.type = static_cast<int>(int_value(f, r, w)); break;
        case AttributeField::I: a.i = int_value(f, r, w); a.has_i = true; break;
        case AttributeField::F:
          if (f.type != WireType::Fixed32) r.fail(w, f.whole.data(), "attribute f should be fixed32");
          {
            auto bits = static_cast<uint32_t>(f.scalar);
            std::memcpy(&a.f, &bits, 4);
          }
          a.has_f = true;
          break;
        case AttributeField::S: need_bytes(f, r, w); a.s = f.bytes; a.has_s = true; break;
        case AttributeField::T: need_bytes(f, r, w); a.t = f.bytes; a.has_t = true; break;
        case AttributeField::Ints:
          for_each_varint(f, base, w, [&](uint64_t v) { a.ints.push_back(static_cast<int64_t>(v)); });
          break;
        case AttributeField::Floats:
          if (f.type == WireType::Fixed32) {
            auto bits = static_cast<uint32_t>(f.scalar);
            float v;
            std::memcpy(&v, &bits, 4);
            a.floats.push_back(v);
          } else {
            need_bytes(f, r, w);
            if (f.bytes.size() % 4) r.fail(w, f.whole.data(), "packed floats not a multiple of 4 bytes");
            for (size_t k = 0; k < f.bytes.size(); k += 4) {
              float v;
              std::memcpy(&v, f.bytes.data() + k, 4);
              a.floats.push_back(v);
            }
          }
          break;
        case AttributeField::G: need_bytes(f, r, w); graphs.emplace_back(f.bytes, 0); break;
        case AttributeField::Graphs:
          need_bytes(f, r, w);
          graphs.emplace_back(f.bytes, static_cast<int>(graphs.size()));
          break;
        case AttributeField::Tensors: case AttributeField::Tp: case AttributeField::TypeProtos:
        case AttributeField::SparseTensor: case AttributeField::SparseTensors: case AttributeField::Strings:
          need_bytes(f, r, w);
          break;
        default: break;
      }
    }
    // Positions: a `g` field is position 0; `graphs` entries are numbered in order.
    int position = 0;
    for (auto& [payload, pos] : graphs) {
      (void)pos;
      auto sub = std::make_unique<Graph>();
      sub->kind = GraphKind::Subgraph;
      sub->parent = &owner;
      sub->owner_attribute = attr_index;
      sub->owner_position = position++;
      sub->owner_node = node_index;
      sub->path = owner.path + "/" + (node.name.empty() ? node.op_type : node.name) + ":" + a.name;
      parse_graph(*sub, payload, depth + 1);
      node.subgraphs.push_back(std::move(sub));
    }
    a.graph_count = position;
    return a;
  }

  void parse_node(Node& n, std::string_view body, Graph& owner, int depth, int index) {
    n.body = body;
    std::string where = owner.path + " node #" + std::to_string(index);
    Reader r(body, base);
    std::vector<std::string_view> attrs;
    while (!r.done()) {
      Field f = r.next(where.c_str());
      switch (static_cast<NodeField>(f.number)) {
        case NodeField::Input: n.inputs.push_back(str(f, r, where.c_str())); break;
        case NodeField::Output: n.outputs.push_back(str(f, r, where.c_str())); break;
        case NodeField::Name: n.name = str(f, r, where.c_str()); break;
        case NodeField::OpType: n.op_type = str(f, r, where.c_str()); break;
        case NodeField::Domain: n.domain = str(f, r, where.c_str()); break;
        case NodeField::Attribute: need_bytes(f, r, where.c_str()); attrs.push_back(f.bytes); break;
        default: break;
      }
    }
    if (n.op_type.empty()) throw WireError(where + ": node has no op_type");
    if (!n.name.empty()) where = owner.path + " node '" + n.name + "'";
    for (auto a : attrs) {
      int k = static_cast<int>(n.attributes.size());
      n.attributes.push_back(parse_attribute(a, n, index, owner, k, depth, where + " attribute"));
    }
    for (auto& o : n.outputs) model.note_name(o);
  }

  ValueInfo parse_value_info(std::string_view body, const char* where) {
    ValueInfo v;
    v.body = body;
    Reader r(body, base);
    while (!r.done()) {
      Field f = r.next(where);
      if (f.number == num(ValueInfoField::Name)) v.name = str(f, r, where);
      else if (f.number == num(ValueInfoField::Type)) { need_bytes(f, r, where); check_fields(f.bytes, where); }
    }
    return v;
  }

  void parse_graph(Graph& g, std::string_view body, int depth) {
    if (depth > kMaxGraphDepth)
      throw WireError(g.path + ": graphs nested more than " + std::to_string(kMaxGraphDepth) + " deep");
    g.model = &model;
    g.body = body;
    const bool function = g.kind == GraphKind::Function;
    const std::string where = g.path + (function ? " (FunctionProto)" : " (GraphProto)");
    const char* w = where.c_str();
    Reader r(body, base);
    std::vector<std::string_view> node_bodies;
    while (!r.done()) {
      Field f = r.next(w);
      int index = -1;
      if (!function) {
        switch (static_cast<GraphField>(f.number)) {
          case GraphField::Node: need_bytes(f, r, w); index = static_cast<int>(node_bodies.size()); node_bodies.push_back(f.bytes); break;
          case GraphField::Initializer: {
            need_bytes(f, r, w);
            index = static_cast<int>(EditRecord::initializers(g).size());
            EditRecord::initializers(g).push_back(
                parse_tensor(f.bytes, base, g.path + " initializer #" + std::to_string(index), model.external));
            model.note_name(EditRecord::initializers(g).back().name);
            break;
          }
          case GraphField::Input:
            need_bytes(f, r, w);
            index = static_cast<int>(g.inputs.size());
            g.inputs.push_back(parse_value_info(f.bytes, w));
            model.note_name(g.inputs.back().name);
            break;
          case GraphField::Output: need_bytes(f, r, w); g.outputs.push_back(parse_value_info(f.bytes, w)); break;
          case GraphField::ValueInfo:
            need_bytes(f, r, w);
            index = static_cast<int>(EditRecord::value_info(g).size());
            EditRecord::value_info(g).push_back(parse_value_info(f.bytes, w));
            break;
          case GraphField::SparseInitializer: need_bytes(f, r, w); check_fields(f.bytes, w); break;
          case GraphField::Name: need_bytes(f, r, w); break;
          default: break;
        }
      } else {
        switch (static_cast<FunctionField>(f.number)) {
          case FunctionField::Node: need_bytes(f, r, w); index = static_cast<int>(node_bodies.size()); node_bodies.push_back(f.bytes); break;
          case FunctionField::Input: g.inputs.push_back(ValueInfo{str(f, r, w), {}}); model.note_name(g.inputs.back().name); break;
          case FunctionField::Output: g.outputs.push_back(ValueInfo{str(f, r, w), {}}); break;
          case FunctionField::ValueInfo:
            need_bytes(f, r, w);
            index = static_cast<int>(EditRecord::value_info(g).size());
            EditRecord::value_info(g).push_back(parse_value_info(f.bytes, w));
            break;
          case FunctionField::OpsetImport: {
            need_bytes(f, r, w);
            auto [domain, version] = parse_opset(f.bytes, w);
            g.function_opsets[domain] = version;
            break;
          }
          default: break;
        }
      }
      EditRecord::fields(g).push_back(Graph::FieldRef{f.number, f.whole, index});
    }
    EditRecord::nodes(g).resize(node_bodies.size());
    for (size_t k = 0; k < node_bodies.size(); ++k) parse_node(EditRecord::nodes(g)[k], node_bodies[k], g, depth, static_cast<int>(k));
    EditRecord::of(g).initializer_removed.assign(EditRecord::initializers(g).size(), false);
    EditRecord::of(g).initializer_replaced.resize(EditRecord::initializers(g).size());
    EditRecord::of(g).original_initializer_count = EditRecord::initializers(g).size();
    EditRecord::of(g).initializer_lazy.resize(EditRecord::initializers(g).size());
    for (const auto& t : EditRecord::initializers(g)) g.original_external.push_back(t.external ? t.external_ref : ExternalRef{});
    EditRecord::of(g).value_info_removed.assign(EditRecord::value_info(g).size(), false);
    EditRecord::of(g).input_removed.assign(g.inputs.size(), false);
    g.build_index();
    check_structure(g);
  }

  std::pair<std::string, int64_t> parse_opset(std::string_view body, const char* where) {
    std::string domain;
    int64_t version = 0;
    Reader r(body, base);
    while (!r.done()) {
      Field f = r.next(where);
      if (f.number == num(OpsetField::Domain)) domain = str(f, r, where);
      else if (f.number == num(OpsetField::Version)) version = int_value(f, r, where);
    }
    if (domain == "ai.onnx") domain.clear();
    return {domain, version};
  }

  std::string function_label(std::string_view body) {
    std::string name, domain;
    Reader r(body, base);
    while (!r.done()) {
      Field f = r.next("FunctionProto");
      if (f.number == num(FunctionField::Name)) name = str(f, r, "FunctionProto");
      else if (f.number == num(FunctionField::Domain)) domain = str(f, r, "FunctionProto");
    }
    return "function:" + (domain.empty() ? "" : domain + ".") + name;
  }
};

}  // namespace

std::unique_ptr<Model> parse_model(std::string_view buffer, ExternalResolver* external) {
  if (buffer.empty()) throw WireError("the input is empty (0 bytes), not an ONNX model");
  auto model = std::make_unique<Model>();
  model->buffer = buffer;
  model->external = external;
  Parser p{buffer.data(), *model};
  Reader r(buffer, buffer.data());
  const char* w = "ModelProto";
  std::vector<std::string_view> function_bodies;
  std::string_view graph_body;
  bool has_graph = false;
  while (!r.done()) {
    Field f = r.next(w);
    int index = -1;
    switch (static_cast<ModelField>(f.number)) {
      case ModelField::IrVersion: model->ir_version = p.int_value(f, r, w); break;
      case ModelField::OpsetImport: {
        p.need_bytes(f, r, w);
        auto [domain, version] = p.parse_opset(f.bytes, "ModelProto.opset_import");
        model->opsets[domain] = version;
        break;
      }
      case ModelField::Graph:
        p.need_bytes(f, r, w);
        if (has_graph) r.fail(w, f.whole.data(), "the model holds two graph fields");
        has_graph = true;
        graph_body = f.bytes;
        index = 0;
        break;
      case ModelField::Functions:
        p.need_bytes(f, r, w);
        index = static_cast<int>(function_bodies.size());
        function_bodies.push_back(f.bytes);
        break;
      case ModelField::ProducerName: case ModelField::ProducerVersion: case ModelField::Domain:
      case ModelField::DocString:
        p.need_bytes(f, r, w);
        break;
      case ModelField::MetadataProps: case ModelField::TrainingInfo:
        p.need_bytes(f, r, w);
        p.check_fields(f.bytes, w);
        break;
      default: break;
    }
    model->fields.push_back(Model::FieldRef{f.number, f.whole, index});
  }
  if (model->ir_version <= 0) throw WireError("ModelProto: ir_version is missing, so this is not an ONNX model");
  if (!has_graph) throw WireError("ModelProto: the model has no graph");
  if (model->opsets.empty()) throw WireError("ModelProto: the model has no opset_import");
  model->graph = std::make_unique<Graph>();
  model->graph->path = "main";
  p.parse_graph(*model->graph, graph_body, 0);
  for (auto body : function_bodies) {
    auto fn = std::make_unique<Graph>();
    fn->kind = GraphKind::Function;
    fn->path = p.function_label(body);
    p.parse_graph(*fn, body, 0);
    model->functions.push_back(std::move(fn));
  }
  return model;
}

}  // namespace qdqfold::graph
