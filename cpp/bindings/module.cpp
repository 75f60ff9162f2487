// qdqfold_native: the thin binding. Arguments are converted with the GIL held, the C++ work runs inside one
// explicit gil_scoped_release block, and the Python objects are made after it. The input is read in place
// through the buffer protocol (bytes, bytearray, memoryview, mmap): it is never copied.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <stdexcept>
#include <string>

#include "../core/api.h"
#include "../core/file_io.h"
#include "../core/files.h"
#include "../folds/reasons.h"

namespace py = pybind11;
using qdqfold::Options;

#ifndef QDQFOLD_VERSION
#define QDQFOLD_VERSION "0.0.0"
#endif

namespace {

// Every option: its keyword, the member it sets. Kept in one table so the binding, the error for an unknown
// keyword and `options()` agree.
struct OptionSpec {
  const char* name;
  bool Options::*member;
};
const OptionSpec kOptions[] = {
    {"fold_backward", &Options::fold_backward},
    {"fold_forward", &Options::fold_forward},
    {"fold_affine", &Options::fold_affine},
    {"freeze_initializer_inputs", &Options::freeze_initializer_inputs},
    {"pad_correction", &Options::pad_correction},
    {"allow_opset_upgrade", &Options::allow_opset_upgrade},
    {"allow_nonzero_zero_point", &Options::allow_nonzero_zero_point},
    {"materialize_quantized_weights", &Options::materialize_quantized_weights},
    {"drop_activation_quantizers", &Options::drop_activation_quantizers},
    {"merge_branches", &Options::merge_branches},
    {"requantize_merged", &Options::requantize_merged},
};

// The `shapes` option: {value name: [dims]}, a dim None or negative where unknown.
std::map<std::string, std::vector<int64_t>> parse_shapes(const py::handle& value) {
  const char* usage = "option 'shapes' takes a dict of value name -> list of dims (int, or None if unknown)";
  if (!PyDict_Check(value.ptr())) throw py::type_error(usage);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (auto entry : py::reinterpret_borrow<py::dict>(value)) {
    if (!PyUnicode_Check(entry.first.ptr()) || !PySequence_Check(entry.second.ptr()) ||
        PyUnicode_Check(entry.second.ptr()))
      throw py::type_error(usage);
    std::vector<int64_t> dims;
    for (auto d : py::reinterpret_borrow<py::sequence>(entry.second)) {
      if (d.is_none()) dims.push_back(-1);
      else if (PyLong_Check(d.ptr()) && !PyBool_Check(d.ptr())) dims.push_back(std::max<int64_t>(-1, d.cast<int64_t>()));
      else throw py::type_error(usage);
    }
    shapes[py::cast<std::string>(entry.first)] = std::move(dims);
  }
  return shapes;
}

// Keywords that are not fold options: fold()'s `base_directory`, fold_file()'s `force`. Taken out of `kwargs`
// by the caller before parse_options sees them.
py::object take_keyword(py::kwargs& kwargs, const char* name) {
  if (!kwargs.contains(name)) return py::none();
  py::object value = kwargs[name];
  PyDict_DelItemString(kwargs.ptr(), name);
  return value;
}

Options parse_options(const py::kwargs& kwargs) {
  Options options;
  for (auto item : kwargs) {
    const auto key = py::cast<std::string>(item.first);
    if (key == "shapes") {
      options.shapes = parse_shapes(item.second);
      continue;
    }
    const OptionSpec* spec = nullptr;
    for (const auto& s : kOptions)
      if (key == s.name) spec = &s;
    if (!spec) {
      std::string known;
      for (const auto& s : kOptions) known += std::string(known.empty() ? "" : ", ") + s.name;
      throw py::type_error("unknown option '" + key + "'; the options are: " + known + ", shapes");
    }
    if (!PyBool_Check(item.second.ptr()))
      throw py::type_error("option '" + key + "' takes True or False");
    options.*(spec->member) = item.second.cast<bool>();
  }
  return options;
}

// Holds a Py_buffer for the duration of a call.
class InputBuffer {
 public:
  explicit InputBuffer(const py::object& obj) {
    if (PyUnicode_Check(obj.ptr()))
      throw py::type_error("fold() takes the model's bytes (bytes, bytearray, memoryview or mmap), not a str path");
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~InputBuffer() { PyBuffer_Release(&view_); }
  InputBuffer(const InputBuffer&) = delete;
  InputBuffer& operator=(const InputBuffer&) = delete;
  std::string_view bytes() const { return {static_cast<const char*>(view_.buf), static_cast<size_t>(view_.len)}; }

 private:
  Py_buffer view_{};
};

// Text that quotes the model (node, graph, tensor and op names), which need not be UTF-8: decoded with
// replacement, so a report always arrives instead of a UnicodeDecodeError.
py::str text(const std::string& s) {
  return py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace"));
}
py::list texts(const std::vector<std::string>& v) {
  py::list out;
  for (const auto& s : v) out.append(text(s));
  return out;
}
py::dict counts(const std::map<std::string, int64_t>& m) {
  py::dict out;
  for (const auto& [k, n] : m) out[text(k)] = n;
  return out;
}

py::list records_to_list(const std::vector<qdqfold::BatchNormRecord>& records) {
  py::list bns;
  for (const auto& r : records) {
    py::dict d;
    d["graph"] = text(r.graph);
    d["node"] = text(r.node);
    d["folded"] = r.folded;
    d["direction"] = r.direction.empty() ? py::object(py::none()) : py::object(text(r.direction));
    d["into"] = texts(r.into);
    d["into_op"] = r.into_op.empty() ? py::object(py::none()) : py::object(text(r.into_op));
    d["code"] = text(r.code);
    d["op_type"] = text(r.op_type);
    d["message"] = text(r.message);
    // true (within float rounding), "bias-rounded" (plus a reported int32 bias rounding), or false.
    d["exact"] = r.exact && r.bias_rounded ? py::object(py::str("bias-rounded")) : py::object(py::bool_(r.exact));
    d["new_tensors"] = texts(r.new_tensors);
    py::dict metrics;
    for (const auto& [k, v] : r.metrics) metrics[text(k)] = v;
    d["metrics"] = metrics;
    bns.append(d);
  }
  return bns;
}

py::dict report_to_dict(const qdqfold::Report& report) {
  py::dict out;
  out["batchnorms"] = records_to_list(report.batchnorms);
  if (!report.merges.empty()) out["merges"] = records_to_list(report.merges);  // merge_branches only
  out["op_types"] = py::dict(py::arg("before") = counts(report.op_types_before),
                             py::arg("after") = counts(report.op_types_after));
  return out;
}

// Parses and folds with the GIL released, allocates the result bytes with it held, then fills them with the
// GIL released again: the output is written once, into its final buffer.
std::pair<py::bytes, qdqfold::Report> run(const py::object& model, py::kwargs kwargs) {
  const py::object base = take_keyword(kwargs, "base_directory");
  const Options options = parse_options(kwargs);
  std::unique_ptr<qdqfold::graph::ExternalResolver> external;
  if (!base.is_none()) {
    const auto directory = py::cast<std::string>(py::module_::import("os").attr("fspath")(base));
    external = qdqfold::external_data_in(directory.empty() ? "." : directory, "the model in memory");
  }
  InputBuffer input(model);
  // The buffer may be a caller's mmap of a file: a read past the end of that file, should it shrink while
  // we fold, gives zeros instead of SIGBUS, and the fold ends in a FileError.
  const qdqfold::io::GuardedRange guard(input.bytes().data(), input.bytes().size());
  auto throw_if_changed = [&guard] {
    if (guard.faulted()) throw qdqfold::io::FileError("the model: the input changed while it was being folded");
  };
  // First with the checks deferred to the writing; in the rare case one fails, once more checking first.
  for (const bool defer_checks : {true, false}) {
    std::unique_ptr<qdqfold::FoldPlan> plan;
    {
      py::gil_scoped_release release;
      try {
        plan = qdqfold::plan_fold(input.bytes(), options, defer_checks, external.get());
      } catch (const std::exception&) {
        throw_if_changed();
        throw;
      }
      plan->report.input_bytes = static_cast<int64_t>(input.bytes().size());
      if (external)
        for (auto& [path, size] : qdqfold::files_read(*external)) {
          plan->report.input_files.push_back(path);
          plan->report.input_bytes += size;
        }
    }
    PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(plan->pieces.size()));
    if (!out) throw py::error_already_set();
    py::bytes result = py::reinterpret_steal<py::bytes>(out);
    {
      py::gil_scoped_release release;
      plan->pieces.write_to(PyBytes_AS_STRING(out));
    }
    throw_if_changed();
    if (!qdqfold::checks_failed(*plan->model)) return {std::move(result), std::move(plan->report)};
  }
  throw std::logic_error("qdqfold: a deferred check failed in the run that defers none");
}

}  // namespace

PYBIND11_MODULE(qdqfold_native, m) {
  m.doc() = "qdqfold's native core: folds BatchNormalization into neighbouring layers of an ONNX model, "
            "quantized (QDQ) weights included, reading and writing the protobuf wire format directly.";
  m.attr("__version__") = QDQFOLD_VERSION;
  static py::exception<qdqfold::FoldError> fold_error(m, "FoldError", PyExc_ValueError);
  static py::exception<qdqfold::io::FileError> file_error(m, "FileError", fold_error.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    // Messages quote names from the model, which need not be UTF-8: decode with replacement, so that a
    // FoldError is what arrives, not a UnicodeDecodeError.
    auto raise = [](const py::object& type, const std::string& what) {
      py::set_error(type, py::reinterpret_steal<py::str>(
                              PyUnicode_DecodeUTF8(what.data(), static_cast<Py_ssize_t>(what.size()), "replace")));
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const qdqfold::io::FileError& e) {
      raise(file_error, e.what());
    } catch (const qdqfold::FoldError& e) {
      raise(fold_error, e.what());
    }
  });

  m.def(
      "fold", [](const py::object& model, py::kwargs kwargs) { return run(model, std::move(kwargs)).first; },
      py::arg("model"),
      "fold(model, *, base_directory=None, **options) -> bytes\n\n"
      "Folds every BatchNormalization it can fold exactly and returns the new model's bytes. `model` is any\n"
      "bytes-like object holding a serialized ModelProto; it is read in place. Raises FoldError (a ValueError)\n"
      "for input that is not a valid ONNX model. See options() for the keyword options and their defaults.\n"
      "`base_directory`: the directory external-data locations are relative to (the model file's directory);\n"
      "they are read under fold_file()'s rules. Folded external tensors are written inline; others keep their\n"
      "references. Without it, BNs whose weights are external are kept.");
  m.def(
      "fold_with_report",
      [](const py::object& model, py::kwargs kwargs) {
        auto [bytes, report] = run(model, std::move(kwargs));
        py::dict result = report_to_dict(report);
        result["input_bytes"] = report.input_bytes;
        if (!report.input_files.empty()) result["input_files"] = texts(report.input_files);
        return py::make_tuple(bytes, result);
      },
      py::arg("model"),
      "fold_with_report(model, **options) -> (bytes, dict)\n\n"
      "As fold(), and also returns the report: {'batchnorms': [...]}, one entry per BatchNormalization\n"
      "(subgraphs and functions included) with its graph, node name, whether it was folded, the direction\n"
      "and the layer(s) it went into, or the reason code and sentence for keeping it.");
  m.def(
      "fold_file",
      [](const py::object& src, const py::object& dst, py::kwargs kwargs) {
        qdqfold::FileOptions file_options;
        const py::object force = take_keyword(kwargs, "force");
        if (!force.is_none()) {
          if (!PyBool_Check(force.ptr())) throw py::type_error("option 'force' takes True or False");
          file_options.force = force.cast<bool>();
        }
        using Layout = qdqfold::graph::ExternalOutput::Layout;
        const py::object external = take_keyword(kwargs, "save_as_external_data");
        const py::object threshold = take_keyword(kwargs, "size_threshold");
        const py::object data_name = take_keyword(kwargs, "data_name");
        if (!external.is_none()) {
          if (!PyBool_Check(external.ptr()))
            throw py::type_error("option 'save_as_external_data' takes True, False or None (as the input)");
          file_options.layout = external.cast<bool>() ? Layout::External : Layout::Inline;
        }
        if (!threshold.is_none()) {
          if (!PyLong_Check(threshold.ptr()) || PyBool_Check(threshold.ptr()) || threshold.cast<int64_t>() < 0)
            throw py::type_error("option 'size_threshold' takes a number of bytes >= 0");
          file_options.size_threshold = threshold.cast<int64_t>();
        }
        if (!data_name.is_none()) {
          if (!PyUnicode_Check(data_name.ptr())) throw py::type_error("option 'data_name' takes a file name (str)");
          file_options.data_name = data_name.cast<std::string>();
        }
        if ((!threshold.is_none() || !data_name.is_none()) && file_options.layout == Layout::Inline)
          throw py::type_error("size_threshold and data_name describe external data; not with save_as_external_data=False");
        if (!threshold.is_none() || !data_name.is_none()) file_options.layout = Layout::External;
        const Options options = parse_options(kwargs);
        const auto fspath = py::module_::import("os").attr("fspath");
        const auto source = py::cast<std::string>(fspath(src));
        const auto destination = dst.is_none() ? std::string() : py::cast<std::string>(fspath(dst));
        if (!dst.is_none() && destination.empty()) throw py::value_error("fold_file: dst is empty (None: a dry run)");
        qdqfold::Report report;
        {
          py::gil_scoped_release release;
          report = qdqfold::fold_file(source, destination, options, file_options);
        }
        py::dict result = report_to_dict(report);
        result["data_files"] = texts(report.data_files);
        result["removed_files"] = texts(report.removed_files);
        result["input_files"] = texts(report.input_files);
        result["input_bytes"] = report.input_bytes;
        return result;
      },
      py::arg("src"), py::arg("dst"),
      "fold_file(src, dst, *, force=False, save_as_external_data=None, size_threshold=1024, data_name=None,\n"
      "          **options) -> dict\n\n"
      "Folds the model file `src` into `dst` (may be the same path; None: a dry run that writes nothing) and\n"
      "returns the report, with 'input_files' (the input's external data files), 'data_files'\n"
      "(the external data files written beside `dst`) and 'removed_files'. The input is mapped, not read; each\n"
      "output is written once, to a temporary file renamed over it. External data is read only from regular files\n"
      "inside src's directory and written to files named after dst (dst.data, dst.2.data, ...), offsets kept. An\n"
      "existing file at such a name is replaced only when dst refers to it (an earlier run) or with force=True.\n"
      "Raises FileError (a FoldError whose message starts with the path at fault) for files that cannot be read,\n"
      "written or replaced, or that changed while they were read, and FoldError for an invalid model.\n"
      "How the output stores tensor data: save_as_external_data=None keeps the input's layout; False writes every\n"
      "tensor inline (FileError past 2 GB); True (implied by size_threshold or data_name) writes every initializer\n"
      "of at least size_threshold bytes to one data file, data_name or dst.data, the others inline.");
  m.def(
      "interrupt", []() { qdqfold::io::interrupt(); },
      "interrupt() -> None\n\n"
      "Makes every fold_file() running in this process stop at its next chunk, remove its temporary files and\n"
      "raise FileError('<dst>: interrupted'). Folds started after the call are not affected.");
  m.def(
      "options",
      []() {
        py::dict d;
        const Options defaults;
        for (const auto& s : kOptions) d[s.name] = defaults.*(s.member);
        return d;
      },
      "options() -> dict: every keyword option of fold() and its default.");
  // The table of reason codes and fold names (cpp/folds/reasons.h).
  m.def(
      "reasons",
      []() {
        py::list out;
        for (const auto& e : qdqfold::folds::reason_table()) {
          py::dict d;
          d["code"] = e.code;
          d["kind"] = e.kind;
          d["meaning"] = e.meaning;
          d["option"] = e.option;
          d["flag"] = e.flag;
          out.append(std::move(d));
        }
        return out;
      },
      "reasons() -> list[dict]: every code a report can carry, as {code, kind ('kept' or 'fold'), meaning,\n"
      "option, flag}: option and flag name the keyword of fold() and the CLI flag that change it ('' for none).");
}
