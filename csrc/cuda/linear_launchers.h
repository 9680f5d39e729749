// Row kernels of the fused linear op's CUDA implementation (csrc/cuda/linear_margin_cuda.cpp) on
// one (rows, n) cosine tile of a class chunk [first, first + n): linear_margin_kernels.cu defines
// them (nvcc, lean includes). Tiles are contiguous, in the GEMM's dtype; per-row vectors are
// contiguous, in the arithmetic type (float, or double for double tiles). Labels outside
// [0, classes) mean no target.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "margin_params.h"

namespace angular::cuda::linear {

enum class TileType { kHalf, kBFloat16, kFloat, kDouble };

// p.shard (the sharded ops, angular/ops/sharded.py): rows whose label is outside [0, classes) are
// accumulated (forward) and get their off-target gradient (backward) all the same; a row whose
// upstream gradient is 0 gets 0; label smoothing spreads over p.num_classes.

// Merges the tile into the per-row state (rows x 4: max, sum of exp(z - max), sum of z, target
// logit; zero-initialised = empty), with the margin on the target column.
cudaError_t launch_tile_lse(TileType type, const void* tile, int64_t rows, int64_t n,
                            int64_t first, int64_t classes, const int64_t* labels,
                            const MarginParams& p, void* state, cudaStream_t stream);

// loss and lse per row from the merged state.
cudaError_t launch_finish(bool is_double, const void* state, int64_t rows, int64_t classes,
                          const int64_t* labels, const MarginParams& p, void* loss, void* lse,
                          cudaStream_t stream);

// Overwrites the tile with d loss / d cos (rows without a target: 0), from the per-row upstream
// gradient and log-sum-exp.
cudaError_t launch_tile_grad(TileType type, void* tile, int64_t rows, int64_t n, int64_t first,
                             int64_t classes, const int64_t* labels, const void* grad_rows,
                             const void* lse, const MarginParams& p, cudaStream_t stream);

}  // namespace angular::cuda::linear
