// Autograd of margin_cross_entropy_loss and margin_logits at the Autograd dispatch key, in C++ (as
// torchvision registers its ops' autograd): the forward and backward each cost one dispatcher call
// and no Python. The loss's forward runs the op below autograd (CPU, CUDA or fake kernel) and saves
// cos, labels, lse and the divisor; lse and the divisor are not differentiable, and no gradient is
// materialised for them. margin_logits saves cos and labels.
// Under torch.compile, AOT autograd traces through this kernel: the forward and backward ops it
// calls run their fake kernels (angular/ops/margin.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "op_common.h"

namespace angular {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, double, double, double, double, double, bool,
    int64_t);
using LossBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double, double,
                                         double, double, double, double, bool, int64_t);

class MarginCrossEntropyLoss : public torch::autograd::Function<MarginCrossEntropyLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& cos,
                               const at::Tensor& labels, double s, double m1, double m2, double m3,
                               double lam, double label_smoothing, bool straight_through,
                               int64_t reduction) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("angular::margin_cross_entropy_loss", "")
                               .typed<LossSignature>();
    // The checks that need no data (so that they also hold for fake tensors, and before a meta
    // labels tensor could route the call to a meta kernel); the kernels check the labels' values.
    check_loss_arguments(cos, labels, s, m1, m2, m3, lam, label_smoothing, reduction);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, divisor] =
        op.call(cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through, reduction);
    ctx->save_for_backward({cos, labels, lse, divisor});
    ctx->saved_data["params"] = std::vector<double>{s, m1, m2, m3, lam, label_smoothing};
    ctx->saved_data["straight_through"] = straight_through;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({lse, divisor});
    ctx->set_materialize_grads(false);  // no zeros for the gradients of lse and divisor
    return {loss, lse, divisor};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("angular::margin_cross_entropy_loss_backward", "")
                               .typed<LossBackwardSignature>();
    at::Tensor grad_cos;
    if (grads[0].defined()) {
      const variable_list saved = ctx->get_saved_variables();
      const auto params = ctx->saved_data["params"].toDoubleVector();
      grad_cos = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], params[0], params[1],
                         params[2], params[3], params[4], params[5],
                         ctx->saved_data["straight_through"].toBool(),
                         ctx->saved_data["reduction"].toInt());
    }
    // One gradient per input of forward: cos, then nothing for labels and the 8 scalars.
    return {grad_cos,     at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

using LogitsSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, double,
                                   double, double, bool);
using LogitsBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           double, double, double, double, double, bool);

class MarginLogits : public torch::autograd::Function<MarginLogits> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& cos, const at::Tensor& labels,
                            double s, double m1, double m2, double m3, double lam,
                            bool straight_through) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("angular::margin_logits", "")
                               .typed<LogitsSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor logits = op.call(cos, labels, s, m1, m2, m3, lam, straight_through);
    ctx->save_for_backward({cos, labels});
    ctx->saved_data["params"] = std::vector<double>{s, m1, m2, m3, lam};
    ctx->saved_data["straight_through"] = straight_through;
    ctx->set_materialize_grads(false);
    return logits;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("angular::margin_logits_backward", "")
                               .typed<LogitsBackwardSignature>();
    at::Tensor grad_cos;
    if (grads[0].defined()) {
      const variable_list saved = ctx->get_saved_variables();
      const auto params = ctx->saved_data["params"].toDoubleVector();
      grad_cos = op.call(grads[0], saved[0], saved[1], params[0], params[1], params[2], params[3],
                         params[4], ctx->saved_data["straight_through"].toBool());
    }
    // One gradient per input of forward: cos, then nothing for labels and the 6 scalars.
    return {grad_cos,     at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor margin_logits_autograd(const at::Tensor& cos, const at::Tensor& labels, double s,
                                  double m1, double m2, double m3, double lam,
                                  bool straight_through) {
  return MarginLogits::apply(cos, labels, s, m1, m2, m3, lam, straight_through);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_cross_entropy_loss_autograd(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam, double label_smoothing, bool straight_through, int64_t reduction) {
  variable_list out = MarginCrossEntropyLoss::apply(cos, labels, s, m1, m2, m3, lam,
                                                    label_smoothing, straight_through, reduction);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(angular, Autograd, m) {
  m.impl("margin_cross_entropy_loss", &margin_cross_entropy_loss_autograd);
  m.impl("margin_logits", &margin_logits_autograd);
}

}  // namespace angular
