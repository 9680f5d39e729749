// CUDA implementations of the sharded margin ops (schemas in csrc/sharded_ops.cpp): checks, output
// allocation and the launches of sharded_margin_kernels.cu on the current stream. Built only with
// CUDA.
#ifdef ANGULAR_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/sharded_launchers.h"
#include "op_common.h"

namespace angular::cuda {
namespace {

DType sharded_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      TORCH_CHECK(false, "angular: unsupported dtype ", t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sharded_margin_partials_cuda(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam) {
  const char* op = "angular::sharded_margin_partials";
  check_cos_labels(cos, labels, op);
  TORCH_CHECK(cos.size(1) >= 1, op, ": cos must have C_local >= 1 columns, got ", cos.sizes());
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::Tensor label_vec = labels.contiguous();
  const auto options = cos.options().dtype(compute_dtype(cos.scalar_type()));
  const int64_t rows = cos.size(0);
  at::Tensor row_max = at::empty({rows}, options), sum_exp = at::empty({rows}, options);
  at::Tensor target = at::empty({rows}, options), logit_sum = at::empty({rows}, options);
  const MarginParams p{s, m1, m2, m3, lam, 0.0, false};
  C10_CUDA_CHECK(launch_sharded_partials(
      sharded_dtype(cos), Rows{rows, cos.size(1), label_vec.const_data_ptr<int64_t>()},
      Matrix{cos.const_data_ptr(), cos.stride(0), cos.stride(1)}, p, row_max.mutable_data_ptr(),
      sum_exp.mutable_data_ptr(), target.mutable_data_ptr(), logit_sum.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream()));
  return {row_max, sum_exp, target, logit_sum};
}

at::Tensor sharded_margin_cross_entropy_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& lse, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, int64_t num_classes, bool straight_through) {
  const char* op = "angular::sharded_margin_cross_entropy_backward";
  check_cos_labels(cos, labels, op);
  check_rows(grad_rows, cos, op, "grad_rows");
  check_rows(lse, cos, op, "lse");
  TORCH_CHECK(num_classes >= cos.size(1), op, ": num_classes must be >= C_local = ", cos.size(1),
              ", got ", num_classes);
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::ScalarType acc_dtype = compute_dtype(cos.scalar_type());
  const at::Tensor grad_vec = as_dtype(grad_rows, acc_dtype);
  const at::Tensor lse_vec = as_dtype(lse, acc_dtype);
  const at::Tensor label_vec = labels.contiguous();
  at::Tensor out = empty_matrix(cos);
  const MarginParams p{s, m1, m2, m3, lam, label_smoothing, straight_through};
  C10_CUDA_CHECK(launch_sharded_backward(
      sharded_dtype(cos), Rows{cos.size(0), cos.size(1), label_vec.const_data_ptr<int64_t>()},
      Matrix{cos.const_data_ptr(), cos.stride(0), cos.stride(1)}, grad_vec.const_data_ptr(),
      grad_vec.stride(0), lse_vec.const_data_ptr(), lse_vec.stride(0), p, num_classes,
      out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(angular, CUDA, m) {
  m.impl("sharded_margin_partials", &sharded_margin_partials_cuda);
  m.impl("sharded_margin_cross_entropy_backward", &sharded_margin_cross_entropy_backward_cuda);
}

}  // namespace angular::cuda

#endif  // ANGULAR_WITH_CUDA
