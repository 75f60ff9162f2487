// The report's fields, defined once: the two tables below are what the binding's report_to_dict iterates,
// what run_folds' finish() copies from a fold's Outcome, and what qdqfold_native.report_fields() shows, which
// tests/test_report_fields.py compares with an actual report dict, the stub's TypedDicts
// (python/qdqfold_native.pyi), python/qdqfold/report.py and docs/report.schema.json.
//
// A field is added in the table and in its struct (report.h; for a fold's result also folds::Outcome); the
// member counts are checked at compile time below (and for Outcome in core/api.cpp), so a member missing from
// its table does not build, and the test fails until the stub and report.py have it too.
#pragma once

#include <cstddef>
#include <iterator>
#include <type_traits>
#include <utility>

#include "report.h"

namespace qdqfold {

// How a field appears in the report's dict (the binding gives each kind one Python type).
enum class FieldKind {
  Text,          // str
  OptionalText,  // str, or None when empty
  Texts,         // list[str]
  Bool,          // bool
  Exact,         // exact with bias_rounded: True, "bias-rounded" (exact but for a reported int32 bias
                 // rounding) or False
  Metrics,       // {name: float}
  Hidden,        // no key of its own (bias_rounded: shown through exact)
  Records,       // [BatchNormRecord as a dict]
  OpTypes,       // {"before": {op type: count}, "after": {...}}
  Int,           // int
  Attempts,      // [{"rule", "verdict", "code", "message", "at": str | None, "option": str | None}]
};

// Each BatchNormRecord member, in the order of the dict's keys: X(member, kind, from), `from` being
//   Outcome: run_folds' finish() moves it from the chosen folds::Outcome's member of the same name;
//   Driver:  run_folds sets it (from the node, or from the verdict and the rule's direction).
#define QDQFOLD_RECORD_FIELDS(X)      \
  X(graph, Text, Driver)              \
  X(node, Text, Driver)               \
  X(folded, Bool, Driver)             \
  X(direction, OptionalText, Driver)  \
  X(into, Texts, Outcome)             \
  X(into_op, OptionalText, Outcome)   \
  X(code, Text, Outcome)              \
  X(op_type, Text, Driver)            \
  X(message, Text, Outcome)           \
  X(exact, Exact, Outcome)            \
  X(bias_rounded, Hidden, Outcome)    \
  X(new_tensors, Texts, Outcome)      \
  X(metrics, Metrics, Outcome)        \
  X(attempts, Attempts, Driver)

// When a Report member is in the dict of fold() / fold_with_report() (a model in memory) and of fold_file().
enum class Presence {
  Always,
  NonEmpty,  // only when it is not empty
  Never,
};

// Each Report member, in the order of the dict's keys: X(member, kind, in memory, file).
#define QDQFOLD_REPORT_FIELDS(X)               \
  X(batchnorms, Records, Always, Always)       \
  X(merges, Records, NonEmpty, NonEmpty)       \
  X(op_types, OpTypes, Always, Always)         \
  X(data_files, Texts, Never, Always)          \
  X(removed_files, Texts, Never, Always)       \
  X(input_files, Texts, NonEmpty, Always)      \
  X(input_bytes, Int, Always, Always)           \
  X(target, Text, NonEmpty, NonEmpty)          \
  X(target_layers, Records, NonEmpty, NonEmpty) \
  X(target_kernels, OpTypes, NonEmpty, NonEmpty)

struct FieldInfo {
  const char* name;
  FieldKind kind;
  Presence in_memory = Presence::Always;  // Report fields only
  Presence file = Presence::Always;
};

#define QDQFOLD_RECORD_FIELD_INFO(member, kind, from) FieldInfo{#member, FieldKind::kind},
inline constexpr FieldInfo kRecordFields[] = {QDQFOLD_RECORD_FIELDS(QDQFOLD_RECORD_FIELD_INFO)};
#undef QDQFOLD_RECORD_FIELD_INFO

#define QDQFOLD_REPORT_FIELD_INFO(member, kind, in_memory, file) \
  FieldInfo{#member, FieldKind::kind, Presence::in_memory, Presence::file},
inline constexpr FieldInfo kReportFields[] = {QDQFOLD_REPORT_FIELDS(QDQFOLD_REPORT_FIELD_INFO)};
#undef QDQFOLD_REPORT_FIELD_INFO

// The number of members of an aggregate (none of them an aggregate itself, or brace elision would count its
// members): the most initializers `T{...}` takes.
namespace detail {
struct AnyMember {
  template <typename T>
  operator T() const;  // never defined: only used unevaluated
};
template <typename T, typename Indices, typename = void>
struct takes : std::false_type {};
template <typename T, size_t... I>
struct takes<T, std::index_sequence<I...>, std::void_t<decltype(T{(void(I), AnyMember{})...})>> : std::true_type {};
template <typename T, size_t N = 0>
constexpr size_t member_count() {
  if constexpr (takes<T, std::make_index_sequence<N + 1>>::value) return member_count<T, N + 1>();
  else return N;
}
}  // namespace detail
using detail::member_count;

static_assert(std::is_aggregate_v<BatchNormRecord> &&
                  member_count<BatchNormRecord>() == std::size(kRecordFields),
              "a BatchNormRecord member is missing from QDQFOLD_RECORD_FIELDS (core/report_fields.h)");
static_assert(std::is_aggregate_v<Report> && member_count<Report>() == std::size(kReportFields),
              "a Report member is missing from QDQFOLD_REPORT_FIELDS (core/report_fields.h)");

}  // namespace qdqfold
