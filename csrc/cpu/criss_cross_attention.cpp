// Criss-cross attention (docs/operators.md §2.1), CPU forward and backward.
//
// Every position u = (y, x) attends to its row y and its column x (centre once) with one joint
// softmax. Both branches are small GEMMs, laid out so that none needs a copy of the inputs:
//   * a row of an NCHW tensor is a (C x W) matrix with leading dimension H*W, so the row branch
//     is GEMMs straight on the inputs and outputs, one per (n, y) and block of channels: on the
//     short-row kernels (segops/cpu/short_row_gemm.h) where they apply (fp32, 16 <= W <= 64,
//     AVX-512 or AVX2 + FMA), else BLAS (gemm_rm);
//   * the column x is strided in both directions, but the W columns of a map are W independent
//     products whose operands sit side by side in memory (x is the contiguous index). The
//     column branch therefore runs as "lane GEMMs": one product per column x, vectorised across
//     the columns, register-blocked like a GEMM microkernel (LaneKernel below); one to four
//     lanes past whole vectors run one lane at a time on strided_gemm (lane_one).
// The column probabilities are kept as (N, H, H, W) = [n][y][i][x] and the row ones as
// (N, H, W, W) = [n][y][x][j]: a few MiB at most, never the (N, H, W, H+W) attention of the
// reference, and the softmax passes over them run on whole vectors (per-lane statistics).
//
// Saved statistics (N, 2, H, W): the maximum energy m[u] and log l[u], l[u] = sum exp(e - m),
// so P = exp((e - m) - log l): the energies are recomputed bit-identically in the backward,
// and e - m stays exact where a single log-sum-exp would lose digits for large energies.
// Each pass is one parallel region of stages of tasks, handed out in order (parallel_stages).
// The maps with Cv channels are the bulk of the traffic (a core streams them at ~10 GB/s on the
// machines measured), so the Cv-channel products run per (n, block of channels) with both the
// row and the column part of a block while it is in L2, from probability blocks prepared once
// per pass, and the block is written to out (or dv) once, with streaming stores:
// Forward:  column energies (lane GEMM tasks); per (n, y): row energies, the joint statistics
//           over the row and the column, both probability blocks (the row one in the
//           short-row layout, the column one also packed for the lane kernel); per
//           (n, block of channels): out = column part + row part.
// Backward: column energies; column and row dP = <dout[:, u], value[:, j]> (tasks over chunks
//           of the channels, each reading its part of dout and value once, in tiles that
//           both products take while they are in L2); per (n, y): the probabilities, the
//           chunks' dP summed, D[u] = sum over the keys of P dP (which is
//           <dout[:, u], out[:, u]>), dS = P * (dP - D) of both branches, the row parts of
//           dq and dk, and the column probabilities packed; per (n, lane vector) the column
//           parts of dq and dk, and per (n, block of channels) dv = column part + row part.
#include "segops/cpu/gemm.h"
#include "segops/cpu/guards.h"
#include "segops/cpu/isa.h"
#include "segops/cpu/prefetch.h"
#include "segops/cpu/short_row_gemm.h"
#include "segops/cpu/softmax_rows.h"
#include "segops/cpu/stream_store.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

namespace segops {
namespace {

using cpu::gemm_rm;

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// A 64-byte aligned, uninitialised array (the packed operands of the kernels): the AVX-512 code
// loads them with aligned moves, while alignof of the vector types follows the baseline target.
template <typename T>
class AlignedArray {
 public:
  explicit AlignedArray(int64_t size) : raw_(new T[size + 64 / sizeof(T)]) {
    const auto base = reinterpret_cast<std::uintptr_t>(raw_.get());
    data_ = reinterpret_cast<T*>((base + 63) / 64 * 64);
  }
  T* data() const { return data_; }

 private:
  std::unique_ptr<T[]> raw_;
  T* data_;
};

// ---- Lane GEMMs: C[m, n] (+)= sum_k A[m, k] B[k, n], one product per lane x < L. ----

// Element (r, s) of sample b, lane x, sits at p[b * sample + r * row + s * col + x].
template <typename P>
struct LaneOperand {
  P p;
  int64_t sample, row, col;
};

template <typename T>
struct LaneGemm {
  int64_t M, N, K, L;
  LaneOperand<const T*> A, B;
  LaneOperand<T*> C;
  bool accumulate;  // false: C is overwritten
};

// K is walked in tiles so that the A and B tiles of a lane vector stay in L2 together: a short
// K whole (up to kTileK: the H of the column products), a long one (the channel reductions of
// the backward) in tiles of kTileK / 2 (at 2 x 512 x 49 x 49 on a 512 KiB L2, about 10% faster
// for the column dP than tiles of kTileK).
constexpr int64_t kTileK = 64;
inline int64_t k_tile(int64_t K) { return K <= kTileK ? std::max<int64_t>(K, 1) : kTileK / 2; }
constexpr int64_t kTaskM = 64;  // rows of C per task of a whole lane GEMM
constexpr int64_t kDpTile = 32;  // channels per step of a column dP task (backward_impl)

// One lane vector: 64 bytes (an AVX-512 register; two or four on narrower targets), or a plain
// scalar for maps narrower than a vector. The kernels compute in register-wide parts of it
// (RegVec): GCC lowers arithmetic on a vector wider than the target's registers through the
// stack.
template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename T>
using LaneVec = typename VecOf<T, 64>::type;
template <typename T, int Bytes>
using RegVec = typename VecOf<T, Bytes>::type;

// BM x BN lane vectors of accumulators per register block, each computed as sizeof(V) /
// sizeof(U) register vectors U (see lane_gemm_vec).
template <typename T, typename V, int BM = 1, int BN = 1, typename U = V>
struct LaneKernel {
  static constexpr int64_t kWidth = sizeof(V) / sizeof(T);
  static constexpr int kParts = sizeof(V) / sizeof(U);
  static constexpr int64_t kPartWidth = sizeof(U) / sizeof(T);

  // The (RM x RN) block of C at c (rows m, columns n) from the packed tiles ap[k * RM + r] and
  // bp[k * N + s], k < kc; only the lanes from `own` on are stored (the last vector of a row
  // overlaps the one before).
  template <int RM, int RN>
  __attribute__((always_inline)) static inline void block(const LaneGemm<T>& g, const V* ap,
                                                          const V* bp, int64_t kc, T* c,
                                                          int64_t own, bool accumulate) {
    // One register block per part: the k loop runs once per part, over its half (or quarter)
    // of every packed lane vector.
    constexpr int P = kParts;
    for (int p = 0; p < P; ++p) {
      U acc[RM][RN];
      for (int r = 0; r < RM; ++r)
        for (int s = 0; s < RN; ++s) acc[r][s] = U{};
      for (int64_t k = 0; k < kc; ++k) {
        const U* a = reinterpret_cast<const U*>(ap + k * RM) + p;
        const U* bk = reinterpret_cast<const U*>(bp + k * g.N) + p;
        U bv[RN];
        for (int s = 0; s < RN; ++s) bv[s] = bk[s * P];
        for (int r = 0; r < RM; ++r) {
          const U ar = a[r * P];
          for (int s = 0; s < RN; ++s) acc[r][s] += ar * bv[s];
        }
      }
      if (own <= p * kPartWidth) {  // the whole part is this vector's: straight from registers
        for (int r = 0; r < RM; ++r) {
          for (int s = 0; s < RN; ++s) {
            T* cp = c + r * g.C.row + s * g.C.col + p * kPartWidth;
            U out = acc[r][s];
            if (accumulate) {
              U old;
              std::memcpy(&old, cp, sizeof(U));
              out = old + out;
            }
            std::memcpy(cp, &out, sizeof(U));
          }
        }
      } else {
        for (int r = 0; r < RM; ++r)
          for (int s = 0; s < RN; ++s)
            store_owned(c + r * g.C.row + s * g.C.col + p * kPartWidth, acc[r][s],
                        own - p * kPartWidth, accumulate);
      }
    }
  }

  // Lanes [from, kPartWidth) of one part (the rest belong to the vector before).
  __attribute__((always_inline)) static inline void store_owned(T* cp, const U& v, int64_t from,
                                                                bool accumulate) {
    T lanes[kPartWidth];
    std::memcpy(lanes, &v, sizeof(U));
    for (int64_t l = from; l < kPartWidth; ++l) cp[l] = accumulate ? cp[l] + lanes[l] : lanes[l];
  }

  // Rows [m, m + RM) of C against all its columns, k in [k0, k0 + kc): packs the A rows, then
  // walks the packed B tile.
  template <int RM>
  __attribute__((always_inline)) static inline void rows(const LaneGemm<T>& g, int64_t b,
                                                         int64_t m, int64_t k0, int64_t kc,
                                                         int64_t x, int64_t own, bool accumulate,
                                                         const V* bpack, V* apack) {
    const T* a = g.A.p + b * g.A.sample + m * g.A.row + k0 * g.A.col + x;
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < RM; ++r)
        std::memcpy(&apack[k * RM + r], a + r * g.A.row + k * g.A.col, sizeof(V));
    T* c = g.C.p + b * g.C.sample + m * g.C.row + x;
    int64_t n = 0;
    for (; n + BN <= g.N; n += BN)
      block<RM, BN>(g, apack, bpack + n, kc, c + n * g.C.col, own, accumulate);
    for (; n < g.N; ++n) block<RM, 1>(g, apack, bpack + n, kc, c + n * g.C.col, own, accumulate);
  }

  // First lane of lane vector `index` and the first of its lanes that it owns: the last,
  // partial vector is shifted back to end at L, overlapping the one before.
  static void lane_start(const LaneGemm<T>& g, int64_t index, int64_t& x, int64_t& own) {
    x = index * kWidth;
    own = 0;
    if (x + kWidth > g.L) {
      own = x + kWidth - g.L;
      x = g.L - kWidth;
    }
  }

  // Rows [m0, m1) of C for the lane vectors [v0, v1). The operands are packed per K tile into
  // aligned vectors (BLAS-style), so the inner loop streams them from L1/L2 without split loads.
  // Lane vector by lane vector, so that its B tile (K x N vectors, up to a few hundred KiB)
  // stays in L2 while every block of rows of C passes over it. With `packed` (pack_b's layout
  // for this sample, 64-byte aligned), B is read from there instead: callers that split C into
  // many blocks pack it once.
  __attribute__((always_inline)) static inline void run(const LaneGemm<T>& g, int64_t b,
                                                        int64_t m0, int64_t m1, int64_t v0,
                                                        int64_t v1, const T* packed) {
    const int64_t tk = k_tile(g.K), tile = tk * g.N;
    AlignedArray<T> buffer(((packed ? 0 : tile) + kTileK * BM) * kWidth);
    V* apack = reinterpret_cast<V*>(buffer.data());
    V* bpack = apack + kTileK * BM;
    // At least one tile, so that K == 0 still overwrites C with zeros.
    for (int64_t k0 = 0; k0 == 0 || k0 < g.K; k0 += tk) {
      const int64_t kc = std::min(tk, g.K - k0);
      const bool accumulate = g.accumulate || k0 > 0;
      for (int64_t v = v0; v < v1; ++v) {
        const V* btile = bpack;
        if (packed) {
          btile = reinterpret_cast<const V*>(packed) + (v * g.K + k0) * g.N;
        } else {
          pack_b(g, b, v, k0, kc, bpack);
        }
        int64_t x, own_from;
        lane_start(g, v, x, own_from);
        for (int64_t m = m0; m < m1; m += BM) {
          if (m + BM <= m1) {
            rows<BM>(g, b, m, k0, kc, x, own_from, accumulate, btile, apack);
          } else {
            for (int64_t r = m; r < m1; ++r)
              rows<1>(g, b, r, k0, kc, x, own_from, accumulate, btile, apack);
          }
        }
      }
    }
  }

  // Rows [k0, k0 + kc) of B in sample b for lane vector `index`: dst[k * N + n] = B[k0 + k, n].
  static void pack_b(const LaneGemm<T>& g, int64_t b, int64_t index, int64_t k0, int64_t kc,
                     V* dst) {
    int64_t x, own;
    lane_start(g, index, x, own);
    const T* src = g.B.p + b * g.B.sample + k0 * g.B.row + x;
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t n = 0; n < g.N; ++n)
        std::memcpy(&dst[k * g.N + n], src + k * g.B.row + n * g.B.col, sizeof(V));
  }
};

// Lane GEMMs on whole lane vectors (64 bytes), with the register block of the instruction set:
// 4 x 6 lane vectors of accumulators fill 24 of AVX-512's 32 registers. On AVX2 a lane vector
// is computed as two 256-bit halves, one after the other, each a block of 4 x 3 registers
// (12 accumulators of 16; the best of 2 x 3, 3 x 2, 3 x 3, 3 x 4, 4 x 2 and 1 x 6 on a Zen 3);
// plain x86-64 takes 1 x 2 in 128-bit quarters.
#ifdef SEGOPS_CPU_X86
template <typename T>
__attribute__((target("avx512f"))) void lane_gemm_avx512(const LaneGemm<T>& g, int64_t b,
                                                         int64_t m0, int64_t m1, int64_t v0,
                                                         int64_t v1, const T* packed) {
  LaneKernel<T, LaneVec<T>, 4, 6>::run(g, b, m0, m1, v0, v1, packed);
}
template <typename T>
__attribute__((target("avx2,fma"))) void lane_gemm_avx2(const LaneGemm<T>& g, int64_t b,
                                                        int64_t m0, int64_t m1, int64_t v0,
                                                        int64_t v1, const T* packed) {
  LaneKernel<T, LaneVec<T>, 4, 3, RegVec<T, 32>>::run(g, b, m0, m1, v0, v1, packed);
}
#endif

template <typename T>
void lane_gemm_vec(const LaneGemm<T>& g, int64_t b, int64_t m0, int64_t m1, int64_t v0,
                   int64_t v1, const T* packed) {
#ifdef SEGOPS_CPU_X86
  const cpu::Isa isa = cpu::cpu_isa();
  if (isa == cpu::Isa::avx512) return lane_gemm_avx512(g, b, m0, m1, v0, v1, packed);
  if (isa == cpu::Isa::avx2) return lane_gemm_avx2(g, b, m0, m1, v0, v1, packed);
#endif
  LaneKernel<T, LaneVec<T>, 1, 2, RegVec<T, 16>>::run(g, b, m0, m1, v0, v1, packed);
}

// Runs task(stage, t) for every t < counts[stage] of every stage, in one parallel region:
// the tasks are handed out one at a time and in order, and those of a stage start once every
// task of the stages before it has finished. On a busy machine a thread that loses its core
// holds the others up by one task, not by a fixed share of the work, and a pass wakes its
// threads once, not once per stage.
template <typename F>
void parallel_stages(std::initializer_list<int64_t> counts, const F& task) {
  std::vector<int64_t> ends;  // ends[s]: one past the last task of stage s, counted overall
  for (const int64_t count : counts) ends.push_back((ends.empty() ? 0 : ends.back()) + count);
  const int64_t total = ends.back();
  // Tasks are taken in order, so all tasks below index i have finished when `finished` >= i:
  // a task of stage s only finishes after `finished` has reached the start of stage s.
  std::atomic<int64_t> next{0}, finished{0};
  std::atomic<bool> failed{false};
  at::parallel_for(0, std::min<int64_t>(total, at::get_num_threads()), 1, [&](int64_t,
                                                                             int64_t) {
    for (int64_t t = next++; t < total && !failed; t = next++) {
      const int64_t stage = std::upper_bound(ends.begin(), ends.end(), t) - ends.begin();
      const int64_t begin = stage == 0 ? 0 : ends[stage - 1];
      while (finished.load(std::memory_order_acquire) < begin && !failed) {
        std::this_thread::yield();
      }
      try {
        task(static_cast<int>(stage), t - begin);
      } catch (...) {
        failed = true;  // the other threads stop waiting for this task
        throw;
      }
      finished.fetch_add(1, std::memory_order_release);
    }
  });
}

// Lane vectors of a lane GEMM: whole vectors, or single lanes for maps narrower than one.
template <typename T>
int64_t lane_vectors(const LaneGemm<T>& g) {
  constexpr int64_t kVecWidth = LaneKernel<T, LaneVec<T>>::kWidth;
  return g.L < kVecWidth ? g.L : (g.L + kVecWidth - 1) / kVecWidth;
}

// A map a few lanes wider than whole vectors (W = 49 = 3 x 16 + 1) would pay a whole vector of
// lane-kernel work for its last lanes, overlapping the vector before. Up to kMaxLaneTail such
// lanes run one at a time instead, each as a plain GEMM vectorised along N (strided_gemm),
// about 1/16 of a vector's work plus a gather of its B and a scatter of its C.
constexpr int64_t kMaxLaneTail = 4;

// The lanes past the whole vectors that lane_gemm runs one at a time (0: none, the last
// vector overlaps the one before).
template <typename T>
int64_t lane_tail(const LaneGemm<T>& g) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t width = LaneKernel<T, LaneVec<T>>::kWidth;
    const int64_t tail = g.L % width;
    if (g.L > width && tail <= kMaxLaneTail && cpu::short_row_gemm_available(width)) return tail;
  }
  return 0;
}

// B of sample b at the single lane x in the short-row layout: dst[k * ld + n] = B_x[k, n],
// ld = short_row_stride(N), zero past N (K * ld elements, 64-byte aligned).
void gather_lane_b(const LaneGemm<float>& g, int64_t b, int64_t x, float* dst) {
  const int64_t ld = cpu::short_row_stride(g.N);
  const float* src = g.B.p + b * g.B.sample + x;
  for (int64_t k = 0; k < g.K; ++k) {
    float* row = dst + k * ld;
    for (int64_t n = 0; n < g.N; ++n) row[n] = src[k * g.B.row + n * g.B.col];
    std::fill(row + g.N, row + ld, 0.f);
  }
}

// Rows [m0, m1) of C in sample b for the single lane x: C_x = A_x B_x in row chunks, added to
// (or written into) C. B_x from `packed` (gather_lane_b's layout) when given, else gathered.
void lane_one(const LaneGemm<float>& g, int64_t b, int64_t m0, int64_t m1, int64_t x,
              const float* packed) {
  constexpr int64_t kChunk = 60;  // rows of C per chunk: whole register blocks of six
  const int64_t ld = cpu::short_row_stride(g.N);
  AlignedArray<float> bx(packed ? 0 : std::max<int64_t>(g.K, 1) * ld), cx(kChunk * ld);
  if (!packed) {
    gather_lane_b(g, b, x, bx.data());
    packed = bx.data();
  }
  for (int64_t m = m0; m < m1; m += kChunk) {
    const int64_t rows = std::min(kChunk, m1 - m);
    cpu::strided_gemm(rows, g.N, g.K, g.A.p + b * g.A.sample + m * g.A.row + x, g.A.row,
                      g.A.col, packed, ld, cx.data(), ld);
    for (int64_t r = 0; r < rows; ++r) {
      float* c = g.C.p + b * g.C.sample + (m + r) * g.C.row + x;
      const float* src = cx.data() + r * ld;
      for (int64_t n = 0; n < g.N; ++n) {
        c[n * g.C.col] = g.accumulate ? c[n * g.C.col] + src[n] : src[n];
      }
    }
  }
}

// Where the lanes past the whole vectors of a packed sample start: whole vectors of K x N lane
// vectors each, then K * short_row_stride(N) elements per tail lane (gather_lane_b).
template <typename T>
int64_t lane_tail_offset(const LaneGemm<T>& g) {
  constexpr int64_t width = LaneKernel<T, LaneVec<T>>::kWidth;
  return g.L / width * g.K * g.N * width;
}

// Rows [m0, m1) of C in sample b, for the lane vectors [v0, v1); B from `packed` (the sample's
// B packed by pack_lane_b_line) when given.
template <typename T>
void lane_gemm(const LaneGemm<T>& g, int64_t b, int64_t m0, int64_t m1, int64_t v0, int64_t v1,
               const T* packed = nullptr) {
  constexpr int64_t width = LaneKernel<T, LaneVec<T>>::kWidth;
  if (g.L < width) {
    LaneKernel<T, T, 4, 6>::run(g, b, m0, m1, v0, v1, packed);
    return;
  }
  const int64_t whole = g.L / width;  // with a lane tail, vector `whole` is the tail's lanes
  if constexpr (std::is_same_v<T, float>) {
    if (lane_tail(g) > 0 && v1 > whole) {
      if (v0 < whole) lane_gemm_vec(g, b, m0, m1, v0, whole, packed);
      const int64_t ld = cpu::short_row_stride(g.N);
      for (int64_t x = whole * width; x < g.L; ++x) {
        const float* bx = packed ? packed + lane_tail_offset(g) + (x - whole * width) * g.K * ld
                                 : nullptr;
        lane_one(g, b, m0, m1, x, bx);
      }
      return;
    }
  }
  lane_gemm_vec(g, b, m0, m1, v0, v1, packed);
}

// Elements of one sample's B packed for lane_gemm: K x N lane vectors per lane vector, or per
// tail lane its gather_lane_b layout.
template <typename T>
int64_t lane_packed_size(const LaneGemm<T>& g) {
  if (const int64_t tail = lane_tail(g); tail > 0)
    return lane_tail_offset(g) + tail * g.K * cpu::short_row_stride(g.N);
  const int64_t width = g.L < LaneKernel<T, LaneVec<T>>::kWidth
                            ? 1 : LaneKernel<T, LaneVec<T>>::kWidth;
  return lane_vectors(g) * g.K * g.N * width;
}

// One line of sample b's B into dst (the sample's packed buffer, 64-byte aligned, in the layout
// of lane_packed_size): row `index` (k) with `row`, else column `index` (n), for every lane
// vector and tail lane. The task that computes a line of the probabilities packs it while it is
// in cache, so that no pass of its own (and no wait for every task before it) packs all of B.
template <typename T>
void pack_lane_b_line(const LaneGemm<T>& g, int64_t b, bool row, int64_t index, T* dst) {
  constexpr int64_t width = LaneKernel<T, LaneVec<T>>::kWidth;
  const int64_t k0 = row ? index : 0, k1 = row ? index + 1 : g.K;
  const int64_t n0 = row ? 0 : index, n1 = row ? g.N : index + 1;
  const T* src = g.B.p + b * g.B.sample;
  if (g.L < width) {  // one element per lane (pack_b on scalar lanes)
    for (int64_t x = 0; x < g.L; ++x)
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t n = n0; n < n1; ++n)
          dst[(x * g.K + k) * g.N + n] = src[k * g.B.row + n * g.B.col + x];
    return;
  }
  using V = LaneVec<T>;
  const int64_t tail = lane_tail(g), vectors = tail > 0 ? g.L / width : lane_vectors(g);
  for (int64_t v = 0; v < vectors; ++v) {
    int64_t x, own;
    LaneKernel<T, V>::lane_start(g, v, x, own);
    V* out = reinterpret_cast<V*>(dst) + v * g.K * g.N;
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t n = n0; n < n1; ++n)
        std::memcpy(&out[k * g.N + n], src + k * g.B.row + n * g.B.col + x, sizeof(V));
  }
  if constexpr (std::is_same_v<T, float>) {
    const int64_t ld = cpu::short_row_stride(g.N);
    for (int64_t l = 0; l < tail; ++l) {  // gather_lane_b's layout, zero past N
      const int64_t x = vectors * width + l;
      T* out = dst + lane_tail_offset(g) + l * g.K * ld;
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t n = n0; n < n1; ++n) out[k * ld + n] = src[k * g.B.row + n * g.B.col + x];
        if (row || index == 0) std::fill(out + k * ld + g.N, out + (k + 1) * ld, T(0));
      }
    }
  }
}

// A whole lane GEMM over `batch` samples as tasks (sample, lane vector, block of rows of C).
template <typename T>
struct LaneTasks {
  LaneGemm<T> g;
  int64_t batch;

  int64_t row_blocks() const { return (g.M + kTaskM - 1) / kTaskM; }
  int64_t count() const { return g.N == 0 ? 0 : batch * lane_vectors(g) * row_blocks(); }
  void run(int64_t t) const {
    const int64_t blocks = row_blocks(), vectors = lane_vectors(g);
    const int64_t block = t % blocks;
    const int64_t v = t / blocks % vectors;
    lane_gemm(g, t / (blocks * vectors), block * g.M / blocks, (block + 1) * g.M / blocks, v,
              v + 1);
  }
};

// The row products with a W x W block (probabilities or dS) take the block prepared once in the
// layout that both their kernels read: B[k][x] at b[k * ld + x], ld = short_row_stride(W), zero
// past W, 64-byte aligned. B = P, or P^T when trans (P[r][s] at p[r * ldp + s]).
template <typename T>
void prepare_block(int64_t W, const T* p, int64_t ldp, bool trans, T* b) {
  const int64_t ld = cpu::short_row_stride(W);
  for (int64_t k = 0; k < W; ++k) {
    T* row = b + k * ld;
    if (trans) {
      for (int64_t x = 0; x < W; ++x) row[x] = p[x * ldp + k];
    } else {
      std::memcpy(row, p + k * ldp, W * sizeof(T));
    }
    std::fill(row + W, row + ld, T(0));
  }
}

// C (M x W, rows ldc apart) = A (M x W, rows lda apart) B, or C += A B with accumulate; B from
// prepare_block. On the short-row kernel where it applies (fp32, 16 <= W <= 64, AVX-512 or
// AVX2 + FMA), else on BLAS.
template <typename T>
void times_block(int64_t M, int64_t W, const T* a, int64_t lda, const T* b, T* c, int64_t ldc,
                 bool accumulate = false) {
  const int64_t ld = cpu::short_row_stride(W);
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::short_row_gemm_available(W)) {
      cpu::short_row_gemm(M, W, a, lda, b, ld, c, ldc, accumulate);
      return;
    }
  }
  gemm_rm<T>(false, false, M, W, W, T(1), a, lda, b, ld, accumulate ? T(1) : T(0), c, ldc);
}

// G (W x W, rows ldg apart) = A^T B over K channels, A and B lines of two maps (element (c, x)
// at a[c * ld + x]), or G += A^T B with accumulate: the short-row Gram kernel where it
// applies, else BLAS.
template <typename T>
void line_gram(int64_t K, int64_t W, const T* a, const T* b, int64_t ld, T* g, int64_t ldg,
               bool accumulate = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::short_row_gemm_available(W)) {
      cpu::short_row_gram(K, W, a, ld, b, ld, g, ldg, accumulate);
      return;
    }
  }
  gemm_rm<T>(true, false, W, W, K, T(1), a, ld, b, ld, accumulate ? T(1) : T(0), g, ldg);
}

template <typename T>
struct Dims {
  int64_t N, Ck, Cv, H, W, HW;
  int64_t col_block() const { return H * H * W; }  // column probabilities of one sample
};

// pcol[n][y][i][x] = <q[n, :, y, x], k[n, :, i, x]> for all n, y, i, x (the diagonal is masked
// later, per row task).
template <typename T>
LaneTasks<T> col_energies(const Dims<T>& d, const T* q, const T* k, T* pcol) {
  const int64_t s = d.Ck * d.HW;
  return {{d.H, d.H, d.Ck, d.W, {q, s, d.W, d.HW}, {k, s, d.HW, d.W},
           {pcol, d.col_block(), d.H * d.W, d.W}, false},
          d.N};
}

// Row task (n, y) of both passes: the row probabilities prow (W x W, [x][j]) from the row
// energies, and the column ones pc = pcol[n][y] (H x W, [i][x]) from the column energies there.
// With finish_stats (forward) the joint statistics are computed and stored in sm (m) and sl
// (log l), each a W-long row of the stats, and P = exp(e - m) / l: one exp per energy, its sum
// taken on the way. Otherwise (backward) they are read from there and P = exp((e - m) - log l).
// The two differ by an ulp or two, as any two roundings of P do.
template <typename T>
void row_task_probabilities(const Dims<T>& d, const T* q, const T* k, int64_t n, int64_t y,
                            T* prow, T* pc, T* sm, T* sl, bool finish_stats, T* scratch) {
  const int64_t H = d.H, W = d.W, off = n * d.Ck * d.HW + y * W;
  line_gram(d.Ck, W, q + off, k + off, d.HW, prow, W);
  std::fill(pc + y * W, pc + (y + 1) * W, neg_inf<T>());  // the centre is in the row part
  if (!finish_stats) {
    for (int64_t x = 0; x < W; ++x) cpu::exp_affine(prow + x * W, W, T(1), sm[x], sl[x]);
    for (int64_t i = 0; i < H; ++i) cpu::exp_shifted(pc + i * W, W, sm, sl);
    return;
  }
  // m[x]: the largest energy of position x, over its row (which holds the centre, so m is
  // finite) and its column.
  for (int64_t x = 0; x < W; ++x) sm[x] = cpu::scale_and_max(prow + x * W, W, T(1));
  for (int64_t i = 0; i < H; ++i) {
    const T* e = pc + i * W;
    for (int64_t x = 0; x < W; ++x) sm[x] = sm[x] < e[x] ? e[x] : sm[x];
  }
  T* l = scratch;
  for (int64_t x = 0; x < W; ++x) l[x] = cpu::exp_affine(prow + x * W, W, T(1), sm[x]);
  for (int64_t i = 0; i < H; ++i) cpu::exp_shifted_accumulate(pc + i * W, W, sm, l);
  T* inv = l;
  for (int64_t x = 0; x < W; ++x) {
    sl[x] = std::log(l[x]);
    inv[x] = T(1) / l[x];
    T* p = prow + x * W;
    for (int64_t j = 0; j < W; ++j) p[j] *= inv[x];
  }
  for (int64_t i = 0; i < H; ++i) {
    T* p = pc + i * W;
    for (int64_t x = 0; x < W; ++x) p[x] *= inv[x];
  }
}

// The channels of a sample split into blocks for the tasks that run the column parts: a block
// of the map that a task reads and of the one it writes stay in L2 while its row and column
// products pass over them, and there are a few tasks per thread.
struct ChannelBlocks {
  int64_t size, count;
  ChannelBlocks(int64_t channels, int64_t batch, int64_t bytes_per_channel) {
    constexpr int64_t kBudget = 512 * 1024;  // of L2, 1-2 MiB per core on current x86 servers
    const int64_t tasks = 4 * at::get_num_threads();
    int64_t s = std::min(kBudget / std::max<int64_t>(bytes_per_channel, 1),
                         (channels * batch + tasks - 1) / tasks);
    if (s >= 12) s = s / 12 * 12;  // whole register blocks of both kernels (6 and 4 rows)
    size = std::max<int64_t>(1, s);
    count = channels == 0 ? 0 : (channels + size - 1) / size;
  }
  int64_t begin(int64_t block) const { return block * size; }
  int64_t end(int64_t block, int64_t channels) const {
    return std::min(channels, (block + 1) * size);
  }
};

// A buffer of this thread's, at least `size` elements, kept from call to call: a new one of a
// few hundred KiB for every task would be fresh pages, a page fault each, where glibc hands
// back memory it has returned to the system.
template <typename T>
T* thread_buffer(int64_t size) {
  thread_local std::unique_ptr<AlignedArray<T>> buffer;
  thread_local int64_t capacity = 0;
  if (size > capacity) {
    buffer = std::make_unique<AlignedArray<T>>(size);
    capacity = size;
  }
  return buffer->data();
}

// Channel blocks up to this size are computed in a thread buffer (thread_buffer) and streamed
// to the output; larger ones (single channels of large maps) are computed in place.
constexpr int64_t kMaxBufferedBlock = 1 << 20;  // bytes

// Rows [c0, c1) (channels) of the map c of one sample: the column part of `column` (sample n,
// B packed in `packed`; it overwrites C), then the row part A[c, y, :] B_y for every row y (B_y
// the prepared block y of the sample, rb elements apart) added while the block is in cache.
// In this order the block arrives from memory in the lane kernel, which walks each channel's
// map in address order (streams the hardware prefetchers follow); the row part, whose rows are
// a page apart, then finds it in cache (about 15% faster for the pair at 512 x 49 x 49).
// Both parts run on a cached buffer of the block, copied to c with streaming stores at the end:
// c's lines are then written without being read from memory first (about 7% of the whole
// forward and backward at 2 x 64 x 512 x 49 x 49 on two cores of a Zen 3).
template <typename T>
void channel_block_products(const Dims<T>& d, int64_t n, int64_t c0, int64_t c1, const T* a,
                            T* c, const T* row_blocks, const LaneGemm<T>& column,
                            const T* packed) {
  const int64_t H = d.H, W = d.W, HW = d.HW, rb = W * cpu::short_row_stride(W);
  const int64_t count = (c1 - c0) * HW, bytes = count * static_cast<int64_t>(sizeof(T));
  // The lane kernel walks each map a lane vector at a time, strided by its width: ask for the
  // block's lines in address order first, so that their misses overlap.
  cpu::prefetch_range<0, 2>(a + c0 * HW, count);
  const bool buffered = bytes <= kMaxBufferedBlock;
  // Element (c, y, x) of the block at block[(c - c0) HW + y W + x].
  T* block = buffered ? thread_buffer<T>(count) : c + c0 * HW;
  LaneGemm<T> g = column;
  g.C = {block - c0 * HW, 0, column.C.row, column.C.col};  // sample n of C is the block
  lane_gemm(g, n, c0, c1, 0, lane_vectors(column), packed);
  for (int64_t y = 0; y < H; ++y) {
    times_block(c1 - c0, W, a + c0 * HW + y * W, HW, row_blocks + y * rb, block + y * W, HW,
                true);
  }
  if (buffered) cpu::stream_copy(c + c0 * HW, block, bytes);
}

template <typename T>
void forward_impl(const Dims<T>& d, const T* q, const T* k, const T* v, T* out, T* st) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Cv = d.Cv, sv = Cv * HW;
  const int64_t rb = W * cpu::short_row_stride(W);  // one prepared row block
  AlignedArray<T> pcol(d.N * d.col_block()), prow(d.N * H * rb);
  const LaneTasks<T> energies = col_energies(d, q, k, pcol.data());
  // out[c, y, x] = sum_j v[c, y, j] P[y, x, j] + sum_i v[c, i, x] P[y, i, x]
  const LaneGemm<T> column{Cv, H, H, W, {v, sv, HW, W}, {pcol.data(), d.col_block(), W, H * W},
                           {out, sv, HW, W}, false};
  const int64_t packed_size = lane_packed_size(column);
  AlignedArray<T> packed(d.N * packed_size);
  const ChannelBlocks blocks(Cv, d.N, 2 * HW * static_cast<int64_t>(sizeof(T)));
  // Stages: column energies; per (n, y) the statistics and both probability blocks (the column
  // one also packed for the lane kernel: it is column y of the lane GEMM's B); per (n, block of
  // channels) both parts of out.
  parallel_stages({energies.count(), d.N * H, d.N * blocks.count}, [&](int stage, int64_t t) {
    if (stage == 0) {
      energies.run(t);
    } else if (stage == 1) {
      const int64_t n = t / H, y = t % H;
      std::vector<T> p(W * W), scratch(W);
      T* sm = st + 2 * n * HW + y * W;
      row_task_probabilities(d, q, k, n, y, p.data(),
                             pcol.data() + n * d.col_block() + y * H * W, sm, sm + HW, true,
                             scratch.data());
      pack_lane_b_line(column, n, false, y, packed.data() + n * packed_size);
      prepare_block(W, p.data(), W, true, prow.data() + t * rb);
    } else {
      const int64_t n = t / blocks.count, b = t % blocks.count;
      channel_block_products(d, n, blocks.begin(b), blocks.end(b, Cv), v + n * sv, out + n * sv,
                             prow.data() + n * H * rb, column, packed.data() + n * packed_size);
    }
  });
}

template <typename T>
void backward_impl(const Dims<T>& d, const T* go, const T* q, const T* k, const T* v,
                   const T* st, T* dq, T* dk, T* dv) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Ck = d.Ck, Cv = d.Cv, N = d.N;
  const int64_t sk = Ck * HW, sv = Cv * HW, cb = d.col_block(), HWc = H * W;
  const int64_t ld = cpu::short_row_stride(W), rb = W * ld;
  // The column dP[y, i, x] = sum_c go[c, y, x] v[c, i, x] and the row dP[y, x, j] =
  // sum_c go[c, y, x] v[c, y, j] run as tasks over chunks of the channels (each reads its part
  // of go and value once, for all lanes), into one partial sum per chunk that the row tasks add
  // up. Two tasks per thread, so that a thread that loses its core for a while holds the stage
  // up by half its share.
  const int64_t chunks = std::max<int64_t>(
      1, std::min((2 * at::get_num_threads() + N - 1) / N, Cv / 64));
  // The row dP is summed per chunk too, as W x W blocks [n][y][x][j] with rows ld apart, a row
  // block (rb) apart: chunk 0's in prow, where the row task (n, y) adds the other chunks'
  // (in dsrow) and turns the sum into dS before it writes its probabilities there.
  AlignedArray<T> pcol(N * cb), dscol(chunks * N * cb), prow(N * H * rb);
  AlignedArray<T> dsrow((chunks - 1) * N * H * rb);
  T* pc = pcol.data();
  T* dsc = dscol.data();
  auto row_partial = [&](int64_t j, int64_t t) {  // chunk j's row dP block of t = n * H + y
    return (j == 0 ? prow.data() : dsrow.data() + (j - 1) * N * H * rb) + t * rb;
  };
  const LaneTasks<T> energies = col_energies(d, q, k, pc);
  const LaneGemm<T> dp_col{H, H, Cv, W, {go, sv, W, HW}, {v, sv, HW, W}, {dsc, cb, HWc, W},
                           false};
  const int64_t vectors = lane_vectors(dp_col);
  auto dp_col_task = [&](int64_t t) {
    const int64_t n = t / chunks, j = t % chunks;
    const int64_t c0 = j * Cv / chunks, c1 = (j + 1) * Cv / chunks;
    LaneGemm<T> g = dp_col;
    g.C.p += j * N * cb;
    // Tiles of kDpTile channels: the column dP of a tile (its lane GEMM reads the two maps in
    // address order), then its row dP of every row y while the tile is still in L2 (read in
    // place, rows a page apart, it ran at about half the speed).
    for (int64_t t0 = c0; t0 == c0 || t0 < c1; t0 += kDpTile) {
      const int64_t t1 = std::min(c1, t0 + kDpTile);
      g.K = t1 - t0;
      g.A.p = go + t0 * HW;
      g.B.p = v + t0 * HW;
      g.accumulate = t0 > c0;
      const int64_t tile = n * sv + t0 * HW;  // the tile in both maps
      cpu::prefetch_range<0, 2>(go + tile, (t1 - t0) * HW);
      cpu::prefetch_range<0, 2>(v + tile, (t1 - t0) * HW);
      lane_gemm(g, n, 0, H, 0, vectors);
      for (int64_t y = 0; y < H; ++y) {
        line_gram(t1 - t0, W, go + tile + y * W, v + tile + y * W, HW, row_partial(j, n * H + y),
                  ld, t0 > c0);
      }
    }
  };
  // Column parts (per lane x): dq and dk (few channels, one task per sample and lane vector
  // each, the largest tasks of the stage and so handed out first), added to their row parts;
  // dv per block of channels, its B operand packed by the row tasks (written first, the row
  // part added):
  // dv[c, i] = sum_y go[c, y] P[y, i];  dq[c, y] += sum_i k[c, i] dS[y, i];
  // dk[c, i] += sum_y q[c, y] dS[y, i]
  const LaneGemm<T> dv_col{Cv, H, H, W, {go, sv, HW, W}, {pc, cb, HWc, W}, {dv, sv, HW, W},
                           false};
  const LaneGemm<T> dqk_col[2] = {
      {Ck, H, H, W, {k, sk, HW, W}, {dsc, cb, W, HWc}, {dq, sk, HW, W}, true},
      {Ck, H, H, W, {q, sk, HW, W}, {dsc, cb, HWc, W}, {dk, sk, HW, W}, true}};
  const int64_t packed_size = lane_packed_size(dv_col);
  AlignedArray<T> packed(N * packed_size);
  // Row tasks: both probability blocks (the column one also packed for dv's lane GEMM: it is
  // row y of its B), row dP, D, dS = P * (dP - D) of both, and the row parts of dq and dk
  // (written, not added).
  auto row_task = [&](int64_t t) {
    const int64_t n = t / H, y = t % H, ko = n * sk + y * W;
    T* sm = const_cast<T*>(st) + 2 * n * HW + y * W;  // only read: finish_stats is false
    std::vector<T> p(W * W);
    AlignedArray<T> block(rb);
    T* pcy = pc + t * HWc;  // t = n * H + y
    T* dscy = dsc + t * HWc;
    row_task_probabilities(d, q, k, n, y, p.data(), pcy, sm, sm + HW, false,
                           static_cast<T*>(nullptr));
    pack_lane_b_line(dv_col, n, true, y, packed.data() + n * packed_size);
    for (int64_t j = 1; j < chunks; ++j) {
      const T* part = dscy + j * N * cb;
      for (int64_t i = 0; i < HWc; ++i) dscy[i] += part[i];
    }
    // dP[x, j] = sum_c go[c, x] v[c, j], summed over the chunks
    T* ds = row_partial(0, t);
    for (int64_t j = 1; j < chunks; ++j) {
      const T* part = row_partial(j, t);
      for (int64_t x = 0; x < W; ++x)
        for (int64_t i = 0; i < W; ++i) ds[x * ld + i] += part[x * ld + i];
    }
    // D[x] = sum over the keys of P dP, which is <dout[:, u], out[:, u]> without reading out.
    std::vector<T> D(W, T(0));
    for (int64_t x = 0; x < W; ++x) {
      for (int64_t j = 0; j < W; ++j) D[x] += p[x * W + j] * ds[x * ld + j];
    }
    for (int64_t i = 0; i < HWc; i += W) {
      for (int64_t x = 0; x < W; ++x) D[x] += pcy[i + x] * dscy[i + x];
    }
    for (int64_t x = 0; x < W; ++x) {
      for (int64_t j = 0; j < W; ++j) ds[x * ld + j] = p[x * W + j] * (ds[x * ld + j] - D[x]);
    }
    for (int64_t i = 0; i < HWc; i += W) {
      for (int64_t x = 0; x < W; ++x) dscy[i + x] = pcy[i + x] * (dscy[i + x] - D[x]);
    }
    // dq[c, x] = sum_j k[c, j] dS[x, j];  dk[c, j] = sum_x q[c, x] dS[x, j]; then the P block,
    // over dS, prepared for the row part of dv (in the column tasks, with its column part).
    prepare_block(W, ds, ld, true, block.data());
    times_block(Ck, W, k + ko, HW, block.data(), dq + ko, HW);
    prepare_block(W, ds, ld, false, block.data());
    times_block(Ck, W, q + ko, HW, block.data(), dk + ko, HW);
    prepare_block(W, p.data(), W, false, prow.data() + t * rb);
  };
  const ChannelBlocks blocks(Cv, N, 2 * HW * static_cast<int64_t>(sizeof(T)));
  const int64_t value_tasks = N * blocks.count, key_tasks = Ck == 0 ? 0 : 2 * N * vectors;
  parallel_stages({N * chunks + energies.count(), N * H, key_tasks + value_tasks},
                  [&](int stage, int64_t t) {
    if (stage == 0) {
      if (t < N * chunks) {
        dp_col_task(t);
      } else {
        energies.run(t - N * chunks);
      }
    } else if (stage == 1) {
      row_task(t);
    } else if (t < key_tasks) {
      const int64_t v = t % vectors, n = t / vectors % N;
      lane_gemm(dqk_col[t / (N * vectors)], n, 0, Ck, v, v + 1);
    } else {
      t -= key_tasks;
      const int64_t n = t / blocks.count, b = t % blocks.count;
      // dv[c, j] = sum_x go[c, x] P[x, j] + column part
      channel_block_products(d, n, blocks.begin(b), blocks.end(b, Cv), go + n * sv, dv + n * sv,
                             prow.data() + n * H * rb, dv_col, packed.data() + n * packed_size);
    }
  });
}

// query, key (N, Ck, H, W) and value (N, Cv, H, W).
void check_inputs(const char* kernel, const at::Tensor& query, const at::Tensor& key,
                  const at::Tensor& value) {
  cpu::check_operands(kernel, 4, {{"query", &query}, {"key", &key}, {"value", &value}});
  guards::check_sizes(kernel, "key", key, query.sizes());
  guards::check_sizes(kernel, "value", value,
                      {query.size(0), value.size(1), query.size(2), query.size(3)});
}

std::tuple<at::Tensor, at::Tensor> cca_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value) {
  check_inputs("criss_cross_attention_forward (cpu)", query, key, value);
  cpu::cpu_isa();  // a bad SEGOPS_CPU_ISA fails here, before any thread starts
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  at::Tensor out = at::empty({N, Cv, H, W}, value.options());
  at::Tensor lse = at::empty({N, 2, H, W}, query.options());
  if (lse.numel() == 0) return {out, lse};  // no positions (then out is empty too)
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "criss_cross_attention_forward", [&] {
    Dims<scalar_t> d{N, Ck, Cv, H, W, H * W};
    forward_impl<scalar_t>(d, query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                           value.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                           lse.mutable_data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& stats) {
  const char* kernel = "criss_cross_attention_backward (cpu)";
  check_inputs(kernel, query, key, value);
  cpu::cpu_isa();  // a bad SEGOPS_CPU_ISA fails here, before any thread starts
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  guards::check_like(kernel, query, {{"grad_out", &grad_out}, {"out", &out}, {"stats", &stats}});
  guards::check_sizes(kernel, "grad_out", grad_out, value.sizes());
  guards::check_sizes(kernel, "out", out, value.sizes());
  guards::check_sizes(kernel, "stats", stats, {N, 2, H, W});
  at::Tensor dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  if (stats.numel() == 0 || Cv == 0) {  // dP = 0, so dS = 0 (and dv is empty)
    dq.zero_();
    dk.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "criss_cross_attention_backward", [&] {
    Dims<scalar_t> d{N, Ck, Cv, H, W, H * W};
    backward_impl<scalar_t>(d, grad_out.const_data_ptr<scalar_t>(),
                            query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                            value.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(),
                            dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                            dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("criss_cross_attention_forward", &segops::cca_forward_cpu);
  m.impl("criss_cross_attention_backward", &segops::cca_backward_cpu);
}
