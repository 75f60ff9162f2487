// File mode's description of where the output's tensor data goes, handed to write_model (graph.h) by
// fold_file (core/files.cpp), which owns it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "../wire/writer.h"
#include "tensor.h"

namespace qdqfold::graph {

// File mode: where external data goes. The file writer fills `location_out` before writing the model; the
// model writer records the tensors whose data must overwrite the copied data files.
struct ExternalOutput {
  // Where the output's tensor data goes. AsInput: initializers stay inline or external as they were (each
  // input data file copied to `location_out`, offsets kept). Inline: every initializer inline. External:
  // every initializer with raw data of at least `threshold` bytes goes to `data_name`, one after another
  // (those of 1 MB and more at 64 KB boundaries, as onnx.save aligns them), the others inline.
  enum class Layout { AsInput, Inline, External };
  Layout layout = Layout::AsInput;
  int64_t threshold = 1024;
  std::string data_name;
  wire::Pieces data_pieces;  // External: the data file's contents, filled by the model writer
  std::map<std::string, std::string> location_out;  // input location -> output location
  // Output location -> where data appended to that file goes next (filled by the file writer with the
  // input file's size). A folded tensor whose bytes another tensor also reads (aliased external data) cannot
  // be overwritten in place: it is appended there instead, at a 4096-byte boundary.
  std::map<std::string, int64_t> append_at;
  struct Overwrite {
    std::string location;  // output location
    int64_t offset = 0;
    std::string_view bytes;                 // or
    std::shared_ptr<const LazyBytes> lazy;  // data to write there
  };
  std::vector<Overwrite> overwrites;
};

}  // namespace qdqfold::graph
