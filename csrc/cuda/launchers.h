// The CUDA kernels' host entry points, on raw pointers: margin_kernels.cu defines them (nvcc, lean
// includes), margin_cuda.cpp calls them with tensors (C++ compiler, torch headers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "margin_params.h"

namespace angular::cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// A (rows, cols) matrix read through strides (any, including 0), elements of the op's dtype.
struct Matrix {
  const void* data;
  int64_t row_stride;
  int64_t col_stride;
};

// The rows of a problem and their labels (contiguous int64; outside [0, cols) means no target).
struct Rows {
  int64_t rows;
  int64_t cols;
  const int64_t* labels;
};

// out (contiguous, dtype) = margin logits of cos.
cudaError_t launch_logits_forward(DType dtype, Rows shape, Matrix cos, const MarginParams& p,
                                  void* out, cudaStream_t stream);

// out (contiguous, dtype) = d logits / d cos applied to grad; with per-row margins
// (p.row_margins), margin_grad (a zeroed (4, rows) array of the arithmetic type, or null) receives
// d / d margins.
cudaError_t launch_logits_backward(DType dtype, Rows shape, Matrix grad, Matrix cos,
                                   const MarginParams& p, void* out, void* margin_grad,
                                   cudaStream_t stream);

// How many blocks share one row in the cross-entropy forward (from the kernel's occupancy on the
// current device; no synchronisation). When it is above 1 the caller allocates a workspace of
// rows * splits * 3 elements of the arithmetic type (float, or double for double).
int64_t cross_entropy_splits(Rows shape, DType dtype);

// The per-row outputs of the cross-entropy forward (rows elements each, of the arithmetic type):
// loss and lse of the margin cross-entropy; for a shard (p.shard: sharded_margin_partials),
// row_max, sum_exp, target and logit_sum instead. The others may be null.
struct RowOutputs {
  void* loss = nullptr;
  void* lse = nullptr;
  void* row_max = nullptr;
  void* sum_exp = nullptr;
  void* target = nullptr;
  void* logit_sum = nullptr;
};

// The margin cross-entropy's forward pass into outputs; workspace may be null when splits is 1.
cudaError_t launch_cross_entropy_forward(DType dtype, Rows shape, Matrix cos, const MarginParams& p,
                                         int64_t splits, void* workspace,
                                         const RowOutputs& outputs, cudaStream_t stream);

// The reduction of margin_cross_entropy_loss, one block in a fixed order (deterministic): checks
// every label (< cols; a device-side assert with the message of the CPU check otherwise), sums the
// per-row loss (arithmetic type; 0 for rows without a target) into loss (a scalar; nothing for
// reduction none, whose loss is row_loss) and writes divisor (a scalar): the rows with a target,
// at least 1, for mean, else 1. reduction: 0 none, 1 mean, 2 sum (angular::Reduction).
cudaError_t launch_loss_reduction(DType dtype, Rows shape, const void* row_loss, int64_t reduction,
                                  void* loss, void* divisor, cudaStream_t stream);

// out (contiguous, dtype) = d loss / d cos, from the per-row upstream gradient and saved lse
// (arithmetic type, read with the given strides; grad_stride 0: one gradient for every row);
// divisor (a scalar of the arithmetic type, or null for 1) divides the upstream gradient;
// margin_grad as in launch_logits_backward. Also the sharded backward (p.shard, p.num_classes).
cudaError_t launch_cross_entropy_backward(DType dtype, Rows shape, Matrix cos,
                                          const void* grad_rows, int64_t grad_stride,
                                          const void* lse, int64_t lse_stride,
                                          const void* divisor, const MarginParams& p, void* out,
                                          void* margin_grad, cudaStream_t stream);

}  // namespace angular::cuda
