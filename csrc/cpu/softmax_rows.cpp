// Row passes of the CPU softmaxes (segops/cpu/softmax_rows.h).
#include "segops/cpu/softmax_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace segops {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEGOPS_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEGOPS_VEC_CLONES
#endif

// e^x for float: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial (Cephes' minimax
// coefficients), 2^n from the exponent bits; 0 below e^-87 (also for -inf).
inline float exp_poly(float x) {
  const bool underflow = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, two-part ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

// Reductions keep kLanes independent partial results: without -ffast-math the compiler may not
// reorder one running float sum or max, and would not vectorise it.
constexpr int64_t kLanes = 16;

}  // namespace

SEGOPS_VEC_CLONES float scale_and_max(float* row, int64_t len, float s) {
  float m[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) m[k] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      row[j + k] *= s;
      m[k] = m[k] > row[j + k] ? m[k] : row[j + k];
    }
  }
  for (; j < len; ++j) {
    row[j] *= s;
    m[0] = std::max(m[0], row[j]);
  }
  float r = m[0];
  for (int64_t k = 1; k < kLanes; ++k) r = std::max(r, m[k]);
  return r;
}

SEGOPS_VEC_CLONES float exp_affine(float* row, int64_t len, float s, float m, float l) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      row[j + k] = exp_poly((row[j + k] * s - m) - l);
      acc[k] += row[j + k];
    }
  }
  for (; j < len; ++j) {
    row[j] = exp_poly((row[j] * s - m) - l);
    acc[0] += row[j];
  }
  float sum = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) sum += acc[k];
  return sum;
}

SEGOPS_VEC_CLONES void exp_shifted(float* row, int64_t len, const float* m, const float* l) {
  for (int64_t j = 0; j < len; ++j) row[j] = exp_poly((row[j] - m[j]) - l[j]);
}

SEGOPS_VEC_CLONES void exp_shifted_accumulate(float* row, int64_t len, const float* m,
                                              float* acc) {
  for (int64_t j = 0; j < len; ++j) {
    row[j] = exp_poly(row[j] - m[j]);
    acc[j] += row[j];
  }
}

double scale_and_max(double* row, int64_t len, double s) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    row[j] *= s;
    m = std::max(m, row[j]);
  }
  return m;
}

double exp_affine(double* row, int64_t len, double s, double m, double l) {
  double sum = 0.0;
  for (int64_t j = 0; j < len; ++j) {
    row[j] = std::exp((row[j] * s - m) - l);
    sum += row[j];
  }
  return sum;
}

void exp_shifted(double* row, int64_t len, const double* m, const double* l) {
  for (int64_t j = 0; j < len; ++j) row[j] = std::exp((row[j] - m[j]) - l[j]);
}

void exp_shifted_accumulate(double* row, int64_t len, const double* m, double* acc) {
  for (int64_t j = 0; j < len; ++j) {
    row[j] = std::exp(row[j] - m[j]);
    acc[j] += row[j];
  }
}

}  // namespace cpu
}  // namespace segops
