// The one GEMM of the CPU kernels: row-major C = alpha op(A) op(B) + beta C on raw pointers.
//
// It calls the Fortran sgemm_/dgemm_ of the BLAS linked into libtorch_cpu (MKL or OpenBLAS)
// directly: on the small per-task blocks these kernels multiply (64..256 a side) that is up to
// twice as fast as at::addmm_/at::mm_out on from_blob views, which pay for tensor creation and
// dispatch on every call. The symbols are bound weakly; a libtorch without them takes the
// at::addmm_ route instead.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

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
