// CUDA kernels of the sharded margin ops (docs/design.md, "Sharded softmax"; tensors and
// registration: sharded_margin_cuda.cpp). Math from csrc/margin_math.h; arithmetic in fp32 (fp64
// for double). They run on the caller's stream and never synchronise with the host.
//
// - Partials: one block (256 threads) per row; each thread keeps an online log-sum-exp (one
//   exponential per element) and the sum of the logits over a strided share of the columns, then
//   the block merges them in shared memory. Rows beyond the grid's y limit loop.
// - Backward: elementwise, grid = (column tiles, rows); a row whose upstream gradient is 0 is
//   written as zeros without reading cos.
// Plain scalar loads: simpler than margin_kernels.cu's 16-byte packs (not tuned yet; see
// BENCHMARKS.md, "Distributed head").
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/sharded_launchers.h"
#include "margin_math.h"

namespace angular::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxColumnBlocks = 4096;

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> load(const Matrix& m, int64_t row, int64_t col) {
  const scalar_t* data = static_cast<const scalar_t*>(m.data);
  return static_cast<acc_type<scalar_t>>(data[row * m.row_stride + col * m.col_stride]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    partials_kernel(Rows shape, Matrix cos, MarginParams p, acc_type<scalar_t>* row_max,
                    acc_type<scalar_t>* sum_exp, acc_type<scalar_t>* target,
                    acc_type<scalar_t>* logit_sum) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shared_max[kThreads];
  __shared__ acc_t shared_sum[kThreads];
  __shared__ acc_t shared_z[kThreads];
  const acc_t s = acc_t(p.s);
  for (int64_t row = blockIdx.y; row < shape.rows; row += gridDim.y) {
    const int64_t y = shape.labels[row];
    const bool own = y >= 0 && y < shape.cols;
    const acc_t z_y = own ? s * target_logit<acc_t>(load<scalar_t>(cos, row, y), acc_t(p.m1),
                                                     acc_t(p.m2), acc_t(p.m3), acc_t(p.lam))
                          : acc_t(0);
    LogSumExp<acc_t> lse{acc_t(0), acc_t(0)};
    acc_t z_sum = 0;
    for (int64_t col = threadIdx.x; col < shape.cols; col += kThreads) {
      const acc_t z = col == y ? z_y : s * load<scalar_t>(cos, row, col);
      z_sum += z;
      if (lse.sum == acc_t(0)) {
        lse = LogSumExp<acc_t>{z, acc_t(1)};
      } else if (z > lse.max) {
        lse.sum = lse.sum * math::exp_(lse.max - z) + acc_t(1);
        lse.max = z;
      } else {
        lse.sum += math::exp_(z - lse.max);
      }
    }
    shared_max[threadIdx.x] = lse.max;
    shared_sum[threadIdx.x] = lse.sum;
    shared_z[threadIdx.x] = z_sum;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) {
        const LogSumExp<acc_t> merged =
            merge(LogSumExp<acc_t>{shared_max[threadIdx.x], shared_sum[threadIdx.x]},
                  LogSumExp<acc_t>{shared_max[threadIdx.x + stride], shared_sum[threadIdx.x + stride]});
        shared_max[threadIdx.x] = merged.max;
        shared_sum[threadIdx.x] = merged.sum;
        shared_z[threadIdx.x] += shared_z[threadIdx.x + stride];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      row_max[row] = shared_max[0];
      sum_exp[row] = shared_sum[0];
      target[row] = z_y;
      logit_sum[row] = shared_z[0];
    }
    __syncthreads();  // the shared arrays are reused by the next row
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Rows shape, Matrix cos, const acc_type<scalar_t>* grad_rows,
                    int64_t grad_stride, const acc_type<scalar_t>* lse, int64_t lse_stride,
                    MarginParams p, acc_type<scalar_t> num_classes, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const acc_t s = acc_t(p.s);
  const acc_t eps = acc_t(p.label_smoothing);
  for (int64_t row = blockIdx.y; row < shape.rows; row += gridDim.y) {
    const acc_t g = grad_rows[row * grad_stride];
    const acc_t row_lse = lse[row * lse_stride];
    const int64_t y = shape.labels[row];
    const acc_t scale = s * g;
    const acc_t offset = scale * eps / num_classes;
    scalar_t* out_row = out + row * shape.cols;
    for (int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x; col < shape.cols;
         col += int64_t(gridDim.x) * kThreads) {
      acc_t value = 0;
      if (g != acc_t(0)) {  // a row without a target anywhere: 0 whatever it holds
        const acc_t c = load<scalar_t>(cos, row, col);
        value = col == y ? target_cos_grad<acc_t>(c, row_lse, g, s, acc_t(p.m1), acc_t(p.m2),
                                                  acc_t(p.m3), acc_t(p.lam), eps, num_classes,
                                                  p.straight_through)
                         : scale * math::exp_(s * c - row_lse) - offset;
      }
      out_row[col] = static_cast<scalar_t>(value);
    }
  }
}

template <typename scalar_t>
cudaError_t sharded_partials(Rows shape, Matrix cos, const MarginParams& p, void* row_max,
                             void* sum_exp, void* target, void* logit_sum, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const dim3 grid(1, static_cast<unsigned>(shape.rows < kMaxGridY ? shape.rows : kMaxGridY));
  partials_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      shape, cos, p, static_cast<acc_t*>(row_max), static_cast<acc_t*>(sum_exp),
      static_cast<acc_t*>(target), static_cast<acc_t*>(logit_sum));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t sharded_backward(Rows shape, Matrix cos, const void* grad_rows, int64_t grad_stride,
                             const void* lse, int64_t lse_stride, const MarginParams& p,
                             int64_t num_classes, void* out, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t column_blocks = (shape.cols + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(column_blocks < kMaxColumnBlocks ? column_blocks
                                                                         : kMaxColumnBlocks),
                  static_cast<unsigned>(shape.rows < kMaxGridY ? shape.rows : kMaxGridY));
  backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      shape, cos, static_cast<const acc_t*>(grad_rows), grad_stride,
      static_cast<const acc_t*>(lse), lse_stride, p, static_cast<acc_t>(num_classes),
      static_cast<scalar_t*>(out));
  return cudaGetLastError();
}

bool is_empty(const Rows& shape) { return shape.rows <= 0 || shape.cols <= 0; }

}  // namespace

#define ANGULAR_SHARDED_DISPATCH(dtype, FN, ...) \
  switch (dtype) {                               \
    case DType::kHalf:                           \
      return FN<c10::Half>(__VA_ARGS__);         \
    case DType::kBFloat16:                       \
      return FN<c10::BFloat16>(__VA_ARGS__);     \
    case DType::kFloat:                          \
      return FN<float>(__VA_ARGS__);             \
    case DType::kDouble:                         \
      return FN<double>(__VA_ARGS__);            \
  }                                              \
  return cudaErrorInvalidValue

cudaError_t launch_sharded_partials(DType dtype, Rows shape, Matrix cos, const MarginParams& p,
                                    void* row_max, void* sum_exp, void* target, void* logit_sum,
                                    cudaStream_t stream) {
  if (is_empty(shape)) {
    return cudaSuccess;
  }
  ANGULAR_SHARDED_DISPATCH(dtype, sharded_partials, shape, cos, p, row_max, sum_exp, target,
                           logit_sum, stream);
}

cudaError_t launch_sharded_backward(DType dtype, Rows shape, Matrix cos, const void* grad_rows,
                                    int64_t grad_stride, const void* lse, int64_t lse_stride,
                                    const MarginParams& p, int64_t num_classes, void* out,
                                    cudaStream_t stream) {
  if (is_empty(shape)) {
    return cudaSuccess;
  }
  ANGULAR_SHARDED_DISPATCH(dtype, sharded_backward, shape, cos, grad_rows, grad_stride, lse,
                           lse_stride, p, num_classes, out, stream);
}

#undef ANGULAR_SHARDED_DISPATCH

}  // namespace angular::cuda
