// The scalar arguments of the angular ops, as the kernels receive them (no torch headers here, so
// that the CUDA translation units stay lean).
#pragma once

#include <cstdint>

namespace angular {

struct MarginParams {
  double s;
  double m1;
  double m2;
  double m3;
  double lam;
  double label_smoothing;  // 0 for the logits ops
  bool straight_through;
  // Per-row margins (docs/design.md, Per-row margins and negative modulation): when not null, a
  // contiguous (4, B) array of the arithmetic type (rows m1, m2, m3, lam) that replaces the four
  // scalars above.
  const void* row_margins = nullptr;
  // Negative modulation (CurricularFace): hard negatives x become x (negative_t + x).
  bool modulate = false;
  double negative_t = 0.0;
  // The sharded ops (docs/design.md, "Sharded softmax"): 0 for the ops over all classes; for one
  // shard, the global class count. Label smoothing then spreads over it, and the cross-entropy
  // backward (whose lse is the global one) gives rows whose target is on another shard (labels
  // outside [0, C_local)) the off-target gradient; only a row whose upstream gradient is 0 is 0.
  int64_t global_classes = 0;
};

}  // namespace angular
