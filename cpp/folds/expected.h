// One helper for the steps of a fold, instead of "if this step said keep, return it" after each one.
//
// A step returns Expected<T>: the T it computed, or the Outcome that ends the fold (NotApplicable from a
// selection, Kept with a reason from a plan). A check that computes nothing returns std::optional<Outcome>.
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

// The Outcome a step stopped with, or null.
template <class T>
Outcome* stopped(Expected<T>& e) {
  return std::get_if<Outcome>(&e);
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
