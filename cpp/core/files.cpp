// fold_file (files.h): what may be written, then one staged attempt per run of the two-run protocol
// (deferred_checks.h), committed at the end. The resolvers are in file_resolver.cpp, the writers in
// file_writing.cpp.
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
#include "deferred_checks.h"
#include "file_io.h"
#include "file_resolver.h"
#include "file_writing.h"

namespace qdqfold {

using io::FileError;
using io::MappedFile;
using io::OutputFile;
using detail::FileResolver;
using detail::Interruption;
using detail::write_data_file;
using detail::write_pieces;

std::string output_data_name(const std::string& output_name, size_t k) {
  return k == 0 ? output_name + ".data" : output_name + "." + std::to_string(k + 1) + ".data";
}

namespace {

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
    for (const auto& field : g->fields())
      if (field.number == wire::num(wire::GraphField::SparseInitializer) && g->kind != graph::GraphKind::Function) {
        wire::Reader outer(field.whole, field.whole.data());
        const wire::Field f = outer.next("sparse_initializer");
        if (sparse_is_external(f.bytes))
          throw FileError(src + ": a sparse initializer of " + g->path + " keeps external data; qdqfold relocates "
                          "the external data of dense initializers only");
      }
    for (size_t k = 0; k < g->nodes().size(); ++k) {
      const graph::Node& node = g->nodes()[k];
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
  FoldHooks hooks;  // file mode's: the folds give back the mapped pages they read
  hooks.deferred_checks = std::move(deferred_checks);
  hooks.after_each_fold = [&] {
    input.drop_resident();
    resolver.drop_resident();
  };
  hooks.release_pages = [&](std::string_view bytes) {
    input.release(bytes);
    resolver.release(bytes);
  };
  plan->report = run_folds(*plan->model, options, hooks);
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
  plan->pieces = graph::write_model(*plan->model, plan->arena, &external);
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
