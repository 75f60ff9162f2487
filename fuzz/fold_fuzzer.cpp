// libFuzzer harness: feeds arbitrary bytes to qdqfold::plan_fold, the whole core (parse, every fold, plan
// the output), under a few option combinations, and writes the planned output into a buffer of the size the
// plan announced. FoldError is the one acceptable failure; anything else (a crash, an ASan/UBSan report, an
// unexpected exception type, a plan that writes other than its announced size) is a finding.
//
// Build and run: see fuzz/README.md.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string_view>
#include <vector>

#include "core/api.h"
#include "core/deferred_checks.h"

namespace {

// Writes the plan into a buffer with a guard byte past its end; the guard must survive.
void write_plan(const qdqfold::FoldPlan& plan) {
  const size_t size = plan.pieces.size();
  std::vector<char> out(size + 1);
  out[size] = '\x5a';
  plan.pieces.write_to(out.data());
  if (out[size] != '\x5a') std::abort();
}

qdqfold::Options option_set(uint8_t selector) {
  qdqfold::Options o;
  switch (selector % 4) {
    case 0: break;  // defaults
    case 1:         // every opt-in switch on
      o.pad_correction = o.allow_opset_upgrade = o.allow_nonzero_zero_point = true;
      o.materialize_quantized_weights = o.drop_activation_quantizers = true;
      break;
    case 2: o.fold_backward = false; o.pad_correction = true; break;     // forward folds only
    case 3: o.fold_forward = false; o.allow_opset_upgrade = true; break;  // backward folds only
  }
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The input lives in its own allocation of exactly `size` bytes, so ASan flags any read past its end.
  const std::string_view model(reinterpret_cast<const char*>(data), size);
  // Defaults always; one more option set chosen by the input's last byte, so every set gets coverage.
  const uint8_t selectors[2] = {0, static_cast<uint8_t>(size ? 1 + data[size - 1] % 3 : 1)};
  for (uint8_t selector : selectors) {
    try {
      // As the binding and fold_file do it: checks deferred to the writing first, and if one failed, once
      // more checking first (core/deferred_checks.h).
      const qdqfold::Options options = option_set(selector);
      auto plan = qdqfold::run_with_deferred_checks([&](std::shared_ptr<qdqfold::DeferredChecks> checks) {
        auto attempt = qdqfold::plan_fold(model, options, std::move(checks));
        write_plan(*attempt);
        return attempt;
      });
      // With nothing folded, the output is the input, byte for byte.
      bool any_folded = false;
      for (const auto& bn : plan->report.batchnorms) any_folded = any_folded || bn.folded;
      if (!any_folded) {
        std::vector<char> out(plan->pieces.size());
        plan->pieces.write_to(out.data());
        if (out.size() != size || (size && std::memcmp(out.data(), data, size) != 0)) std::abort();
      }
    } catch (const qdqfold::FoldError&) {
      return 0;  // bad input, reported properly: parsing fails the same way for every option set
    }
  }
  return 0;
}
