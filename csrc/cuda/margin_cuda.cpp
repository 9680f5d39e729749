// CUDA implementations of the angular margin ops (the scalar ones, their *_rows variants, and the
// sharded ops of csrc/sharded_ops.cpp, which share the cross-entropy's kernels): checks, output
// allocation, and the launch of the kernels in margin_kernels.cu on the current stream of cos's
// device. Built only with CUDA.
#ifdef ANGULAR_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/launchers.h"
#include "op_common.h"

namespace angular::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
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

Matrix matrix_of(const at::Tensor& t) { return Matrix{t.const_data_ptr(), t.stride(0), t.stride(1)}; }

// A (B, C) operand the kernels stream through, in an order they read well: columns contiguous, or
// stride 0 (a broadcast). Others, column-major ones above all (cos = (W @ x.T).T has strides
// (1, B)), would be read B elements apart, one sector per element: one contiguous copy costs less.
at::Tensor streamable(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 || t.stride(1) == 0 ? t : t.contiguous();
}

Rows rows_of(const at::Tensor& cos, const at::Tensor& contiguous_labels) {
  return Rows{cos.size(0), cos.size(1), contiguous_labels.const_data_ptr<int64_t>()};
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Per-row outputs (loss, lse, partial statistics): the arithmetic type, on cos's device.
at::TensorOptions row_options(const at::Tensor& cos) {
  return cos.options().dtype(compute_dtype(cos.scalar_type()));
}

// The per-row margins and modulation of a *_rows call, into the kernels' parameters.
MarginParams with_rows(MarginParams p, const at::Tensor* rows, std::optional<double> negative_t) {
  if (rows != nullptr) {
    p.row_margins = rows->const_data_ptr();
  }
  p.modulate = negative_t.has_value();
  p.negative_t = negative_t.value_or(0.0);
  return p;
}

at::Tensor logits_forward(const at::Tensor& cos, const at::Tensor& labels, const MarginParams& p) {
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::Tensor label_vec = labels.contiguous();
  const at::Tensor cos_in = streamable(cos);
  at::Tensor out = empty_matrix(cos);
  C10_CUDA_CHECK(launch_logits_forward(dtype_of(cos), rows_of(cos, label_vec), matrix_of(cos_in),
                                       p, out.mutable_data_ptr(), current_stream()));
  return out;
}

at::Tensor logits_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& labels,
                           const MarginParams& p, const at::Tensor& margin_grad) {
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::Tensor grad_in = streamable(as_dtype(grad, cos.scalar_type()));  // cos: targets only
  const at::Tensor label_vec = labels.contiguous();
  at::Tensor out = empty_matrix(cos);
  C10_CUDA_CHECK(launch_logits_backward(
      dtype_of(cos), rows_of(cos, label_vec), matrix_of(grad_in), matrix_of(cos), p,
      out.mutable_data_ptr(), margin_grad.defined() ? margin_grad.mutable_data_ptr() : nullptr,
      current_stream()));
  return out;
}

// The cross-entropy forward's pass over cos into outputs (per-row arrays of the arithmetic type
// on cos's device): the loss and lse, or a shard's partial statistics (p.shard).
void forward_rows(const at::Tensor& cos, const at::Tensor& labels, const MarginParams& p,
                  const RowOutputs& outputs) {
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::Tensor label_vec = labels.contiguous();
  const at::Tensor cos_in = streamable(cos);
  const Rows shape = rows_of(cos, label_vec);
  const DType dtype = dtype_of(cos);
  const int64_t splits = cross_entropy_splits(shape, dtype);
  // B x splits x 3 partial sums, not B x C; none with one split (the kernel writes the outputs).
  at::Tensor workspace;
  if (splits > 1) {
    workspace = at::empty({cos.size(0) * splits * 3}, row_options(cos));
  }
  C10_CUDA_CHECK(launch_cross_entropy_forward(dtype, shape, matrix_of(cos_in), p, splits,
                                              splits > 1 ? workspace.mutable_data_ptr() : nullptr,
                                              outputs, current_stream()));
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& cos,
                                                         const at::Tensor& labels,
                                                         const MarginParams& p, const char* op) {
  check_columns(cos, op, "C");
  at::Tensor loss = at::empty({cos.size(0)}, row_options(cos));
  at::Tensor lse = at::empty({cos.size(0)}, row_options(cos));
  RowOutputs outputs;
  outputs.loss = loss.mutable_data_ptr();
  outputs.lse = lse.mutable_data_ptr();
  forward_rows(cos, labels, p, outputs);
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_rows, const at::Tensor& cos,
                                  const at::Tensor& labels, const at::Tensor& lse,
                                  const MarginParams& p, const at::Tensor& margin_grad,
                                  const at::Tensor& divisor = {}) {
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::ScalarType acc_dtype = compute_dtype(cos.scalar_type());
  // Often expanded: read by stride; a scalar (a reduced loss's gradient) is every row's.
  const at::Tensor grad_vec = as_dtype(grad_rows, acc_dtype);
  const at::Tensor lse_vec = as_dtype(lse, acc_dtype);
  const at::Tensor label_vec = labels.contiguous();
  const at::Tensor cos_in = streamable(cos);
  at::Tensor out = empty_matrix(cos);
  C10_CUDA_CHECK(launch_cross_entropy_backward(
      dtype_of(cos), rows_of(cos, label_vec), matrix_of(cos_in), grad_vec.const_data_ptr(),
      grad_vec.dim() == 0 ? 0 : grad_vec.stride(0), lse_vec.const_data_ptr(), lse_vec.stride(0),
      divisor.defined() ? divisor.const_data_ptr() : nullptr, p, out.mutable_data_ptr(),
      margin_grad.defined() ? margin_grad.mutable_data_ptr() : nullptr, current_stream()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// The registered kernels: the scalar ops, then the *_rows ops (per-row margins, modulation).

at::Tensor margin_logits_cuda(const at::Tensor& cos, const at::Tensor& labels, double s, double m1,
                              double m2, double m3, double lam, bool straight_through) {
  check_cos_labels(cos, labels, "angular::margin_logits");
  return logits_forward(cos, labels, MarginParams{s, m1, m2, m3, lam, 0.0, straight_through});
}

at::Tensor margin_logits_backward_cuda(const at::Tensor& grad, const at::Tensor& cos,
                                       const at::Tensor& labels, double s, double m1, double m2,
                                       double m3, double lam, bool straight_through) {
  const char* op = "angular::margin_logits_backward";
  check_cos_labels(cos, labels, op);
  check_same_shape(grad, cos, op);
  return logits_backward(grad, cos, labels,
                         MarginParams{s, m1, m2, m3, lam, 0.0, straight_through}, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_cuda(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam, double label_smoothing, bool straight_through) {
  const char* op = "angular::margin_cross_entropy";
  check_cos_labels(cos, labels, op);
  return cross_entropy_forward(
      cos, labels, MarginParams{s, m1, m2, m3, lam, label_smoothing, straight_through}, op);
}

at::Tensor margin_cross_entropy_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& cos,
                                              const at::Tensor& labels, const at::Tensor& lse,
                                              double s, double m1, double m2, double m3, double lam,
                                              double label_smoothing, bool straight_through) {
  const char* op = "angular::margin_cross_entropy_backward";
  check_cross_entropy_backward(grad_rows, cos, labels, lse, op);
  return cross_entropy_backward(
      grad_rows, cos, labels, lse,
      MarginParams{s, m1, m2, m3, lam, label_smoothing, straight_through}, at::Tensor());
}

// The reduced loss (csrc/ops.cpp): the forward pass (one kernel, plus a combine when rows are
// split), then one reduction kernel that also checks every label; no host synchronisation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_cross_entropy_loss_cuda(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam, double label_smoothing, bool straight_through, int64_t reduction) {
  check_loss_arguments(cos, labels, s, m1, m2, m3, lam, label_smoothing, reduction);
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::Tensor label_vec = labels.contiguous();
  auto [per_row, lse] = cross_entropy_forward(
      cos, label_vec, MarginParams{s, m1, m2, m3, lam, label_smoothing, straight_through},
      "angular::margin_cross_entropy_loss");
  const bool reduced = static_cast<Reduction>(reduction) != Reduction::kNone;
  at::Tensor loss = reduced ? at::empty({}, per_row.options()) : per_row;
  at::Tensor divisor = at::empty({}, per_row.options());
  C10_CUDA_CHECK(launch_loss_reduction(dtype_of(per_row), rows_of(cos, label_vec),
                                       per_row.const_data_ptr(), reduction,
                                       loss.mutable_data_ptr(), divisor.mutable_data_ptr(),
                                       current_stream()));
  return {loss, lse, divisor};
}

at::Tensor margin_cross_entropy_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& divisor, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, bool straight_through, int64_t reduction) {
  check_loss_backward(grad, cos, labels, lse, divisor, reduction,
                      "angular::margin_cross_entropy_loss_backward");
  return cross_entropy_backward(
      grad, cos, labels, lse, MarginParams{s, m1, m2, m3, lam, label_smoothing, straight_through},
      at::Tensor(), divisor);
}

at::Tensor margin_logits_rows_cuda(const at::Tensor& cos, const at::Tensor& labels,
                                   const at::Tensor& margins, double s, bool straight_through,
                                   std::optional<double> negative_t) {
  const char* op = "angular::margin_logits_rows";
  check_cos_labels(cos, labels, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  const MarginParams p{s, 1.0, 0.0, 0.0, 0.0, 0.0, straight_through};
  return logits_forward(cos, labels, with_rows(p, &rows, negative_t));
}

std::tuple<at::Tensor, at::Tensor> margin_logits_rows_backward_cuda(
    const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& margins, double s, bool straight_through, std::optional<double> negative_t) {
  const char* op = "angular::margin_logits_rows_backward";
  check_cos_labels(cos, labels, op);
  check_same_shape(grad, cos, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  at::Tensor margin_grad = at::zeros_like(rows);
  const MarginParams p{s, 1.0, 0.0, 0.0, 0.0, 0.0, straight_through};
  at::Tensor grad_cos =
      logits_backward(grad, cos, labels, with_rows(p, &rows, negative_t), margin_grad);
  return {grad_cos, margin_grad};
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_rows_cuda(
    const at::Tensor& cos, const at::Tensor& labels, const at::Tensor& margins, double s,
    double label_smoothing, bool straight_through, std::optional<double> negative_t) {
  const char* op = "angular::margin_cross_entropy_rows";
  check_cos_labels(cos, labels, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  const MarginParams p{s, 1.0, 0.0, 0.0, 0.0, label_smoothing, straight_through};
  return cross_entropy_forward(cos, labels, with_rows(p, &rows, negative_t), op);
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_rows_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& lse, const at::Tensor& margins, double s, double label_smoothing,
    bool straight_through, std::optional<double> negative_t) {
  const char* op = "angular::margin_cross_entropy_rows_backward";
  check_cross_entropy_backward(grad_rows, cos, labels, lse, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  at::Tensor margin_grad = at::zeros_like(rows);
  const MarginParams p{s, 1.0, 0.0, 0.0, 0.0, label_smoothing, straight_through};
  at::Tensor grad_cos = cross_entropy_backward(grad_rows, cos, labels, lse,
                                               with_rows(p, &rows, negative_t), margin_grad);
  return {grad_cos, margin_grad};
}

// The sharded ops (schemas in csrc/sharded_ops.cpp; docs/design.md, "Sharded softmax"): the
// cross-entropy's forward pass and backward above, over one shard of the classes (p.shard).

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sharded_margin_partials_cuda(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam) {
  const char* op = "angular::sharded_margin_partials";
  check_cos_labels(cos, labels, op);
  check_columns(cos, op, "C_local");
  MarginParams p{s, m1, m2, m3, lam, 0.0, false};
  p.shard = true;
  const auto options = row_options(cos);
  const int64_t rows = cos.size(0);
  at::Tensor row_max = at::empty({rows}, options), sum_exp = at::empty({rows}, options);
  at::Tensor target = at::empty({rows}, options), logit_sum = at::empty({rows}, options);
  RowOutputs outputs;
  outputs.row_max = row_max.mutable_data_ptr();
  outputs.sum_exp = sum_exp.mutable_data_ptr();
  outputs.target = target.mutable_data_ptr();
  outputs.logit_sum = logit_sum.mutable_data_ptr();
  forward_rows(cos, labels, p, outputs);
  return {row_max, sum_exp, target, logit_sum};
}

at::Tensor sharded_margin_cross_entropy_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& lse, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, int64_t num_classes, bool straight_through) {
  const char* op = "angular::sharded_margin_cross_entropy_backward";
  check_cross_entropy_backward(grad_rows, cos, labels, lse, op);
  check_num_classes(num_classes, cos, op);
  MarginParams p{s, m1, m2, m3, lam, label_smoothing, straight_through};
  p.shard = true;
  p.num_classes = num_classes;
  return cross_entropy_backward(grad_rows, cos, labels, lse, p, at::Tensor());
}

}  // namespace

TORCH_LIBRARY_IMPL(angular, CUDA, m) {
  m.impl("margin_logits", &margin_logits_cuda);
  m.impl("margin_logits_backward", &margin_logits_backward_cuda);
  m.impl("margin_cross_entropy", &margin_cross_entropy_cuda);
  m.impl("margin_cross_entropy_backward", &margin_cross_entropy_backward_cuda);
  m.impl("margin_cross_entropy_loss", &margin_cross_entropy_loss_cuda);
  m.impl("margin_cross_entropy_loss_backward", &margin_cross_entropy_loss_backward_cuda);
  m.impl("margin_logits_rows", &margin_logits_rows_cuda);
  m.impl("margin_logits_rows_backward", &margin_logits_rows_backward_cuda);
  m.impl("margin_cross_entropy_rows", &margin_cross_entropy_rows_cuda);
  m.impl("margin_cross_entropy_rows_backward", &margin_cross_entropy_rows_backward_cuda);
  m.impl("sharded_margin_partials", &sharded_margin_partials_cuda);
  m.impl("sharded_margin_cross_entropy_backward", &sharded_margin_cross_entropy_backward_cuda);
}

}  // namespace angular::cuda

#endif  // ANGULAR_WITH_CUDA
