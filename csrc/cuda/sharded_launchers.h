// Host entry points of the sharded margin kernels (sharded_margin_kernels.cu, nvcc) called by
// sharded_margin_cuda.cpp (C++ compiler, torch headers). Types from launchers.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launchers.h"
#include "margin_params.h"

namespace angular::cuda {

// Per-row (max, sum of exp, target logit, sum of logits) of one shard, each `shape.rows` elements
// of the arithmetic type (float, double for double). Labels outside [0, cols): target elsewhere.
cudaError_t launch_sharded_partials(DType dtype, Rows shape, Matrix cos, const MarginParams& p,
                                    void* row_max, void* sum_exp, void* target, void* logit_sum,
                                    cudaStream_t stream);

// out (contiguous, dtype) = the shard's d loss / d cos, from the per-row upstream gradient and the
// global lse (arithmetic type, read with the given strides); label smoothing over num_classes.
cudaError_t launch_sharded_backward(DType dtype, Rows shape, Matrix cos, const void* grad_rows,
                                    int64_t grad_stride, const void* lse, int64_t lse_stride,
                                    const MarginParams& p, int64_t num_classes, void* out,
                                    cudaStream_t stream);

}  // namespace angular::cuda
