// The report as Python objects (report_dict.h).
#include "report_dict.h"

#include <pybind11/stl.h>

#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace qdqfold::bindings {

py::str text(const std::string& s) {
  return py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace"));
}
namespace {

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

}  // namespace

// The report as a dict, field by field as core/report_fields.h lists them: each kind of field has one
// conversion, and the Python type report_fields() names for it.
using qdqfold::FieldKind;
using qdqfold::Presence;
template <FieldKind K>
using Kind = std::integral_constant<FieldKind, K>;

const char* python_type(FieldKind kind) {
  switch (kind) {
    case FieldKind::Text: return "str";
    case FieldKind::OptionalText: return "str | None";
    case FieldKind::Texts: return "list[str]";
    case FieldKind::Bool: return "bool";
    case FieldKind::Exact: return "bool | str";
    case FieldKind::Metrics: return "dict[str, float]";
    case FieldKind::Hidden: return "";
    case FieldKind::Records: return "list[BatchNormEntry]";
    case FieldKind::OpTypes: return "OpTypes";
    case FieldKind::Int: return "int";
    case FieldKind::Attempts: return "list[FoldAttempt]";
  }
  return "";
}

const char* presence_name(Presence presence) {
  switch (presence) {
    case Presence::Always: return "always";
    case Presence::NonEmpty: return "non-empty";
    case Presence::Never: return "never";
  }
  return "";
}

namespace {

py::list records_to_list(const std::vector<qdqfold::BatchNormRecord>& records);

template <typename Whole>
py::object show(Kind<FieldKind::Text>, const std::string& s, const Whole&) { return text(s); }
template <typename Whole>
py::object show(Kind<FieldKind::OptionalText>, const std::string& s, const Whole&) {
  return s.empty() ? py::object(py::none()) : py::object(text(s));
}
template <typename Whole>
py::object show(Kind<FieldKind::Texts>, const std::vector<std::string>& v, const Whole&) { return texts(v); }
template <typename Whole>
py::object show(Kind<FieldKind::Bool>, bool b, const Whole&) { return py::bool_(b); }
// true (within float rounding), "bias-rounded" (plus a reported int32 bias rounding), or false.
py::object show(Kind<FieldKind::Exact>, bool exact, const qdqfold::BatchNormRecord& r) {
  return exact && r.bias_rounded ? py::object(py::str("bias-rounded")) : py::object(py::bool_(exact));
}
template <typename Whole>
py::object show(Kind<FieldKind::Metrics>, const std::vector<std::pair<std::string, double>>& m, const Whole&) {
  py::dict metrics;
  for (const auto& [k, v] : m) metrics[text(k)] = v;
  return std::move(metrics);
}
template <typename Whole>
py::object show(Kind<FieldKind::Records>, const std::vector<qdqfold::BatchNormRecord>& v, const Whole&) {
  return records_to_list(v);
}
template <typename Whole>
py::object show(Kind<FieldKind::OpTypes>, const qdqfold::OpTypeCounts& c, const Whole&) {
  return py::dict(py::arg("before") = counts(c.before), py::arg("after") = counts(c.after));
}
template <typename Whole>
py::object show(Kind<FieldKind::Int>, int64_t n, const Whole&) { return py::int_(n); }
template <typename Whole>
py::object show(Kind<FieldKind::Attempts>, const std::vector<qdqfold::FoldAttempt>& v, const Whole&) {
  auto optional = [](const std::string& s) { return s.empty() ? py::object(py::none()) : py::object(text(s)); };
  py::list attempts;
  for (const auto& a : v)
    attempts.append(py::dict(py::arg("rule") = text(a.rule), py::arg("verdict") = text(a.verdict),
                             py::arg("code") = text(a.code), py::arg("message") = text(a.message),
                             py::arg("at") = optional(a.at), py::arg("option") = optional(a.option)));
  return std::move(attempts);
}

template <typename K, typename T, typename Whole>
void put(py::dict& d, const char* key, K kind, const T& value, const Whole& whole) {
  d[key] = show(kind, value, whole);
}
template <typename T, typename Whole>
void put(py::dict&, const char*, Kind<FieldKind::Hidden>, const T&, const Whole&) {}  // shown through another

template <typename T>
bool is_empty(const T& value) { return value.empty(); }
bool is_empty(int64_t) { return false; }
bool is_empty(const qdqfold::OpTypeCounts& c) { return c.before.empty() && c.after.empty(); }

py::list records_to_list(const std::vector<qdqfold::BatchNormRecord>& records) {
  py::list bns;
  for (const auto& r : records) {
    py::dict d;
#define QDQFOLD_PUT_RECORD(member, kind, from) put(d, #member, Kind<FieldKind::kind>{}, r.member, r);
    QDQFOLD_RECORD_FIELDS(QDQFOLD_PUT_RECORD)
#undef QDQFOLD_PUT_RECORD
    bns.append(d);
  }
  return bns;
}

}  // namespace

py::dict report_to_dict(const qdqfold::Report& report, bool in_file) {
  py::dict out;
#define QDQFOLD_PUT_REPORT(member, kind, in_memory, file)                                                   \
  switch (in_file ? Presence::file : Presence::in_memory) {                                                 \
    case Presence::Always: put(out, #member, Kind<FieldKind::kind>{}, report.member, report); break;        \
    case Presence::NonEmpty:                                                                               \
      if (!is_empty(report.member)) put(out, #member, Kind<FieldKind::kind>{}, report.member, report);      \
      break;                                                                                               \
    case Presence::Never: break;                                                                           \
  }
  QDQFOLD_REPORT_FIELDS(QDQFOLD_PUT_REPORT)
#undef QDQFOLD_PUT_REPORT
  return out;
}

}  // namespace qdqfold::bindings
