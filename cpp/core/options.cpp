#include "options.h"

namespace qdqfold {

const std::vector<OptionSwitch>& option_switches() {
  static const std::vector<OptionSwitch> switches = {
      {"fold_backward", &Options::fold_backward},
      {"fold_forward", &Options::fold_forward},
      {"fold_affine", &Options::fold_affine},
      {"freeze_initializer_inputs", &Options::freeze_initializer_inputs},
      {"pad_correction", &Options::pad_correction},
      {"allow_opset_upgrade", &Options::allow_opset_upgrade},
      {"allow_nonzero_zero_point", &Options::allow_nonzero_zero_point},
      {"materialize_quantized_weights", &Options::materialize_quantized_weights},
      {"drop_activation_quantizers", &Options::drop_activation_quantizers},
      {"merge_branches", &Options::merge_branches},
      {"requantize_merged", &Options::requantize_merged},
      {"requantize_residuals", &Options::requantize_residuals},
      {"store_float_weights", &Options::store_float_weights},
  };
  return switches;
}

const OptionSwitch& option_switch(std::string_view keyword) {
  for (const auto& s : option_switches())
    if (keyword == s.name) return s;
  std::string known;
  for (const auto& s : option_switches()) known += std::string(known.empty() ? "" : ", ") + s.name;
  throw OptionError("unknown option '" + std::string(keyword) + "'; the options are: " + known + ", shapes, target");
}

}  // namespace qdqfold
