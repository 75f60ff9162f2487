// The external data resolvers of file mode (file_resolver.h) and the core/files.h functions that make and
// read them.
#include "file_resolver.h"

#include <map>
#include <memory>
#include <string>

#include "files.h"

namespace qdqfold {

namespace detail {

using io::FileError;

namespace {

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

}  // namespace

std::string_view FileResolver::resolve(const graph::ExternalRef& ref, const std::string& tensor) {
  const MappedFile& file = *files_[open(ref.location, tensor)].file;
  const auto size = static_cast<int64_t>(file.view().size());
  const int64_t length = ref.length >= 0 ? ref.length : size - ref.offset;
  if (ref.offset > size || length < 0 || length > size - ref.offset)
    throw FileError(file.path() + ": external data of tensor '" + tensor + "' (offset " + std::to_string(ref.offset) +
                    ", length " + std::to_string(length) + ") runs past the end of the file (" +
                    std::to_string(size) + " bytes)");
  return file.view().substr(static_cast<size_t>(ref.offset), static_cast<size_t>(length));
}

size_t FileResolver::open(const std::string& location, const std::string& tensor) {
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

}  // namespace detail

using detail::FileResolver;
using detail::MemoryResolver;

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

std::unique_ptr<graph::ExternalResolver> external_data_from(std::map<std::string, std::string_view> buffers,
                                                            std::unique_ptr<graph::ExternalResolver> files,
                                                            const std::string& label) {
  return std::make_unique<MemoryResolver>(std::move(buffers), std::move(files), label);
}

}  // namespace qdqfold
