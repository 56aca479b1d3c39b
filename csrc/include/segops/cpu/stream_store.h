// Copies whose destination is written with non-temporal stores: the lines of the destination
// are written whole, without first being read from memory (the read-for-ownership that an
// ordinary store to a line missing from cache costs), and without evicting what is in cache.
// For outputs a kernel computes in a cached buffer and will not read again.
#pragma once

#include "segops/cpu/isa.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef SEGOPS_CPU_X86
#include <immintrin.h>
#endif

namespace segops {
namespace cpu {

// dst[0, bytes) = src[0, bytes); the two may have any alignment and must not overlap.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return;
#ifdef SEGOPS_CPU_X86
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(
      bytes, static_cast<int64_t>((16 - reinterpret_cast<std::uintptr_t>(d) % 16) % 16));
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16) {  // SSE2, part of every x86-64
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
  _mm_sfence();  // the streamed stores are visible before any later store
#else
  std::memcpy(dst, src, bytes);
#endif
}

}  // namespace cpu
}  // namespace segops
