// The scalar arguments of the angular ops, as the kernels receive them (no torch headers here, so
// that the CUDA translation units stay lean).
#pragma once

namespace angular {

struct MarginParams {
  double s;
  double m1;
  double m2;
  double m3;
  double lam;
  double label_smoothing;  // 0 for the logits ops
  bool straight_through;
};

}  // namespace angular
