// Software prefetch of a range of memory, for reads the hardware prefetchers do not follow
// (rows a page or more apart, or a map walked a lane vector at a time).
#pragma once

#include <cstdint>

namespace segops {
namespace cpu {

// Asks for every cache line of p[0, count) in address order: RW 1 to write, 0 to read;
// Locality as __builtin_prefetch's (3: all cache levels, 2: L2 and beyond). p need not be aligned:
// the last element is asked for on its own, so the last line is never skipped.
template <int RW = 0, int Locality = 3, typename T>
inline void prefetch_range(const T* p, int64_t count) {
  if (count <= 0) return;
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t size = count * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < size; i += 64) __builtin_prefetch(bytes + i, RW, Locality);
  __builtin_prefetch(bytes + size - 1, RW, Locality);
}

}  // namespace cpu
}  // namespace segops
