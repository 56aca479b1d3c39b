// The guard every CPU kernel starts with (see segops/torch_guards.h for what the guards are for).
#pragma once

#include "segops/torch_guards.h"

#include <initializer_list>

namespace segops {
namespace cpu {

// Every argument is `rank`-D and contiguous, with the device and the dtype of the first one,
// which is a dtype the CPU kernels implement (float32 or float64).
inline void check_operands(const char* kernel, int64_t rank,
                           std::initializer_list<guards::Arg> args) {
  const auto& [first_name, first] = *args.begin();
  guards::check_rank(kernel, rank, args);
  guards::check_dtype(kernel, first_name, *first, {at::kFloat, at::kDouble});
  guards::check_like(kernel, *first, args);
}

}  // namespace cpu
}  // namespace segops
