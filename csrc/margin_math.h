// The margin (docs/design.md, Math) for one target cosine, its derivative, and the online
// log-sum-exp merge.
// This is the single C++ definition of that math: the CPU and the CUDA kernels both include it, and
// it mirrors angular/ops/reference.py line for line (tests hold the two together).
//
//   t = m1 * theta + m2,  theta = acos(clamp(cos_y, -1, 1)),  k = floor(t / pi)
//   psi = (-1)^k cos(t) - 2k - m3,  f_y = (lam * cos_y + psi) / (1 + lam)
//
// Gradient guard: d psi / d cos = (-1)^k m1 sin(t) / sin(theta) is unbounded as |cos| -> 1, so it
// is evaluated at theta clamped to [kThetaMin, pi - kThetaMin] (cos clamped to +-kCosMax; t and k
// at the clamped angle too). The forward value is exact; wherever |cos| <= 1 - 1e-4 the derivative
// is exact as well.
#pragma once

#include <c10/macros/Macros.h>

#include <math.h>

#include <type_traits>

namespace angular {

// The arithmetic type of an input type: double for double, float for float, half and bfloat16.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr double kPi = 3.14159265358979323846;
constexpr double kThetaMin = 0.01;              // THETA_MIN in angular/ops/reference.py
constexpr double kCosMax = 0.9999500004166653;  // cos(kThetaMin), COS_MAX in angular/ops/reference.py

namespace math {
// Explicit float/double overloads: the same names resolve on the host (libm) and the device (CUDA
// math API), and float inputs never silently compute in double.
C10_HOST_DEVICE inline float acos_(float x) { return ::acosf(x); }
C10_HOST_DEVICE inline double acos_(double x) { return ::acos(x); }
C10_HOST_DEVICE inline float cos_(float x) { return ::cosf(x); }
C10_HOST_DEVICE inline double cos_(double x) { return ::cos(x); }
C10_HOST_DEVICE inline float sin_(float x) { return ::sinf(x); }
C10_HOST_DEVICE inline double sin_(double x) { return ::sin(x); }
C10_HOST_DEVICE inline float floor_(float x) { return ::floorf(x); }
C10_HOST_DEVICE inline double floor_(double x) { return ::floor(x); }
C10_HOST_DEVICE inline float sqrt_(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double sqrt_(double x) { return ::sqrt(x); }
C10_HOST_DEVICE inline float exp_(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float log_(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_(double x) { return ::log(x); }
C10_HOST_DEVICE inline float fma_(float a, float b, float c) { return ::fmaf(a, b, c); }
C10_HOST_DEVICE inline double fma_(double a, double b, double c) { return ::fma(a, b, c); }

// Clamp that lets NaN through (a NaN cosine must give a NaN logit, not a clamped one).
template <typename T>
C10_HOST_DEVICE inline T clamp_(T x, T low, T high) {
  return x < low ? low : (x > high ? high : x);
}
}  // namespace math

// t = m1 * theta + m2, k = floor(t / pi) and (-1)^k, for one angle.
template <typename T>
struct MarginAngle {
  T t;
  T k;
  T sign;
};

template <typename T>
C10_HOST_DEVICE inline MarginAngle<T> margin_angle(T theta, T m1, T m2) {
  MarginAngle<T> a;
  a.t = m1 * theta + m2;
  a.k = math::floor_(a.t / T(kPi));
  const T parity = a.k - T(2) * math::floor_(a.k / T(2));  // k mod 2, as torch.remainder(k, 2)
  a.sign = T(1) - T(2) * parity;
  return a;
}

// f_y, the target logit divided by s.
template <typename T>
C10_HOST_DEVICE inline T target_logit(T cos_y, T m1, T m2, T m3, T lam) {
  const MarginAngle<T> a = margin_angle(math::acos_(math::clamp_(cos_y, T(-1), T(1))), m1, m2);
  const T psi = a.sign * math::cos_(a.t) - T(2) * a.k - m3;
  return (lam * cos_y + psi) / (T(1) + lam);
}

// d f_y / d cos_y with the guard described at the top; 1 with straight_through.
template <typename T>
C10_HOST_DEVICE inline T target_logit_grad(T cos_y, T m1, T m2, T lam, bool straight_through) {
  if (straight_through) {
    return T(1);
  }
  const T c = math::clamp_(cos_y, T(-kCosMax), T(kCosMax));
  const MarginAngle<T> a = margin_angle(math::acos_(c), m1, m2);
  const T dpsi = a.sign * m1 * math::sin_(a.t) / math::sqrt_(T(1) - c * c);
  return (lam + dpsi) / (T(1) + lam);
}

// The margin parameters of one row (per-row margins: docs/design.md, Per-row margins and negative
// modulation), or their gradients.
template <typename T>
struct RowMargin {
  T m1;
  T m2;
  T m3;
  T lam;
};

// (d f_y / d m1, d m2, d m3, d lam) at the exact angle (the gradient guard concerns d / d cos only;
// k is piecewise constant): with dpsi = -(-1)^k sin(t),
//   d f / d m1 = dpsi theta / (1 + lam),  d f / d m2 = dpsi / (1 + lam),  d f / d m3 = -1 / (1 + lam),
//   d f / d lam = (cos_y - psi) / (1 + lam)^2.
template <typename T>
C10_HOST_DEVICE inline RowMargin<T> target_logit_margin_grad(T cos_y, const RowMargin<T>& m) {
  const T theta = math::acos_(math::clamp_(cos_y, T(-1), T(1)));
  const MarginAngle<T> a = margin_angle(theta, m.m1, m.m2);
  const T psi = a.sign * math::cos_(a.t) - T(2) * a.k - m.m3;
  const T inv = T(1) / (T(1) + m.lam);
  const T dpsi = -a.sign * math::sin_(a.t) * inv;
  return RowMargin<T>{dpsi * theta, dpsi, -inv, (cos_y - psi) * inv * inv};
}

// CurricularFace's negative modulation of one non-target cosine x of a row whose target cosine
// after the margin is `threshold` (f_y): x (t + x) when x > threshold, strictly (x == f_y, and so
// the target column itself, whose value is f_y, is left as it is; NaN compares false).
template <typename T>
C10_HOST_DEVICE inline T modulate_negative(T x, T threshold, T t) {
  return x > threshold ? x * (t + x) : x;
}

// d modulate_negative / d x: t + 2x on the modulated entries, 1 elsewhere.
template <typename T>
C10_HOST_DEVICE inline T modulate_negative_grad(T x, T threshold, T t) {
  return x > threshold ? t + T(2) * x : T(1);
}

// A log-sum-exp in progress: sum = sum_j exp(z_j - max). An empty one has sum == 0; a non-empty
// one has sum >= 1 (its largest term is exp(0)), or NaN, which then propagates.
template <typename T>
struct LogSumExp {
  T max;
  T sum;
};

template <typename T>
C10_HOST_DEVICE inline LogSumExp<T> merge(LogSumExp<T> a, LogSumExp<T> b) {
  if (b.sum == T(0)) {
    return a;
  }
  if (a.sum == T(0)) {
    return b;
  }
  const T m = a.max > b.max ? a.max : b.max;
  LogSumExp<T> out;
  out.max = m;
  out.sum = a.sum * math::exp_(a.max - m) + b.sum * math::exp_(b.max - m);
  return out;
}

// F.cross_entropy of one row with label smoothing eps spread over all C classes:
// (1 - eps) (lse - z_y) + eps (lse - mean_j z_j). Without smoothing the second term is left out,
// as F.cross_entropy does: a logit of -inf (probability 0) then keeps the loss finite.
template <typename T>
C10_HOST_DEVICE inline T smoothed_loss(T lse, T z_target, T z_sum, T num_classes, T eps) {
  const T nll = lse - z_target;
  return eps == T(0) ? nll : (T(1) - eps) * nll + eps * (lse - z_sum / num_classes);
}

// d loss / d z_y of a row with upstream gradient grad_row: grad_row (p_y - eps / C - (1 - eps)),
// p_y = exp(s * f_y - lse).
template <typename T>
C10_HOST_DEVICE inline T target_logit_upstream(T f_y, T lse, T grad_row, T s, T eps,
                                               T num_classes) {
  return grad_row * (math::exp_(s * f_y - lse) - eps / num_classes - (T(1) - eps));
}

// d loss / d cos_y for the target column: s * g * (p_y - eps / C - (1 - eps)) * d f_y / d cos_y,
// with p_y = exp(s * f_y - lse). (Other columns: s * g * (p_j - eps / C).)
template <typename T>
C10_HOST_DEVICE inline T target_cos_grad(
    T cos_y, T lse, T grad_row, T s, T m1, T m2, T m3, T lam, T eps, T num_classes,
    bool straight_through) {
  const T dz = target_logit_upstream(target_logit(cos_y, m1, m2, m3, lam), lse, grad_row, s, eps,
                                     num_classes);
  return s * dz * target_logit_grad(cos_y, m1, m2, lam, straight_through);
}

}  // namespace angular
