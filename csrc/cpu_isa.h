// Which hand-written SIMD kernels the CPU kernels may run: the widest this CPU supports
// and torch allows (ATEN_CPU_CAPABILITY caps them as it caps torch's own kernels).
// Decided once per process. Shared by target_attention_cpu.cpp and gru_scan_cpu.cpp.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace interest_kernels {

enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa simd_isa() {
#if defined(__x86_64__)
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
      return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

}  // namespace interest_kernels
