#include "files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "background_writer.h"

namespace qdqfold {

namespace {

std::string os_error(const std::string& what, const std::string& path) {
  return path + ": " + what + ": " + std::strerror(errno);
}

std::string directory_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string file_name_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool same_directory(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  if (stat(a.c_str(), &sa) != 0 || stat(b.c_str(), &sb) != 0) return a == b;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// A read-only mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw FoldError(os_error("cannot open", path));
    struct stat st {};
    if (fstat(fd_, &st) != 0) throw FoldError(os_error("cannot stat", path));
    if (S_ISDIR(st.st_mode)) throw FoldError(path + ": is a directory, not a file");
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      if (p == MAP_FAILED) throw FoldError(os_error("cannot map", path));
      data_ = static_cast<const char*>(p);
      madvise(p, size_, MADV_SEQUENTIAL);
    }
  }
  ~MappedFile() {
    if (data_) munmap(const_cast<char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::string_view view() const { return {data_ ? data_ : "", size_}; }
  // Gives back the resident pages of the mapping: they stay in the page cache, and a later read maps them
  // again, but this process's memory does not grow with every weight it reads.
  void drop_resident() const {
    if (data_) madvise(const_cast<char*>(data_), size_, MADV_DONTNEED);
  }
  // The same for the whole pages inside `bytes`, when they lie in this mapping.
  void release(std::string_view bytes) const {
    if (bytes.empty() || !contains(bytes.data()) || !contains(bytes.data() + bytes.size() - 1)) return;
    const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const auto begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) & ~(page - 1);
    const auto end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) & ~(page - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  }
  bool contains(const char* p) const { return data_ && p >= data_ && p < data_ + size_; }
  int64_t offset_of(const char* p) const { return p - data_; }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

// Maps external data files on first use; a location must stay inside the model's directory.
class FileResolver : public graph::ExternalResolver {
 public:
  explicit FileResolver(std::string directory) : directory_(std::move(directory)) {}

  std::string_view resolve(const graph::ExternalRef& ref, const std::string& tensor) override {
    const MappedFile& file = open(ref.location, tensor);
    const auto size = static_cast<int64_t>(file.view().size());
    const int64_t length = ref.length >= 0 ? ref.length : size - ref.offset;
    if (ref.offset > size || length < 0 || length > size - ref.offset)
      throw FoldError(file.path() + ": external data of tensor '" + tensor + "' (offset " + std::to_string(ref.offset) +
                      ", length " + std::to_string(length) + ") runs past the end of the file (" +
                      std::to_string(size) + " bytes)");
    return file.view().substr(static_cast<size_t>(ref.offset), static_cast<size_t>(length));
  }

  const MappedFile& open(const std::string& location, const std::string& tensor) {
    auto it = files_.find(location);
    if (it != files_.end()) return *it->second;
    if (location.empty() || location[0] == '/' || location.find("..") != std::string::npos)
      throw FoldError("external data location '" + location + "' of tensor '" + tensor +
                      "' is not a path inside the model's directory");
    const std::string path = directory_ + "/" + location;
    if (access(path.c_str(), F_OK) != 0)
      throw FoldError(path + ": external data file of tensor '" + tensor + "' is missing");
    auto file = std::make_unique<MappedFile>(path);
    return *files_.emplace(location, std::move(file)).first->second;
  }

  bool holds(std::string_view bytes) const override {
    for (const auto& [location, file] : files_)
      if (file->contains(bytes.data()) && file->contains(bytes.data() + bytes.size() - (bytes.empty() ? 0 : 1)))
        return true;
    return false;
  }

  const std::map<std::string, std::unique_ptr<MappedFile>>& files() const { return files_; }
  void drop_resident() const {
    for (const auto& [location, file] : files_) file->drop_resident();
  }
  void release(std::string_view bytes) const {
    for (const auto& [location, file] : files_) file->release(bytes);
  }

 private:
  std::string directory_;
  std::map<std::string, std::unique_ptr<MappedFile>> files_;
};

// A temporary file beside its destination, renamed over it by commit(); removed if never committed.
class OutputFile {
 public:
  explicit OutputFile(std::string destination) : destination_(std::move(destination)) {
    temp_ = directory_of(destination_) + "/." + file_name_of(destination_) + ".XXXXXX.tmp";
    fd_ = mkstemps(temp_.data(), 4);
    if (fd_ < 0) throw FoldError(os_error("cannot write", destination_));
  }
  ~OutputFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(temp_.c_str());
  }
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  void write(const char* p, size_t n) {
    while (n > 0) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw FoldError(os_error("cannot write", destination_));
      p += w;
      n -= static_cast<size_t>(w);
    }
  }
  void pwrite_all(const char* p, size_t n, int64_t offset) {
    while (n > 0) {
      ssize_t w = ::pwrite(fd_, p, n, offset);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw FoldError(os_error("cannot write", destination_));
      p += w;
      n -= static_cast<size_t>(w);
      offset += w;
    }
  }
  // Copies [offset, offset + n) of `in` to the current end, inside the kernel where it can.
  void copy_from(const MappedFile& in, int64_t offset, size_t n) {
    loff_t from = offset;
    while (n > 0) {
      ssize_t c = copy_file_range(in.fd(), &from, fd_, nullptr, n, 0);
      if (c < 0 && errno == EINTR) continue;
      if (c <= 0) {  // not supported here (or nothing copied): fall back to writing from the mapping
        write(in.view().data() + from, n);
        return;
      }
      n -= static_cast<size_t>(c);
    }
  }
  void commit() {
    // The new file gets the permissions a plain create would give it (mkstemp makes it 0600).
    mode_t mask = umask(0);
    umask(mask);
    fchmod(fd_, 0666 & ~mask);
    if (::close(fd_) != 0) {
      fd_ = -1;
      throw FoldError(os_error("cannot write", destination_));
    }
    fd_ = -1;
    if (::rename(temp_.c_str(), destination_.c_str()) != 0) throw FoldError(os_error("cannot write", destination_));
    committed_ = true;
  }

 private:
  std::string destination_, temp_;
  int fd_ = -1;
  bool committed_ = false;
};

// Generated data goes through a buffer of this size at most, when its generator can produce ranges: the
// process never holds a whole folded weight. 1 MB stays in cache between the generator writing it and write()
// copying it into the page cache (measured 5-15% faster file to file than 8 MB; 256 KB was no faster).
constexpr size_t kChunk = size_t(1) << 20;

// Writes pieces in order: views of the input file are copied file to file, everything else is written, all on
// a second thread (BackgroundWriter) while the next chunk of a folded weight is computed on this one.
void write_pieces(const wire::Pieces& pieces, const MappedFile& input, OutputFile& out) {
  BackgroundWriter writer(kChunk, 3);
  auto write_buffer = [&out](size_t n) { return [&out, n](const std::string& b) { out.write(b.data(), n); }; };
  for (const auto& p : pieces.list()) {
    if (p.generate && p.generate_range) {
      for (size_t begin = 0; begin < p.size; begin += kChunk) {
        const size_t end = std::min(p.size, begin + kChunk);
        std::string& buffer = writer.acquire();
        p.generate_range(buffer.data(), begin, end);
        writer.post(buffer, write_buffer(end - begin));
      }
      input.drop_resident();  // the generator read its source from the mapping
    } else if (p.generate) {  // small tensors a fold encodes whole
      auto whole = std::make_shared<std::string>(p.size, '\0');
      p.generate(whole->data());
      writer.post([&out, whole] { out.write(whole->data(), whole->size()); });
      input.drop_resident();
    } else if (input.contains(p.data)) {
      writer.post([&out, &input, offset = input.offset_of(p.data), size = p.size] { out.copy_from(input, offset, size); });
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
                     OutputFile& out) {
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
        const size_t stop = std::min(w.lazy->size, begin + kChunk);
        std::string& buffer = writer.acquire();
        w.lazy->fill_range(buffer.data(), begin, stop);
        writer.post(buffer, [put, n = stop - begin, to = at(begin)](const std::string& b) { put(b.data(), n, to); });
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

// One run of fold_file. With `defer_checks` (see plan_fold), nullopt when a deferred check failed: the
// temporary outputs are then removed and nothing is committed.
std::optional<Report> fold_file_once(MappedFile& input, FileResolver& resolver, const std::string& src,
                                     const std::string& dst, const Options& options, bool defer_checks) {
  graph::ExternalOutput external;
  auto plan = std::make_unique<FoldPlan>();
  plan->model = graph::parse_model(input.view(), &resolver);
  if (defer_checks) plan->model->deferred_checks = std::make_shared<graph::Model::DeferredChecks>();
  plan->model->after_each_fold = [&] {
    input.drop_resident();
    resolver.drop_resident();
  };
  plan->model->release_pages = [&](std::string_view bytes) {
    input.release(bytes);
    resolver.release(bytes);
  };
  plan->report = run_folds(*plan->model, options);

  // External data files are copied beside the output under the same names, unless the output sits in the
  // input's directory, where those names are taken: then they are prefixed with the output's file name.
  const bool beside_input = same_directory(directory_of(src), directory_of(dst));
  for (const auto& [location, file] : resolver.files()) {
    external.location_out[location] = beside_input ? file_name_of(dst) + "." + location : location;
    external.append_at[external.location_out[location]] = static_cast<int64_t>(file->view().size());
  }
  plan->model->external_output = &external;
  plan->pieces = graph::write_model(*plan->model, plan->arena);

  std::vector<std::unique_ptr<OutputFile>> data_files;
  for (const auto& [location, file] : resolver.files()) {
    auto out = std::make_unique<OutputFile>(directory_of(dst) + "/" + external.location_out[location]);
    write_data_file(*file, external.location_out[location], external.overwrites, resolver, *out);
    data_files.push_back(std::move(out));
  }
  OutputFile model_out(dst);
  write_pieces(plan->pieces, input, model_out);
  if (checks_failed(*plan->model)) return std::nullopt;  // the OutputFiles remove their temporary files
  for (auto& f : data_files) f->commit();
  model_out.commit();
  return std::move(plan->report);
}

}  // namespace

Report fold_file(const std::string& src, const std::string& dst, const Options& options) {
  MappedFile input(src);
  FileResolver resolver(directory_of(src));
  // First with the checks deferred to the writing; in the rare case one fails, once more checking first.
  if (auto report = fold_file_once(input, resolver, src, dst, options, true)) return std::move(*report);
  return *fold_file_once(input, resolver, src, dst, options, false);
}

}  // namespace qdqfold
