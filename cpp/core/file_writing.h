// How fold_file writes its outputs (core/files.cpp): the model's pieces and the external data files, on a
// second thread (BackgroundWriter), file to file where bytes are unchanged. Private to core/.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../graph/external_output.h"
#include "../graph/graph.h"
#include "../wire/writer.h"
#include "file_io.h"
#include "file_resolver.h"

namespace qdqfold::detail {

using io::MappedFile;
using io::OutputFile;

// Stops a fold at its next chunk once io::interrupt() was called after it began.
struct Interruption {
  uint64_t generation = io::interrupt_generation();
  std::string output;
  void check() const {
    if (io::interrupt_generation() != generation) throw io::FileError(output + ": interrupted");
  }
};

// Writes pieces in order: views of the input file are copied file to file, everything else is written, all on
// a second thread (BackgroundWriter) while the next chunk of a folded weight is computed on this one.
void write_pieces(const wire::Pieces& pieces, const std::vector<const MappedFile*>& sources, OutputFile& out,
                  const Interruption& stop);

// Writes an external data file: the input's bytes with the folded tensors' new bytes in place (every offset
// kept). In offset order, each stretch between folded tensors is copied file to file and each folded tensor is
// written once. When one lies past the end (appended: its old bytes are shared with another tensor, see
// ExternalOutput::append_at), the whole file is copied and the folded tensors are written at their offsets.
// The writes run on a second thread while this one computes the folded bytes.
void write_data_file(const MappedFile& file, const std::string& location,
                     const std::vector<graph::ExternalOutput::Overwrite>& overwrites, const FileResolver& resolver,
                     OutputFile& out, const Interruption& stop);

}  // namespace qdqfold::detail
