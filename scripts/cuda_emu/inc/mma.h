#pragma once
#include "emu_core.h"
#include "cuda_fp16.h"
#include "cuda_bf16.h"
#include <cassert>
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
inline float tof(__half v) { return __half2float(v); }
inline float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float tof(float v) { return v; }
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { float x[16 * 16]; };
template <class F> void fill_fragment(F& f, float v) { for (auto& e : f.x) e = v; }
template <class Use, class T> void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
  if ((uintptr_t)p % 32 || ld % 8) { std::fprintf(stderr, "WMMA misaligned load\n"); std::abort(); }
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = tof(p[i * ld + j]);
}
template <class Use, class T> void load_matrix_sync(fragment<Use, 16, 16, 16, T, col_major>& f, const T* p, unsigned ld) {
  if ((uintptr_t)p % 32 || ld % 8) { std::fprintf(stderr, "WMMA misaligned load\n"); std::abort(); }
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = tof(p[i + j * ld]);
}
template <class FA, class FB, class FC> void mma_sync(FC& d, const FA& a, const FB& b, const FC& c) {
  float r[256];
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) {
    float s = c.x[i * 16 + j];
    for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
    r[i * 16 + j] = s;
  }
  std::memcpy(d.x, r, sizeof r);
}
template <class F> void store_matrix_sync(float* p, const F& f, unsigned ld, layout_t l) {
  if ((uintptr_t)p % 32 || ld % 4) { std::fprintf(stderr, "WMMA misaligned store\n"); std::abort(); }
  if (threadIdx.x % 32 != 0) return;  // one lane writes (the values are the warp's, identical)
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j)
    p[l == mem_row_major ? i * ld + j : i + j * ld] = f.x[i * 16 + j];
}
}}
