// Two fp32 GEMM kernels for products whose rows are one short image line (16 to 64 elements),
// with the long operand read in place from NCHW maps: a row of channel c is L contiguous
// elements, channels H * W elements apart. BLAS is slow on these: its operands are a
// few hundred runs of a few hundred bytes, each call packs them, and the caller cannot order
// its calls so that the hardware prefetchers see sequential streams.
//   * short_row_gemm: C (M x L) = A (M x L) B with B an L x L block (probabilities). A whole
//     output row stays in registers (up to four 16-lane vectors; the last one masked), six rows
//     at a time, the elements of A broadcast from memory.
//   * short_row_gram: G (L x L) = A^T B over K channels, A and B lines of two maps (the
//     backward's dP = dout^T v). Six rows of G in registers, the elements of A broadcast, a row
//     of B loaded per channel; one or two columns past whole vectors apart (kMaxTailColumns).
//   * strided_gemm: the register blocks of short_row_gemm for any K and N, A read at any
//     strides (a single lane of a map whose width is a few lanes past whole vectors: see
//     lane_gemm in csrc/cpu/criss_cross_attention.cpp).
// The caller feeds them channel blocks of a few dozen lines that lie one after another in memory,
// which is what makes them faster than BLAS here (measured on criss-cross attention at
// 2 x 512 x 49 x 49, one thread: about 90 GFLOP/s against MKL's 55-60 on the same products).
// AVX-512, or AVX2 with FMA (8-lane registers, column chunks of 16 to 24), chosen at run time
// (cpu_isa); callers fall back to segops::cpu::gemm_rm where short_row_gemm_available is false.
#pragma once

#include "segops/cpu/isa.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef SEGOPS_CPU_X86
#include <immintrin.h>
#define SEGOPS_SHORT_ROW_GEMM 1
#endif

namespace segops {
namespace cpu {

constexpr int64_t kShortRowMax = 64;

#ifdef SEGOPS_SHORT_ROW_GEMM
// The kernels run on AVX-512 (16-lane registers), else on AVX2 with FMA (8-lane registers).
inline bool short_row_avx512() { return cpu_isa() == Isa::avx512; }
#endif

inline bool short_row_gemm_available(int64_t L) {
#ifdef SEGOPS_SHORT_ROW_GEMM
  return cpu_isa() >= Isa::avx2 && L >= 16 && L <= kShortRowMax;
#else
  (void)L;
  return false;
#endif
}

// Row stride of the L x L blocks that the kernels read as B or write as G: whole vectors.
inline int64_t short_row_stride(int64_t L) { return (L + 15) / 16 * 16; }

#ifdef SEGOPS_SHORT_ROW_GEMM
namespace detail {

constexpr int kShortRowBlock = 6;  // rows per register block (6 x 4 accumulators)

// A Gram product whose rows are one or two lanes longer than whole vectors (L = 49 = 3 x 16 + 1)
// would spend a whole vector of FMAs per channel on its last columns: those are computed apart,
// vectorised over the rows of G instead (about 8% faster at L = 49; the same for the row
// product, C = A B, measured no faster, so it keeps its masked last vector).
constexpr int64_t kMaxTailColumns = 2;

// The columns of an L-long Gram row computed apart, or 0.
inline int64_t tail_columns(int64_t L) {
  return L > 16 && L % 16 <= kMaxTailColumns ? L % 16 : 0;
}

// Lanes of the last vector of an L-long row.
__attribute__((target("avx512f"))) inline __mmask16 tail_mask(int64_t L) {
  const int64_t rem = L - (L - 1) / 16 * 16;  // 1..16
  return static_cast<__mmask16>((1u << rem) - 1u);
}

// C rows [0, RM) (+)= sum_k A(r, k) B[k, :] with A(r, k) = a[r * a_r + k * a_k], k < K; B rows
// are whole vectors (stride ldb, 64-aligned); the lanes of C past its row length (tail) are
// neither read nor written.
template <int RM, int NV>
__attribute__((target("avx512f"), always_inline)) inline void block(
    int64_t K, const float* a, int64_t a_r, int64_t a_k, const float* b, int64_t ldb, float* c,
    int64_t ldc, __mmask16 tail, bool accumulate) {
  __m512 acc[RM][NV];
  for (int r = 0; r < RM; ++r)
    for (int s = 0; s < NV; ++s) {
      const __mmask16 m = s + 1 < NV ? static_cast<__mmask16>(0xffff) : tail;
      acc[r][s] = accumulate ? _mm512_maskz_loadu_ps(m, c + r * ldc + 16 * s) : _mm512_setzero_ps();
    }
  for (int64_t k = 0; k < K; ++k) {
    __m512 bk[NV];
    for (int s = 0; s < NV; ++s) bk[s] = _mm512_load_ps(b + k * ldb + 16 * s);
    for (int r = 0; r < RM; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * a_r + k * a_k]);
      for (int s = 0; s < NV; ++s) acc[r][s] = _mm512_fmadd_ps(ar, bk[s], acc[r][s]);
    }
  }
  for (int r = 0; r < RM; ++r) {
    for (int s = 0; s + 1 < NV; ++s) _mm512_storeu_ps(c + r * ldc + 16 * s, acc[r][s]);
    _mm512_mask_storeu_ps(c + r * ldc + 16 * (NV - 1), tail, acc[r][NV - 1]);
  }
}

// C (M x 16 NV, the last vector masked by tail) (+)= A (M x K) B, A(m, k) = a[m * a_m + k * a_k].
template <int NV>
__attribute__((target("avx512f"))) void gemm_rows(int64_t M, int64_t K, const float* a,
                                                  int64_t a_m, int64_t a_k, const float* b,
                                                  int64_t ldb, float* c, int64_t ldc,
                                                  __mmask16 tail, bool accumulate = false) {
  constexpr int RB = kShortRowBlock;
  int64_t m = 0;
  for (; m + RB <= M; m += RB)
    block<RB, NV>(K, a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, tail, accumulate);
  for (; m < M; ++m)
    block<1, NV>(K, a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, tail, accumulate);
}

constexpr int64_t kGramTileK = 16;  // channels per packed tile of the Gram kernel

// The rows of the Gram products' operands lie one per channel, a page or more apart: a tile of
// channels is copied into contiguous aligned rows first (zero past L), so that the register
// blocks read a few pages instead of two per channel (the TLB misses halved the speed).
template <int NV>
__attribute__((target("avx512f"))) void gram_rows(int64_t K, int64_t L, const float* a,
                                                  int64_t lda, const float* b, int64_t ldb,
                                                  float* g, int64_t ldg, bool accumulate) {
  const __mmask16 tail = tail_mask(L);
  constexpr int64_t ld = 16 * NV;
  alignas(64) float ap[kGramTileK * ld], bp[kGramTileK * ld];
  // With tail columns, G's columns [16 (NV - 1), L) are summed over all tiles in tacc, a column
  // per row of it, vectorised over the rows of G (its x), and stored at the end.
  const int64_t tails = NV > 1 ? tail_columns(L) : 0;
  alignas(64) float tacc[kMaxTailColumns][ld];
  for (int64_t j = 0; j < tails; ++j) {
    std::fill(tacc[j], tacc[j] + ld, 0.f);
    if (accumulate)
      for (int64_t x = 0; x < L; ++x) tacc[j][x] = g[x * ldg + 16 * (NV - 1) + j];
  }
  // At least one tile, so that K == 0 still overwrites G with zeros.
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kGramTileK) {
    const int64_t kc = std::min(kGramTileK, K - k0);
    for (int64_t k = 0; k < kc; ++k) {
      for (int s = 0; s < NV; ++s) {
        const __mmask16 m = s + 1 < NV ? static_cast<__mmask16>(0xffff) : tail;
        _mm512_store_ps(bp + k * ld + 16 * s,
                        _mm512_maskz_loadu_ps(m, b + (k0 + k) * ldb + 16 * s));
        _mm512_store_ps(ap + k * ld + 16 * s,
                        _mm512_maskz_loadu_ps(m, a + (k0 + k) * lda + 16 * s));
      }
    }
    // G's rows are the columns x of the packed A tile: A(x, k) = ap[x + k * ld].
    const bool acc = accumulate || k0 > 0;
    if (tails == 0) {
      gemm_rows<NV>(L, kc, ap, 1, ld, bp, ld, g, ldg, tail, acc);
      continue;
    }
    if constexpr (NV > 1) {
      gemm_rows<NV - 1>(L, kc, ap, 1, ld, bp, ld, g, ldg, static_cast<__mmask16>(0xffff), acc);
      for (int64_t j = 0; j < tails; ++j) {
        const int64_t column = 16 * (NV - 1) + j;
        __m512 t[NV];
        for (int v = 0; v < NV; ++v) t[v] = _mm512_load_ps(tacc[j] + 16 * v);
        for (int64_t k = 0; k < kc; ++k) {
          const __m512 bk = _mm512_set1_ps(bp[k * ld + column]);
          for (int v = 0; v < NV; ++v)
            t[v] = _mm512_fmadd_ps(_mm512_load_ps(ap + k * ld + 16 * v), bk, t[v]);
        }
        for (int v = 0; v < NV; ++v) _mm512_store_ps(tacc[j] + 16 * v, t[v]);
      }
    }
  }
  for (int64_t j = 0; j < tails; ++j)
    for (int64_t x = 0; x < L; ++x) g[x * ldg + 16 * (NV - 1) + j] = tacc[j][x];
}

// f(std::integral_constant<int, NV>) with NV the number of 16-lane vectors of an L-long row.
template <typename F>
inline void with_vectors(int64_t L, F&& f) {
  switch ((L + 15) / 16) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// ---- AVX2 + FMA: the same products on 8-lane registers, in column chunks of 16. ----

// Lanes [0, n) of an 8-lane register (n in 1..8), as a maskload mask.
__attribute__((target("avx2"))) inline __m256i mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lanes [0, n) of v stored at p (n in 1..8). AVX2's masked store (vmaskmovps) costs tens of
// cycles on Zen 3, more than a block's FMAs over a short K: plain stores of 4, 2 and 1 lanes.
__attribute__((target("avx2"), always_inline)) inline void store_lanes8(float* p, __m256 v,
                                                                        int64_t n) {
  if (n == 8) return _mm256_storeu_ps(p, v);
  __m128 part = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(p, part);
    part = _mm256_extractf128_ps(v, 1);
    p += 4;
    n -= 4;
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
    part = _mm_movehl_ps(part, part);
    p += 2;
    n -= 2;
  }
  if (n == 1) _mm_store_ss(p, part);
}

// C rows [0, RM) x columns [0, n) (+)= sum_k A(r, k) B[k, :], n in (8 (NC - 1), 8 NC]; B rows
// are read as NC whole registers (zero or unused past n), A(r, k) = a[r * a_r + k * a_k].
template <int RM, int NC>
__attribute__((target("avx2,fma"), always_inline)) inline void block8(
    int64_t K, const float* a, int64_t a_r, int64_t a_k, const float* b, int64_t ldb, float* c,
    int64_t ldc, int64_t n, bool accumulate) {
  const int64_t tail = n - 8 * (NC - 1);  // lanes of the last register, 1..8
  const __m256i last = mask8(tail);
  __m256 acc[RM][NC];
  for (int r = 0; r < RM; ++r)
    for (int s = 0; s < NC; ++s) {
      const float* cp = c + r * ldc + 8 * s;
      acc[r][s] = !accumulate                ? _mm256_setzero_ps()
                  : s + 1 < NC || tail == 8  ? _mm256_loadu_ps(cp)
                                             : _mm256_maskload_ps(cp, last);
    }
  for (int64_t k = 0; k < K; ++k) {
    __m256 bk[NC];
    for (int s = 0; s < NC; ++s) bk[s] = _mm256_loadu_ps(b + k * ldb + 8 * s);
    for (int r = 0; r < RM; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * a_r + k * a_k);
      for (int s = 0; s < NC; ++s) acc[r][s] = _mm256_fmadd_ps(ar, bk[s], acc[r][s]);
    }
  }
  for (int r = 0; r < RM; ++r) {
    for (int s = 0; s + 1 < NC; ++s) _mm256_storeu_ps(c + r * ldc + 8 * s, acc[r][s]);
    store_lanes8(c + r * ldc + 8 * (NC - 1), acc[r][NC - 1], tail);
  }
}

// Rows [0, M) of one column chunk of n <= 8 NC columns, RB rows per block (12 accumulators).
template <int NC, int RB>
__attribute__((target("avx2,fma"))) void chunk8(int64_t M, int64_t K, const float* a,
                                                int64_t a_m, int64_t a_k, const float* b,
                                                int64_t ldb, float* c, int64_t ldc, int64_t n,
                                                bool accumulate) {
  int64_t m = 0;
  for (; m + RB <= M; m += RB)
    block8<RB, NC>(K, a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, n, accumulate);
  for (; m < M; ++m)
    block8<1, NC>(K, a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, n, accumulate);
}

// C (M x N) (+)= A (M x K) B, A(m, k) = a[m * a_m + k * a_k], B rows ldb apart and readable to
// a multiple of 8 past N. Column chunks of 16 (6 x 2 registers of accumulators), the last one
// up to 24 wide (4 x 3): a chunk of a few columns alone (L = 49 = 3 x 16 + 1) would load as
// much as it computes.
inline void gemm_rows8(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_m,
                       int64_t a_k, const float* b, int64_t ldb, float* c, int64_t ldc,
                       bool accumulate) {
  for (int64_t n0 = 0; n0 < N;) {
    const int64_t n = N - n0 <= 24 ? N - n0 : 16;
    if (n > 16) {
      chunk8<3, 4>(M, K, a, a_m, a_k, b + n0, ldb, c + n0, ldc, n, accumulate);
    } else if (n > 8) {
      chunk8<2, 6>(M, K, a, a_m, a_k, b + n0, ldb, c + n0, ldc, n, accumulate);
    } else {
      chunk8<1, 6>(M, K, a, a_m, a_k, b + n0, ldb, c + n0, ldc, n, accumulate);
    }
    n0 += n;
  }
}

// Rows [0, K) of src (L elements each, ld_src apart) into dst (ld_dst apart), zero from L to
// width (a multiple of 8).
__attribute__((target("avx2"))) inline void pack_rows8(int64_t K, int64_t L, int64_t width,
                                                       const float* src, int64_t ld_src,
                                                       float* dst, int64_t ld_dst) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t x = 0; x < width; x += 8) {
      const float* p = src + k * ld_src + x;
      const __m256 v = x + 8 <= L ? _mm256_loadu_ps(p)
                       : x < L    ? _mm256_maskload_ps(p, mask8(L - x))
                                  : _mm256_setzero_ps();
      _mm256_storeu_ps(dst + k * ld_dst + x, v);
    }
  }
}

constexpr int64_t kGramTileK8 = 32;  // channels per packed tile of gram_rows8 (16 and 64 no faster)
inline void gram_rows8(int64_t K, int64_t L, const float* a, int64_t lda, const float* b,
                       int64_t ldb, float* g, int64_t ldg, bool accumulate) {
  constexpr int64_t ld = kShortRowMax;
  alignas(64) float ap[kGramTileK8 * ld], bp[kGramTileK8 * ld];
  const int64_t width = short_row_stride(L);
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kGramTileK8) {
    const int64_t kc = std::min(kGramTileK8, K - k0);
    // The rows are a page or more apart, where the hardware prefetchers do not follow: the next
    // tile's rows are requested now and arrive while this tile's products run.
    for (int64_t k = k0 + kc; k < std::min(K, k0 + kc + kGramTileK8); ++k) {
      for (int64_t x = 0; x < L + 15; x += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(a + k * lda + std::min(x, L - 1)), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + k * ldb + std::min(x, L - 1)), _MM_HINT_T0);
      }
    }
    pack_rows8(kc, L, width, a + k0 * lda, lda, ap, ld);
    pack_rows8(kc, L, width, b + k0 * ldb, ldb, bp, ld);
    gemm_rows8(L, L, kc, ap, 1, ld, bp, ld, g, ldg, accumulate || k0 > 0);
  }
}

}  // namespace detail

// C[m, n] = sum_k A[m, k] B[k, n] for m < M, n < N, k < K, where A[m, k] = a[m * a_m + k * a_k]
// (any strides: its elements are broadcast one at a time), B[k, n] = b[k * ldb + n] with b
// 64-byte aligned and ldb = short_row_stride(N) (zero past N), and C rows start every ldc
// elements (N stored each; with accumulate, C += A B). N of any size, in chunks of four vectors.
// Needs short_row_gemm_available(16).
inline void strided_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_m,
                         int64_t a_k, const float* b, int64_t ldb, float* c, int64_t ldc,
                         bool accumulate = false) {
  if (!short_row_avx512()) {
    detail::gemm_rows8(M, N, K, a, a_m, a_k, b, ldb, c, ldc, accumulate);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += kShortRowMax) {
    const int64_t n = std::min(kShortRowMax, N - n0);
    detail::with_vectors(n, [&](auto nv) {
      detail::gemm_rows<decltype(nv)::value>(M, K, a, a_m, a_k, b + n0, ldb, c + n0, ldc,
                                             detail::tail_mask(n), accumulate);
    });
  }
}

// C[m, x] = sum_k A[m, k] B[k, x] for m < M and x, k < L, where A[m, k] = a[m * lda + k],
// B[k, x] = b[k * ldb + x] with b 64-byte aligned and ldb a multiple of 16 (the rows are read as
// whole vectors: short_row_stride(L) elements, past L too, whose values only reach lanes that
// are not stored), and C rows start every ldc elements (L elements stored each; with accumulate,
// C += A B). Needs short_row_gemm_available(L).
inline void short_row_gemm(int64_t M, int64_t L, const float* a, int64_t lda, const float* b,
                           int64_t ldb, float* c, int64_t ldc, bool accumulate = false) {
  strided_gemm(M, L, L, a, lda, 1, b, ldb, c, ldc, accumulate);
}

// G[x, j] = sum_k A[k, x] B[k, j] for x, j < L and k < K, where A[k, x] = a[k * lda + x] and
// B[k, j] = b[k * ldb + j]. G rows start every ldg elements (L elements stored each; with
// accumulate, G += A^T B). Needs short_row_gemm_available(L).
inline void short_row_gram(int64_t K, int64_t L, const float* a, int64_t lda, const float* b,
                           int64_t ldb, float* g, int64_t ldg, bool accumulate = false) {
  if (!short_row_avx512()) {
    detail::gram_rows8(K, L, a, lda, b, ldb, g, ldg, accumulate);
    return;
  }
  detail::with_vectors(L, [&](auto nv) {
    detail::gram_rows<decltype(nv)::value>(K, L, a, lda, b, ldb, g, ldg, accumulate);
  });
}

#else
// Never called: short_row_gemm_available is false without the x86 kernel.
inline void short_row_gemm(int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                           float*, int64_t, bool = false) {}
inline void short_row_gram(int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                           float*, int64_t, bool = false) {}
inline void strided_gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                         const float*, int64_t, float*, int64_t, bool = false) {}
#endif

}  // namespace cpu
}  // namespace segops
