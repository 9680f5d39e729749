// The op schemas of namespace `angular` (docs/design.md, Ops), and the Python module angular._C whose import
// runs this registration. Kernels: csrc/cpu/margin_cpu.cpp (CPU) and csrc/cuda/margin_cuda.cpp
// (CUDA); autograd of margin_logits and margin_cross_entropy_loss: csrc/autograd.cpp; fake
// implementations and the autograd of the other ops: angular/ops/margin.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A plain module with no Python functions: the ops are reached through torch.ops.angular.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Fused margin kernels; importing this module registers torch.ops.angular.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(angular, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "margin_logits(Tensor cos, Tensor labels, float s, float m1, float m2, float m3, float lam, "
      "bool straight_through) -> Tensor",
      tags);
  m.def(
      "margin_logits_backward(Tensor grad, Tensor cos, Tensor labels, float s, float m1, float m2, "
      "float m3, float lam, bool straight_through) -> Tensor",
      tags);
  m.def(
      "margin_cross_entropy(Tensor cos, Tensor labels, float s, float m1, float m2, float m3, "
      "float lam, float label_smoothing, bool straight_through) -> (Tensor, Tensor)",
      tags);
  m.def(
      "margin_cross_entropy_backward(Tensor grad_rows, Tensor cos, Tensor labels, Tensor lse, "
      "float s, float m1, float m2, float m3, float lam, float label_smoothing, "
      "bool straight_through) -> Tensor",
      tags);
  // The loss that angular.ops.margin_cross_entropy returns (scalar margins): the per-row loss
  // reduced in the kernels (reduction: 0 none, 1 mean, 2 sum; enum Reduction in op_common.h), every
  // argument checked there, autograd in C++ (csrc/autograd.cpp). -> (loss: (B,) for none, else a
  // scalar; lse (B,); divisor: the scalar the backward divides the upstream gradient by, the rows
  // with a target for mean, else 1). lse and divisor are not differentiable.
  m.def(
      "margin_cross_entropy_loss(Tensor cos, Tensor labels, float s, float m1, float m2, float m3, "
      "float lam, float label_smoothing, bool straight_through, int reduction) "
      "-> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "margin_cross_entropy_loss_backward(Tensor grad, Tensor cos, Tensor labels, Tensor lse, "
      "Tensor divisor, float s, float m1, float m2, float m3, float lam, float label_smoothing, "
      "bool straight_through, int reduction) -> Tensor",
      tags);
  // Per-row margins and negative modulation (docs/design.md, Per-row margins and negative
  // modulation): margins is (4, B) in the arithmetic dtype (rows m1, m2, m3, lam); negative_t None
  // means no modulation. The backwards also return d loss / d margins, (4, B).
  m.def(
      "margin_logits_rows(Tensor cos, Tensor labels, Tensor margins, float s, "
      "bool straight_through, float? negative_t) -> Tensor",
      tags);
  m.def(
      "margin_logits_rows_backward(Tensor grad, Tensor cos, Tensor labels, Tensor margins, "
      "float s, bool straight_through, float? negative_t) -> (Tensor, Tensor)",
      tags);
  m.def(
      "margin_cross_entropy_rows(Tensor cos, Tensor labels, Tensor margins, float s, "
      "float label_smoothing, bool straight_through, float? negative_t) -> (Tensor, Tensor)",
      tags);
  m.def(
      "margin_cross_entropy_rows_backward(Tensor grad_rows, Tensor cos, Tensor labels, Tensor lse, "
      "Tensor margins, float s, float label_smoothing, bool straight_through, float? negative_t) "
      "-> (Tensor, Tensor)",
      tags);
  // Fused linear + margin + cross-entropy (angular/ops/linear.py): x (B, D), weight (C, D); the
  // forward returns the per-row loss, log-sum-exp and |x|, and the per-class |weight|.
  m.def(
      "linear_margin_cross_entropy(Tensor x, Tensor weight, Tensor labels, float s, float m1, "
      "float m2, float m3, float lam, float label_smoothing, bool straight_through) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "linear_margin_cross_entropy_backward(Tensor grad_rows, Tensor x, Tensor weight, "
      "Tensor labels, Tensor lse, Tensor x_norm, Tensor weight_norm, float s, float m1, float m2, "
      "float m3, float lam, float label_smoothing, bool straight_through) -> (Tensor, Tensor)",
      tags);
}
