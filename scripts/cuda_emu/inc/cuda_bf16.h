#pragma once
#include "emu_core.h"
struct __nv_bfloat16 {
  uint16_t b = 0;
  __nv_bfloat16() = default;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x; std::memcpy(&x, &f, 4);
  __nv_bfloat16 h;
  if ((x & 0x7fffffffu) > 0x7f800000u) { h.b = 0x7fc0; return h; }
  x += 0x7fffu + ((x >> 16) & 1u);
  h.b = (uint16_t)(x >> 16); return h;
}
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t x = (uint32_t)h.b << 16; float f; std::memcpy(&f, &x, 4); return f; }
