#include "files.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <vector>

#include "../wire/fields.h"
#include "background_writer.h"
#include "deferred_checks.h"
#include "file_io.h"

namespace qdqfold {

using io::FileError;
using io::MappedFile;
using io::OutputFile;

std::string output_data_name(const std::string& output_name, size_t k) {
  return k == 0 ? output_name + ".data" : output_name + "." + std::to_string(k + 1) + ".data";
}

namespace {

// ------------------------------------------------------------------------------------------------ reading

// A location onnx would accept too: relative, with no ".." component and no NUL.
bool plain_relative(const std::string& location) {
  if (location.empty() || location[0] == '/' || location.find('\0') != std::string::npos) return false;
  size_t begin = 0;
  while (begin <= location.size()) {
    size_t end = location.find_first_of("/\\", begin);
    if (end == std::string::npos) end = location.size();
    if (location.compare(begin, end - begin, "..") == 0 && end - begin == 2) return false;
    begin = end + 1;
  }
  return true;
}

// Maps external data files on first use. A location must name a regular file inside the model's directory
// after every link is followed; files are told apart by device and inode, so one file reached by several
// names is mapped once and written once.
class FileResolver : public graph::ExternalResolver {
 public:
  struct DataFile {
    std::unique_ptr<MappedFile> file;
    std::string real_path;  // absolute, links resolved
  };

  // `directory` holds the model; `model` names it in messages (its path, or a label for bytes in memory).
  FileResolver(std::string directory, std::string model) : model_path_(std::move(model)), directory_(std::move(directory)) {}

  std::string_view resolve(const graph::ExternalRef& ref, const std::string& tensor) override {
    const MappedFile& file = *files_[open(ref.location, tensor)].file;
    const auto size = static_cast<int64_t>(file.view().size());
    const int64_t length = ref.length >= 0 ? ref.length : size - ref.offset;
    if (ref.offset > size || length < 0 || length > size - ref.offset)
      throw FileError(file.path() + ": external data of tensor '" + tensor + "' (offset " + std::to_string(ref.offset) +
                      ", length " + std::to_string(length) + ") runs past the end of the file (" +
                      std::to_string(size) + " bytes)");
    return file.view().substr(static_cast<size_t>(ref.offset), static_cast<size_t>(length));
  }

  // The index in files() of the file `location` names.
  size_t open(const std::string& location, const std::string& tensor) {
    auto it = by_location_.find(location);
    if (it != by_location_.end()) return it->second;
    const std::string role = "the external data file of tensor '" + tensor + "'";
    if (!plain_relative(location))
      throw FileError(model_path_ + ": tensor '" + tensor + "' keeps its data at '" + location +
                      "', which is not a path inside the model's directory (qdqfold reads external data only "
                      "from files inside it)");
    if (!real_directory_) {
      real_directory_ = io::real_path(directory_);
      if (!real_directory_) io::throw_os_error("cannot open the model's directory", directory_);
    }
    const std::string path = directory_ + "/" + location;
    // Where the name leads, checked before the file is opened: a link out of the directory is never read.
    const auto real = io::real_path(path);
    if (real && !io::is_inside(*real, *real_directory_))
      throw FileError(path + ": " + role + " leads to " + *real + ", outside the model's directory " +
                      *real_directory_ + " (through a symbolic link); qdqfold reads external data only from "
                      "files inside it");
    auto file = std::make_unique<MappedFile>(path, role);  // refuses FIFOs, devices, directories
    if (!real || io::file_id(*real) != file->id())
      throw FileError(path + ": the input changed while it was being folded");
    for (size_t k = 0; k < files_.size(); ++k)
      if (files_[k].file->id() == file->id()) return by_location_[location] = k;
    files_.push_back({std::move(file), *real});
    return by_location_[location] = files_.size() - 1;
  }

  bool holds(std::string_view bytes) const override {
    for (const auto& f : files_)
      if (f.file->contains(bytes.data()) && f.file->contains(bytes.data() + bytes.size() - (bytes.empty() ? 0 : 1)))
        return true;
    return false;
  }

  const std::vector<DataFile>& files() const { return files_; }
  const std::map<std::string, size_t>& locations() const { return by_location_; }
  void drop_resident() const {
    for (const auto& f : files_) f.file->drop_resident();
  }
  void release(std::string_view bytes) const {
    for (const auto& f : files_) f.file->release(bytes);
  }

 private:
  std::string model_path_, directory_;
  std::optional<std::string> real_directory_;
  std::vector<DataFile> files_;
  std::map<std::string, size_t> by_location_;
};

// Resolves locations named in a map of caller-held buffers (the onnx_ir pass hands its in-memory tensors over
// this way, without copying them into the model's bytes); other locations go to a file resolver, if any.
class MemoryResolver : public graph::ExternalResolver {
 public:
  MemoryResolver(std::map<std::string, std::string_view> buffers, std::unique_ptr<graph::ExternalResolver> files,
                 std::string label)
      : buffers_(std::move(buffers)), files_(std::move(files)), label_(std::move(label)) {}

  std::string_view resolve(const graph::ExternalRef& ref, const std::string& tensor) override {
    const auto it = buffers_.find(ref.location);
    if (it == buffers_.end()) {
      if (files_) return files_->resolve(ref, tensor);
      throw FileError(label_ + ": tensor '" + tensor + "' keeps its data at '" + ref.location +
                      "', which is not one of the buffers given in `tensors` (and no base_directory was given)");
    }
    const auto size = static_cast<int64_t>(it->second.size());
    const int64_t length = ref.length >= 0 ? ref.length : size - ref.offset;
    if (ref.offset < 0 || ref.offset > size || length < 0 || length > size - ref.offset)
      throw FileError(label_ + ": external data of tensor '" + tensor + "' (offset " + std::to_string(ref.offset) +
                      ", length " + std::to_string(length) + ") runs past the end of its buffer (" +
                      std::to_string(size) + " bytes)");
    return it->second.substr(static_cast<size_t>(ref.offset), static_cast<size_t>(length));
  }

  bool holds(std::string_view bytes) const override {
    for (const auto& [location, buffer] : buffers_)
      if (bytes.data() >= buffer.data() && bytes.data() + bytes.size() <= buffer.data() + buffer.size()) return true;
    return files_ && files_->holds(bytes);
  }

  const graph::ExternalResolver* files() const { return files_.get(); }
  size_t buffer_bytes() const {
    size_t n = 0;
    for (const auto& [location, buffer] : buffers_) n += buffer.size();
    return n;
  }

 private:
  std::map<std::string, std::string_view> buffers_;
  std::unique_ptr<graph::ExternalResolver> files_;
  std::string label_;
};

// Tensors the writer does not relocate (Constant and other attribute tensors, sparse initializers) must not
// keep external data: the output's data files have other names, and the model would read the input's files,
// or whatever carries their names beside the output. Refused, naming the tensor.
bool tensor_is_external(std::string_view tensor) {
  wire::Reader r(tensor, tensor.data());
  while (!r.done()) {
    const wire::Field f = r.next("tensor");
    if (f.number == wire::num(wire::TensorField::DataLocation) && f.type == wire::WireType::Varint && f.scalar == 1)
      return true;
  }
  return false;
}

bool sparse_is_external(std::string_view sparse) {
  wire::Reader r(sparse, sparse.data());
  while (!r.done()) {
    const wire::Field f = r.next("sparse tensor");
    if ((f.number == 1 || f.number == 2) && f.type == wire::WireType::Bytes && tensor_is_external(f.bytes)) return true;
  }
  return false;
}

void refuse_unrelocatable_external_data(graph::Model& model, const std::string& src) {
  using wire::AttributeField;
  for (graph::Graph* g : model.all_graphs()) {
    for (const auto& field : g->fields)
      if (field.number == wire::num(wire::GraphField::SparseInitializer) && g->kind != graph::GraphKind::Function) {
        wire::Reader outer(field.whole, field.whole.data());
        const wire::Field f = outer.next("sparse_initializer");
        if (sparse_is_external(f.bytes))
          throw FileError(src + ": a sparse initializer of " + g->path + " keeps external data; qdqfold relocates "
                          "the external data of dense initializers only");
      }
    for (size_t k = 0; k < g->nodes.size(); ++k) {
      const graph::Node& node = g->nodes[k];
      if (node.body.empty()) continue;
      wire::Reader r(node.body, node.body.data());
      while (!r.done()) {
        const wire::Field a = r.next("node");
        if (a.number != wire::num(wire::NodeField::Attribute) || a.type != wire::WireType::Bytes) continue;
        wire::Reader ar(a.bytes, a.bytes.data());
        while (!ar.done()) {
          const wire::Field f = ar.next("attribute");
          if (f.type != wire::WireType::Bytes) continue;
          const bool external =
              ((f.number == wire::num(AttributeField::T) || f.number == wire::num(AttributeField::Tensors)) &&
               tensor_is_external(f.bytes)) ||
              ((f.number == wire::num(AttributeField::SparseTensor) ||
                f.number == wire::num(AttributeField::SparseTensors)) && sparse_is_external(f.bytes));
          if (external)
            throw FileError(src + ": node " + node.display_name(static_cast<int>(k)) + " of " + g->path +
                            " holds a tensor attribute with external data; qdqfold relocates the external data "
                            "of initializers only");
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ writing

// Stops a fold at its next chunk once io::interrupt() was called after it began.
struct Interruption {
  uint64_t generation = io::interrupt_generation();
  std::string output;
  void check() const {
    if (io::interrupt_generation() != generation) throw FileError(output + ": interrupted");
  }
};

// Generated data goes through a buffer of this size at most, when its generator can produce ranges: the
// process never holds a whole folded weight. 1 MB stays in cache between the generator writing it and write()
// copying it into the page cache (measured 5-15% faster file to file than 8 MB; 256 KB was no faster).
constexpr size_t kChunk = size_t(1) << 20;

// Writes pieces in order: views of the input file are copied file to file, everything else is written, all on
// a second thread (BackgroundWriter) while the next chunk of a folded weight is computed on this one.
void write_pieces(const wire::Pieces& pieces, const std::vector<const MappedFile*>& sources, OutputFile& out,
                  const Interruption& stop) {
  auto source_of = [&sources](const char* p) -> const MappedFile* {
    for (const MappedFile* f : sources)
      if (f->contains(p)) return f;
    return nullptr;
  };
  auto drop_resident = [&sources] {
    for (const MappedFile* f : sources) f->drop_resident();
  };
  BackgroundWriter writer(kChunk, 3);
  auto write_buffer = [&out](size_t n) { return [&out, n](const std::string& b) { out.write(b.data(), n); }; };
  for (const auto& p : pieces.list()) {
    stop.check();
    if (p.generate && p.generate_range) {
      for (size_t begin = 0; begin < p.size; begin += kChunk) {
        const size_t end = std::min(p.size, begin + kChunk);
        std::string& buffer = writer.acquire();
        p.generate_range(buffer.data(), begin, end);
        writer.post(buffer, write_buffer(end - begin));
        stop.check();
      }
      drop_resident();  // the generator read its source from a mapping
    } else if (p.generate) {  // small tensors a fold encodes whole
      auto whole = std::make_shared<std::string>(p.size, '\0');
      p.generate(whole->data());
      writer.post([&out, whole] { out.write(whole->data(), whole->size()); });
      drop_resident();
    } else if (const MappedFile* input = source_of(p.data)) {
      writer.post([&out, input, offset = input->offset_of(p.data), size = p.size] { out.copy_from(*input, offset, size); });
    } else {
      writer.post([&out, data = p.data, size = p.size] { out.write(data, size); });
    }
  }
  writer.finish();
}

// Writes an external data file: the input's bytes with the folded tensors' new bytes in place (every offset
// kept). In offset order, each stretch between folded tensors is copied file to file and each folded tensor is
// written once. When one lies past the end (appended: its old bytes are shared with another tensor, see
// ExternalOutput::append_at), the whole file is copied and the folded tensors are written at their offsets.
// The writes run on a second thread while this one computes the folded bytes.
void write_data_file(const MappedFile& file, const std::string& location,
                     const std::vector<graph::ExternalOutput::Overwrite>& overwrites, const FileResolver& resolver,
                     OutputFile& out, const Interruption& stop) {
  auto size_of = [](const graph::ExternalOutput::Overwrite& w) { return w.lazy ? w.lazy->size : w.bytes.size(); };
  std::vector<const graph::ExternalOutput::Overwrite*> mine;
  for (const auto& w : overwrites)
    if (w.location == location) mine.push_back(&w);
  std::stable_sort(mine.begin(), mine.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  const auto file_size = static_cast<int64_t>(file.view().size());
  bool in_order = true;  // disjoint and inside the file: one sequential pass
  int64_t end = 0;
  for (const auto* w : mine) {
    in_order = in_order && w->offset >= end && w->offset + static_cast<int64_t>(size_of(*w)) <= file_size;
    end = w->offset + static_cast<int64_t>(size_of(*w));
  }

  BackgroundWriter writer(kChunk, 3);
  // Writes `n` bytes at `at`, or at the current end when at < 0.
  auto put = [&out](const char* data, size_t n, int64_t at) {
    if (at < 0) out.write(data, n);
    else out.pwrite_all(data, n, at);
  };
  auto write_folded = [&](const graph::ExternalOutput::Overwrite& w, bool sequential) {
    const int64_t base = sequential ? -1 : w.offset;
    auto at = [base](size_t begin) { return base < 0 ? base : base + static_cast<int64_t>(begin); };
    if (w.lazy && w.lazy->fill_range) {
      for (size_t begin = 0; begin < w.lazy->size; begin += kChunk) {
        stop.check();
        const size_t stop_at = std::min(w.lazy->size, begin + kChunk);
        std::string& buffer = writer.acquire();
        w.lazy->fill_range(buffer.data(), begin, stop_at);
        writer.post(buffer, [put, n = stop_at - begin, to = at(begin)](const std::string& b) { put(b.data(), n, to); });
        resolver.drop_resident();  // the generator read its source from a mapped data file
      }
    } else if (w.lazy) {
      auto whole = std::make_shared<std::string>(w.lazy->size, '\0');
      w.lazy->fill(whole->data());
      writer.post([put, whole, to = at(0)] { put(whole->data(), whole->size(), to); });
    } else {
      writer.post([put, bytes = w.bytes, to = at(0)] { put(bytes.data(), bytes.size(), to); });
    }
  };
  auto copy = [&](int64_t from, int64_t n) {
    stop.check();
    if (n > 0) writer.post([&out, &file, from, n] { out.copy_from(file, from, static_cast<size_t>(n)); });
  };
  if (in_order) {
    int64_t done = 0;
    for (const auto* w : mine) {
      copy(done, w->offset - done);
      write_folded(*w, true);
      done = w->offset + static_cast<int64_t>(size_of(*w));
    }
    copy(done, file_size - done);
  } else {
    copy(0, file_size);
    for (const auto* w : mine) write_folded(*w, false);
  }
  writer.post([&file] { file.drop_resident(); });
  writer.finish();
}

// ------------------------------------------------------------------------------------- what may be written

// The destination the user named, as the file to write: a symbolic link is followed to the file it names
// (as cp does); that file must be a regular file, or not exist yet in an existing directory.
std::string resolve_destination(const std::string& dst) {
  using io::FileKind;
  FileKind kind = io::file_kind(dst, false);
  if (kind != FileKind::missing && kind != FileKind::inaccessible) {
    std::string target = dst;
    if (kind == FileKind::link) {
      const auto real = io::real_path(dst);
      if (!real) throw FileError(dst + ": is a symbolic link to a file that does not exist; name the output file itself");
      target = *real;
      kind = io::file_kind(target, true);
      if (kind == FileKind::missing || kind == FileKind::inaccessible) io::throw_os_error("cannot write", dst);
    }
    if (kind == FileKind::directory)
      throw FileError(dst + ": is a directory; name the output model file (the CLI's -o DIR/ writes DIR/<input name>)");
    if (kind != FileKind::regular)
      throw FileError(dst + ": is " + io::describe(kind) + "; qdqfold replaces only regular files");
    return target;
  }
  if (kind != FileKind::missing) io::throw_os_error("cannot write", dst);
  const std::string directory = io::directory_of(dst);
  const FileKind parent = io::file_kind(directory, true);
  if (parent == FileKind::missing) throw FileError(dst + ": cannot write: the directory " + directory + " does not exist");
  if (parent == FileKind::inaccessible) io::throw_os_error("cannot write", dst);
  if (parent != FileKind::directory) throw FileError(dst + ": cannot write: " + directory + " is not a directory");
  return dst;
}

// The external data locations an existing model file refers to; empty when it is not a model qdqfold reads.
std::set<std::string> external_locations_of(const std::string& path) {
  std::set<std::string> locations;
  try {
    MappedFile existing(path, "the existing output");
    auto model = graph::parse_model(existing.view());
    for (graph::Graph* g : model->all_graphs())
      for (const auto& ref : g->original_external)
        if (!ref.location.empty()) locations.insert(ref.location);
  } catch (const std::exception&) {
    locations.clear();
  }
  return locations;
}

// Everything decided about the files of one fold before anything is written.
struct OutputPlan {
  std::string model;                       // the file to write (links followed)
  bool in_place = false;                   // model is the input itself
  std::vector<std::string> data_names;     // per input data file (FileResolver::files() order)
  std::set<std::string> stale;             // data files of an earlier output of this name that this run replaces
};

// Checks that `model` (resolve_destination of `dst`) and the data files `data_names` beside it may be written
// (see files.h); returns the plan, with the stale data files of an earlier output.
OutputPlan plan_outputs(const std::string& src, const std::string& dst, const std::string& model,
                        const std::vector<std::string>& data_names, const MappedFile& input,
                        const FileResolver& resolver, const FileOptions& file_options) {
  OutputPlan plan;
  plan.model = model;
  const auto model_id = io::file_id(plan.model);
  plan.in_place = model_id && *model_id == input.id();
  const std::string directory = io::directory_of(plan.model);
  const std::string name = io::file_name_of(plan.model);

  auto read_by_fold = [&](const io::FileId& id) -> std::string {
    if (id == input.id()) return src;
    for (const auto& f : resolver.files())
      if (f.file->id() == id) return f.file->path();
    return {};
  };
  if (model_id && !plan.in_place) {
    const std::string read = read_by_fold(*model_id);
    if (!read.empty())
      throw FileError(dst + ": is " + read + ", the external data of the input " + src + "; qdqfold never replaces "
                      "a file the fold reads (choose another output name)");
  }
  // The output's earlier data files (from a run of qdqfold into the same output): replaced without --force.
  std::set<std::string> earlier;
  if (model_id) earlier = external_locations_of(plan.model);

  std::set<std::string> written;
  for (const std::string& data_name : data_names) {
    const std::string path = directory + "/" + data_name;
    plan.data_names.push_back(data_name);
    written.insert(data_name);
    const io::FileKind kind = io::file_kind(path, false);
    if (kind == io::FileKind::missing || kind == io::FileKind::inaccessible) continue;  // a new file
    if (kind != io::FileKind::regular && kind != io::FileKind::link)
      throw FileError(path + ": is " + io::describe(kind) + "; qdqfold replaces only regular files");
    const auto id = io::file_id(path);
    const std::string read = id ? read_by_fold(*id) : std::string();
    if (!read.empty()) {
      if (plan.in_place) continue;  // the model's own data file, replaced with the model
      throw FileError(path + ": is " + read + ", read by this fold of " + src + "; qdqfold never replaces a file "
                      "the fold reads (choose another output name)");
    }
    if (file_options.force || earlier.count(data_name)) continue;
    throw FileError(path + ": already exists and is not a data file of " + plan.model + "; qdqfold writes the "
                    "output's external data there: remove it, choose another output name, or pass force=True to "
                    "replace it");
  }
  // Data files of the earlier output that this run does not write again: named as qdqfold names them for
  // this output, and not read by this fold.
  for (const auto& location : earlier) {
    if (written.count(location)) continue;
    bool ours = false;
    for (size_t k = 0; k < 64 && !ours; ++k) ours = location == output_data_name(name, k);
    const std::string path = directory + "/" + location;
    const auto id = io::file_id(path);
    if (ours && id && read_by_fold(*id).empty()) plan.stale.insert(path);
  }
  return plan;
}

// After an in-place fold: the input's data files that no output file is now, removed (each only if it is
// still the file that was read). Returns their paths.
std::vector<std::string> remove_replaced_inputs(const FileResolver& resolver, const OutputPlan& plan) {
  std::set<std::string> outputs;
  for (const auto& name : plan.data_names) {
    const auto real = io::real_path(io::directory_of(plan.model) + "/" + name);
    if (real) outputs.insert(*real);
  }
  if (const auto real = io::real_path(plan.model)) outputs.insert(*real);
  std::vector<std::string> removed;
  for (const auto& f : resolver.files()) {
    if (outputs.count(f.real_path)) continue;
    const auto id = io::file_id(f.real_path);
    if (id && *id == f.file->id() && io::remove_file(f.real_path)) removed.push_back(f.file->path());
  }
  return removed;
}

// Throws "the input changed" naming the first file read by this fold that changed, if any.
void check_unchanged(const MappedFile& input, const FileResolver& resolver) {
  if (input.changed()) throw FileError(input.path() + ": the input changed while it was being folded");
  for (const auto& f : resolver.files())
    if (f.file->changed()) throw FileError(f.file->path() + ": the input changed while it was being folded");
}

// One run of fold_file up to the commit: the report, and the output files written but still temporary
// (destroyed uncommitted, they remove themselves). No output files for a dry run.
struct StagedOutput {
  Report report;
  std::vector<std::unique_ptr<OutputFile>> data_files;
  std::unique_ptr<OutputFile> model;
  OutputPlan outputs;
};

// One attempt of fold_file's run_with_deferred_checks (core/deferred_checks.h): plans the fold with
// `deferred_checks` and writes every output to its temporary file.
StagedOutput stage_fold_file(MappedFile& input, FileResolver& resolver, const std::string& src,
                             const std::string& dst, const Options& options, const FileOptions& file_options,
                             std::shared_ptr<DeferredChecks> deferred_checks, const Interruption& stop) {
  graph::ExternalOutput external;
  auto plan = std::make_unique<FoldPlan>();
  plan->model = graph::parse_model(input.view(), &resolver);
  refuse_unrelocatable_external_data(*plan->model, src);
  plan->model->deferred_checks = std::move(deferred_checks);
  plan->model->after_each_fold = [&] {
    input.drop_resident();
    resolver.drop_resident();
  };
  plan->model->release_pages = [&](std::string_view bytes) {
    input.release(bytes);
    resolver.release(bytes);
  };
  plan->report = run_folds(*plan->model, options);
  report_inputs(plan->report, input.view().size(), &resolver);
  StagedOutput staged;
  if (dst.empty()) {  // a dry run: the report, nothing written
    check_unchanged(input, resolver);
    staged.report = std::move(plan->report);
    return staged;
  }

  // Where the tensor data goes, then the model written (which fills the data file's pieces in External
  // layout), then every output checked before anything is written.
  using Layout = graph::ExternalOutput::Layout;
  const std::string target = resolve_destination(dst);
  const std::string name = io::file_name_of(target);
  external.layout = file_options.layout;
  external.threshold = file_options.size_threshold;
  external.data_name = file_options.data_name.empty() ? output_data_name(name, 0) : file_options.data_name;
  std::vector<std::string> data_names;
  if (external.layout == Layout::AsInput) {
    for (size_t k = 0; k < resolver.files().size(); ++k) data_names.push_back(output_data_name(name, k));
    for (const auto& [location, index] : resolver.locations()) external.location_out[location] = data_names[index];
    for (size_t k = 0; k < resolver.files().size(); ++k)
      external.append_at[data_names[k]] = static_cast<int64_t>(resolver.files()[k].file->view().size());
  }
  plan->model->external_output = &external;
  plan->pieces = graph::write_model(*plan->model, plan->arena);
  if (external.layout == Layout::External && external.data_pieces.size() > 0) data_names.push_back(external.data_name);
  if (external.layout == Layout::Inline && plan->pieces.size() > static_cast<size_t>(INT32_MAX))
    throw FileError(dst + ": the model would be " + std::to_string(plan->pieces.size()) + " bytes with its data "
                    "inline, over protobuf's 2 GB limit; keep its data external");
  staged.outputs = plan_outputs(src, dst, target, data_names, input, resolver, file_options);
  const std::string directory = io::directory_of(staged.outputs.model);

  stop.check();
  std::vector<const MappedFile*> sources{&input};
  for (const auto& f : resolver.files()) sources.push_back(f.file.get());
  std::vector<std::unique_ptr<OutputFile>>& data_files = staged.data_files;
  if (external.layout == Layout::AsInput) {
    for (size_t k = 0; k < resolver.files().size(); ++k) {
      auto out = std::make_unique<OutputFile>(directory + "/" + data_names[k], staged.outputs.model);
      write_data_file(*resolver.files()[k].file, data_names[k], external.overwrites, resolver, *out, stop);
      data_files.push_back(std::move(out));
    }
  } else if (!data_names.empty()) {
    auto out = std::make_unique<OutputFile>(directory + "/" + data_names[0], staged.outputs.model);
    write_pieces(external.data_pieces, sources, *out, stop);
    data_files.push_back(std::move(out));
  }
  staged.model = std::make_unique<OutputFile>(staged.outputs.model);
  write_pieces(plan->pieces, sources, *staged.model, stop);
  staged.report = std::move(plan->report);
  return staged;
}

// The outputs of the attempt whose deferred checks held, renamed over their destinations; the report.
Report commit(StagedOutput& staged, const MappedFile& input, const FileResolver& resolver, const Interruption& stop) {
  if (!staged.model) return std::move(staged.report);  // a dry run
  check_unchanged(input, resolver);
  stop.check();
  for (auto& f : staged.data_files) {
    f->commit();
    staged.report.data_files.push_back(f->destination());
  }
  staged.model->commit();
  const OutputPlan& outputs = staged.outputs;
  for (const auto& path : outputs.stale)
    if (io::remove_file(path)) staged.report.removed_files.push_back(path);
  if (outputs.in_place) {
    for (auto& path : remove_replaced_inputs(resolver, outputs)) staged.report.removed_files.push_back(std::move(path));
  }
  return std::move(staged.report);
}

}  // namespace

void report_inputs(Report& report, size_t model_size, const graph::ExternalResolver* resolver) {
  report.input_bytes = static_cast<int64_t>(model_size);
  if (const auto* memory = dynamic_cast<const MemoryResolver*>(resolver)) {
    report_inputs(report, model_size + memory->buffer_bytes(), memory->files());
    return;
  }
  if (const auto* resolved = dynamic_cast<const FileResolver*>(resolver))
    for (const auto& f : resolved->files()) {
      report.input_files.push_back(f.file->path());
      report.input_bytes += static_cast<int64_t>(f.file->view().size());
    }
}

std::unique_ptr<graph::ExternalResolver> external_data_in(const std::string& directory, const std::string& label) {
  return std::make_unique<FileResolver>(directory.empty() ? "." : directory, label);
}

void StorageKeywords::save_as_external_data(bool external) { external_ = external; }

void StorageKeywords::size_threshold(int64_t bytes) {
  if (bytes < 0) throw OptionError(kSizeThresholdRule);
  size_threshold_ = bytes;
}

void StorageKeywords::data_name(std::string name) { data_name_ = std::move(name); }

void StorageKeywords::apply_to(FileOptions& file_options) const {
  using Layout = graph::ExternalOutput::Layout;
  if (external_) file_options.layout = *external_ ? Layout::External : Layout::Inline;
  if (size_threshold_) file_options.size_threshold = *size_threshold_;
  if (data_name_) file_options.data_name = *data_name_;
  if ((size_threshold_ || data_name_) && file_options.layout == Layout::Inline)
    throw OptionError("size_threshold and data_name describe external data; not with save_as_external_data=False");
  if (size_threshold_ || data_name_) file_options.layout = Layout::External;
}

std::unique_ptr<graph::ExternalResolver> external_data_from(std::map<std::string, std::string_view> buffers,
                                                            std::unique_ptr<graph::ExternalResolver> files,
                                                            const std::string& label) {
  return std::make_unique<MemoryResolver>(std::move(buffers), std::move(files), label);
}

Report fold_file(const std::string& src, const std::string& dst, const Options& options,
                 const FileOptions& file_options) {
  const std::string& data_name = file_options.data_name;
  if (!data_name.empty() && (data_name == "." || data_name == ".." || data_name.find('/') != std::string::npos ||
                             data_name.find('\0') != std::string::npos || data_name == io::file_name_of(dst)))
    throw FileError(dst + ": the data file name '" + data_name + "' must be a plain file name (written beside the "
                    "output), other than the output's own");
  const Interruption stop{io::interrupt_generation(), dst};  // an interrupt() from now on stops this fold
  MappedFile input(src, "the model file");
  const std::string& label = file_options.model_label.empty() ? src : file_options.model_label;
  FileResolver resolver(file_options.base_directory.empty() ? io::directory_of(src) : file_options.base_directory,
                        label);
  try {
    // A dry run writes nothing, so nothing could make a deferred check: it checks everything first.
    StagedOutput staged =
        dst.empty() ? stage_fold_file(input, resolver, label, dst, options, file_options, nullptr, stop)
                    : run_with_deferred_checks([&](std::shared_ptr<DeferredChecks> checks) {
                        return stage_fold_file(input, resolver, label, dst, options, file_options, std::move(checks),
                                               stop);
                      });
    return commit(staged, input, resolver, stop);
  } catch (const std::exception&) {
    // Whatever went wrong, if a file being read changed meanwhile, that is the cause to report (a read past
    // the new end of a truncated file gives zeros, and anything may follow from them).
    check_unchanged(input, resolver);
    throw;
  }
}

}  // namespace qdqfold
