// CUDA kernels of the angular ops, on raw pointers (tensors and registration: margin_cuda.cpp).
// The margin math comes from csrc/margin_math.h, shared with the CPU kernels. Arithmetic is fp32
// for half, bfloat16 and float inputs, fp64 for double. Every kernel runs on the caller's stream.
//
// - Elementwise ops (margin_logits, both backwards): grid = (column tiles, rows); each thread
//   handles 16-byte packs when the row is contiguous and 16-byte aligned, scalars otherwise (any
//   strides, including 0).
// - margin_cross_entropy forward: grid = (splits, rows). Each block reduces one column chunk of a
//   row to a partial (max, sum of exp, sum of z) with an online log-sum-exp (one read of cos, one
//   exponential per element); a second tiny kernel merges the splits of each row into its loss and
//   log-sum-exp. Splits are chosen so that the grid fills the GPU even for a few huge rows (e.g.
//   B = 128, C = 1,000,000). The workspace is rows * splits * 3 numbers, never B x C.
// Includes stay lean (no torch/extension.h) so that nvcc compiles this file quickly.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launchers.h"
#include "margin_math.h"

namespace angular::cuda {
namespace {

constexpr int kThreads = 256;       // threads per block, 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kPacksPerThread = 4;  // elementwise tile: this many 16-byte packs per thread
constexpr int64_t kMaxGridY = 65535;

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
C10_HOST_DEVICE inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return ::exp(x); }

// 16 bytes of scalars: one vector load or store.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int size = 16 / sizeof(scalar_t);
  scalar_t v[size];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// out[row, j] = op(op.row(...), j, src[row, j]) for every column of every row. Op::Row holds a
// row's constants (computed once per block and row); Row::zero skips reading the row.
template <typename scalar_t, typename Op>
__global__ void __launch_bounds__(kThreads)
    map_rows_kernel(Rows shape, Matrix src_matrix, scalar_t* out, Op op) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = Pack<scalar_t>::size;
  const int64_t tile = int64_t(kThreads) * N * kPacksPerThread;
  const int64_t first = int64_t(blockIdx.x) * tile;
  const int64_t end = min64(shape.cols, first + tile);
  for (int64_t row = blockIdx.y; row < shape.rows; row += gridDim.y) {
    const typename Op::Row r = op.row(row, first, end);
    scalar_t* dst = out + row * shape.cols;
    if (r.zero) {
      for (int64_t j = first + threadIdx.x; j < end; j += kThreads) {
        dst[j] = static_cast<scalar_t>(acc_t(0));
      }
      continue;
    }
    const scalar_t* src = static_cast<const scalar_t*>(src_matrix.data) + row * src_matrix.row_stride;
    int64_t scalar_from = first;
    if (src_matrix.col_stride == 1 && aligned16(src + first) && aligned16(dst + first)) {
      const int64_t packs = (end - first) / N;
      for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
        const int64_t j = first + p * N;
        const Pack<scalar_t> in = *reinterpret_cast<const Pack<scalar_t>*>(src + j);
        Pack<scalar_t> res;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          res.v[k] = static_cast<scalar_t>(op(r, j + k, static_cast<acc_t>(in.v[k])));
        }
        *reinterpret_cast<Pack<scalar_t>*>(dst + j) = res;
      }
      scalar_from = first + packs * N;
    }
    for (int64_t j = scalar_from + threadIdx.x; j < end; j += kThreads) {
      dst[j] = static_cast<scalar_t>(op(r, j, static_cast<acc_t>(src[j * src_matrix.col_stride])));
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> load(const Matrix& m, int64_t row, int64_t col) {
  return static_cast<acc_type<scalar_t>>(
      static_cast<const scalar_t*>(m.data)[row * m.row_stride + col * m.col_stride]);
}

// The margin parameters in the arithmetic type.
template <typename acc_t>
struct Margin {
  acc_t s, m1, m2, m3, lam, eps;
  bool straight_through;

  explicit Margin(const MarginParams& p)
      : s(acc_t(p.s)),
        m1(acc_t(p.m1)),
        m2(acc_t(p.m2)),
        m3(acc_t(p.m3)),
        lam(acc_t(p.lam)),
        eps(acc_t(p.label_smoothing)),
        straight_through(p.straight_through) {}
};

// z = s * cos, and s * f_y in the target column. Labels outside [0, C) match no column.
template <typename scalar_t>
struct LogitsForward {
  using acc_t = acc_type<scalar_t>;
  Margin<acc_t> m;
  const int64_t* labels;
  struct Row {
    int64_t target;
    bool zero;
  };
  __device__ Row row(int64_t row, int64_t, int64_t) const { return Row{labels[row], false}; }
  __device__ acc_t operator()(const Row& r, int64_t j, acc_t x) const {
    return j == r.target ? m.s * target_logit(x, m.m1, m.m2, m.m3, m.lam) : m.s * x;
  }
};

// grad_cos = s * grad, times d f_y / d cos_y in the target column.
template <typename scalar_t>
struct LogitsBackward {
  using acc_t = acc_type<scalar_t>;
  Margin<acc_t> m;
  const int64_t* labels;
  Matrix cos;
  struct Row {
    int64_t target;
    acc_t target_factor;
    bool zero;
  };
  __device__ Row row(int64_t row, int64_t first, int64_t end) const {
    const int64_t y = labels[row];
    acc_t factor = acc_t(0);
    if (y >= first && y < end) {
      factor = m.s * target_logit_grad(load<scalar_t>(cos, row, y), m.m1, m.m2, m.lam,
                                       m.straight_through);
    }
    return Row{y, factor, false};
  }
  __device__ acc_t operator()(const Row& r, int64_t j, acc_t g) const {
    return j == r.target ? g * r.target_factor : m.s * g;
  }
};

// grad_cos = s * g * (softmax - eps / C), and target_cos_grad in the target column; 0 for rows
// without a target.
template <typename scalar_t>
struct CrossEntropyBackward {
  using acc_t = acc_type<scalar_t>;
  Margin<acc_t> m;
  const int64_t* labels;
  int64_t cols;
  Matrix cos;
  const acc_t* grad_rows;
  int64_t grad_stride;
  const acc_t* lse;
  int64_t lse_stride;
  struct Row {
    int64_t target;
    acc_t scale;
    acc_t minus_offset;
    acc_t lse;
    acc_t target_grad;
    bool zero;
  };
  __device__ Row row(int64_t row, int64_t first, int64_t end) const {
    Row r{labels[row], acc_t(0), acc_t(0), acc_t(0), acc_t(0), false};
    if (r.target < 0 || r.target >= cols) {
      r.zero = true;
      return r;
    }
    const acc_t g = grad_rows[row * grad_stride];
    r.lse = lse[row * lse_stride];
    r.scale = m.s * g;
    r.minus_offset = -r.scale * m.eps / acc_t(cols);
    if (r.target >= first && r.target < end) {
      r.target_grad = target_cos_grad(load<scalar_t>(cos, row, r.target), r.lse, g, m.s, m.m1,
                                      m.m2, m.m3, m.lam, m.eps, acc_t(cols), m.straight_through);
    }
    return r;
  }
  __device__ acc_t operator()(const Row& r, int64_t j, acc_t x) const {
    return j == r.target ? r.target_grad
                         : math::fma_(r.scale, fast_exp(math::fma_(m.s, x, -r.lse)), r.minus_offset);
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

// Block-wide reduction; the result is valid in thread 0. Every thread of the block must call it.
template <typename acc_t>
__device__ RowSums<acc_t> block_reduce(RowSums<acc_t> a) {
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

// Partial (max, sum, z_sum) of columns [blockIdx.x * width, +width) of each row with a target.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_partial_kernel(Rows shape, Matrix cos, Margin<acc_type<scalar_t>> m,
                                 int64_t width, int64_t splits, acc_type<scalar_t>* partials) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = Pack<scalar_t>::size;
  const int64_t first = int64_t(blockIdx.x) * width;
  const int64_t end = min64(shape.cols, first + width);
  for (int64_t row = blockIdx.y; row < shape.rows; row += gridDim.y) {
    const int64_t y = shape.labels[row];
    if (y < 0 || y >= shape.cols) {
      continue;  // the same for the whole block: no target, nothing to read
    }
    const scalar_t* src = static_cast<const scalar_t*>(cos.data) + row * cos.row_stride;
    const acc_t target_value = (y >= first && y < end)
                                   ? target_logit(load<scalar_t>(cos, row, y), m.m1, m.m2, m.m3,
                                                  m.lam)
                                   : acc_t(0);
    RowSums<acc_t> sums = empty_sums<acc_t>();
    int64_t scalar_from = first;
    if (cos.col_stride == 1 && aligned16(src + first)) {
      const int64_t packs = (end - first) / N;
      for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
        const int64_t j = first + p * N;
        const Pack<scalar_t> in = *reinterpret_cast<const Pack<scalar_t>*>(src + j);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const acc_t x = j + k == y ? target_value : static_cast<acc_t>(in.v[k]);
          sums.add(m.s * x);
        }
      }
      scalar_from = first + packs * N;
    }
    for (int64_t j = scalar_from + threadIdx.x; j < end; j += kThreads) {
      const acc_t x = j == y ? target_value : static_cast<acc_t>(src[j * cos.col_stride]);
      sums.add(m.s * x);
    }
    sums = block_reduce(sums);
    if (threadIdx.x == 0) {
      acc_t* out = partials + (row * splits + blockIdx.x) * 3;
      out[0] = sums.max;
      out[1] = sums.sum;
      out[2] = sums.z_sum;
    }
  }
}

// Merges the splits of each row: loss and log-sum-exp (both 0 for a row without target).
template <typename scalar_t>
__global__ void cross_entropy_combine_kernel(Rows shape, Matrix cos, Margin<acc_type<scalar_t>> m,
                                             int64_t splits, const acc_type<scalar_t>* partials,
                                             acc_type<scalar_t>* loss, acc_type<scalar_t>* lse) {
  using acc_t = acc_type<scalar_t>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < shape.rows;
       row += step) {
    const int64_t y = shape.labels[row];
    if (y < 0 || y >= shape.cols) {
      loss[row] = acc_t(0);
      lse[row] = acc_t(0);
      continue;
    }
    RowSums<acc_t> total = empty_sums<acc_t>();
    for (int64_t k = 0; k < splits; ++k) {
      const acc_t* part = partials + (row * splits + k) * 3;
      total.merge_with(RowSums<acc_t>{part[0], part[1], part[2]});
    }
    const acc_t row_lse = total.max + math::log_(total.sum);
    const acc_t z_y =
        m.s * target_logit(load<scalar_t>(cos, row, y), m.m1, m.m2, m.m3, m.lam);
    loss[row] = smoothed_loss(row_lse, z_y, total.z_sum, acc_t(shape.cols), m.eps);
    lse[row] = row_lse;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename scalar_t>
dim3 map_grid(const Rows& shape) {
  const int64_t tile = int64_t(kThreads) * Pack<scalar_t>::size * kPacksPerThread;
  return dim3(static_cast<unsigned>(ceil_div(shape.cols, tile)),
              static_cast<unsigned>(min64(shape.rows, kMaxGridY)));
}

template <typename scalar_t>
cudaError_t logits_forward(Rows shape, Matrix cos, const MarginParams& p, void* out,
                           cudaStream_t stream) {
  const LogitsForward<scalar_t> op{Margin<acc_type<scalar_t>>(p), shape.labels};
  map_rows_kernel<scalar_t><<<map_grid<scalar_t>(shape), kThreads, 0, stream>>>(
      shape, cos, static_cast<scalar_t*>(out), op);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t logits_backward(Rows shape, Matrix grad, Matrix cos, const MarginParams& p, void* out,
                            cudaStream_t stream) {
  const LogitsBackward<scalar_t> op{Margin<acc_type<scalar_t>>(p), shape.labels, cos};
  map_rows_kernel<scalar_t><<<map_grid<scalar_t>(shape), kThreads, 0, stream>>>(
      shape, grad, static_cast<scalar_t*>(out), op);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t cross_entropy_forward(Rows shape, Matrix cos, const MarginParams& p, int64_t splits,
                                  void* workspace, void* loss, void* lse, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Margin<acc_t> m(p);
  constexpr int N = Pack<scalar_t>::size;
  // Chunks of whole packs, so that every chunk of an aligned row starts aligned.
  const int64_t width = ceil_div(ceil_div(shape.cols, splits), N) * N;
  const int64_t used_splits = ceil_div(shape.cols, width);  // <= splits
  auto* partials = static_cast<acc_t*>(workspace);
  const dim3 grid(static_cast<unsigned>(used_splits),
                  static_cast<unsigned>(min64(shape.rows, kMaxGridY)));
  cross_entropy_partial_kernel<scalar_t>
      <<<grid, kThreads, 0, stream>>>(shape, cos, m, width, used_splits, partials);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return status;
  }
  const int64_t blocks = min64(ceil_div(shape.rows, kThreads), int64_t(1) << 20);
  cross_entropy_combine_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      shape, cos, m, used_splits, partials, static_cast<acc_t*>(loss), static_cast<acc_t*>(lse));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t cross_entropy_backward(Rows shape, Matrix cos, const void* grad_rows,
                                   int64_t grad_stride, const void* lse, int64_t lse_stride,
                                   const MarginParams& p, void* out, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyBackward<scalar_t> op{Margin<acc_t>(p),
                                          shape.labels,
                                          shape.cols,
                                          cos,
                                          static_cast<const acc_t*>(grad_rows),
                                          grad_stride,
                                          static_cast<const acc_t*>(lse),
                                          lse_stride};
  map_rows_kernel<scalar_t><<<map_grid<scalar_t>(shape), kThreads, 0, stream>>>(
      shape, cos, static_cast<scalar_t*>(out), op);
  return cudaGetLastError();
}

int pack_size(DType dtype) {
  switch (dtype) {
    case DType::kHalf:
    case DType::kBFloat16:
      return 8;
    case DType::kFloat:
      return 4;
    case DType::kDouble:
      return 2;
  }
  return 1;
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
                                   const MarginParams& p, void* out, cudaStream_t stream) {
  if (is_empty(shape)) {
    return cudaSuccess;
  }
  ANGULAR_DISPATCH_DTYPE(dtype, logits_backward, shape, grad, cos, p, out, stream);
}

int64_t cross_entropy_splits(Rows shape, DType dtype) {
  if (is_empty(shape)) {
    return 1;
  }
  int device = 0;
  int multiprocessors = 1;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess) {
    cudaGetLastError();  // clear it: a failure here only costs parallelism
    multiprocessors = 1;
  }
  const int64_t resident_blocks = int64_t(multiprocessors) * (2048 / kThreads);
  // Each block gets at least kPacksPerThread packs per thread, so splitting pays off.
  const int64_t min_width = int64_t(kThreads) * pack_size(dtype) * kPacksPerThread;
  const int64_t max_splits = shape.cols / min_width > 1 ? shape.cols / min_width : 1;
  const int64_t wanted = ceil_div(resident_blocks, shape.rows);
  return wanted < 1 ? 1 : min64(wanted, max_splits);
}

cudaError_t launch_cross_entropy_forward(DType dtype, Rows shape, Matrix cos, const MarginParams& p,
                                         int64_t splits, void* workspace, void* loss, void* lse,
                                         cudaStream_t stream) {
  if (shape.rows <= 0) {
    return cudaSuccess;
  }
  if (shape.cols <= 0 || splits < 1) {
    return cudaErrorInvalidValue;
  }
  ANGULAR_DISPATCH_DTYPE(dtype, cross_entropy_forward, shape, cos, p, splits, workspace, loss, lse,
                         stream);
}

cudaError_t launch_cross_entropy_backward(DType dtype, Rows shape, Matrix cos,
                                          const void* grad_rows, int64_t grad_stride,
                                          const void* lse, int64_t lse_stride,
                                          const MarginParams& p, void* out, cudaStream_t stream) {
  if (is_empty(shape)) {
    return cudaSuccess;
  }
  ANGULAR_DISPATCH_DTYPE(dtype, cross_entropy_backward, shape, cos, grad_rows, grad_stride, lse,
                         lse_stride, p, out, stream);
}

#undef ANGULAR_DISPATCH_DTYPE

}  // namespace angular::cuda
