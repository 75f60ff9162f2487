// qdqfold_native, nanobind edition: an experiment (bench/nanobind/README.md), not part of the package build.
// A line-for-line port of cpp/bindings/module.cpp so the two can be measured against each other: the same
// functions, keywords, errors and GIL handling; the input is read in place through the buffer protocol.
// Under Py_LIMITED_API (nanobind's STABLE_ABI, Python >= 3.12) only limited-API calls are used:
// PyBytes_AsString instead of the PyBytes_AS_STRING macro, the rest is in the limited API already.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/api.h"
#include "core/file_io.h"
#include "core/files.h"

namespace nb = nanobind;
using qdqfold::Options;

#ifndef QDQFOLD_VERSION
#define QDQFOLD_VERSION "0.0.0"
#endif

namespace {

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

std::map<std::string, std::vector<int64_t>> parse_shapes(nb::handle value) {
  const char* usage = "option 'shapes' takes a dict of value name -> list of dims (int, or None if unknown)";
  if (!PyDict_Check(value.ptr())) throw nb::type_error(usage);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (auto [key, dims_obj] : nb::borrow<nb::dict>(value)) {
    if (!PyUnicode_Check(key.ptr()) || !PySequence_Check(dims_obj.ptr()) || PyUnicode_Check(dims_obj.ptr()))
      throw nb::type_error(usage);
    std::vector<int64_t> dims;
    for (nb::handle d : nb::borrow<nb::sequence>(dims_obj)) {
      if (d.is_none()) dims.push_back(-1);
      else if (PyLong_Check(d.ptr()) && !PyBool_Check(d.ptr())) dims.push_back(std::max<int64_t>(-1, nb::cast<int64_t>(d)));
      else throw nb::type_error(usage);
    }
    shapes[nb::cast<std::string>(key)] = std::move(dims);
  }
  return shapes;
}

nb::object take_keyword(nb::kwargs& kwargs, const char* name) {
  if (!kwargs.contains(name)) return nb::none();
  nb::object value = kwargs[name];
  PyDict_DelItemString(kwargs.ptr(), name);
  return value;
}

Options parse_options(const nb::kwargs& kwargs) {
  Options options;
  for (auto [k, v] : kwargs) {
    const auto key = nb::cast<std::string>(k);
    if (key == "shapes") {
      options.shapes = parse_shapes(v);
      continue;
    }
    const OptionSpec* spec = nullptr;
    for (const auto& s : kOptions)
      if (key == s.name) spec = &s;
    if (!spec) {
      std::string known;
      for (const auto& s : kOptions) known += std::string(known.empty() ? "" : ", ") + s.name;
      throw nb::type_error(("unknown option '" + key + "'; the options are: " + known + ", shapes").c_str());
    }
    if (!PyBool_Check(v.ptr())) throw nb::type_error(("option '" + key + "' takes True or False").c_str());
    options.*(spec->member) = nb::cast<bool>(v);
  }
  return options;
}

class InputBuffer {
 public:
  explicit InputBuffer(nb::handle obj) {
    if (PyUnicode_Check(obj.ptr()))
      throw nb::type_error("fold() takes the model's bytes (bytes, bytearray, memoryview or mmap), not a str path");
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw nb::python_error();
  }
  ~InputBuffer() { PyBuffer_Release(&view_); }
  InputBuffer(const InputBuffer&) = delete;
  InputBuffer& operator=(const InputBuffer&) = delete;
  std::string_view bytes() const { return {static_cast<const char*>(view_.buf), static_cast<size_t>(view_.len)}; }

 private:
  Py_buffer view_{};
};

nb::str text(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (!o) throw nb::python_error();
  return nb::steal<nb::str>(o);
}
nb::list texts(const std::vector<std::string>& v) {
  nb::list out;
  for (const auto& s : v) out.append(text(s));
  return out;
}
nb::dict counts(const std::map<std::string, int64_t>& m) {
  nb::dict out;
  for (const auto& [k, n] : m) out[text(k)] = n;
  return out;
}

nb::list records_to_list(const std::vector<qdqfold::BatchNormRecord>& records) {
  nb::list bns;
  for (const auto& r : records) {
    nb::dict d;
    d["graph"] = text(r.graph);
    d["node"] = text(r.node);
    d["folded"] = r.folded;
    d["direction"] = r.direction.empty() ? nb::none() : nb::object(text(r.direction));
    d["into"] = texts(r.into);
    d["into_op"] = r.into_op.empty() ? nb::none() : nb::object(text(r.into_op));
    d["code"] = text(r.code);
    d["op_type"] = text(r.op_type);
    d["message"] = text(r.message);
    d["exact"] = r.exact && r.bias_rounded ? nb::object(nb::str("bias-rounded")) : nb::object(nb::bool_(r.exact));
    d["new_tensors"] = texts(r.new_tensors);
    nb::dict metrics;
    for (const auto& [k, v] : r.metrics) metrics[text(k)] = v;
    d["metrics"] = metrics;
    bns.append(d);
  }
  return bns;
}

nb::dict report_to_dict(const qdqfold::Report& report) {
  nb::dict out;
  out["batchnorms"] = records_to_list(report.batchnorms);
  if (!report.merges.empty()) out["merges"] = records_to_list(report.merges);
  nb::dict op_types;
  op_types["before"] = counts(report.op_types_before);
  op_types["after"] = counts(report.op_types_after);
  out["op_types"] = op_types;
  return out;
}

std::pair<nb::bytes, qdqfold::Report> run(nb::handle model, nb::kwargs kwargs) {
  const nb::object base = take_keyword(kwargs, "base_directory");
  const Options options = parse_options(kwargs);
  std::unique_ptr<qdqfold::graph::ExternalResolver> external;
  if (!base.is_none()) {
    const auto directory = nb::cast<std::string>(nb::module_::import_("os").attr("fspath")(base));
    external = qdqfold::external_data_in(directory.empty() ? "." : directory, "the model in memory");
  }
  InputBuffer input(model);
  const qdqfold::io::GuardedRange guard(input.bytes().data(), input.bytes().size());
  auto throw_if_changed = [&guard] {
    if (guard.faulted()) throw qdqfold::io::FileError("the model: the input changed while it was being folded");
  };
  for (const bool defer_checks : {true, false}) {
    std::unique_ptr<qdqfold::FoldPlan> plan;
    {
      nb::gil_scoped_release release;
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
    if (!out) throw nb::python_error();
    nb::bytes result = nb::steal<nb::bytes>(out);
    char* target = PyBytes_AsString(out);
    {
      nb::gil_scoped_release release;
      plan->pieces.write_to(target);
    }
    throw_if_changed();
    if (!qdqfold::checks_failed(*plan->model)) return {std::move(result), std::move(plan->report)};
  }
  throw std::logic_error("qdqfold: a deferred check failed in the run that defers none");
}

nb::handle fold_error_type, file_error_type;

}  // namespace

NB_MODULE(qdqfold_native, m) {
  m.doc() = "qdqfold's native core: folds BatchNormalization into neighbouring layers of an ONNX model, "
            "quantized (QDQ) weights included, reading and writing the protobuf wire format directly.";
  m.attr("__version__") = nb::str(QDQFOLD_VERSION);
  static nb::exception<qdqfold::FoldError> fold_error(m, "FoldError", PyExc_ValueError);
  static nb::exception<qdqfold::io::FileError> file_error(m, "FileError", fold_error);
  fold_error_type = fold_error;
  file_error_type = file_error;
  // Registered last, so tried first: messages quote names from the model, which need not be UTF-8.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    auto raise = [](nb::handle type, const std::string& what) {
      PyObject* msg = PyUnicode_DecodeUTF8(what.data(), static_cast<Py_ssize_t>(what.size()), "replace");
      if (!msg) return;  // the decode's own error stays set
      PyErr_SetObject(type.ptr(), msg);
      Py_DECREF(msg);
    };
    try {
      std::rethrow_exception(p);
    } catch (const qdqfold::io::FileError& e) {
      raise(file_error_type, e.what());
    } catch (const qdqfold::FoldError& e) {
      raise(fold_error_type, e.what());
    }
  });

  m.def(
      "fold", [](nb::handle model, nb::kwargs kwargs) { return run(model, std::move(kwargs)).first; },
      nb::arg("model"), nb::arg("kwargs"),
      "fold(model, *, base_directory=None, **options) -> bytes\n\n"
      "Folds every BatchNormalization it can fold exactly and returns the new model's bytes. `model` is any\n"
      "bytes-like object holding a serialized ModelProto; it is read in place. Raises FoldError (a ValueError)\n"
      "for input that is not a valid ONNX model. See options() for the keyword options and their defaults.\n"
      "`base_directory`: the directory external-data locations are relative to (the model file's directory);\n"
      "they are read under fold_file()'s rules. Folded external tensors are written inline; others keep their\n"
      "references. Without it, BNs whose weights are external are kept.");
  m.def(
      "fold_with_report",
      [](nb::handle model, nb::kwargs kwargs) {
        auto [bytes, report] = run(model, std::move(kwargs));
        nb::dict result = report_to_dict(report);
        result["input_bytes"] = report.input_bytes;
        if (!report.input_files.empty()) result["input_files"] = texts(report.input_files);
        return nb::make_tuple(bytes, result);
      },
      nb::arg("model"), nb::arg("kwargs"),
      "fold_with_report(model, **options) -> (bytes, dict)\n\n"
      "As fold(), and also returns the report: {'batchnorms': [...]}, one entry per BatchNormalization\n"
      "(subgraphs and functions included) with its graph, node name, whether it was folded, the direction\n"
      "and the layer(s) it went into, or the reason code and sentence for keeping it.");
  m.def(
      "fold_file",
      [](nb::handle src, nb::handle dst, nb::kwargs kwargs) {
        qdqfold::FileOptions file_options;
        const nb::object force = take_keyword(kwargs, "force");
        if (!force.is_none()) {
          if (!PyBool_Check(force.ptr())) throw nb::type_error("option 'force' takes True or False");
          file_options.force = nb::cast<bool>(force);
        }
        using Layout = qdqfold::graph::ExternalOutput::Layout;
        const nb::object external = take_keyword(kwargs, "save_as_external_data");
        const nb::object threshold = take_keyword(kwargs, "size_threshold");
        const nb::object data_name = take_keyword(kwargs, "data_name");
        if (!external.is_none()) {
          if (!PyBool_Check(external.ptr()))
            throw nb::type_error("option 'save_as_external_data' takes True, False or None (as the input)");
          file_options.layout = nb::cast<bool>(external) ? Layout::External : Layout::Inline;
        }
        if (!threshold.is_none()) {
          if (!PyLong_Check(threshold.ptr()) || PyBool_Check(threshold.ptr()) || nb::cast<int64_t>(threshold) < 0)
            throw nb::type_error("option 'size_threshold' takes a number of bytes >= 0");
          file_options.size_threshold = nb::cast<int64_t>(threshold);
        }
        if (!data_name.is_none()) {
          if (!PyUnicode_Check(data_name.ptr())) throw nb::type_error("option 'data_name' takes a file name (str)");
          file_options.data_name = nb::cast<std::string>(data_name);
        }
        if ((!threshold.is_none() || !data_name.is_none()) && file_options.layout == Layout::Inline)
          throw nb::type_error("size_threshold and data_name describe external data; not with save_as_external_data=False");
        if (!threshold.is_none() || !data_name.is_none()) file_options.layout = Layout::External;
        const Options options = parse_options(kwargs);
        const nb::object fspath = nb::module_::import_("os").attr("fspath");
        const auto source = nb::cast<std::string>(fspath(src));
        const auto destination = dst.is_none() ? std::string() : nb::cast<std::string>(fspath(dst));
        if (!dst.is_none() && destination.empty()) throw nb::value_error("fold_file: dst is empty (None: a dry run)");
        qdqfold::Report report;
        {
          nb::gil_scoped_release release;
          report = qdqfold::fold_file(source, destination, options, file_options);
        }
        nb::dict result = report_to_dict(report);
        result["data_files"] = texts(report.data_files);
        result["removed_files"] = texts(report.removed_files);
        result["input_files"] = texts(report.input_files);
        result["input_bytes"] = report.input_bytes;
        return result;
      },
      nb::arg("src"), nb::arg("dst").none(), nb::arg("kwargs"),
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
        nb::dict d;
        const Options defaults;
        for (const auto& s : kOptions) d[s.name] = defaults.*(s.member);
        return d;
      },
      "options() -> dict: every keyword option of fold() and its default.");
}
