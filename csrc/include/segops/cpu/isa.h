// The instruction set that the hand-vectorised CPU kernels run on.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

// x86-64 with GCC-compatible builtins and target attributes: the hand-vectorised kernels exist.
#if defined(__x86_64__) && defined(__GNUC__)
#define SEGOPS_CPU_X86 1
#endif

namespace segops {
namespace cpu {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };  // avx2 includes FMA

// The widest instruction set this CPU has, capped by the environment variable SEGOPS_CPU_ISA
// (baseline, avx2 or avx512) when it is set: one machine can then run the narrower kernels, in
// tests or to compare them. Read once, at the first call.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::baseline;
#ifdef SEGOPS_CPU_X86
    if (__builtin_cpu_supports("avx512f")) {
      best = Isa::avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = Isa::avx2;
    }
#endif
    const char* cap = std::getenv("SEGOPS_CPU_ISA");
    if (cap == nullptr || *cap == '\0') return best;
    Isa limit;
    if (std::strcmp(cap, "baseline") == 0) {
      limit = Isa::baseline;
    } else if (std::strcmp(cap, "avx2") == 0) {
      limit = Isa::avx2;
    } else if (std::strcmp(cap, "avx512") == 0) {
      limit = Isa::avx512;
    } else {
      throw std::invalid_argument(
          std::string("SEGOPS_CPU_ISA must be one of baseline, avx2, avx512; got '") + cap + "'");
    }
    return limit < best ? limit : best;
  }();
  return isa;
}

}  // namespace cpu
}  // namespace segops
