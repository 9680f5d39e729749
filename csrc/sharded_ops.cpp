// Schemas of the sharded margin ops (docs/design.md, "Sharded softmax"; angular/ops/sharded.py):
// the per-row partial statistics of one shard of the classes, and that shard's gradient given the
// global log-sum-exp. Kernels: csrc/cpu/margin_cpu.cpp, csrc/cuda/margin_cuda.cpp (which share the
// plain cross-entropy's forward pass and backward). The same two over a shard of the centres,
// without its cosines, are the fused linear op's kernels run in shard mode
// (csrc/cpu/linear_margin_cpu.cpp, csrc/cuda/linear_margin_cuda.cpp).
// labels are local columns; -1 (any negative) when another shard owns the target or there is none.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(angular, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // -> (max, sum of exp(z - max), z_target (0 when not local), sum of z), each (B,), fp32 (fp64).
  m.def(
      "sharded_margin_partials(Tensor cos, Tensor labels, float s, float m1, float m2, float m3, "
      "float lam) -> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "sharded_margin_cross_entropy_backward(Tensor grad_rows, Tensor cos, Tensor labels, "
      "Tensor lse, float s, float m1, float m2, float m3, float lam, float label_smoothing, "
      "int num_classes, bool straight_through) -> Tensor",
      tags);
  // The fused linear op on one shard of the classes (angular/ops/sharded.py): x (B, D) the
  // gathered embeddings, weight (C_local, D) the shard's centres, labels local columns.
  // -> (max, sum of exp(z - max), z_target, sum of z, |x| per row, |weight| per class).
  m.def(
      "sharded_linear_margin_partials(Tensor x, Tensor weight, Tensor labels, float s, float m1, "
      "float m2, float m3, float lam) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // -> (grad_x, grad_weight), given the global log-sum-exp per row.
  m.def(
      "sharded_linear_margin_backward(Tensor grad_rows, Tensor x, Tensor weight, Tensor labels, "
      "Tensor lse, Tensor x_norm, Tensor weight_norm, float s, float m1, float m2, float m3, "
      "float lam, float label_smoothing, int num_classes, bool straight_through) "
      "-> (Tensor, Tensor)",
      tags);
}
