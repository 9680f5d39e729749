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
  // The sharded ops (docs/design.md, "Sharded softmax"; CUDA kernels): cos is one shard of the
  // classes. Rows whose target is on another shard (labels outside [0, C_local)) are read all the
  // same: the forward's pass gives their partial statistics, the backward (whose lse is the global
  // one) their off-target gradient; a row whose upstream gradient is 0 is 0 there.
  bool shard = false;
  // The C of label smoothing in a shard's backward (the global class count); 0: the columns of cos.
  int64_t num_classes = 0;
};

}  // namespace angular
