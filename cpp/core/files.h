// File to file: the input is mapped, not read; the output is written in one pass to a temporary file beside
// the destination and renamed over it, so a failure never leaves a half-written file. Bytes copied through
// unchanged go file to file inside the kernel (copy_file_range) without passing through this process.
//
// Which files are read and written is decided here, never by the model (docs/files.md, "Files qdqfold reads and
// writes"):
//   - External data is read only from regular files inside the model's directory (subfolders allowed),
//     after following links; one file reached by several names (`m.data`, `./m.data`, a link) is one file.
//   - The output's external data goes to files named after the output: `<output>.data` (and `<output>.2.data`,
//     ... when the input had several data files), each keeping the offsets of the file it copies.
//   - An existing file is replaced only when it is the output the user named, or a data file of that output
//     from an earlier run (the existing output refers to it), or with `force`. Files the fold reads (the input
//     and its data files) are never replaced, except by an in-place fold (`dst` is `src`), which replaces the
//     model and its data files and removes the input's data files that the new model no longer uses.
//   - Non-regular files (FIFOs, devices, directories, sockets) are neither read nor replaced.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../graph/external_output.h"
#include "api.h"

namespace qdqfold {

struct FileOptions {
  // Replace existing files at the output data file names even when they are not the output's own.
  bool force = false;
  // How the output stores its tensor data (graph::ExternalOutput::Layout): as the input did (the default),
  // all inline (an output over protobuf's 2 GB limit is then a FileError), or every initializer of at least
  // `size_threshold` bytes in one data file, `data_name` (a plain file name beside the output; empty: the
  // derived `<output>.data`).
  graph::ExternalOutput::Layout layout = graph::ExternalOutput::Layout::AsInput;
  int64_t size_threshold = 1024;
  std::string data_name;
  // Where external data locations resolve (empty: src's directory), for a model that has no directory of
  // its own (standard input, spooled to a private temporary file), and how messages name that model (empty:
  // src).
  std::string base_directory;
  std::string model_label;
};

// fold_file's storage keywords as a caller gives them one by one (the Python binding's save_as_external_data,
// size_threshold and data_name, in that order, each only when given), and their rules: size_threshold or
// data_name asks for external data, so neither goes with save_as_external_data=False. Each step throws
// OptionError (options.h) for a value or combination it does not take.
class StorageKeywords {
 public:
  static constexpr const char* kSizeThresholdRule = "option 'size_threshold' takes a number of bytes >= 0";
  void save_as_external_data(bool external);  // false: every tensor inline; true: external data
  void size_threshold(int64_t bytes);         // >= 0
  void data_name(std::string name);           // checked by fold_file, which knows the output's name
  // Sets `file_options`' layout, size_threshold and data_name from the keywords given.
  void apply_to(FileOptions& file_options) const;

 private:
  std::optional<bool> external_;
  std::optional<int64_t> size_threshold_;
  std::optional<std::string> data_name_;
};

// Folds the model at `src` into `dst` (which may equal `src`; empty: a dry run, which reads and folds under
// the same rules and writes nothing). Throws io::FileError (a FoldError whose
// message starts with the path at fault) for files that cannot be read, written or replaced, and FoldError
// for an invalid model. Report::data_files and Report::removed_files list the files written and removed
// besides `dst`.
Report fold_file(const std::string& src, const std::string& dst, const Options& options,
                 const FileOptions& file_options = {});

// Reads external data for a model held in memory (fold() with `base_directory`): locations resolve inside
// `directory` (empty: the current directory) under the same rules as fold_file's; `label` names the model in
// messages.
std::unique_ptr<graph::ExternalResolver> external_data_in(const std::string& directory, const std::string& label);

// Reads external data from buffers the caller holds (fold() with `tensors`): a location that is a key of
// `buffers` resolves to that buffer (offset and length inside it); any other location goes to `files`
// (external_data_in), or is a FileError naming the tensor when there is none. The buffers must outlive the
// fold and its writing; views into them are kept like views into the model's own bytes.
std::unique_ptr<graph::ExternalResolver> external_data_from(std::map<std::string, std::string_view> buffers,
                                                            std::unique_ptr<graph::ExternalResolver> files,
                                                            const std::string& label);

// The report's input_bytes and input_files: `model_size`, plus every buffer an external_data_from resolver
// was given, plus each external data file an external_data_in resolver (or the one behind an
// external_data_from) read, each once. Nothing more for another resolver or null.
void report_inputs(Report& report, size_t model_size, const graph::ExternalResolver* resolver);

// The name of the k-th (from 0) external data file of an output model whose file name is `output_name`.
std::string output_data_name(const std::string& output_name, size_t k);

}  // namespace qdqfold
