// Row kernels of the fused linear op on one cosine tile (declared in csrc/cuda/linear_launchers.h;
// margin math from csrc/margin_math.h). One block per row of the tile: the block's threads stride
// over the row's n columns, keep an online log-sum-exp each, and merge them in shared memory.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear_launchers.h"
#include "margin_math.h"

namespace angular::cuda::linear {
namespace {

constexpr int kThreads = 256;

// shard (MarginParams::shard): the tile is one shard's; rows whose target lives in another shard
// are read all the same, and num_classes (0: the tile's classes) is what label smoothing spreads
// over.
template <typename acc_t>
struct Params {
  acc_t s, m1, m2, m3, lam, eps;
  bool straight_through;
  bool shard;
  acc_t num_classes;
};

template <typename acc_t>
Params<acc_t> params_of(const MarginParams& p) {
  return Params<acc_t>{acc_t(p.s),   acc_t(p.m1),  acc_t(p.m2),
                       acc_t(p.m3),  acc_t(p.lam), acc_t(p.label_smoothing),
                       p.straight_through, p.shard, acc_t(p.num_classes)};
}

__device__ inline bool has_target(int64_t y, int64_t classes) { return y >= 0 && y < classes; }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tile_lse_kernel(const scalar_t* __restrict__ tile, int64_t n, int64_t first, int64_t classes,
                    const int64_t* __restrict__ labels, Params<acc_type<scalar_t>> p,
                    acc_type<scalar_t>* __restrict__ state) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shared_max[kThreads];
  __shared__ acc_t shared_sum[kThreads];
  __shared__ acc_t shared_z[kThreads];
  const int64_t row = blockIdx.x;
  const int64_t y = labels[row];
  if (!p.shard && !has_target(y, classes)) {
    return;  // loss 0: nothing to accumulate
  }
  const scalar_t* __restrict__ src = tile + row * n;
  const int64_t target = y - first;  // in [0, n) when the target is in this chunk
  LogSumExp<acc_t> mine{acc_t(0), acc_t(0)};
  acc_t z_sum = acc_t(0);
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const acc_t c = static_cast<acc_t>(src[j]);
    const acc_t z = j == target ? p.s * target_logit(c, p.m1, p.m2, p.m3, p.lam) : p.s * c;
    z_sum += z;
    mine = merge(mine, LogSumExp<acc_t>{z, acc_t(1)});
  }
  shared_max[threadIdx.x] = mine.max;
  shared_sum[threadIdx.x] = mine.sum;
  shared_z[threadIdx.x] = z_sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const int other = threadIdx.x + stride;
      const LogSumExp<acc_t> merged =
          merge(LogSumExp<acc_t>{shared_max[threadIdx.x], shared_sum[threadIdx.x]},
                LogSumExp<acc_t>{shared_max[other], shared_sum[other]});
      shared_max[threadIdx.x] = merged.max;
      shared_sum[threadIdx.x] = merged.sum;
      shared_z[threadIdx.x] += shared_z[other];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    acc_t* s = state + row * 4;
    const LogSumExp<acc_t> total =
        merge(LogSumExp<acc_t>{s[0], s[1]}, LogSumExp<acc_t>{shared_max[0], shared_sum[0]});
    s[0] = total.max;
    s[1] = total.sum;
    s[2] += shared_z[0];
    if (target >= 0 && target < n) {
      s[3] = p.s * target_logit(static_cast<acc_t>(src[target]), p.m1, p.m2, p.m3, p.lam);
    }
  }
}

template <typename acc_t>
__global__ void finish_kernel(const acc_t* __restrict__ state, int64_t rows, int64_t classes,
                              const int64_t* __restrict__ labels, acc_t eps,
                              acc_t* __restrict__ loss, acc_t* __restrict__ lse) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) {
    return;
  }
  if (!has_target(labels[row], classes)) {
    loss[row] = acc_t(0);
    lse[row] = acc_t(0);
    return;
  }
  const acc_t* s = state + row * 4;
  const acc_t row_lse = s[0] + math::log_(s[1]);
  lse[row] = row_lse;
  loss[row] = smoothed_loss<acc_t>(row_lse, s[3], s[2], acc_t(classes), eps);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tile_grad_kernel(scalar_t* __restrict__ tile, int64_t n, int64_t first, int64_t classes,
                     const int64_t* __restrict__ labels,
                     const acc_type<scalar_t>* __restrict__ grad_rows,
                     const acc_type<scalar_t>* __restrict__ lse, Params<acc_type<scalar_t>> p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t y = labels[row];
  scalar_t* __restrict__ dst = tile + row * n;
  const acc_t g = grad_rows[row];
  if (p.shard ? g == acc_t(0) : !has_target(y, classes)) {
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      dst[j] = static_cast<scalar_t>(acc_t(0));
    }
    return;
  }
  const acc_t row_lse = lse[row];
  const acc_t num_classes = p.num_classes > acc_t(0) ? p.num_classes : acc_t(classes);
  const acc_t scale = p.s * g;
  const acc_t offset = scale * p.eps / num_classes;
  const int64_t target = y - first;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const acc_t c = static_cast<acc_t>(dst[j]);
    const acc_t value =
        j == target ? target_cos_grad<acc_t>(c, row_lse, g, p.s, p.m1, p.m2, p.m3, p.lam, p.eps,
                                             num_classes, p.straight_through)
                    : scale * math::exp_(p.s * c - row_lse) - offset;
    dst[j] = static_cast<scalar_t>(value);
  }
}

template <typename Fn>
cudaError_t with_type(TileType type, const Fn& fn) {
  switch (type) {
    case TileType::kHalf:
      return fn(c10::Half{});
    case TileType::kBFloat16:
      return fn(c10::BFloat16{});
    case TileType::kFloat:
      return fn(float{});
    case TileType::kDouble:
      return fn(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_tile_lse(TileType type, const void* tile, int64_t rows, int64_t n,
                            int64_t first, int64_t classes, const int64_t* labels,
                            const MarginParams& p, void* state, cudaStream_t stream) {
  return with_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    tile_lse_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(tile), n, first, classes, labels, params_of<acc_t>(p),
        static_cast<acc_t*>(state));
    return cudaGetLastError();
  });
}

cudaError_t launch_finish(bool is_double, const void* state, int64_t rows, int64_t classes,
                          const int64_t* labels, const MarginParams& p, void* loss, void* lse,
                          cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((rows + kThreads - 1) / kThreads);
  if (is_double) {
    finish_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(state), rows, classes, labels, p.label_smoothing,
        static_cast<double*>(loss), static_cast<double*>(lse));
  } else {
    finish_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(state), rows, classes, labels,
        static_cast<float>(p.label_smoothing), static_cast<float*>(loss),
        static_cast<float*>(lse));
  }
  return cudaGetLastError();
}

cudaError_t launch_tile_grad(TileType type, void* tile, int64_t rows, int64_t n, int64_t first,
                             int64_t classes, const int64_t* labels, const void* grad_rows,
                             const void* lse, const MarginParams& p, cudaStream_t stream) {
  return with_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    tile_grad_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<scalar_t*>(tile), n, first, classes, labels,
        static_cast<const acc_t*>(grad_rows), static_cast<const acc_t*>(lse),
        params_of<acc_t>(p));
    return cudaGetLastError();
  });
}

}  // namespace angular::cuda::linear
