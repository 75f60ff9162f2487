// The table of reasons and fold names (reasons.h).
#include "folds/reasons.h"

#include <cctype>

namespace qdqfold::folds {

namespace {

struct Row {
  const char* code;
  const char* meaning;
  const char* option;
  const char* flag;
};

constexpr Row kKept[] = {
#define QDQFOLD_ROW(id, code, meaning, option, flag) {code, meaning, option, flag},
    QDQFOLD_KEPT_REASONS(QDQFOLD_ROW)
#undef QDQFOLD_ROW
};

constexpr Row kFolds[] = {
#define QDQFOLD_ROW(id, code, meaning) {code, meaning, "", ""},
    QDQFOLD_FOLD_NAMES(QDQFOLD_ROW)
#undef QDQFOLD_ROW
};

// The ops an elementwise affine source (sources/affine.h) can be; a BN fold applied to one is named after it.
constexpr const char* kAffineOps[] = {"Mul", "Add", "Sub", "Div"};

}  // namespace

const char* code(Reason reason) { return kKept[static_cast<int>(reason)].code; }
const char* code(FoldName name) { return kFolds[static_cast<int>(name)].code; }

const std::vector<ReasonEntry>& reason_table() {
  static const std::vector<ReasonEntry> table = [] {
    std::vector<ReasonEntry> t;
    for (const Row& r : kKept) t.push_back({r.code, "kept", r.meaning, r.option, r.flag});
    for (const Row& r : kFolds) t.push_back({r.code, "fold", r.meaning, r.option, r.flag});
    // The affine variants: every "bn" token of a BN fold's name replaced by the op (affine_fold_name).
    for (const Row& r : kFolds) {
      const std::string name = r.code;
      if (name == code(FoldName::MergeBranches)) continue;
      for (const char* op : kAffineOps) {
        const std::string out = affine_variant_name(name, op);
        t.push_back({out, "fold", std::string(op) + " by a per-channel constant" + std::string(r.meaning).substr(2),
                     "", ""});
      }
    }
    return t;
  }();
  return table;
}

std::string affine_variant_name(const std::string& bn_fold_name, const std::string& op_type) {
  std::string op = op_type;
  for (char& ch : op) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  std::string out;
  size_t start = 0;
  while (start <= bn_fold_name.size()) {
    size_t end = bn_fold_name.find('-', start);
    if (end == std::string::npos) end = bn_fold_name.size();
    const std::string token = bn_fold_name.substr(start, end - start);
    if (!out.empty()) out += '-';
    out += token == "bn" ? op : token;
    start = end + 1;
  }
  return out;
}

bool changed_by_freezing_inputs(const std::string& c) {
  for (const Row& r : kKept)
    if (c == r.code) return std::string(r.option) == "freeze_initializer_inputs";
  return false;
}

}  // namespace qdqfold::folds
