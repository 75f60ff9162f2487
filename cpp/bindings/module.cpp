// qdqfold_native: the thin binding. Arguments are converted with the GIL held, the C++ work runs inside one
// explicit gil_scoped_release block, and the Python objects are made after it. The input is read in place
// through the buffer protocol (bytes, bytearray, memoryview, mmap): it is never copied.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <stdexcept>
#include <string>

#include "../analysis/integer_kernels.h"
#include "../core/api.h"
#include "../core/deferred_checks.h"
#include "../core/file_io.h"
#include "../core/files.h"
#include "../core/report_fields.h"
#include "report_dict.h"
#include "../folds/reasons.h"
#include "../folds/layer_kinds.h"
#include "../targets/onnxruntime.h"

namespace py = pybind11;
using qdqfold::Options;
using qdqfold::bindings::presence_name;
using qdqfold::bindings::python_type;
using qdqfold::bindings::report_to_dict;
using qdqfold::bindings::text;
using qdqfold::FieldKind;
using qdqfold::Presence;

#ifndef QDQFOLD_VERSION
#define QDQFOLD_VERSION "0.0.0"
#endif

namespace {

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
    if (key == "target") {
      if (item.second.is_none()) continue;
      if (!PyUnicode_Check(item.second.ptr()))
        throw py::type_error(std::string("option 'target' takes None or a target name: ") +
                             qdqfold::targets::known_targets());
      options.target = item.second.cast<std::string>();
      if (!qdqfold::targets::is_known_target(options.target))
        throw py::type_error("option 'target': unknown target '" + options.target + "'; the targets are: " +
                             qdqfold::targets::known_targets());
      continue;
    }
    const qdqfold::OptionSwitch& option = qdqfold::option_switch(key);  // OptionError: TypeError
    if (!PyBool_Check(item.second.ptr()))
      throw py::type_error("option '" + key + "' takes True or False");
    options.*(option.member) = item.second.cast<bool>();
  }
  // Switches of the deployment target do nothing without one: say so instead of ignoring them.
  if (options.target.empty())
    for (const auto& [on, name] : {std::pair{options.requantize_residuals, "requantize_residuals"},
                                   std::pair{options.store_float_weights, "store_float_weights"}})
      if (on) throw py::type_error(std::string("option '") + name + "' needs a target (target='onnxruntime')");
  if (options.requantize_merged && !options.merge_branches)
    throw py::type_error("option 'requantize_merged' needs merge_branches=True");
  return options;
}

// Holds a Py_buffer for the duration of a call.
class InputBuffer {
 public:
  explicit InputBuffer(const py::object& obj, const char* option = nullptr) {
    if (PyUnicode_Check(obj.ptr()))
      throw py::type_error(option ? std::string("option '") + option + "' takes bytes-like buffers, not str"
                                  : "fold() takes the model's bytes (bytes, bytearray, memoryview or mmap), not a str path");
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~InputBuffer() { PyBuffer_Release(&view_); }
  InputBuffer(const InputBuffer&) = delete;
  InputBuffer& operator=(const InputBuffer&) = delete;
  std::string_view bytes() const { return {static_cast<const char*>(view_.buf), static_cast<size_t>(view_.len)}; }

 private:
  Py_buffer view_{};
};

// Parses and folds with the GIL released, allocates the result bytes with it held, then fills them with the
// GIL released again: the output is written once, into its final buffer.
std::pair<py::bytes, qdqfold::Report> run(const py::object& model, py::kwargs kwargs) {
  const py::object base = take_keyword(kwargs, "base_directory");
  const py::object tensors = take_keyword(kwargs, "tensors");
  const Options options = parse_options(kwargs);
  std::unique_ptr<qdqfold::graph::ExternalResolver> external;
  if (!base.is_none()) {
    const auto directory = py::cast<std::string>(py::module_::import("os").attr("fspath")(base));
    external = qdqfold::external_data_in(directory, "the model in memory");
  }
  // `tensors`: external-data locations resolved to the caller's buffers, held (and read in place) for the call.
  std::vector<std::unique_ptr<InputBuffer>> tensor_buffers;
  if (!tensors.is_none()) {
    if (!PyDict_Check(tensors.ptr()))
      throw py::type_error("option 'tensors' takes a dict of external-data location (str) -> bytes-like buffer");
    std::map<std::string, std::string_view> buffers;
    for (const auto& [key, value] : py::reinterpret_borrow<py::dict>(tensors)) {
      if (!PyUnicode_Check(key.ptr())) throw py::type_error("option 'tensors': every key is a location (str)");
      tensor_buffers.push_back(std::make_unique<InputBuffer>(py::reinterpret_borrow<py::object>(value), "tensors"));
      buffers[key.cast<std::string>()] = tensor_buffers.back()->bytes();
    }
    external = qdqfold::external_data_from(std::move(buffers), std::move(external), "the model in memory");
  }
  InputBuffer input(model);
  // The buffer may be a caller's mmap of a file: a read past the end of that file, should it shrink while
  // we fold, gives zeros instead of SIGBUS, and the fold ends in a FileError.
  const qdqfold::io::GuardedRange guard(input.bytes().data(), input.bytes().size());
  auto throw_if_changed = [&guard] {
    if (guard.faulted()) throw qdqfold::io::FileError("the model: the input changed while it was being folded");
  };
  return qdqfold::run_with_deferred_checks([&](std::shared_ptr<qdqfold::DeferredChecks> checks) {
    std::unique_ptr<qdqfold::FoldPlan> plan;
    {
      py::gil_scoped_release release;
      try {
        plan = qdqfold::plan_fold(input.bytes(), options, std::move(checks), external.get());
      } catch (const std::exception&) {
        throw_if_changed();
        throw;
      }
      qdqfold::report_inputs(plan->report, input.bytes().size(), external.get());
    }
    PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(plan->pieces.size()));
    if (!out) throw py::error_already_set();
    py::bytes result = py::reinterpret_steal<py::bytes>(out);
    {
      py::gil_scoped_release release;
      plan->pieces.write_to(PyBytes_AS_STRING(out));
    }
    throw_if_changed();
    return std::pair<py::bytes, qdqfold::Report>(std::move(result), std::move(plan->report));
  });
}

}  // namespace

PYBIND11_MODULE(qdqfold_native, m) {
  m.doc() = "qdqfold's native core: folds BatchNormalization into neighbouring layers of an ONNX model, "
            "quantized (QDQ) weights included, reading and writing the protobuf wire format directly.";
  m.attr("__version__") = QDQFOLD_VERSION;
  // Which file backend this build compiled: "linux" keeps an existing output's extended attributes and copies
  // ranges in the kernel; "posix" (POSIX.1-2008 only) and "windows" do not. Asked of the platform layer, the
  // only code compiled with QDQFOLD_PORTABLE_IO.
  m.attr("file_backend") = qdqfold::io::backend_name();
  static py::exception<qdqfold::FoldError> fold_error(m, "FoldError", PyExc_ValueError);
  static py::exception<qdqfold::io::FileError> file_error(m, "FileError", fold_error.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    // Messages quote names from the model, which need not be UTF-8: decode with replacement, so that a
    // FoldError is what arrives, not a UnicodeDecodeError.
    // A message is one line: control characters (a newline in a path or a node name) are escaped, so that a
    // newline prints as \n.
    auto raise = [](const py::object& type, const std::string& message) {
      const std::string what = qdqfold::io::one_line(message);
      py::set_error(type, py::reinterpret_steal<py::str>(
                              PyUnicode_DecodeUTF8(what.data(), static_cast<Py_ssize_t>(what.size()), "replace")));
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const qdqfold::io::FileError& e) {
      raise(file_error, e.what());
    } catch (const qdqfold::FoldError& e) {
      raise(fold_error, e.what());
    } catch (const qdqfold::OptionError& e) {
      raise(py::reinterpret_borrow<py::object>(PyExc_TypeError), e.what());
    }
  });

  m.def(
      "fold", [](const py::object& model, py::kwargs kwargs) { return run(model, std::move(kwargs)).first; },
      py::arg("model"),
      "fold(model, *, base_directory=None, tensors=None, **options) -> bytes\n\n"
      "Folds every BatchNormalization it can fold exactly and returns the new model's bytes. `model` is any\n"
      "bytes-like object holding a serialized ModelProto; it is read in place. Raises FoldError (a ValueError)\n"
      "for input that is not a valid ONNX model. See options() for the keyword options and their defaults.\n"
      "`base_directory`: the directory external-data locations are relative to (the model file's directory);\n"
      "they are read under fold_file()'s rules. Folded external tensors are written inline; others keep their\n"
      "references. Without it, BNs whose weights are external are kept.\n"
      "`tensors`: {location: buffer}: external-data locations whose bytes are the given buffers (any bytes-like\n"
      "object, read in place), for tensors held in memory beside a model without their data; other locations go\n"
      "to base_directory. As with files, folded tensors come back inline and the others keep their references.");
  m.def(
      "fold_with_report",
      [](const py::object& model, py::kwargs kwargs) {
        auto [bytes, report] = run(model, std::move(kwargs));
        return py::make_tuple(bytes, report_to_dict(report, false));
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
        // The storage keywords: types checked here, values and combinations by the core (OptionError: TypeError).
        qdqfold::StorageKeywords storage;
        const py::object external = take_keyword(kwargs, "save_as_external_data");
        const py::object threshold = take_keyword(kwargs, "size_threshold");
        const py::object data_name = take_keyword(kwargs, "data_name");
        if (!external.is_none()) {
          if (!PyBool_Check(external.ptr()))
            throw py::type_error("option 'save_as_external_data' takes True, False or None (as the input)");
          storage.save_as_external_data(external.cast<bool>());
        }
        if (!threshold.is_none()) {
          if (!PyLong_Check(threshold.ptr()) || PyBool_Check(threshold.ptr()))
            throw py::type_error(qdqfold::StorageKeywords::kSizeThresholdRule);
          storage.size_threshold(threshold.cast<int64_t>());
        }
        if (!data_name.is_none()) {
          if (!PyUnicode_Check(data_name.ptr())) throw py::type_error("option 'data_name' takes a file name (str)");
          storage.data_name(data_name.cast<std::string>());
        }
        storage.apply_to(file_options);
        // A model without a directory of its own (standard input spooled to a temporary file): where its
        // external data lives, and how messages name it.
        const py::object base = take_keyword(kwargs, "base_directory");
        const py::object label = take_keyword(kwargs, "model_label");
        if (!base.is_none())
          file_options.base_directory = py::cast<std::string>(py::module_::import("os").attr("fspath")(base));
        if (!label.is_none()) {
          if (!PyUnicode_Check(label.ptr())) throw py::type_error("option 'model_label' takes a str");
          file_options.model_label = label.cast<std::string>();
        }
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
        return report_to_dict(report, true);
      },
      py::arg("src"), py::arg("dst"),
      "fold_file(src, dst, *, force=False, save_as_external_data=None, size_threshold=1024, data_name=None,\n"
      "          base_directory=None, model_label=None, **options) -> dict\n\n"
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
      "of at least size_threshold bytes to one data file, data_name or dst.data, the others inline.\n"
      "base_directory: where external data locations resolve instead of src's directory (a model read from a\n"
      "stream, spooled to a temporary file); model_label: how messages name src (e.g. '<stdin>').\n"
      "An existing dst keeps its mode (owner and extended attributes where permitted); a new one gets\n"
      "0666 & ~umask; the data files take the mode of their model file.");
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
        for (const auto& s : qdqfold::option_switches()) d[s.name] = defaults.*(s.member);
        return d;
      },
      "options() -> dict: every keyword option of fold() and its default.");
  m.def(
      "report_fields",
      []() {
        py::dict batchnorm, report;
        for (const auto& f : qdqfold::kRecordFields)
          if (f.kind != FieldKind::Hidden) batchnorm[f.name] = python_type(f.kind);
        for (const auto& f : qdqfold::kReportFields)
          report[f.name] = py::dict(py::arg("type") = python_type(f.kind),
                                    py::arg("fold_with_report") = presence_name(f.in_memory),
                                    py::arg("fold_file") = presence_name(f.file));
        return py::dict(py::arg("batchnorm") = batchnorm, py::arg("report") = report);
      },
      "report_fields() -> dict: the report's fields, in the order of its dicts (cpp/core/report_fields.h).\n\n"
      "'batchnorm': {key: Python type} of each entry of 'batchnorms' and 'merges'. 'report': {key: {'type',\n"
      "'fold_with_report', 'fold_file'}}, the last two saying when the key is in that function's dict:\n"
      "'always', 'non-empty' (only when not empty) or 'never'.");
  // The static saturation check of onnxruntime's integer kernels (cpp/analysis/integer_kernels.h).
  m.def(
      "integer_kernels",
      [](const py::object& model, const py::object& base) {
        std::unique_ptr<qdqfold::graph::ExternalResolver> external;
        if (!base.is_none()) {
          const auto directory = py::cast<std::string>(py::module_::import("os").attr("fspath")(base));
          external = qdqfold::external_data_in(directory, "the model in memory");
        }
        InputBuffer input(model);
        const qdqfold::io::GuardedRange guard(input.bytes().data(), input.bytes().size());
        std::vector<qdqfold::analysis::IntegerLayer> layers;
        {
          py::gil_scoped_release release;
          auto parsed = qdqfold::graph::parse_model(input.bytes(), external.get());
          layers = qdqfold::analysis::integer_layers(*parsed);
        }
        if (guard.faulted()) throw qdqfold::io::FileError("the model: the input changed while it was being read");
        py::list out;
        for (const auto& l : layers) {
          py::dict d;
          d["node"] = text(l.node);
          d["op"] = l.op;
          d["kernel"] = l.kernel;
          d["activation"] = l.activation;
          d["weight"] = l.weight;
          d["activation_range"] = py::make_tuple(l.activation_lo, l.activation_hi);
          d["pair_max"] = l.pair_max;
          d["pair_min"] = l.pair_min;
          d["can_saturate"] = l.can_saturate;
          d["channels"] = l.channels;
          d["why_not"] = l.why_not.empty() ? py::object(py::none()) : py::object(py::str(l.why_not));
          out.append(std::move(d));
        }
        return out;
      },
      py::arg("model"), py::kw_only(), py::arg("base_directory") = py::none(),
      "integer_kernels(model, *, base_directory=None) -> list[dict]\n\n"
      "The layers of `model` (a bytes-like serialized ModelProto, read in place) that onnxruntime will run as\n"
      "integer kernels (QLinearConv, QLinearMatMul, QGemm) on x86-64, each with the bound of its 16-bit pair sums:\n"
      "{node, op, kernel, activation, weight, activation_range, pair_max, pair_min, can_saturate, channels,\n"
      "why_not}. can_saturate: on x86-64 CPUs without VNNI (AVX2, AVX-512 without VNNI) some pair of products\n"
      "can leave int16's range (vpmaddubsw saturates). `base_directory`: where external data lives.");
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
  m.def(
      "layer_kinds",
      []() {
        py::list out;
        for (const auto& k : qdqfold::folds::layer_kinds()) {
          py::dict d;
          d["op"] = k.op;
          d["weight_input"] = k.weight_input;
          d["weight_scale_input"] = qdqfold::folds::kWeightScaleInput;
          d["weight_zero_point_input"] = qdqfold::folds::kWeightZeroPointInput;
          d["bias_input"] = k.bias_input < 0 ? py::object(py::none()) : py::object(py::int_(k.bias_input));
          d["bias"] = k.bias;
          d["output_axis"] = k.output_axis;
          d["spatial"] = k.spatial;
          d["backward"] = k.backward;
          d["forward"] = k.forward;
          d["quantized"] = k.quantized;
          out.append(std::move(d));
        }
        return out;
      },
      "layer_kinds() -> list[dict]: the layers qdqfold folds into (cpp/folds/layer_kinds.h), as {op, weight_input,\n"
      "weight_scale_input and weight_zero_point_input (of the DequantizeLinear feeding the weight), bias_input\n"
      "(None: an Add after it), bias, output_axis, spatial, backward, forward, quantized}.");
}
