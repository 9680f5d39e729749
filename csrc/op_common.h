// What the CPU and CUDA front ends share: the defensive input checks and the
// dtype rules of docs/design.md, Math (fp16/bf16/fp32 compute in fp32, fp64 in fp64).
//
// angular/ops/margin.py validates the arguments of most ops with messages for users first; the checks
// here only make sure no call that bypasses it (torch.ops.angular.* directly) can read out of bounds.
// The exception is margin_cross_entropy_loss, which the Python entry point calls unchecked: its
// checks (check_loss_arguments, further down) are the user-facing ones.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>

#include "margin_math.h"
#include "margin_params.h"

namespace angular {

inline at::ScalarType compute_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cos_labels(const at::Tensor& cos, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(cos.dim() == 2, op, ": cos must have shape (B, C), got ", cos.sizes());
  const auto dtype = cos.scalar_type();
  TORCH_CHECK(
      dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
      op, ": cos must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(labels.dim() == 1, op, ": labels must have shape (B,), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.size(0) == cos.size(0), op, ": labels has ", labels.size(0),
              " entries but cos has B = ", cos.size(0), " rows");
  TORCH_CHECK(labels.device() == cos.device(), op, ": labels is on ", labels.device(),
              " but cos is on ", cos.device());
}

// The inputs of the fused linear op (angular/ops/linear.py): x (B, D), weight (C, D), labels (B,).
inline void check_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& labels, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape (B, D), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape (C, D), got ", weight.sizes());
  for (const at::Tensor* t : {&x, &weight}) {
    const auto dtype = t->scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                    dtype == at::kDouble,
                op, ": ", t == &x ? "x" : "weight",
                " must be float16, bfloat16, float32 or float64, got ", dtype);
  }
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight has D = ", weight.size(1),
              " columns but x has D = ", x.size(1));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), op,
              ": labels must have shape (B,) = (", x.size(0), ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(weight.device() == x.device() && labels.device() == x.device(), op,
              ": x, weight and labels must be on one device, got ", x.device(), ", ",
              weight.device(), " and ", labels.device());
}

// A per-row tensor (loss gradient, log-sum-exp) that goes with cos.
inline void check_rows(const at::Tensor& rows, const at::Tensor& cos, const char* op,
                       const char* name) {
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == cos.size(0), op, ": ", name,
              " must have shape (B,) = (", cos.size(0), ",), got ", rows.sizes());
  TORCH_CHECK(rows.device() == cos.device(), op, ": ", name, " is on ", rows.device(),
              " but cos is on ", cos.device());
  TORCH_CHECK(at::isFloatingType(rows.scalar_type()), op, ": ", name,
              " must be floating point, got ", rows.scalar_type());
}

// The cross-entropy forwards need at least one class: `columns` is "C", or "C_local" for a shard.
inline void check_columns(const at::Tensor& cos, const char* op, const char* columns) {
  TORCH_CHECK(cos.size(1) >= 1, op, ": cos must have ", columns, " >= 1 columns, got ",
              cos.sizes());
}

// The arguments of the cross-entropy backwards (plain, *_rows and sharded): the per-row upstream
// gradient and log-sum-exp go with cos and labels.
inline void check_cross_entropy_backward(const at::Tensor& grad_rows, const at::Tensor& cos,
                                         const at::Tensor& labels, const at::Tensor& lse,
                                         const char* op) {
  check_cos_labels(cos, labels, op);
  check_rows(grad_rows, cos, op, "grad_rows");
  check_rows(lse, cos, op, "lse");
}

// The global class count of the sharded backward: at least the shard's own columns.
inline void check_num_classes(int64_t num_classes, const at::Tensor& cos, const char* op) {
  TORCH_CHECK(num_classes >= cos.size(1), op, ": num_classes must be >= C_local = ", cos.size(1),
              ", got ", num_classes);
}

// The per-row margins of the *_rows ops: (4, B) in the arithmetic type of cos (rows m1, m2, m3,
// lam), on cos's device; returned contiguous.
inline at::Tensor checked_row_margins(const at::Tensor& margins, const at::Tensor& cos,
                                      const char* op) {
  TORCH_CHECK(margins.dim() == 2 && margins.size(0) == 4 && margins.size(1) == cos.size(0), op,
              ": margins must have shape (4, B) = (4, ", cos.size(0), "), got ", margins.sizes());
  TORCH_CHECK(margins.scalar_type() == compute_dtype(cos.scalar_type()), op, ": margins must be ",
              compute_dtype(cos.scalar_type()), " for ", cos.scalar_type(), " cos, got ",
              margins.scalar_type());
  TORCH_CHECK(margins.device() == cos.device(), op, ": margins is on ", margins.device(),
              " but cos is on ", cos.device());
  return margins.contiguous();
}

// The upstream gradient of margin_logits, same shape as cos.
inline void check_same_shape(const at::Tensor& grad, const at::Tensor& cos, const char* op) {
  TORCH_CHECK(grad.sizes() == cos.sizes(), op, ": grad must have the shape of cos ", cos.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == cos.device(), op, ": grad is on ", grad.device(),
              " but cos is on ", cos.device());
}

// Outputs of shape (B, C) are contiguous whatever the layout of cos (the fake kernels say so too).
inline at::Tensor empty_matrix(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// ---------------------------------------------------------------------------------------------
// The reduced loss op, margin_cross_entropy_loss (csrc/ops.cpp), which the public
// angular.ops.margin_cross_entropy calls directly: it validates every argument itself, with the
// messages and exception types (ValueError, TypeError) of the Python checks in
// angular/ops/margin.py, so that a call costs no Python validation.

// The `reduction` argument; angular/ops/margin.py holds the same codes (REDUCTION_CODES).
enum class Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// A float as Python's repr writes it (1.0, 0.5, nan, inf, 1e+16), for messages.
inline std::string python_float(double value) {
  if (std::isnan(value)) {
    return "nan";
  }
  if (std::isinf(value)) {
    return value > 0 ? "inf" : "-inf";
  }
  char buffer[64];
  const auto end = std::to_chars(buffer, buffer + sizeof(buffer), value).ptr;
  std::string text(buffer, end);
  if (text.find_first_of(".e") == std::string::npos) {
    text += ".0";
  }
  return text;
}

// A shape as Python prints a tuple: (), (5,), (4, 5).
inline std::string python_shape(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    text += (i > 0 ? ", " : "") + std::to_string(sizes[i]);
  }
  return text + (sizes.size() == 1 ? ",)" : ")");
}

// A dtype as Python prints it: torch.int64, torch.float16, ...
inline std::string python_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// check_number of angular/ops/margin.py: finite, and >= low (> low when strict) if bounded.
inline void check_loss_number(const char* name, double value, bool bounded, bool strict) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", python_float(value));
  TORCH_CHECK_VALUE(!bounded || (strict ? value > 0.0 : value >= 0.0), name, " must be ",
                    strict ? ">" : ">=", " 0.0, got ", python_float(value));
}

// Every check of angular.ops.margin_cross_entropy but the labels' values (the kernels check those
// as they read them), in its order. No data is read: the autograd kernel runs it on fake tensors too.
inline void check_loss_arguments(const at::Tensor& cos, const at::Tensor& labels, double s,
                                 double m1, double m2, double m3, double lam,
                                 double label_smoothing, int64_t reduction) {
  check_loss_number("s", s, true, true);
  check_loss_number("label_smoothing", label_smoothing, true, false);
  TORCH_CHECK_VALUE(label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
                    python_float(label_smoothing));
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(cos.dim() == 2, "cos must have shape (B, C), got ", cos.dim(),
                    " dimensions ", python_shape(cos.sizes()));
  const auto dtype = cos.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
      "cos must be float16, bfloat16, float32 or float64, got ", python_dtype(dtype));
  TORCH_CHECK_VALUE(labels.dim() == 1, "labels must have shape (B,), got ",
                    python_shape(labels.sizes()));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
                   python_dtype(labels.scalar_type()));
  TORCH_CHECK_VALUE(cos.size(0) >= 1 && cos.size(1) >= 1,
                    "cos must have B >= 1 and C >= 1, got shape ", python_shape(cos.sizes()));
  TORCH_CHECK_VALUE(labels.size(0) == cos.size(0), "labels has ", labels.size(0),
                    " entries but cos has B = ", cos.size(0), " rows");
  TORCH_CHECK_VALUE(labels.device() == cos.device(), "labels is on ", labels.device(),
                    " but cos is on ", cos.device());
  check_loss_number("m1", m1, true, true);
  check_loss_number("m2", m2, true, false);
  check_loss_number("m3", m3, false, false);
  check_loss_number("lam", lam, true, false);
}

// The message of a label outside [.., C) (the Python check's, and the CUDA kernel's assert).
inline void check_largest_label(int64_t largest, int64_t classes) {
  TORCH_CHECK_VALUE(largest < classes, "labels must be < C = ", classes, ", got a label ",
                    largest);
}

// The arguments of margin_cross_entropy_loss_backward: grad has the loss's shape ((B,) for
// reduction none, () otherwise), divisor is the forward's.
inline void check_loss_backward(const at::Tensor& grad, const at::Tensor& cos,
                                const at::Tensor& labels, const at::Tensor& lse,
                                const at::Tensor& divisor, int64_t reduction, const char* op) {
  check_cos_labels(cos, labels, op);
  check_rows(lse, cos, op, "lse");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0, 1 or 2, got ",
              reduction);
  if (static_cast<Reduction>(reduction) == Reduction::kNone) {
    check_rows(grad, cos, op, "grad");
  } else {
    TORCH_CHECK(grad.dim() == 0 && grad.device() == cos.device() &&
                    at::isFloatingType(grad.scalar_type()),
                op, ": grad must be a floating-point scalar on ", cos.device(), ", got ",
                grad.sizes(), " ", grad.scalar_type(), " on ", grad.device());
  }
  TORCH_CHECK(divisor.dim() == 0 && divisor.device() == cos.device() &&
                  divisor.scalar_type() == compute_dtype(cos.scalar_type()),
              op, ": divisor must be the forward's ", compute_dtype(cos.scalar_type()),
              " scalar on ", cos.device());
}

}  // namespace angular
