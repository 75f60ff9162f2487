// Model -> bytes. Walks the recorded field list of every message on the path to an edit; everything else is
// a view of the input, so a model with no edits is one view of the whole buffer: byte-identical.
#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include "../wire/fields.h"
#include "../wire/writer.h"
#include "edit_record.h"
#include "external_output.h"
#include "graph.h"

namespace qdqfold::graph {

using namespace wire;

namespace {

// Appends to a TensorProto payload (every field but the data) where its data lives: data_location EXTERNAL
// and the location / offset / length entries.
void put_external_data(std::string& payload, const std::string& location, int64_t offset, int64_t length) {
  put_varint_field(payload, num(TensorField::DataLocation), 1);
  auto entry = [&payload](const char* key, const std::string& value) {
    std::string e;
    put_bytes_field(e, num(StringStringField::Key), key);
    put_bytes_field(e, num(StringStringField::Value), value);
    put_bytes_field(payload, num(TensorField::ExternalData), e);
  };
  entry("location", location);
  entry("offset", std::to_string(offset));
  entry("length", std::to_string(length));
}

struct Writer {
  Writer(Arena& a, ExternalOutput* ext) : arena(a), external_output(ext) {}
  Arena& arena;
  ExternalOutput* external_output;

  void message(Pieces& out, uint32_t field, const Pieces& payload) {
    out.view(arena.keep(bytes_header(field, payload.size())));
    out.append(payload);
  }
  void owned(Pieces& out, uint32_t field, std::string_view payload_bytes) {
    std::string s = bytes_header(field, payload_bytes.size());
    s.append(payload_bytes);
    out.view(arena.keep(std::move(s)));
  }
  void owned_string(Pieces& out, uint32_t field, std::string payload) {
    out.view(arena.keep(bytes_header(field, payload.size())));
    out.view(arena.keep(std::move(payload)));
  }

  bool has_dirty_subgraph(const Node& n, int attribute) const {
    for (const auto& s : n.subgraphs)
      if (s->owner_attribute == attribute && s->dirty()) return true;
    return false;
  }

  Pieces attribute_with_subgraphs(const Node& n, int attribute, std::string_view body) {
    Pieces out;
    Reader r(body, body.data());
    int position = 0;
    while (!r.done()) {
      Field f = r.next("attribute");
      if (f.number == num(AttributeField::G) || f.number == num(AttributeField::Graphs)) {
        Graph* sub = nullptr;
        for (const auto& s : n.subgraphs)
          if (s->owner_attribute == attribute && s->owner_position == position) sub = s.get();
        ++position;
        if (sub && sub->dirty()) {
          message(out, f.number, graph(*sub));
          continue;
        }
      }
      out.view(f.whole);
    }
    return out;
  }

  std::string created_node(const Node& n) {
    std::string s;
    for (const auto& i : n.inputs) put_bytes_field(s, num(NodeField::Input), i);
    for (const auto& o : n.outputs) put_bytes_field(s, num(NodeField::Output), o);
    if (!n.name.empty()) put_bytes_field(s, num(NodeField::Name), n.name);
    put_bytes_field(s, num(NodeField::OpType), n.op_type);
    for (const auto& [name, payload] : EditRecord::of(n).set_attributes) put_bytes_field(s, num(NodeField::Attribute), payload);
    if (!n.domain.empty()) put_bytes_field(s, num(NodeField::Domain), n.domain);
    return s;
  }

  // An edited node keeps its fields in their places; inputs and outputs are written positionally, and
  // attributes set by a fold replace the ones of the same name or follow the others.
  Pieces edited_node(const Node& n) {
    Pieces out;
    if (n.created()) {
      out.view(arena.keep(created_node(n)));
      return out;
    }
    size_t in = 0, outp = 0;
    int attribute = 0;
    std::vector<bool> attr_done(EditRecord::of(n).set_attributes.size(), false);
    Reader r(n.body, n.body.data());
    while (!r.done()) {
      Field f = r.next("node");
      switch (static_cast<NodeField>(f.number)) {
        case NodeField::Input:
          if (in < n.inputs.size()) owned(out, f.number, n.inputs[in]);
          ++in;
          break;
        case NodeField::Output:
          if (outp < n.outputs.size()) owned(out, f.number, n.outputs[outp]);
          ++outp;
          break;
        case NodeField::OpType: owned(out, f.number, n.op_type); break;
        case NodeField::Attribute: {
          const std::string& name = n.attributes[attribute].name;
          bool replaced = false;
          for (size_t k = 0; k < EditRecord::of(n).set_attributes.size(); ++k)
            if (EditRecord::of(n).set_attributes[k].first == name) {
              owned(out, f.number, EditRecord::of(n).set_attributes[k].second);
              attr_done[k] = true;
              replaced = true;
            }
          if (!replaced) {
            if (has_dirty_subgraph(n, attribute)) message(out, f.number, attribute_with_subgraphs(n, attribute, f.bytes));
            else out.view(f.whole);
          }
          ++attribute;
          break;
        }
        default: out.view(f.whole);
      }
    }
    for (; in < n.inputs.size(); ++in) owned(out, num(NodeField::Input), n.inputs[in]);
    for (; outp < n.outputs.size(); ++outp) owned(out, num(NodeField::Output), n.outputs[outp]);
    for (size_t k = 0; k < EditRecord::of(n).set_attributes.size(); ++k)
      if (!attr_done[k]) owned(out, num(NodeField::Attribute), EditRecord::of(n).set_attributes[k].second);
    return out;
  }

  bool node_changed(const Node& n) const {
    if (EditRecord::of(n).edited || n.created()) return true;
    for (const auto& s : n.subgraphs)
      if (s->dirty()) return true;
    return false;
  }

  void node(Pieces& out, uint32_t field, const Node& n, std::string_view whole) {
    if (n.removed()) return;
    if (!node_changed(n)) out.view(whole);
    else message(out, field, edited_node(n));
  }

  // Nodes created by folds, by the position they go before (-1: after the last node).
  std::unordered_map<int, std::vector<int>> created_at;

  void created_before(Pieces& out, Graph& g, uint32_t field, int position) {
    auto it = created_at.find(position);
    if (it == created_at.end()) return;
    for (int k : it->second)
      if (!g.nodes()[k].removed()) message(out, field, edited_node(g.nodes()[k]));
  }

  // An initializer: as it was, replaced, added, or produced lazily; in file mode an initializer whose data
  // lived in an external file keeps living there (see external_initializer).
  void initializer(Pieces& out, Graph& g, size_t k, std::string_view whole) {
    if (EditRecord::of(g).initializer_removed[k]) return;
    const uint32_t field = num(GraphField::Initializer);
    const Graph::LazyInitializer* lazy = EditRecord::of(g).initializer_lazy[k].get();
    if (external_output && external_output->layout != ExternalOutput::Layout::AsInput) {
      laid_out_initializer(out, g, k, whole);
    } else if (external_output && k < EditRecord::of(g).original_initializer_count && !g.original_external[k].location.empty()) {
      external_initializer(out, g, k, whole);
    } else if (lazy) {
      lazy_tensor(out, field, lazy->header, lazy->data);
    } else if (EditRecord::of(g).initializer_replaced[k]) {
      owned(out, field, *EditRecord::of(g).initializer_replaced[k]);
    } else if (k < EditRecord::of(g).original_initializer_count) {
      out.view(whole);
    } else {
      owned(out, field, *EditRecord::of(g).initializer_added[k - EditRecord::of(g).original_initializer_count]);
    }
  }

  // File mode, ExternalOutput::Layout Inline or External: the initializer's data goes inline, or to the end of
  // the one data file. A tensor without raw data (typed fields: float_data, string_data, ...) stays as it was,
  // as onnx's own conversion leaves it.
  void laid_out_initializer(Pieces& out, Graph& g, size_t k, std::string_view whole) {
    ExternalOutput& ext = *external_output;
    const uint32_t field = num(GraphField::Initializer);
    const Tensor& current = g.initializers()[k];
    const Graph::LazyInitializer* lazy = EditRecord::of(g).initializer_lazy[k].get();
    const bool original = k < EditRecord::of(g).original_initializer_count;
    const bool was_external = original && !g.original_external[k].location.empty();
    const size_t size = lazy ? lazy->data->size : current.raw.size();
    const bool to_file = ext.layout == ExternalOutput::Layout::External && (lazy || current.has_raw) &&
                         static_cast<int64_t>(size) >= ext.threshold;
    if (!to_file && !was_external) {  // inline, as it was
      if (lazy) lazy_tensor(out, field, lazy->header, lazy->data);
      else if (EditRecord::of(g).initializer_replaced[k]) owned(out, field, *EditRecord::of(g).initializer_replaced[k]);
      else if (original) out.view(whole);
      else owned(out, field, *EditRecord::of(g).initializer_added[k - EditRecord::of(g).original_initializer_count]);
      return;
    }
    std::string header = lazy ? lazy->header : reencode_tensor_header(current, current.data_type, current.dims);
    if (!to_file) {  // external data brought inline: header + raw_data
      if (lazy) {
        lazy_tensor(out, field, lazy->header, lazy->data);
        return;
      }
      std::string raw_header = bytes_header(num(TensorField::RawData), size);
      out.view(arena.keep(bytes_header(field, header.size() + raw_header.size() + size)));
      out.view(arena.keep(std::move(header)));
      out.view(arena.keep(std::move(raw_header)));
      out.view(current.raw);
      return;
    }
    // To the data file, at the next boundary.
    const int64_t alignment = size >= (size_t(1) << 20) ? 65536 : 1;
    const auto at = static_cast<int64_t>(ext.data_pieces.size());
    const int64_t offset = (at + alignment - 1) / alignment * alignment;
    if (offset > at) ext.data_pieces.view(arena.keep(std::string(static_cast<size_t>(offset - at), '\0')));
    if (lazy) {
      const auto data = lazy->data;
      std::function<void(char*, size_t, size_t)> range;
      if (data->fill_range) range = [data](char* dst, size_t begin, size_t end) { data->fill_range(dst, begin, end); };
      ext.data_pieces.generated(size, [data](char* dst) { data->fill(dst); }, std::move(range));
    } else {
      ext.data_pieces.view(current.raw);
    }
    put_external_data(header, ext.data_name, offset, static_cast<int64_t>(size));
    owned_string(out, field, std::move(header));
  }

  // True when the external bytes of initializer k of g overlap those of another initializer of the model.
  bool shares_bytes(const Graph& g, size_t k) {
    if (!shared_external) shared_external = find_shared_external(*whole_model);
    return shared_external->count({&g, k}) > 0;
  }
  // Every initializer whose external bytes overlap another's: one sweep per data file in offset order, where
  // an interval overlaps an earlier one exactly when it starts before the furthest end seen so far (and
  // then overlaps the interval that reached that end too).
  std::set<std::pair<const Graph*, size_t>> find_shared_external(Model& model) const {
    struct Interval {
      int64_t begin, end;
      const Graph* graph;
      size_t index;
    };
    std::map<std::string, std::vector<Interval>> by_file;
    for (Graph* g : model.all_graphs())
      for (size_t i = 0; i < g->original_external.size(); ++i) {
        const ExternalRef& r = g->original_external[i];
        if (r.location.empty() || r.length <= 0) continue;
        // Grouped by the file written, so that two names of one data file (m.data, ./m.data) are one file.
        const std::string& file = external_output ? external_output->location_out.at(r.location) : r.location;
        by_file[file].push_back({r.offset, r.offset + r.length, g, i});
      }
    std::set<std::pair<const Graph*, size_t>> shared;
    for (auto& [location, intervals] : by_file) {
      std::sort(intervals.begin(), intervals.end(), [](const Interval& a, const Interval& b) { return a.begin < b.begin; });
      const Interval* furthest = nullptr;
      for (const Interval& x : intervals) {
        if (furthest && x.begin < furthest->end) {
          shared.insert({x.graph, x.index});
          shared.insert({furthest->graph, furthest->index});
        }
        if (!furthest || x.end > furthest->end) furthest = &x;
      }
    }
    return shared;
  }
  Model* whole_model = nullptr;  // for shares_bytes
  std::optional<std::set<std::pair<const Graph*, size_t>>> shared_external;

  // TensorProto = header + raw_data, the data written by its generator straight into the output.
  void lazy_tensor(Pieces& out, uint32_t field, const std::string& header, const std::shared_ptr<const LazyBytes>& data) {
    std::string raw_header = bytes_header(num(TensorField::RawData), data->size);
    out.view(arena.keep(bytes_header(field, header.size() + raw_header.size() + data->size)));
    out.view(header);
    out.view(arena.keep(std::move(raw_header)));
    std::function<void(char*, size_t, size_t)> range;
    if (data->fill_range) range = [data](char* dst, size_t begin, size_t end) { data->fill_range(dst, begin, end); };
    out.generated(data->size, [data](char* dst) { data->fill(dst); }, std::move(range));
  }

  // File mode, for an initializer whose data was external: the data files are copied, so unchanged data stays
  // where it was and new data of the same size overwrites it in place (offsets and alignment kept); only the
  // location may change. Data of another size is written inline.
  void external_initializer(Pieces& out, Graph& g, size_t k, std::string_view whole) {
    const ExternalRef& ref = g.original_external[k];
    const std::string& location = external_output->location_out.at(ref.location);
    const Tensor& current = g.initializers()[k];
    const Graph::LazyInitializer* lazy = EditRecord::of(g).initializer_lazy[k].get();
    const bool changed = lazy || EditRecord::of(g).initializer_replaced[k];
    const uint32_t field = num(GraphField::Initializer);
    if (!changed && location == ref.location) {
      out.view(whole);
      return;
    }
    const size_t size = lazy ? lazy->data->size : current.raw.size();
    const int64_t length = ref.length;  // resolved on parse in file mode
    if (changed && static_cast<int64_t>(size) != length) {  // another size: inline
      if (lazy) lazy_tensor(out, field, lazy->header, lazy->data);
      else owned(out, field, *EditRecord::of(g).initializer_replaced[k]);
      return;
    }
    int64_t offset = ref.offset;
    if (changed) {
      if (shares_bytes(g, k)) {  // another tensor reads these bytes: they must stay; the new data goes at the end
        int64_t& end = external_output->append_at[location];
        offset = (end + 4095) / 4096 * 4096;
        end = offset + static_cast<int64_t>(size);
      }
      ExternalOutput::Overwrite w;
      w.location = location;
      w.offset = offset;
      if (lazy) w.lazy = lazy->data;
      else w.bytes = current.raw;
      external_output->overwrites.push_back(std::move(w));
    }
    std::string payload = reencode_tensor_header(current, current.data_type, current.dims);
    put_external_data(payload, location, offset, length);
    out.view(arena.keep(bytes_header(field, payload.size())));
    out.view(arena.keep(std::move(payload)));
  }

  Pieces graph(Graph& g) {
    Pieces out;
    if (!g.dirty()) {
      out.view(g.body);
      return out;
    }
    const bool function = g.kind == GraphKind::Function;
    const uint32_t node_field = function ? num(FunctionField::Node) : num(GraphField::Node);
    const uint32_t value_info_field = function ? num(FunctionField::ValueInfo) : num(GraphField::ValueInfo);
    std::unordered_map<int, std::vector<int>> outer_created = std::move(created_at);
    created_at.clear();
    int original_nodes = 0;
    for (size_t k = 0; k < g.nodes().size(); ++k) {
      if (g.nodes()[k].created()) created_at[EditRecord::of(g.nodes()[k]).insert_before].push_back(static_cast<int>(k));
      else ++original_nodes;
    }
    int last_node_field = -1, last_initializer_field = -1;
    for (size_t k = 0; k < g.fields().size(); ++k) {
      if (g.fields()[k].number == node_field) last_node_field = static_cast<int>(k);
      if (!function && g.fields()[k].number == num(GraphField::Initializer)) last_initializer_field = static_cast<int>(k);
    }
    auto added_initializers = [&] {
      for (size_t k = EditRecord::of(g).original_initializer_count; k < g.initializers().size(); ++k) initializer(out, g, k, {});
    };
    // New initializers go first when the graph has none, so that they precede the nodes like the rest.
    if (!function && last_initializer_field < 0) added_initializers();
    if (last_node_field < 0) created_before(out, g, node_field, 0);
    for (size_t k = 0; k < g.fields().size(); ++k) {
      const auto& f = g.fields()[k];
      if (f.number == node_field) {
        created_before(out, g, node_field, f.index);
        node(out, node_field, g.nodes()[f.index], f.whole);
        if (static_cast<int>(k) == last_node_field) created_before(out, g, node_field, -1);
        if (static_cast<int>(k) == last_node_field && original_nodes > 0) created_before(out, g, node_field, original_nodes);
      } else if (!function && f.number == num(GraphField::Initializer)) {
        initializer(out, g, f.index, f.whole);
        if (static_cast<int>(k) == last_initializer_field) added_initializers();
      } else if (f.number == value_info_field && f.index >= 0) {
        if (!EditRecord::of(g).value_info_removed[f.index]) out.view(f.whole);
      } else if (!function && f.number == num(GraphField::Input) && f.index >= 0) {
        if (!EditRecord::of(g).input_removed[f.index]) out.view(f.whole);  // a frozen initializer's input a fold dropped
      } else {
        out.view(f.whole);
      }
    }
    if (last_node_field < 0) created_before(out, g, node_field, -1);
    // Graph inputs for new initializers (IR version < 4 lists every initializer as an input); the field order
    // of a message does not matter, so they go last.
    for (const auto& [name, payload] : EditRecord::of(g).inputs_added)
      if (!payload.empty()) owned_string(out, num(GraphField::Input), payload);
    created_at = std::move(outer_created);  // subgraphs are written while their owner is being written
    return out;
  }

  // Writes an opset_import entry whose domain a fold raised, with the new version; false for other domains.
  bool raised_opset(Pieces& out, const Model& m, std::string_view whole) {
    Reader outer(whole, whole.data());
    const Field entry = outer.next("opset_import");
    std::string domain;
    Reader r(entry.bytes, whole.data());
    while (!r.done()) {
      Field f = r.next("opset_import");
      if (f.number == num(OpsetField::Domain) && f.type == WireType::Bytes) domain = std::string(f.bytes);
    }
    auto it = m.raised_opsets.find(domain == "ai.onnx" ? "" : domain);
    if (it == m.raised_opsets.end()) return false;
    std::string payload;
    if (!domain.empty()) put_bytes_field(payload, num(OpsetField::Domain), domain);
    put_varint_field(payload, num(OpsetField::Version), static_cast<uint64_t>(it->second));
    owned_string(out, num(ModelField::OpsetImport), std::move(payload));
    return true;
  }

  Pieces model(Model& m) {
    Pieces out;
    for (const auto& f : m.fields) {
      if (f.number == num(ModelField::Graph) && m.graph->dirty()) {
        message(out, f.number, graph(*m.graph));
      } else if (f.number == num(ModelField::Functions) && f.index >= 0 && m.functions[f.index]->dirty()) {
        message(out, f.number, graph(*m.functions[f.index]));
      } else if (f.number == num(ModelField::OpsetImport) && !m.raised_opsets.empty() && raised_opset(out, m, f.whole)) {
        // rewritten with the raised version
      } else {
        out.view(f.whole);
      }
    }
    return out;
  }
};

}  // namespace

// In file mode every graph holding an initializer whose external data moves to another location is rewritten.
static void mark_moved_external_data(Model& model, const ExternalOutput* external_output) {
  if (!external_output) return;
  if (external_output->layout != ExternalOutput::Layout::AsInput) {  // any initializer may move
    for (Graph* g : model.all_graphs())
      if (!g->initializers().empty()) g->mark_dirty();
    return;
  }
  for (Graph* g : model.all_graphs())
    for (const auto& ref : g->original_external)
      if (!ref.location.empty() && external_output->location_out.at(ref.location) != ref.location) {
        g->mark_dirty();
        break;
      }
}

Pieces write_model(Model& model, Arena& arena, ExternalOutput* external_output) {
  mark_moved_external_data(model, external_output);
  Writer writer(arena, external_output);
  writer.whole_model = &model;
  return writer.model(model);
}

}  // namespace qdqfold::graph
