// What the caller of a fold lends the folds for one run, beside the model: fold_file's page release (file
// mode, core/files.cpp) and the deferred checks of the two-run protocol (deferred_checks.h). The caller owns
// them (fold_file's staged attempt, plan_fold's caller); run_folds hands them to every fold through
// folds::FoldContext::hooks. No file-mode state lives in the graph index.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string_view>

namespace qdqfold {

// Set by the caller for a first, optimistic run (see api.h, plan_fold): a fold may then skip a read-only
// pass over a whole weight whose only purpose is a check that almost never fails (a value overflowing once
// scaled, a negated integer leaving its type), and have the weight's generator make that check while it
// writes. A generator whose check fails calls fail(); the caller throws that output away and runs again
// without deferral, so the result is the same as with every check done first.
struct DeferredChecks {
  std::atomic<bool> failed{false};
  void fail() { failed.store(true, std::memory_order_relaxed); }
};

struct FoldHooks {
  // File mode: called after each BatchNormalization is dealt with, so the file writer can give back the
  // pages of the mapped input that the fold read (they stay in the page cache).
  std::function<void()> after_each_fold;
  // File mode: gives back the pages of a view of a mapped file that a fold has finished reading, so a
  // read-only pass over a weight larger than memory does not keep it resident. Null for bytes in memory.
  std::function<void(std::string_view)> release_pages;
  // Null: check first.
  std::shared_ptr<DeferredChecks> deferred_checks;
};

}  // namespace qdqfold
