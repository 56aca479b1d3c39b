// The one GEMM of the CPU kernels: row-major C = alpha op(A) op(B) + beta C on raw pointers.
//
// It calls the Fortran sgemm_/dgemm_ of the BLAS linked into libtorch_cpu (MKL or OpenBLAS)
// directly: on the small per-task blocks these kernels multiply (64..256 a side) that is up to
// twice as fast as at::addmm_/at::mm_out on from_blob views, which pay for tensor creation and
// dispatch on every call. The symbols are bound weakly; a libtorch without them takes the
// at::addmm_ route instead.
//
// fp32 on an AVX-512 CPU runs on oneDNN's AVX-512 microkernel instead (torch's
// at::native::cpublas::brgemm, also bound weakly), blocked and packed here: the MKL in the
// PyTorch wheels runs its AVX2 code on AMD CPUs, about half of the machine's fp32 rate on a Zen 5
// (sgemm 83-87 GFLOP/s a core, these blocks 180-195, oneDNN's own convolutions ~190).
#pragma once

#include "segops/cpu/isa.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

// C (M x N, rows ld_c apart) = A B (+ C with add_C), A (M x K) and B (K x N) row-major: torch's
// wrapper of oneDNN's brgemm microkernel (declared in ATen/native/CPUBlas.h since torch 2.5).
namespace at::native::cpublas {
TORCH_API void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
                      const bool add_C, const float* A, const float* B, float* C, bool is_vnni)
    __attribute__((weak));
}  // namespace at::native::cpublas

namespace segops {
namespace cpu {
namespace detail {

inline bool have_blas(float) { return sgemm_ != nullptr; }
inline bool have_blas(double) { return dgemm_ != nullptr; }

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                      int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// op(X) (rows x cols) as a tensor view of raw memory: X is stored row-major with leading
// dimension ld, as rows x cols, or as cols x rows when trans.
template <typename T>
at::Tensor op_view(const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  if (trans) return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, options).t();
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
}

// Inside a parallel task MKL must run single-threaded, or it starts nested threads.
struct SingleThreadedBlas {
  bool active = at::in_parallel_region() && MKL_Set_Num_Threads_Local != nullptr;
  int prev = active ? MKL_Set_Num_Threads_Local(1) : 0;
  ~SingleThreadedBlas() {
    if (active) MKL_Set_Num_Threads_Local(prev);
  }
};

// Blocks of the brgemm route: C is computed in (kBlockM x kBlockN) blocks from packed panels of
// op(B) (kBlockK x up to kPanelN, 512 KiB) and blocks of op(A) (128 KiB): both stay in a 1 MiB L2
// while a panel's blocks pass over them.
constexpr int64_t kBlockM = 64, kBlockN = 64, kBlockK = 512, kPanelN = 256;

inline bool use_brgemm() {
  static const bool use = at::native::cpublas::brgemm != nullptr && cpu_isa() == Isa::avx512;
  return use;
}

// dst[j * ldd + i] = alpha * src[i * lds + j] for i < rows, j < cols: a transposed copy, in
// tiles that keep both sides' lines in L1.
inline void transpose_copy(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                           int64_t ldd, float alpha) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ldd + i] = alpha * src[i * lds + j];
    }
  }
}

inline void brgemm_blocked(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                           const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                           float* C, int64_t ldc) {
  thread_local std::unique_ptr<float[]> bpanel(new float[kBlockK * kPanelN]);
  thread_local std::unique_ptr<float[]> ablock(new float[kBlockM * kBlockK]);
  if (beta != 0.f && beta != 1.f) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] *= beta;
  }
  for (int64_t p0 = 0; p0 < N; p0 += kPanelN) {
    const int64_t pn = std::min(kPanelN, N - p0);
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t kc = std::min(kBlockK, K - k0);
      // The panel as blocks of kBlockN columns, each kc x nc with rows nc apart; alpha folded in.
      for (int64_t n0 = 0; n0 < pn; n0 += kBlockN) {
        const int64_t nc = std::min(kBlockN, pn - n0);
        float* dst = bpanel.get() + n0 * kc;
        if (tb) {  // op(B)[k][n] = B[n][k]
          transpose_copy(B + (p0 + n0) * ldb + k0, ldb, nc, kc, dst, nc, alpha);
        } else {
          for (int64_t k = 0; k < kc; ++k) {
            const float* src = B + (k0 + k) * ldb + p0 + n0;
            for (int64_t n = 0; n < nc; ++n) dst[k * nc + n] = alpha * src[n];
          }
        }
      }
      const bool add = k0 > 0 || beta != 0.f;
      for (int64_t m0 = 0; m0 < M; m0 += kBlockM) {
        const int64_t mc = std::min(kBlockM, M - m0);
        const float* a = A + m0 * lda + k0;
        int64_t ld_a = lda;
        if (ta) {  // op(A) = A^T: its block transposed into rows kc apart
          transpose_copy(A + k0 * lda + m0, lda, kc, mc, ablock.get(), kc, 1.f);
          a = ablock.get();
          ld_a = kc;
        }
        for (int64_t n0 = 0; n0 < pn; n0 += kBlockN) {
          const int64_t nc = std::min(kBlockN, pn - n0);
          at::native::cpublas::brgemm(mc, nc, kc, ld_a, nc, ldc, add, a, bpanel.get() + n0 * kc,
                                      C + m0 * ldc + p0 + n0, false);
        }
      }
    }
  }
}

}  // namespace detail

// C (M x N, row stride ldc) = alpha * op(A) op(B) + beta * C, with op(A) M x K (A stored K x M
// when ta) and op(B) K x N (B stored N x K when tb); beta == 0 ignores what C held.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      T* c = C + m * ldc;
      for (int64_t n = 0; n < N; ++n) c[n] = beta == T(0) ? T(0) : beta * c[n];
    }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (detail::use_brgemm()) {
      detail::brgemm_blocked(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      return;
    }
  }
  if (!detail::have_blas(T(0))) {
    detail::op_view(C, M, N, ldc, false)
        .addmm_(detail::op_view(A, M, K, lda, ta), detail::op_view(B, K, N, ldb, tb), beta, alpha);
    return;
  }
  // A row-major X is the column-major X^T: compute C^T = op(B)^T op(A)^T in column-major.
  detail::SingleThreadedBlas single_threaded;
  detail::blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
                    static_cast<int>(K), alpha, B, static_cast<int>(ldb), A,
                    static_cast<int>(lda), beta, C, static_cast<int>(ldc));
}

}  // namespace cpu
}  // namespace segops
