// The two-run protocol of checks deferred to the writing (DeferredChecks, fold_hooks.h), in one place: the
// binding's fold() and fold_with_report(), fold_file (core/files.cpp) and the fuzz harness all run a fold
// through run_with_deferred_checks.
//
// The first run is optimistic: its model gets a DeferredChecks, so a fold may leave a check that almost never
// fails (a value overflowing once scaled, a negated integer leaving its type) to the generator that writes the
// weight, instead of a read-only pass over the whole weight first. When such a check failed while the output
// was written, that output is wrong: it is thrown away and the fold runs once more with nothing deferred, every
// check made before anything is written, so the result is the one a run that checks first gives. The second
// run defers nothing, so it cannot fail a deferred check.
#pragma once

#include <atomic>
#include <memory>

#include "fold_hooks.h"

namespace qdqfold {

// `attempt(checks)` runs the fold once: it plans the model with `checks` as its deferred_checks (plan_fold's
// argument; null: check first), writes the output, and returns what the caller keeps of it, nothing yet
// committed that cannot be taken back (fold_file: the output files still temporary). Returns the result of
// the first attempt whose deferred checks held; a failed attempt's result is destroyed (fold_file: its
// temporary files removed) before the second attempt begins. An exception from an attempt goes to the caller.
template <typename Attempt>
auto run_with_deferred_checks(Attempt&& attempt) {
  {
    auto checks = std::make_shared<DeferredChecks>();
    auto result = attempt(checks);
    if (!checks->failed.load(std::memory_order_relaxed)) return result;
  }
  return attempt(std::shared_ptr<DeferredChecks>());
}

}  // namespace qdqfold
