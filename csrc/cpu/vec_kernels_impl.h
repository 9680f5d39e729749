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

// dst[j] = fn(src[j]) for a vector function fn of the arithmetic type.
template <typename scalar_t, typename VecFn>
inline void map_segment(const scalar_t* src, int64_t stride, int64_t n, scalar_t* dst,
                        const VecFn& fn) {
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

template <typename scalar_t>
void VecKernels<scalar_t>::scale(const scalar_t* src, int64_t stride, int64_t n, acc_t scale,
                                 scalar_t* dst) {
  const Vectorized<acc_t> factor(scale);
  map_segment(src, stride, n, dst, [&](const Vectorized<acc_t>& x) { return x * factor; });
}

template <typename scalar_t>
RowPartial VecKernels<scalar_t>::logsumexp(const scalar_t* src, int64_t stride, int64_t n, acc_t s,
                                           int64_t target, acc_t target_value) {
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
      const Vec v = Vec::loadu(x + j);
      max_x = at::vec::maximum(max_x, v);
      sum_x = sum_x + v;
    }
    if (j < len) {
      const Vec v = Vec::loadu(x + j, len - j);  // zero-filled past len: fine for the sum
      max_x = Vec::set(max_x, at::vec::maximum(max_x, v), len - j);
      sum_x = sum_x + v;
    }
    const acc_t block_max = s * reduce_max(max_x);  // s > 0, so max(s x) = s max(x)
    z_sum += static_cast<double>(s) * static_cast<double>(reduce_sum(sum_x));
    if (block_max == -std::numeric_limits<acc_t>::infinity()) {
      continue;  // every term is exp(-inf) = 0 (and exp(-inf + inf) would be NaN)
    }
    // Pass 2 (from cache): sum of exp(s x - block_max).
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

template <typename scalar_t>
void VecKernels<scalar_t>::softmax_grad(const scalar_t* src, int64_t stride, int64_t n, acc_t s,
                                        acc_t lse, acc_t scale, acc_t offset, scalar_t* dst) {
  using Vec = Vectorized<acc_t>;
  const Vec vec_s(s);
  const Vec minus_lse(-lse);
  const Vec vec_scale(scale);
  const Vec minus_offset(-offset);
  map_segment(src, stride, n, dst, [&](const Vec& x) {
    return at::vec::fmadd(vec_exp(at::vec::fmadd(x, vec_s, minus_lse)), vec_scale, minus_offset);
  });
}

template struct VecKernels<float>;
template struct VecKernels<double>;
template struct VecKernels<c10::Half>;
template struct VecKernels<c10::BFloat16>;

}  // namespace angular::cpu::CPU_CAPABILITY
