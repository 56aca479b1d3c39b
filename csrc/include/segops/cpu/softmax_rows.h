// The per-element passes of the CPU kernels' softmaxes (and the one other exp that runs over a
// whole map, SDN's gaussian similarity), one row at a time. Every exp of the CPU kernels that
// runs over more than a handful of elements goes through these (csrc/cpu/softmax_rows.cpp).
//
// The float versions are compiled for AVX-512, AVX2 and baseline x86-64 (picked at load time)
// and use a polynomial exp the compiler vectorises (about 1 ulp); libm's expf is a scalar call
// per element. The double versions call std::exp.
#pragma once

#include <cstdint>

namespace segops {
namespace cpu {

// row[j] *= s; returns the new max_j row[j] (-inf for an empty row).
float scale_and_max(float* row, int64_t len, float s);
double scale_and_max(double* row, int64_t len, double s);

// row[j] = exp((row[j] * s - m) - l); returns the sum of the new row. Subtracting the row max m
// and the log-sum l one after the other keeps row - m exact where m + l would round.
float exp_affine(float* row, int64_t len, float s, float m, float l = 0.0f);
double exp_affine(double* row, int64_t len, double s, double m, double l = 0.0);

// row[j] = exp((row[j] - m[j]) - l[j]): exp_affine with a shift per element (softmaxes whose rows
// lie across memory, one statistic per lane).
void exp_shifted(float* row, int64_t len, const float* m, const float* l);
void exp_shifted(double* row, int64_t len, const double* m, const double* l);

// row[j] = exp(row[j] - m[j]) and acc[j] += row[j]: one pass of a softmax over rows that lie
// across memory, the sums left to the caller to divide by.
void exp_shifted_accumulate(float* row, int64_t len, const float* m, float* acc);
void exp_shifted_accumulate(double* row, int64_t len, const double* m, double* acc);

}  // namespace cpu
}  // namespace segops
