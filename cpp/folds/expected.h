// One helper for the steps of a fold, instead of "if this step said keep, return it" after each one.
//
// A step returns Expected<T>: the T it computed, or the Outcome that ends the fold (NotApplicable from a
// selection, Kept with a reason from a plan). A check that computes nothing returns std::optional<Outcome>.
// Expected<T> is the one spelling (never std::variant<T, Outcome>), and a step's Outcome is taken with the
// macros or the helpers below, never by hand.
//
//   QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));      // BatchNormAffine affine, or return the step's Outcome
//   QDQFOLD_CHECK(layer_output_blocker(g, ...));        // return the Outcome when the check gives one
#pragma once

#include <optional>
#include <utility>
#include <variant>

#include "folds/fold.h"

namespace qdqfold::folds {

template <class T>
using Expected = std::variant<T, Outcome>;

// `step`, with a NotApplicable outcome (the pattern is another fold's) replaced by the Outcome `instead()`
// gives: for a step whose "not mine" is a reason to keep the BN here.
template <class T, class F>
Expected<T> if_not_applicable(Expected<T> step, F&& instead) {
  if (auto* o = std::get_if<Outcome>(&step); o && o->verdict == Verdict::NotApplicable) return instead();
  return step;
}

// `step`, with a Kept outcome replaced by `reword(outcome)` (a Kept outcome saying it in this fold's terms).
template <class T, class F>
Expected<T> reworded(Expected<T> step, F&& reword) {
  if (auto* o = std::get_if<Outcome>(&step); o && o->verdict == Verdict::Kept) return reword(*o);
  return step;
}

// `step`'s value, or nullopt when it does not apply (another form: the caller tries it); a Kept outcome stays.
template <class T>
Expected<std::optional<T>> optional_step(Expected<T> step) {
  if (auto* v = std::get_if<T>(&step)) return std::optional<T>(std::move(*v));
  Outcome& o = std::get<Outcome>(step);
  if (o.verdict == Verdict::NotApplicable) return std::optional<T>();
  return std::move(o);
}

}  // namespace qdqfold::folds

#define QDQFOLD_CONCAT_(a, b) a##b
#define QDQFOLD_CONCAT(a, b) QDQFOLD_CONCAT_(a, b)

// Declares `var` (T&&, bound to the step's value) or returns the step's Outcome from the enclosing function.
#define QDQFOLD_TRY(var, ...) QDQFOLD_TRY_(var, QDQFOLD_CONCAT(qdqfold_step_, __LINE__), __VA_ARGS__)
#define QDQFOLD_TRY_(var, step, ...)                                                 \
  auto step = (__VA_ARGS__);                                                         \
  if (auto* qdqfold_stop_ = std::get_if<::qdqfold::folds::Outcome>(&step)) return std::move(*qdqfold_stop_); \
  auto&& var = std::move(std::get<0>(step))

// Returns the Outcome of a check (std::optional<Outcome>) from the enclosing function when it gives one.
#define QDQFOLD_CHECK(...)                                                              \
  do {                                                                                  \
    if (auto qdqfold_stop = (__VA_ARGS__)) return std::move(*qdqfold_stop);             \
  } while (0)
