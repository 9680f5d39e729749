// Vector primitives of the CPU kernels over one row segment, compiled once per CPU capability.
//
// csrc/cpu/vec_kernels_impl.h defines them with at::vec::Vectorized; kernels_default.cpp,
// kernels_avx2.cpp and kernels_avx512.cpp compile that header for DEFAULT, AVX2 and AVX512 (as
// ATen does for its own kernels), each in its own namespace, and margin_cpu.cpp picks one at run
// time from at::get_cpu_capability() (so ATEN_CPU_CAPABILITY=default selects the portable one).
//
// A segment is n elements of one row of a (B, C) tensor, `stride` elements apart in memory (any
// stride, including 0); output segments are contiguous and in the input dtype.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "margin_math.h"

// The AVX2/AVX512 variants need GCC's `#pragma GCC target`; elsewhere only DEFAULT is built.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define ANGULAR_X86_DISPATCH 1
#else
#define ANGULAR_X86_DISPATCH 0
#endif

namespace angular::cpu {

// A segment's share of a row's cross-entropy sums, in logit units (z = s * cos).
struct RowPartial {
  LogSumExp<double> lse;
  double z_sum;
};

#define ANGULAR_DECLARE_VEC_KERNELS(CAPABILITY)                                                  \
  namespace CAPABILITY {                                                                         \
  template <typename scalar_t>                                                                   \
  struct VecKernels {                                                                            \
    using acc_t = acc_type<scalar_t>;                                                            \
    /* dst[j] = scale * src[j] */                                                                \
    static void scale(const scalar_t* src, int64_t stride, int64_t n, acc_t scale,               \
                      scalar_t* dst);                                                            \
    /* Online log-sum-exp and sum of z_j = s * src[j], one read of src; when target >= 0,     */ \
    /* src[target] counts as target_value (the margin f_y) instead.                           */ \
    static RowPartial logsumexp(const scalar_t* src, int64_t stride, int64_t n, acc_t s,         \
                                int64_t target, acc_t target_value);                             \
    /* dst[j] = scale * exp(s * src[j] - lse) - offset: the cross-entropy gradient off target. */ \
    static void softmax_grad(const scalar_t* src, int64_t stride, int64_t n, acc_t s, acc_t lse, \
                             acc_t scale, acc_t offset, scalar_t* dst);                          \
    /* The same three with negative modulation (margin_math.h, modulate_negative): h(x) =     */ \
    /* x (t + x) where x > threshold, x elsewhere. dst[j] = scale * h(src[j]).                 */ \
    static void scale_modulated(const scalar_t* src, int64_t stride, int64_t n, acc_t scale,     \
                                acc_t threshold, acc_t t, scalar_t* dst);                        \
    /* logsumexp of z_j = s * h(src[j]); target_value (== threshold) is not modulated.         */ \
    static RowPartial logsumexp_modulated(const scalar_t* src, int64_t stride, int64_t n,        \
                                          acc_t s, int64_t target, acc_t target_value,           \
                                          acc_t threshold, acc_t t);                             \
    /* dst[j] = (scale * exp(s * h(src[j]) - lse) - offset) * h'(src[j]).                      */ \
    static void softmax_grad_modulated(const scalar_t* src, int64_t stride, int64_t n, acc_t s,  \
                                       acc_t lse, acc_t scale, acc_t offset, acc_t threshold,    \
                                       acc_t t, scalar_t* dst);                                  \
    /* dst[j] = scale * grad[j] * h'(src[j]): the margin_logits backward with modulation.      */ \
    static void scale_grad_modulated(const scalar_t* grad, int64_t grad_stride,                  \
                                     const scalar_t* src, int64_t stride, int64_t n, acc_t scale, \
                                     acc_t threshold, acc_t t, scalar_t* dst);                   \
  };                                                                                             \
  }

ANGULAR_DECLARE_VEC_KERNELS(DEFAULT)
#if ANGULAR_X86_DISPATCH
ANGULAR_DECLARE_VEC_KERNELS(AVX2)
ANGULAR_DECLARE_VEC_KERNELS(AVX512)
#endif

#undef ANGULAR_DECLARE_VEC_KERNELS

}  // namespace angular::cpu
