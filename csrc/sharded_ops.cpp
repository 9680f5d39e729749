// Schemas of the sharded margin ops (docs/design.md, "Sharded softmax"; angular/ops/sharded.py):
// the per-row partial statistics of one shard of the classes, and that shard's gradient given the
// global log-sum-exp. Kernels: csrc/cpu/margin_cpu.cpp, csrc/cuda/margin_cuda.cpp (which share the
// plain cross-entropy's forward pass and backward).
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
}
