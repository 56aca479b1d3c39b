#pragma once
#include "emu_core.h"
// IEEE half with round-to-nearest-even conversions.
struct __half {
  uint16_t b = 0;
  __half() = default;
};
inline __half __float2half_rn(float f) {
  uint32_t x; std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  __half h;
  if (ax >= 0x7f800000u) { h.b = sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u); return h; }
  if (ax >= 0x477ff000u) { h.b = sign | 0x7c00u; return h; }  // rounds to >= 65520 -> inf
  if (ax < 0x38800000u) {  // subnormal half: value = m * 2^-24
    float a; std::memcpy(&a, &ax, 4);
    float m = std::nearbyint(a * 16777216.0f);  // RNE in default mode
    h.b = sign | (uint16_t)m; return h;
  }
  uint32_t mant = ax & 0x7fffffu; int e = (int)(ax >> 23) - 127 + 15;
  uint32_t r = mant >> 13, rem = mant & 0x1fffu;
  uint32_t v = ((uint32_t)e << 10) | r;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) v += 1;
  h.b = sign | (uint16_t)v; return h;
}
inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.b & 0x8000u) << 16;
  uint32_t e = (h.b >> 10) & 0x1f, m = h.b & 0x3ff;
  float f;
  if (e == 0) { f = std::ldexp((float)m, -24); uint32_t x; std::memcpy(&x, &f, 4); x |= sign; std::memcpy(&f, &x, 4); return f; }
  uint32_t x = sign | (e == 31 ? (0xffu << 23) | (m << 13) : ((e - 15 + 127) << 23) | (m << 13));
  std::memcpy(&f, &x, 4); return f;
}
