// How the CPU margin kernels (margin_cpu.cpp, linear_margin_cpu.cpp) pick their vector primitives,
// and how margin_cpu.cpp (the plain, *_rows and sharded ops) splits a (B, C) problem into (row,
// column chunk) segments for at::parallel_for, with denormals flushed while a segment runs.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "cpu/vec_kernels.h"

namespace angular::cpu::segments {

constexpr int64_t kMinChunkColumns = 16384;  // below this a row is not worth splitting
constexpr int64_t kGrainElements = 32768;    // work per parallel_for task, in elements

enum class Capability { kDefault, kAvx2, kAvx512 };

inline Capability capability() {
#if ANGULAR_X86_DISPATCH
  // What ATen itself uses on this CPU; honours ATEN_CPU_CAPABILITY (e.g. "default").
  static const Capability cached = [] {
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") {
      return Capability::kAvx512;
    }
    return name == "AVX2" ? Capability::kAvx2 : Capability::kDefault;
  }();
  return cached;
#else
  return Capability::kDefault;
#endif
}

// Calls fn with a VecKernels<scalar_t> of the best capability (a tag value: its members are static).
template <typename scalar_t, typename Fn>
void with_vec_kernels(const Fn& fn) {
  switch (capability()) {
#if ANGULAR_X86_DISPATCH
    case Capability::kAvx512:
      return fn(AVX512::VecKernels<scalar_t>{});
    case Capability::kAvx2:
      return fn(AVX2::VecKernels<scalar_t>{});
#endif
    default:
      return fn(DEFAULT::VecKernels<scalar_t>{});
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Split {
  int64_t chunks;  // column chunks per row
  int64_t width;   // columns per chunk (the last one may be shorter)
};

inline Split split_rows(int64_t rows, int64_t cols) {
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (rows < threads) {
    chunks = std::max<int64_t>(1, std::min(ceil_div(threads, rows), cols / kMinChunkColumns));
  }
  const int64_t width = ceil_div(ceil_div(cols, chunks), 64) * 64;  // whole cache lines
  return Split{ceil_div(cols, width), width};
}

// Flushes denormal results (and reads denormal inputs) as zero in this thread while it lives:
// softmax terms near exp(-87) times a chain factor land below FLT_MIN, and on x86 every such
// operation takes a microcode assist that can double a pass (BENCHMARKS.md, Per-row margins and
// negative modulation). Only values below 1.2e-38 (2.2e-308 in fp64) change.
#if defined(__x86_64__) || defined(_M_X64)
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  static constexpr unsigned int kFlushToZero = 0x8000;
  static constexpr unsigned int kDenormalsAreZero = 0x0040;
  unsigned int saved_;
};
#else
class FlushDenormals {};
#endif

// fn(segment, row, first column, end column) for every segment, in parallel.
template <typename Fn>
void for_each_segment(int64_t rows, int64_t cols, const Split& split, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / split.width);
  at::parallel_for(0, rows * split.chunks, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    for (int64_t segment = begin; segment < end; ++segment) {
      const int64_t row = segment / split.chunks;
      const int64_t first = (segment % split.chunks) * split.width;
      fn(segment, row, first, std::min(cols, first + split.width));
    }
  });
}

}  // namespace angular::cpu::segments
