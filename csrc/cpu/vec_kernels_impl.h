// Definitions of the vector primitives declared in vec_kernels.h, for the CPU capability the
// including file selects with CPU_CAPABILITY (and CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512).
// Include only from kernels_*.cpp.
//
// Rows are processed in blocks of kBlock elements that stay in L1: a block is read from memory
// once (converted to the arithmetic type when it is half, bfloat16 or strided), then the passes
// over it (max and sum, then sum of exponentials) hit the cache. So the log-sum-exp reads each
// element of cos once from memory and takes one exponential per element, plus one per block.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/vec_kernels.h"

namespace angular::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlock = 2048;

template <typename T>
inline Vectorized<T> vec_exp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // within a few ulp; the fp32 tolerance of docs/design.md, Testing, leaves room for it
  } else {
    return x.exp();
  }
}

// n elements of src, `stride` apart, as acc_t: src itself when it can be read in place (and the
// caller does not need to write the block), otherwise a copy in buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, int64_t stride, int64_t n, acc_t* buf,
                               bool writable) {
  if (stride == 1) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (!writable) {
        return src;
      }
      std::memcpy(buf, src, n * sizeof(acc_t));
      return buf;
    } else {
      using ReducedVec = Vectorized<scalar_t>;
      using FloatVec = Vectorized<float>;
      static_assert(ReducedVec::size() == 2 * FloatVec::size());
      int64_t j = 0;
      for (; j + ReducedVec::size() <= n; j += ReducedVec::size()) {
        auto [low, high] = at::vec::convert_to_float<scalar_t>(ReducedVec::loadu(src + j));
        low.store(buf + j);
        high.store(buf + j + FloatVec::size());
      }
      for (; j < n; ++j) {
        buf[j] = static_cast<float>(src[j]);
      }
      return buf;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    buf[j] = static_cast<acc_t>(src[j * stride]);
  }
  return buf;
}

// Writes n floats of buf to a half or bfloat16 dst (rounding to nearest even).
template <typename scalar_t>
inline void store_reduced(const float* buf, int64_t n, scalar_t* dst) {
  using ReducedVec = Vectorized<scalar_t>;
  using FloatVec = Vectorized<float>;
  int64_t j = 0;
  for (; j + ReducedVec::size() <= n; j += ReducedVec::size()) {
    at::vec::convert_from_float<scalar_t>(FloatVec::loadu(buf + j),
                                          FloatVec::loadu(buf + j + FloatVec::size()))
        .store(dst + j);
  }
  for (; j < n; ++j) {
    dst[j] = static_cast<scalar_t>(buf[j]);
  }
}

// dst[j] = fn(src[j]) for a vector function fn of the arithmetic type. fn is taken by value and
// captures its constants by value: then they stay in registers, where a reference could alias dst
// and have them reloaded at every vector.
template <typename scalar_t, typename VecFn>
inline void map_segment(const scalar_t* src, int64_t stride, int64_t n, scalar_t* dst,
                        const VecFn fn) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool in_acc_type = std::is_same_v<scalar_t, acc_t>;
  alignas(64) acc_t buf[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const acc_t* x = load_block(src + start * stride, stride, len, buf, false);
    acc_t* y;
    if constexpr (in_acc_type) {
      y = dst + start;
    } else {
      y = buf;  // elementwise, so in place over the converted block
    }
    int64_t j = 0;
    for (; j + Vec::size() <= len; j += Vec::size()) {
      fn(Vec::loadu(x + j)).store(y + j);
    }
    if (j < len) {
      fn(Vec::loadu(x + j, len - j)).store(y + j, len - j);
    }
    if constexpr (!in_acc_type) {
      store_reduced(buf, len, dst + start);
    }
  }
}

// dst[j] = fn(a[j], b[j]) for a vector function fn of two arguments in the arithmetic type.
template <typename scalar_t, typename VecFn>
inline void map_segment2(const scalar_t* a, int64_t a_stride, const scalar_t* b, int64_t b_stride,
                         int64_t n, scalar_t* dst, const VecFn fn) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool in_acc_type = std::is_same_v<scalar_t, acc_t>;
  alignas(64) acc_t buf_a[kBlock];
  alignas(64) acc_t buf_b[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const acc_t* x = load_block(a + start * a_stride, a_stride, len, buf_a, false);
    const acc_t* y = load_block(b + start * b_stride, b_stride, len, buf_b, false);
    acc_t* out;
    if constexpr (in_acc_type) {
      out = dst + start;
    } else {
      out = buf_a;  // a converted copy: elementwise, so in place
    }
    int64_t j = 0;
    for (; j + Vec::size() <= len; j += Vec::size()) {
      fn(Vec::loadu(x + j), Vec::loadu(y + j)).store(out + j);
    }
    if (j < len) {
      fn(Vec::loadu(x + j, len - j), Vec::loadu(y + j, len - j)).store(out + j, len - j);
    }
    if constexpr (!in_acc_type) {
      store_reduced(buf_a, len, dst + start);
    }
  }
}

template <typename T>
inline T reduce_max(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](Vectorized<T>& a, Vectorized<T>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

}  // namespace

// Outside the anonymous namespace: the kernels' lambdas below capture them.
// Lane selection: an AVX-512 mask register where there is one (at::vec's comparison and blendv
// would round-trip the mask through a vector register, three instructions more per use), a vector
// of all-ones lanes elsewhere.
template <typename T>
struct Lanes {
#if defined(CPU_CAPABILITY_AVX512)
  using Mask = std::conditional_t<std::is_same_v<T, float>, __mmask16, __mmask8>;
  static Mask greater(const Vectorized<T>& a, const Vectorized<T>& b) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ);
    } else {
      return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ);
    }
  }
  // b where mask, a elsewhere.
  static Vectorized<T> select(Mask mask, const Vectorized<T>& a, const Vectorized<T>& b) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_mask_blend_ps(mask, a, b);
    } else {
      return _mm512_mask_blend_pd(mask, a, b);
    }
  }
#else
  using Mask = Vectorized<T>;
  static Mask greater(const Vectorized<T>& a, const Vectorized<T>& b) { return a > b; }
  static Vectorized<T> select(const Mask& mask, const Vectorized<T>& a, const Vectorized<T>& b) {
    return Vectorized<T>::blendv(a, b, mask);
  }
#endif
};

// The plain kernels: no modulation.
template <typename T>
struct NoModulation {
  static constexpr bool kActive = false;
  Vectorized<T> operator()(const Vectorized<T>& x) const { return x; }
};

// Negative modulation, vectorised (margin_math.h, modulate_negative and its derivative) in few
// instructions per vector: h(x) = x w with w = t + x on the hard lanes (x > threshold) and 1
// elsewhere, and h'(x) = w + x on the hard lanes, 1 elsewhere.
template <typename T>
struct Modulation {
  static constexpr bool kActive = true;
  using Mask = typename Lanes<T>::Mask;
  Vectorized<T> threshold;
  Vectorized<T> t;
  Vectorized<T> one;

  // What value() and times_grad() share for one vector x.
  struct Hard {
    Mask lanes;
    Vectorized<T> w;
  };

  Modulation(T threshold_value, T t_value) : threshold(threshold_value), t(t_value), one(T(1)) {}
  Hard hard(const Vectorized<T>& x) const {
    const Mask lanes = Lanes<T>::greater(x, threshold);
    return Hard{lanes, Lanes<T>::select(lanes, one, x + t)};
  }
  Vectorized<T> value(const Vectorized<T>& x, const Hard& hard_lanes) const {
    return x * hard_lanes.w;  // exactly x where w == 1
  }
  // v h'(x).
  Vectorized<T> times_grad(const Vectorized<T>& v, const Vectorized<T>& x,
                           const Hard& hard_lanes) const {
    return Lanes<T>::select(hard_lanes.lanes, v, v * (hard_lanes.w + x));
  }
  Vectorized<T> operator()(const Vectorized<T>& x) const { return value(x, hard(x)); }
};

template <typename scalar_t>
void VecKernels<scalar_t>::scale(const scalar_t* src, int64_t stride, int64_t n, acc_t scale,
                                 scalar_t* dst) {
  const Vectorized<acc_t> factor(scale);
  map_segment(src, stride, n, dst, [=](const Vectorized<acc_t>& x) { return x * factor; });
}

namespace {

// The log-sum-exp of VecKernels::logsumexp, of z_j = s * mod(x_j). With a modulation, pass 1 writes
// the modulated block to the buffer (in place when the block was copied there) for pass 2.
template <typename scalar_t, typename Mod>
RowPartial logsumexp_impl(const scalar_t* src, int64_t stride, int64_t n, acc_type<scalar_t> s,
                          int64_t target, acc_type<scalar_t> target_value, const Mod& mod) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  alignas(64) acc_t buf[kBlock];
  const Vec scale(s);
  const Vec zero(acc_t(0));
  LogSumExp<double> total{-std::numeric_limits<double>::infinity(), 0.0};
  double z_sum = 0.0;  // block sums are exact enough in acc_t; across blocks, keep double
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const bool has_target = target >= start && target < start + len;
    const acc_t* x = load_block(src + start * stride, stride, len, buf, has_target);
    if (has_target) {
      buf[target - start] = target_value;  // x == buf when has_target
    }
    // Pass 1 (from memory): max and sum of the block, in cos units.
    Vec max_x(-std::numeric_limits<acc_t>::infinity());
    Vec sum_x(acc_t(0));
    int64_t j = 0;
    for (; j + Vec::size() <= len; j += Vec::size()) {
      Vec v = Vec::loadu(x + j);
      if constexpr (Mod::kActive) {
        v = mod(v);
        v.store(buf + j);
      }
      max_x = at::vec::maximum(max_x, v);
      sum_x = sum_x + v;
    }
    if (j < len) {
      Vec v = Vec::loadu(x + j, len - j);  // zero-filled past len: fine for the sum
      if constexpr (Mod::kActive) {
        v = Vec::set(Vec(acc_t(0)), mod(v), len - j);  // mod(0) may not be 0
        v.store(buf + j, len - j);
      }
      max_x = Vec::set(max_x, at::vec::maximum(max_x, v), len - j);
      sum_x = sum_x + v;
    }
    const acc_t block_max = s * reduce_max(max_x);  // s > 0, so max(s x) = s max(x)
    z_sum += static_cast<double>(s) * static_cast<double>(reduce_sum(sum_x));
    if (block_max == -std::numeric_limits<acc_t>::infinity()) {
      continue;  // every term is exp(-inf) = 0 (and exp(-inf + inf) would be NaN)
    }
    // Pass 2 (from cache): sum of exp(s x - block_max).
    if constexpr (Mod::kActive) {
      x = buf;
    }
    const Vec minus_max(-block_max);
    Vec sum_exp(acc_t(0));
    for (j = 0; j + Vec::size() <= len; j += Vec::size()) {
      sum_exp = sum_exp + vec_exp(at::vec::fmadd(Vec::loadu(x + j), scale, minus_max));
    }
    if (j < len) {
      const Vec e = vec_exp(at::vec::fmadd(Vec::loadu(x + j, len - j), scale, minus_max));
      sum_exp = sum_exp + Vec::set(zero, e, len - j);
    }
    total = merge(total, LogSumExp<double>{static_cast<double>(block_max),
                                           static_cast<double>(reduce_sum(sum_exp))});
  }
  return RowPartial{total, z_sum};
}

}  // namespace

template <typename scalar_t>
RowPartial VecKernels<scalar_t>::logsumexp(const scalar_t* src, int64_t stride, int64_t n, acc_t s,
                                           int64_t target, acc_t target_value) {
  return logsumexp_impl(src, stride, n, s, target, target_value, NoModulation<acc_t>{});
}

template <typename scalar_t>
RowPartial VecKernels<scalar_t>::logsumexp_modulated(const scalar_t* src, int64_t stride,
                                                     int64_t n, acc_t s, int64_t target,
                                                     acc_t target_value, acc_t threshold,
                                                     acc_t t) {
  return logsumexp_impl(src, stride, n, s, target, target_value, Modulation<acc_t>(threshold, t));
}

template <typename scalar_t>
void VecKernels<scalar_t>::softmax_grad(const scalar_t* src, int64_t stride, int64_t n, acc_t s,
                                        acc_t lse, acc_t scale, acc_t offset, scalar_t* dst) {
  using Vec = Vectorized<acc_t>;
  const Vec vec_s(s);
  const Vec minus_lse(-lse);
  const Vec vec_scale(scale);
  const Vec minus_offset(-offset);
  map_segment(src, stride, n, dst, [=](const Vec& x) {
    return at::vec::fmadd(vec_exp(at::vec::fmadd(x, vec_s, minus_lse)), vec_scale, minus_offset);
  });
}

template <typename scalar_t>
void VecKernels<scalar_t>::scale_modulated(const scalar_t* src, int64_t stride, int64_t n,
                                           acc_t scale, acc_t threshold, acc_t t, scalar_t* dst) {
  const Vectorized<acc_t> factor(scale);
  const Modulation<acc_t> mod(threshold, t);
  map_segment(src, stride, n, dst, [=](const Vectorized<acc_t>& x) { return mod(x) * factor; });
}

template <typename scalar_t>
void VecKernels<scalar_t>::softmax_grad_modulated(const scalar_t* src, int64_t stride, int64_t n,
                                                  acc_t s, acc_t lse, acc_t scale, acc_t offset,
                                                  acc_t threshold, acc_t t, scalar_t* dst) {
  using Vec = Vectorized<acc_t>;
  const Vec vec_s(s);
  const Vec minus_lse(-lse);
  const Vec vec_scale(scale);
  const Vec minus_offset(-offset);
  const Modulation<acc_t> mod(threshold, t);
  map_segment(src, stride, n, dst, [=](const Vec& x) {
    const auto hard = mod.hard(x);
    const Vec p = vec_exp(at::vec::fmadd(mod.value(x, hard), vec_s, minus_lse));
    // (scale p - offset) h'(x); a denormal product is flushed (csrc/cpu/row_segments.h), so the
    // extra multiply on the hard lanes costs no microcode assist.
    return mod.times_grad(at::vec::fmadd(p, vec_scale, minus_offset), x, hard);
  });
}

template <typename scalar_t>
void VecKernels<scalar_t>::scale_grad_modulated(const scalar_t* grad, int64_t grad_stride,
                                                const scalar_t* src, int64_t stride, int64_t n,
                                                acc_t scale, acc_t threshold, acc_t t,
                                                scalar_t* dst) {
  using Vec = Vectorized<acc_t>;
  const Vec factor(scale);
  const Modulation<acc_t> mod(threshold, t);
  map_segment2(grad, grad_stride, src, stride, n, dst, [=](const Vec& g, const Vec& x) {
    return mod.times_grad(g * factor, x, mod.hard(x));
  });
}

template struct VecKernels<float>;
template struct VecKernels<double>;
template struct VecKernels<c10::Half>;
template struct VecKernels<c10::BFloat16>;

}  // namespace angular::cpu::CPU_CAPABILITY
