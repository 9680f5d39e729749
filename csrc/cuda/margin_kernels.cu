// CUDA kernels of the angular ops, on raw pointers (tensors and registration: margin_cuda.cpp).
// The margin math comes from csrc/margin_math.h, shared with the CPU kernels. Arithmetic is fp32
// for half, bfloat16 and float inputs, fp64 for double. Every kernel runs on the caller's stream
// and none synchronises with the host (CUDA-graph capture works).
//
// Rows are processed by a team of threads: a whole block (256 threads) for rows wider than
// kWarpRowMaxBytes, a warp (8 rows per block) for narrower ones, so that large B with small C does
// not leave most threads idle.
//
// Reading a row segment (visit_row): when columns are contiguous, a scalar head up to the first
// 16-byte boundary, then 16-byte packs, then a scalar tail, so any C and any storage offset get
// vector loads (odd class counts such as 85,742 or 360,232 included). Each thread issues all of its
// kUnroll loads before computing with any of them, to keep several loads in flight. Other strides
// (0, or a step) are read as scalars, kUnroll * N of them loaded before use.
//
// - Elementwise ops (margin_logits, both backwards): grid = (column tiles, row groups). The output
//   is contiguous; it is stored in 16-byte packs whenever it has the same alignment as the input
//   row (always, for a contiguous input), element by element otherwise.
// - margin_cross_entropy forward: grid = (splits, row groups). Each block reduces one column chunk
//   of a row to a partial (max, sum of exp, sum of z) with an online log-sum-exp (one read of cos,
//   one exponential per element). With one split the same kernel writes the loss; otherwise a
//   second kernel merges the splits of each row, a warp per row. Splits come from the kernel's
//   measured occupancy, so that the grid is several full waves even for a few huge rows (B = 16,
//   C = 1,000,000). The workspace is rows * splits * 3 numbers, never B x C.
// - The sharded ops (csrc/sharded_ops.cpp) run these same kernels on one shard of the classes
//   (MarginParams::shard): the forward writes each row's partial statistics instead of its loss
//   (RowResults), and the backward smooths over the global class count.
// Includes stay lean (no torch/extension.h) so that nvcc compiles this file quickly.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "cuda/launchers.h"
#include "margin_math.h"

// The label check's device-side assert prints its message where torch has the printf variant.
#ifndef CUDA_KERNEL_ASSERT_PRINTF
#define CUDA_KERNEL_ASSERT_PRINTF(cond, msg, ...) CUDA_KERNEL_ASSERT(cond)
#endif

namespace angular::cuda {
namespace {

constexpr int kThreads = 256;  // threads per block, 8 warps
constexpr int kWarps = kThreads / 32;
// At most 80 registers per thread (3 blocks of 256 per SM). ptxas -v (sm_90): no spills at this
// bound (at 4 blocks, 64 registers, the cross-entropy backward spilled up to 48 bytes); the 32-40
// byte stack frames it reports are the local arrays of the trig argument reduction's slow path.
// 768 threads per SM with kUnroll 16-byte loads each in flight keep HBM busy (Little's law:
// about 22 KiB per SM at H200 bandwidth and latency; this is 48 KiB).
constexpr int kMinBlocksPerSM = 3;
constexpr int kUnroll = 4;  // 16-byte packs a thread loads before using any of them
// Rows of at most this many bytes are handled by one warp instead of a whole block.
constexpr int64_t kWarpRowMaxBytes = 2 * 32 * 16 * kUnroll;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxSplits = 1024;
constexpr int kMinWaves = 4;  // the cross-entropy grid aims for at least this many full waves

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
C10_HOST_DEVICE inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
C10_HOST_DEVICE inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return ::exp(x); }

template <typename scalar_t>
constexpr int pack_of() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// One 16-byte load or store, as a single 128-bit instruction (a struct of c10::Half members may be
// split into several narrower ones).
template <typename scalar_t>
__device__ __forceinline__ uint4 raw_pack(const scalar_t* __restrict__ p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename scalar_t>
__device__ __forceinline__ void unpack(const uint4& raw,
                                       acc_type<scalar_t> (&out)[pack_of<scalar_t>()]) {
  scalar_t v[pack_of<scalar_t>()];
  memcpy(v, &raw, 16);
#pragma unroll
  for (int k = 0; k < pack_of<scalar_t>(); ++k) {
    out[k] = static_cast<acc_type<scalar_t>>(v[k]);
  }
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ p,
                                           const acc_type<scalar_t> (&in)[pack_of<scalar_t>()]) {
  scalar_t v[pack_of<scalar_t>()];
#pragma unroll
  for (int k = 0; k < pack_of<scalar_t>(); ++k) {
    v[k] = static_cast<scalar_t>(in[k]);
  }
  uint4 raw;
  memcpy(&raw, v, 16);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ int misalignment(const void* p) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// Calls on_pack(j, x[N]) for 16-byte packs and on_scalar(j, x) for single elements, covering
// columns [first, end) of one row exactly once, split over a team of G threads (this one is
// `lane`). Elements arrive in the arithmetic type.
template <typename scalar_t, int G, typename PackFn, typename ScalarFn>
__device__ __forceinline__ void visit_row(const scalar_t* __restrict__ row, int64_t col_stride,
                                          int64_t first, int64_t end, int lane, PackFn&& on_pack,
                                          ScalarFn&& on_scalar) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = pack_of<scalar_t>();
  if (col_stride == 1) {
    // Elements are at least element-aligned, so the head is fewer than N of them.
    const int off = misalignment(row + first) / static_cast<int>(sizeof(scalar_t));
    const int64_t body = min64(end, first + (off == 0 ? 0 : N - off));
    for (int64_t j = first + lane; j < body; j += G) {
      on_scalar(j, static_cast<acc_t>(row[j]));
    }
    const int64_t packs = (end - body) / N;
    const scalar_t* __restrict__ base = row + body;
    for (int64_t p0 = lane; p0 < packs; p0 += int64_t(G) * kUnroll) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = p0 + int64_t(u) * G;
        raw[u] = p < packs ? raw_pack(base + p * N) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = p0 + int64_t(u) * G;
        if (p < packs) {
          acc_t x[N];
          unpack<scalar_t>(raw[u], x);
          on_pack(body + p * N, x);
        }
      }
    }
    for (int64_t j = body + packs * N + lane; j < end; j += G) {
      on_scalar(j, static_cast<acc_t>(row[j]));
    }
    return;
  }
  constexpr int kLoads = 2 * kUnroll;  // scalars in flight per thread (more spills registers)
  for (int64_t j0 = first + lane; j0 < end; j0 += int64_t(G) * kLoads) {
    acc_t x[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int64_t j = j0 + int64_t(i) * G;
      x[i] = j < end ? static_cast<acc_t>(row[j * col_stride]) : acc_t(0);
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int64_t j = j0 + int64_t(i) * G;
      if (j < end) {
        on_scalar(j, x[i]);
      }
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> load(const Matrix& m, int64_t row, int64_t col) {
  return static_cast<acc_type<scalar_t>>(
      static_cast<const scalar_t*>(m.data)[row * m.row_stride + col * m.col_stride]);
}

// The margin parameters in the arithmetic type: scalars, or per-row values (a (4, B) array), and
// the negative modulation (docs/design.md, Per-row margins and negative modulation).
template <typename acc_t>
struct Margin {
  acc_t s, m1, m2, m3, lam, eps;
  bool straight_through;
  const acc_t* __restrict__ rows;  // (4, B) or null
  int64_t batch;
  bool modulate;
  acc_t t;
  bool shard;           // one shard of the sharded ops (margin_params.h)
  int64_t num_classes;  // label smoothing's C when not 0

  Margin(const MarginParams& p, int64_t batch_size)
      : s(acc_t(p.s)),
        m1(acc_t(p.m1)),
        m2(acc_t(p.m2)),
        m3(acc_t(p.m3)),
        lam(acc_t(p.lam)),
        eps(acc_t(p.label_smoothing)),
        straight_through(p.straight_through),
        rows(static_cast<const acc_t*>(p.row_margins)),
        batch(batch_size),
        modulate(p.modulate),
        t(acc_t(p.negative_t)),
        shard(p.shard),
        num_classes(p.num_classes) {}

  __device__ RowMargin<acc_t> at(int64_t row) const {
    if (rows == nullptr) {
      return RowMargin<acc_t>{m1, m2, m3, lam};
    }
    return RowMargin<acc_t>{rows[row], rows[batch + row], rows[2 * batch + row],
                            rows[3 * batch + row]};
  }
  __device__ acc_t target_value(acc_t cos_y, const RowMargin<acc_t>& r) const {
    return target_logit(cos_y, r.m1, r.m2, r.m3, r.lam);
  }
  // The C of label smoothing for a cos of `cols` columns.
  __device__ acc_t classes(int64_t cols) const {
    return acc_t(num_classes > 0 ? num_classes : cols);
  }
};

// d loss / d margins of one row (scale times d f_y / d margins) into the (4, B) margin_grad.
template <typename acc_t>
__device__ __forceinline__ void store_margin_grad(acc_t* __restrict__ margin_grad, int64_t batch,
                                                  int64_t row, acc_t cos_y,
                                                  const RowMargin<acc_t>& m, acc_t scale) {
  const RowMargin<acc_t> d = target_logit_margin_grad(cos_y, m);
  margin_grad[row] = scale * d.m1;
  margin_grad[batch + row] = scale * d.m2;
  margin_grad[2 * batch + row] = scale * d.m3;
  margin_grad[3 * batch + row] = scale * d.lam;
}

// Threads [team * G, team * G + G) of the block work on one row; G is 32 or kThreads.
template <int G>
struct Team {
  static constexpr int kRowsPerBlock = kThreads / G;
  int lane = static_cast<int>(threadIdx.x) % G;
  int index = static_cast<int>(threadIdx.x) / G;
};

// out[row, j] = op(r, j, j == target, src[row, j]) over each block's column tile of every row, with
// r = op.row(...) the row's constants (computed once per team and row); r.zero skips the read.
template <typename scalar_t, int G, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    map_rows_kernel(Rows shape, Matrix src_matrix, scalar_t* __restrict__ out, int64_t tile,
                    Op op) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = pack_of<scalar_t>();
  const Team<G> team;
  const int64_t first = int64_t(blockIdx.x) * tile;
  const int64_t end = min64(shape.cols, first + tile);
  for (int64_t row = int64_t(blockIdx.y) * team.kRowsPerBlock + team.index; row < shape.rows;
       row += int64_t(gridDim.y) * team.kRowsPerBlock) {
    const typename Op::Row r = op.row(row, first, end);
    scalar_t* __restrict__ dst = out + row * shape.cols;
    if (r.zero) {
      for (int64_t j = first + team.lane; j < end; j += G) {
        dst[j] = static_cast<scalar_t>(acc_t(0));
      }
      continue;
    }
    const scalar_t* __restrict__ src =
        static_cast<const scalar_t*>(src_matrix.data) + row * src_matrix.row_stride;
    // src and dst reach a 16-byte boundary at the same column: the body's stores are packs too.
    const bool vector_store = ((reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(src))
                               & 15u) == 0;
    visit_row<scalar_t, G>(
        src, src_matrix.col_stride, first, end, team.lane,
        [&](int64_t j, const acc_t(&x)[N]) {
          const int64_t target = r.target - j;  // in [0, N) when the target is in this pack
          acc_t y[N];
#pragma unroll
          for (int k = 0; k < N; ++k) {
            y[k] = op(r, j + k, target == k, x[k]);
          }
          if (vector_store) {
            store_pack<scalar_t>(dst + j, y);
          } else {
#pragma unroll
            for (int k = 0; k < N; ++k) {
              dst[j + k] = static_cast<scalar_t>(y[k]);
            }
          }
        },
        [&](int64_t j, acc_t x) { dst[j] = static_cast<scalar_t>(op(r, j, j == r.target, x)); });
  }
}

// z = s * cos (hard negatives modulated), and s * f_y (computed once per row) in the target
// column. Labels outside [0, C) match no column.
template <typename scalar_t>
struct LogitsForward {
  using acc_t = acc_type<scalar_t>;
  Margin<acc_t> m;
  const int64_t* __restrict__ labels;
  int64_t cols;
  Matrix cos;
  struct Row {
    int64_t target;
    acc_t target_logit;
    acc_t threshold;  // f_y of a modulated row
    bool modulated;
    bool zero;
  };
  __device__ Row row(int64_t row, int64_t first, int64_t end) const {
    const int64_t y = labels[row];
    Row r{y, acc_t(0), acc_t(0), m.modulate && y >= 0 && y < cols, false};
    if ((y >= first && y < end) || r.modulated) {
      r.threshold = m.target_value(load<scalar_t>(cos, row, y), m.at(row));
      r.target_logit = m.s * r.threshold;
    }
    return r;
  }
  __device__ acc_t operator()(const Row& r, int64_t, bool is_target, acc_t x) const {
    return is_target ? r.target_logit
                     : m.s * (r.modulated ? modulate_negative(x, r.threshold, m.t) : x);
  }
};

// grad_cos = s * grad (times t + 2 cos at modulated entries), times d f_y / d cos_y in the target
// column; d / d margins of the row into margin_grad when it is not null.
template <typename scalar_t>
struct LogitsBackward {
  using acc_t = acc_type<scalar_t>;
  Margin<acc_t> m;
  const int64_t* __restrict__ labels;
  int64_t cols;
  Matrix cos;
  Matrix grad;
  acc_t* __restrict__ margin_grad;
  struct Row {
    int64_t row;
    int64_t target;
    acc_t target_factor;
    acc_t threshold;
    bool modulated;
    bool zero;
  };
  __device__ Row row(int64_t row, int64_t first, int64_t end) const {
    const int64_t y = labels[row];
    Row r{row, y, acc_t(0), acc_t(0), m.modulate && y >= 0 && y < cols, false};
    const bool in_tile = y >= first && y < end;
    if (in_tile || r.modulated) {
      const RowMargin<acc_t> margin = m.at(row);
      const acc_t cos_y = load<scalar_t>(cos, row, y);
      r.threshold = m.target_value(cos_y, margin);
      if (in_tile) {
        r.target_factor = m.s * target_logit_grad(cos_y, margin.m1, margin.m2, margin.lam,
                                                  m.straight_through);
        if (margin_grad != nullptr) {  // every lane of the team stores the same values
          store_margin_grad(margin_grad, m.batch, row, cos_y, margin,
                            m.s * load<scalar_t>(grad, row, y));
        }
      }
    }
    return r;
  }
  __device__ acc_t operator()(const Row& r, int64_t j, bool is_target, acc_t g) const {
    if (is_target) {
      return g * r.target_factor;
    }
    return r.modulated
               ? m.s * g * modulate_negative_grad(load<scalar_t>(cos, r.row, j), r.threshold, m.t)
               : m.s * g;
  }
};

// grad_cos = s * g * (softmax - eps / C), and target_cos_grad in the target column; 0 for rows
// without a target. The backward of the plain, *_rows and sharded ops: for a shard (m.shard), C is
// the global class count, rows whose target is on another shard get the off-target gradient, and
// the rows that are 0 are those whose upstream gradient is 0.
template <typename scalar_t>
struct CrossEntropyBackward {
  using acc_t = acc_type<scalar_t>;
  Margin<acc_t> m;
  const int64_t* __restrict__ labels;
  int64_t cols;
  Matrix cos;
  const acc_t* __restrict__ grad_rows;
  int64_t grad_stride;
  const acc_t* __restrict__ lse;
  int64_t lse_stride;
  const acc_t* __restrict__ divisor;  // divides the upstream gradient; null: 1
  acc_t* __restrict__ margin_grad;    // (4, B) or null
  struct Row {
    int64_t target;
    acc_t scale;
    acc_t minus_offset;
    acc_t lse;
    acc_t target_grad;
    acc_t threshold;
    bool zero;
  };
  __device__ Row row(int64_t row, int64_t first, int64_t end) const {
    Row r{labels[row], acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), false};
    const bool has_target = r.target >= 0 && r.target < cols;
    const acc_t g = divisor != nullptr ? grad_rows[row * grad_stride] / *divisor
                                       : grad_rows[row * grad_stride];
    if (m.shard ? g == acc_t(0) : !has_target) {
      r.zero = true;
      return r;
    }
    const acc_t num_classes = m.classes(cols);
    r.lse = lse[row * lse_stride];
    r.scale = m.s * g;
    r.minus_offset = -r.scale * m.eps / num_classes;
    const bool in_tile = r.target >= first && r.target < end;  // so has_target
    if (in_tile || (m.modulate && has_target)) {
      const RowMargin<acc_t> margin = m.at(row);
      const acc_t cos_y = load<scalar_t>(cos, row, r.target);
      r.threshold = m.target_value(cos_y, margin);
      if (in_tile) {
        r.target_grad = target_cos_grad(cos_y, r.lse, g, m.s, margin.m1, margin.m2, margin.m3,
                                        margin.lam, m.eps, num_classes, m.straight_through);
        if (margin_grad != nullptr) {  // every lane of the team stores the same values
          const acc_t dz = target_logit_upstream(r.threshold, r.lse, g, m.s, m.eps, num_classes);
          store_margin_grad(margin_grad, m.batch, row, cos_y, margin, m.s * dz);
        }
      }
    }
    return r;
  }
  __device__ acc_t operator()(const Row& r, int64_t, bool is_target, acc_t x) const {
    if (is_target) {
      return r.target_grad;
    }
    if (m.modulate) {
      const acc_t h = modulate_negative(x, r.threshold, m.t);
      return math::fma_(r.scale, fast_exp(math::fma_(m.s, h, -r.lse)), r.minus_offset) *
             modulate_negative_grad(x, r.threshold, m.t);
    }
    return math::fma_(r.scale, fast_exp(math::fma_(m.s, x, -r.lse)), r.minus_offset);
  }
};

// A row segment's online log-sum-exp plus the sum of its logits.
template <typename acc_t>
struct RowSums {
  acc_t max;
  acc_t sum;
  acc_t z_sum;

  __device__ void add(acc_t z) {
    z_sum += z;
    if (z > max) {  // false for NaN, which then poisons sum below
      sum = sum * fast_exp(max - z) + acc_t(1);
      max = z;
    } else if (z != -INFINITY) {  // exp(-inf) adds 0; exp(-inf - max) is NaN while max = -inf
      sum += fast_exp(z - max);
    }
  }
  __device__ void merge_with(const RowSums& other) {
    const LogSumExp<acc_t> merged =
        merge(LogSumExp<acc_t>{max, sum}, LogSumExp<acc_t>{other.max, other.sum});
    max = merged.max;
    sum = merged.sum;
    z_sum += other.z_sum;
  }
};

template <typename acc_t>
__device__ __forceinline__ RowSums<acc_t> empty_sums() {
  return RowSums<acc_t>{-INFINITY, acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ RowSums<acc_t> warp_reduce(RowSums<acc_t> a) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    RowSums<acc_t> b;
    b.max = __shfl_down_sync(0xffffffffu, a.max, offset);
    b.sum = __shfl_down_sync(0xffffffffu, a.sum, offset);
    b.z_sum = __shfl_down_sync(0xffffffffu, a.z_sum, offset);
    a.merge_with(b);
  }
  return a;
}

// A team's reduction; the result is valid in its lane 0. Every thread of the team must call it.
template <int G, typename acc_t>
__device__ RowSums<acc_t> team_reduce(RowSums<acc_t> a) {
  if constexpr (G == 32) {
    return warp_reduce(a);
  } else {
    static_assert(G == kThreads, "a team is a warp or the whole block");
    __shared__ acc_t shared[3][kWarps];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    a = warp_reduce(a);
    if (lane == 0) {
      shared[0][warp] = a.max;
      shared[1][warp] = a.sum;
      shared[2][warp] = a.z_sum;
    }
    __syncthreads();
    if (warp == 0) {
      a = lane < kWarps ? RowSums<acc_t>{shared[0][lane], shared[1][lane], shared[2][lane]}
                        : empty_sums<acc_t>();
      a = warp_reduce(a);
    }
    __syncthreads();  // shared is reused for the next row
    return a;
  }
}

// Where the cross-entropy forward's rows go (each array `rows` elements): the loss and log-sum-exp
// of margin_cross_entropy(_rows); for a shard (m.shard, sharded_margin_partials), the partial
// statistics the caller combines across shards: max and sum of exp of the row's logits, s f_y (0
// when another shard owns the target) and the sum of the logits.
template <typename acc_t>
struct RowResults {
  acc_t* loss;
  acc_t* lse;
  acc_t* row_max;
  acc_t* sum_exp;
  acc_t* target;
  acc_t* logit_sum;

  // A row that is not read (no target, not a shard): loss 0, and an lse its backward never uses.
  __device__ void skip(int64_t row) const {
    loss[row] = acc_t(0);
    lse[row] = acc_t(0);
  }
  // A row from its merged sums and its target logit over s (valid when has_target).
  __device__ void finish(int64_t row, const RowSums<acc_t>& total, acc_t target_value,
                         bool has_target, const Margin<acc_t>& m, int64_t cols) const {
    if (m.shard) {
      row_max[row] = total.max;
      sum_exp[row] = total.sum;
      target[row] = has_target ? m.s * target_value : acc_t(0);
      logit_sum[row] = total.z_sum;
      return;
    }
    const acc_t row_lse = total.max + math::log_(total.sum);
    loss[row] = smoothed_loss(row_lse, m.s * target_value, total.z_sum, acc_t(cols), m.eps);
    lse[row] = row_lse;
  }
};

// Partial (max, sum, z_sum) of columns [blockIdx.x * width, +width) of each row with a target
// (every row, for a shard), into partials; with a single split (gridDim.x == 1), the row's
// results directly.
template <typename scalar_t, int G>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    cross_entropy_partial_kernel(Rows shape, Matrix cos, Margin<acc_type<scalar_t>> m,
                                 int64_t width, acc_type<scalar_t>* __restrict__ partials,
                                 RowResults<acc_type<scalar_t>> results) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = pack_of<scalar_t>();
  const Team<G> team;
  const int64_t splits = gridDim.x;
  const int64_t first = int64_t(blockIdx.x) * width;
  const int64_t end = min64(shape.cols, first + width);
  for (int64_t row = int64_t(blockIdx.y) * team.kRowsPerBlock + team.index; row < shape.rows;
       row += int64_t(gridDim.y) * team.kRowsPerBlock) {
    const int64_t y = shape.labels[row];
    const bool has_target = y >= 0 && y < shape.cols;
    if (!has_target && !m.shard) {  // the same for the whole team: no target, nothing to read
      if (splits == 1 && team.lane == 0) {
        results.skip(row);
      }
      continue;
    }
    const scalar_t* __restrict__ src = static_cast<const scalar_t*>(cos.data) + row * cos.row_stride;
    // f_y: the target's value, and the threshold of the negative modulation (whose comparison
    // leaves the target, equal to it, unmodulated). No column matches a label outside [0, C).
    const acc_t target_value = (y >= first && y < end) || (m.modulate && has_target)
                                   ? m.target_value(load<scalar_t>(cos, row, y), m.at(row))
                                   : acc_t(0);
    auto logit = [&](bool is_target, acc_t x) {
      return m.s * (is_target ? target_value
                              : (m.modulate ? modulate_negative(x, target_value, m.t) : x));
    };
    RowSums<acc_t> sums = empty_sums<acc_t>();
    visit_row<scalar_t, G>(
        src, cos.col_stride, first, end, team.lane,
        [&](int64_t j, const acc_t(&x)[N]) {
          const int64_t target = y - j;
#pragma unroll
          for (int k = 0; k < N; ++k) {
            sums.add(logit(target == k, x[k]));
          }
        },
        [&](int64_t j, acc_t x) { sums.add(logit(j == y, x)); });
    sums = team_reduce<G>(sums);
    if (team.lane == 0) {
      if (splits == 1) {
        results.finish(row, sums, target_value, has_target, m, shape.cols);
      } else {
        acc_t* out = partials + (row * splits + blockIdx.x) * 3;
        out[0] = sums.max;
        out[1] = sums.sum;
        out[2] = sums.z_sum;
      }
    }
  }
}

// Merges the splits of each row, a warp per row, into its results.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_combine_kernel(Rows shape, Matrix cos, Margin<acc_type<scalar_t>> m,
                                 int64_t splits, const acc_type<scalar_t>* __restrict__ partials,
                                 RowResults<acc_type<scalar_t>> results) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t step = int64_t(gridDim.x) * kWarps;
  for (int64_t row = warp; row < shape.rows; row += step) {
    const int64_t y = shape.labels[row];
    const bool has_target = y >= 0 && y < shape.cols;
    if (!has_target && !m.shard) {
      if (lane == 0) {
        results.skip(row);
      }
      continue;
    }
    RowSums<acc_t> total = empty_sums<acc_t>();
    for (int64_t k = lane; k < splits; k += 32) {
      const acc_t* part = partials + (row * splits + k) * 3;
      total.merge_with(RowSums<acc_t>{part[0], part[1], part[2]});
    }
    total = warp_reduce(total);
    if (lane == 0) {
      const acc_t target_value =
          has_target ? m.target_value(load<scalar_t>(cos, row, y), m.at(row)) : acc_t(0);
      results.finish(row, total, target_value, has_target, m, shape.cols);
    }
  }
}

// The reduction of margin_cross_entropy_loss (launch_loss_reduction): one block; thread t adds
// rows t, t + kThreads, ... in order, then a fixed tree over the threads, so the sum's order never
// depends on timing. Every label is checked here, once.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_reduction_kernel(Rows shape, const acc_t* __restrict__ row_loss, int64_t reduction,
                          acc_t* __restrict__ loss, acc_t* __restrict__ divisor) {
  __shared__ double sums[kThreads];
  __shared__ int64_t targets[kThreads];
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t row = threadIdx.x; row < shape.rows; row += kThreads) {
    const int64_t y = shape.labels[row];
    CUDA_KERNEL_ASSERT_PRINTF(y < shape.cols, "labels must be < C = %lld, got a label %lld",
                              static_cast<long long>(shape.cols), static_cast<long long>(y));
    sum += static_cast<double>(row_loss[row]);  // 0 for a row without a target
    count += y >= 0 ? 1 : 0;
  }
  sums[threadIdx.x] = sum;
  targets[threadIdx.x] = count;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) {
      sums[threadIdx.x] += sums[threadIdx.x + width];
      targets[threadIdx.x] += targets[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t divide_by = reduction == 1 ? static_cast<acc_t>(max64(targets[0], 1)) : acc_t(1);
    *divisor = divide_by;
    if (reduction != 0) {
      *loss = static_cast<acc_t>(sums[0]) / divide_by;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename scalar_t>
bool warp_per_row(const Rows& shape) {
  return shape.cols * int64_t(sizeof(scalar_t)) <= kWarpRowMaxBytes;
}

// Columns per block of the elementwise kernels: one round of kUnroll packs per thread.
template <typename scalar_t>
int64_t block_tile() {
  return int64_t(kThreads) * pack_of<scalar_t>() * kUnroll;
}

template <typename scalar_t, typename Op>
cudaError_t launch_map(const Rows& shape, const Matrix& src, scalar_t* out, const Op& op,
                       cudaStream_t stream) {
  if (warp_per_row<scalar_t>(shape)) {
    const dim3 grid(1u, static_cast<unsigned>(min64(ceil_div(shape.rows, kWarps), kMaxGridY)));
    map_rows_kernel<scalar_t, 32><<<grid, kThreads, 0, stream>>>(shape, src, out, shape.cols, op);
  } else {
    const int64_t tile = block_tile<scalar_t>();
    const dim3 grid(static_cast<unsigned>(ceil_div(shape.cols, tile)),
                    static_cast<unsigned>(min64(shape.rows, kMaxGridY)));
    map_rows_kernel<scalar_t, kThreads><<<grid, kThreads, 0, stream>>>(shape, src, out, tile, op);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t logits_forward(Rows shape, Matrix cos, const MarginParams& p, void* out,
                           cudaStream_t stream) {
  const LogitsForward<scalar_t> op{Margin<acc_type<scalar_t>>(p, shape.rows), shape.labels,
                                   shape.cols, cos};
  return launch_map(shape, cos, static_cast<scalar_t*>(out), op, stream);
}

template <typename scalar_t>
cudaError_t logits_backward(Rows shape, Matrix grad, Matrix cos, const MarginParams& p, void* out,
                            void* margin_grad, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const LogitsBackward<scalar_t> op{Margin<acc_t>(p, shape.rows), shape.labels, shape.cols, cos,
                                    grad, static_cast<acc_t*>(margin_grad)};
  return launch_map(shape, grad, static_cast<scalar_t*>(out), op, stream);
}

template <typename scalar_t>
cudaError_t cross_entropy_backward(Rows shape, Matrix cos, const void* grad_rows,
                                   int64_t grad_stride, const void* lse, int64_t lse_stride,
                                   const void* divisor, const MarginParams& p, void* out,
                                   void* margin_grad, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyBackward<scalar_t> op{Margin<acc_t>(p, shape.rows),
                                          shape.labels,
                                          shape.cols,
                                          cos,
                                          static_cast<const acc_t*>(grad_rows),
                                          grad_stride,
                                          static_cast<const acc_t*>(lse),
                                          lse_stride,
                                          static_cast<const acc_t*>(divisor),
                                          static_cast<acc_t*>(margin_grad)};
  return launch_map(shape, cos, static_cast<scalar_t*>(out), op, stream);
}

// The width of a cross-entropy chunk: whole packs, so that every chunk of a row starts at the
// same offset from a 16-byte boundary (one short head per chunk at most).
template <typename scalar_t>
int64_t chunk_width(const Rows& shape, int64_t splits) {
  constexpr int N = pack_of<scalar_t>();
  return ceil_div(ceil_div(shape.cols, splits), N) * N;
}

template <typename scalar_t>
cudaError_t cross_entropy_forward(Rows shape, Matrix cos, const MarginParams& p, int64_t splits,
                                  void* workspace, const RowOutputs& outputs,
                                  cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Margin<acc_t> m(p, shape.rows);
  const RowResults<acc_t> results{
      static_cast<acc_t*>(outputs.loss),    static_cast<acc_t*>(outputs.lse),
      static_cast<acc_t*>(outputs.row_max), static_cast<acc_t*>(outputs.sum_exp),
      static_cast<acc_t*>(outputs.target),  static_cast<acc_t*>(outputs.logit_sum)};
  if (warp_per_row<scalar_t>(shape)) {
    const dim3 grid(1u, static_cast<unsigned>(min64(ceil_div(shape.rows, kWarps), kMaxGridY)));
    cross_entropy_partial_kernel<scalar_t, 32>
        <<<grid, kThreads, 0, stream>>>(shape, cos, m, shape.cols, nullptr, results);
    return cudaGetLastError();
  }
  const int64_t width = chunk_width<scalar_t>(shape, splits);
  const int64_t used_splits = ceil_div(shape.cols, width);  // <= splits
  auto* partials = static_cast<acc_t*>(workspace);
  const dim3 grid(static_cast<unsigned>(used_splits),
                  static_cast<unsigned>(min64(shape.rows, kMaxGridY)));
  cross_entropy_partial_kernel<scalar_t, kThreads>
      <<<grid, kThreads, 0, stream>>>(shape, cos, m, width, partials, results);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || used_splits == 1) {
    return status;
  }
  const int64_t blocks = min64(ceil_div(shape.rows, kWarps), int64_t(1) << 20);
  cross_entropy_combine_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      shape, cos, m, used_splits, partials, results);
  return cudaGetLastError();
}

// Blocks of the block-per-row cross-entropy kernel resident on the whole device at once, from
// the occupancy calculator; cached per device and dtype (the answer cannot change in a process).
template <typename scalar_t>
int64_t resident_blocks(int dtype_index) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices][4];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    device = -1;
  } else if (const int known = cache[device][dtype_index].load(std::memory_order_relaxed);
             known > 0) {
    return known;
  }
  int multiprocessors = 1;
  int per_sm = 0;
  if (device < 0 ||
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, cross_entropy_partial_kernel<scalar_t, kThreads>, kThreads, 0) != cudaSuccess ||
      per_sm < 1) {
    cudaGetLastError();  // clear it: a failure here only costs parallelism
    return int64_t(multiprocessors > 0 ? multiprocessors : 1) * kMinBlocksPerSM;
  }
  const int resident = multiprocessors * per_sm;
  cache[device][dtype_index].store(resident, std::memory_order_relaxed);
  return resident;
}

// The number of column chunks per row. Many rows: one (the grid is already many waves). Otherwise
// at least kMinWaves full waves of resident blocks where the row is wide enough (each chunk keeps
// one round of kUnroll packs per thread), choosing among those the split count whose last wave is
// fullest, counting a small fixed cost per block.
template <typename scalar_t>
int64_t splits_for(const Rows& shape, int dtype_index) {
  if (warp_per_row<scalar_t>(shape) || shape.rows >= kMaxGridY) {
    return 1;
  }
  const int64_t resident = resident_blocks<scalar_t>(dtype_index);
  if (shape.rows >= int64_t(kMinWaves) * resident) {
    return 1;
  }
  const int64_t min_width = block_tile<scalar_t>();
  const int64_t max_splits = min64(kMaxSplits, max64(1, shape.cols / min_width));
  const int64_t least = min64(max_splits, ceil_div(int64_t(kMinWaves) * resident, shape.rows));
  const int64_t per_block_cost = int64_t(kThreads) * pack_of<scalar_t>();  // in columns
  int64_t best = least;
  double best_cost = -1.0;
  for (int64_t s = least; s <= max_splits; ++s) {
    const int64_t used = ceil_div(shape.cols, chunk_width<scalar_t>(shape, s));
    const double waves = double(ceil_div(shape.rows * used, resident));
    const double cost = waves * double(chunk_width<scalar_t>(shape, s) + per_block_cost);
    if (best_cost < 0.0 || cost < best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return best;
}

bool is_empty(const Rows& shape) { return shape.rows <= 0 || shape.cols <= 0; }

}  // namespace

#define ANGULAR_DISPATCH_DTYPE(dtype, FN, ...)    \
  switch (dtype) {                                \
    case DType::kHalf:                            \
      return FN<c10::Half>(__VA_ARGS__);          \
    case DType::kBFloat16:                        \
      return FN<c10::BFloat16>(__VA_ARGS__);      \
    case DType::kFloat:                           \
      return FN<float>(__VA_ARGS__);              \
    case DType::kDouble:                          \
      return FN<double>(__VA_ARGS__);             \
  }                                               \
  return cudaErrorInvalidValue

cudaError_t launch_logits_forward(DType dtype, Rows shape, Matrix cos, const MarginParams& p,
                                  void* out, cudaStream_t stream) {
  if (is_empty(shape)) {
    return cudaSuccess;
  }
  ANGULAR_DISPATCH_DTYPE(dtype, logits_forward, shape, cos, p, out, stream);
}

cudaError_t launch_logits_backward(DType dtype, Rows shape, Matrix grad, Matrix cos,
                                   const MarginParams& p, void* out, void* margin_grad,
                                   cudaStream_t stream) {
  if (is_empty(shape)) {
    return cudaSuccess;
  }
  ANGULAR_DISPATCH_DTYPE(dtype, logits_backward, shape, grad, cos, p, out, margin_grad, stream);
}

int64_t cross_entropy_splits(Rows shape, DType dtype) {
  if (is_empty(shape)) {
    return 1;
  }
  switch (dtype) {
    case DType::kHalf:
      return splits_for<c10::Half>(shape, 0);
    case DType::kBFloat16:
      return splits_for<c10::BFloat16>(shape, 1);
    case DType::kFloat:
      return splits_for<float>(shape, 2);
    case DType::kDouble:
      return splits_for<double>(shape, 3);
  }
  return 1;
}

cudaError_t launch_cross_entropy_forward(DType dtype, Rows shape, Matrix cos, const MarginParams& p,
                                         int64_t splits, void* workspace,
                                         const RowOutputs& outputs, cudaStream_t stream) {
  if (shape.rows <= 0) {
    return cudaSuccess;
  }
  if (shape.cols <= 0 || splits < 1 || (splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  ANGULAR_DISPATCH_DTYPE(dtype, cross_entropy_forward, shape, cos, p, splits, workspace, outputs,
                         stream);
}

cudaError_t launch_cross_entropy_backward(DType dtype, Rows shape, Matrix cos,
                                          const void* grad_rows, int64_t grad_stride,
                                          const void* lse, int64_t lse_stride,
                                          const void* divisor, const MarginParams& p, void* out,
                                          void* margin_grad, cudaStream_t stream) {
  if (is_empty(shape)) {
    return cudaSuccess;
  }
  ANGULAR_DISPATCH_DTYPE(dtype, cross_entropy_backward, shape, cos, grad_rows, grad_stride, lse,
                         lse_stride, divisor, p, out, margin_grad, stream);
}

cudaError_t launch_loss_reduction(DType dtype, Rows shape, const void* row_loss, int64_t reduction,
                                  void* loss, void* divisor, cudaStream_t stream) {
  if (shape.rows <= 0 || reduction < 0 || reduction > 2) {
    return cudaErrorInvalidValue;
  }
  if (dtype == DType::kDouble) {
    loss_reduction_kernel<double><<<1, kThreads, 0, stream>>>(
        shape, static_cast<const double*>(row_loss), reduction, static_cast<double*>(loss),
        static_cast<double*>(divisor));
  } else {
    loss_reduction_kernel<float><<<1, kThreads, 0, stream>>>(
        shape, static_cast<const float*>(row_loss), reduction, static_cast<float*>(loss),
        static_cast<float*>(divisor));
  }
  return cudaGetLastError();
}

#undef ANGULAR_DISPATCH_DTYPE

}  // namespace angular::cuda
