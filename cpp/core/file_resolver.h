// How fold_file and fold() read external data (core/files.h, external_data_in and external_data_from): the
// resolvers behind graph::ExternalResolver in file mode. Private to core/ (files.cpp, file_resolver.cpp).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "../graph/graph.h"
#include "file_io.h"

namespace qdqfold::detail {

using io::MappedFile;

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

  std::string_view resolve(const graph::ExternalRef& ref, const std::string& tensor) override;

  // The index in files() of the file `location` names.
  size_t open(const std::string& location, const std::string& tensor);

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

}  // namespace qdqfold::detail
