// The report as Python objects (core/report_fields.h, field by field), for the binding (module.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "../core/report.h"
#include "../core/report_fields.h"

namespace qdqfold::bindings {

namespace py = pybind11;

// Text that quotes the model (node, graph, tensor and op names), which need not be UTF-8: decoded with
// replacement, so a report always arrives instead of a UnicodeDecodeError.
py::str text(const std::string& s);
// The Python type report_fields() names for a kind of field, and the words for a Presence.
const char* python_type(FieldKind kind);
const char* presence_name(Presence presence);
// `in_file`: the dict of fold_file(), else of fold_with_report().
py::dict report_to_dict(const Report& report, bool in_file);

}  // namespace qdqfold::bindings
