// fold_file's writers (file_writing.h).
#include "file_writing.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "background_writer.h"

namespace qdqfold::detail {

namespace {

// Generated data goes through a buffer of this size at most, when its generator can produce ranges: the
// process never holds a whole folded weight. 1 MB stays in cache between the generator writing it and write()
// copying it into the page cache (measured 5-15% faster file to file than 8 MB; 256 KB was no faster).
constexpr size_t kChunk = size_t(1) << 20;

}  // namespace

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

}  // namespace qdqfold::detail
