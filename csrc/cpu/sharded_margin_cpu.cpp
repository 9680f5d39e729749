// CPU kernels of the sharded margin ops (schemas in csrc/sharded_ops.cpp; math in
// csrc/margin_math.h; the function in angular/ops/sharded.py).
//
// sharded_margin_partials reads the shard's cosines once: per (row, column chunk) segment the
// vector logsumexp of csrc/cpu/vec_kernels.h (online max and sum of exp, and the sum of the logits,
// with the margin on a local target), merged per row. The backward reads them once more and writes
// the shard's gradient. No other (B, C_local) buffer is allocated; strided cos is read in place.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/row_segments.h"
#include "margin_math.h"
#include "op_common.h"

namespace angular::cpu {
namespace {

using segments::for_each_segment;
using segments::Split;
using segments::split_rows;
using segments::with_vec_kernels;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sharded_margin_partials_cpu(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam) {
  const char* op = "angular::sharded_margin_partials";
  check_cos_labels(cos, labels, op);
  TORCH_CHECK(cos.size(1) >= 1, op, ": cos must have C_local >= 1 columns, got ", cos.sizes());
  const at::Tensor label_vec = labels.contiguous();
  const int64_t rows = cos.size(0), cols = cos.size(1);
  const auto options = cos.options().dtype(compute_dtype(cos.scalar_type()));
  at::Tensor row_max = at::empty({rows}, options);
  at::Tensor sum_exp = at::empty({rows}, options);
  at::Tensor target = at::empty({rows}, options);
  at::Tensor logit_sum = at::empty({rows}, options);
  if (rows == 0) {
    return {row_max, sum_exp, target, logit_sum};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(),
                                  "sharded_margin_partials", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* src = cos.const_data_ptr<scalar_t>();
    const int64_t row_stride = cos.stride(0), col_stride = cos.stride(1);
    const int64_t* label = label_vec.const_data_ptr<int64_t>();
    // f_y of a row whose label is a local column; rows whose target is elsewhere have none.
    auto local_target = [&](int64_t row, acc_t* f_y) {
      const int64_t y = label[row];
      if (y < 0 || y >= cols) {
        return false;
      }
      const acc_t cos_y = static_cast<acc_t>(src[row * row_stride + y * col_stride]);
      *f_y = target_logit<acc_t>(cos_y, acc_t(m1), acc_t(m2), acc_t(m3), acc_t(lam));
      return true;
    };
    const Split split = split_rows(rows, cols);
    std::vector<RowPartial> partials(rows * split.chunks);
    with_vec_kernels<scalar_t>([&](auto kernels) {
      using K = decltype(kernels);
      for_each_segment(rows, cols, split, [&](int64_t segment, int64_t row, int64_t first,
                                              int64_t end) {
        acc_t f_y = 0;
        const bool own = local_target(row, &f_y) && label[row] >= first && label[row] < end;
        partials[segment] = K::logsumexp(src + row * row_stride + first * col_stride, col_stride,
                                         end - first, acc_t(s), own ? label[row] - first : -1,
                                         own ? f_y : acc_t(0));
      });
    });
    acc_t* max_data = row_max.mutable_data_ptr<acc_t>();
    acc_t* sum_data = sum_exp.mutable_data_ptr<acc_t>();
    acc_t* target_data = target.mutable_data_ptr<acc_t>();
    acc_t* z_sum_data = logit_sum.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        LogSumExp<double> total{0.0, 0.0};
        double z_sum = 0.0;
        for (int64_t chunk = 0; chunk < split.chunks; ++chunk) {
          const RowPartial& part = partials[row * split.chunks + chunk];
          total = merge(total, part.lse);
          z_sum += part.z_sum;
        }
        acc_t f_y = 0;
        max_data[row] = static_cast<acc_t>(total.max);
        sum_data[row] = static_cast<acc_t>(total.sum);
        target_data[row] = local_target(row, &f_y) ? acc_t(s) * f_y : acc_t(0);
        z_sum_data[row] = static_cast<acc_t>(z_sum);
      }
    });
  });
  return {row_max, sum_exp, target, logit_sum};
}

at::Tensor sharded_margin_cross_entropy_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& lse, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, int64_t num_classes, bool straight_through) {
  const char* op = "angular::sharded_margin_cross_entropy_backward";
  check_cos_labels(cos, labels, op);
  check_rows(grad_rows, cos, op, "grad_rows");
  check_rows(lse, cos, op, "lse");
  TORCH_CHECK(num_classes >= cos.size(1), op, ": num_classes must be >= C_local = ", cos.size(1),
              ", got ", num_classes);
  const at::ScalarType acc_dtype = compute_dtype(cos.scalar_type());
  const at::Tensor grad_vec = as_dtype(grad_rows, acc_dtype);
  const at::Tensor lse_vec = as_dtype(lse, acc_dtype);
  const at::Tensor label_vec = labels.contiguous();
  at::Tensor out = empty_matrix(cos);
  const int64_t rows = cos.size(0), cols = cos.size(1);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(),
                                  "sharded_margin_cross_entropy_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* src = cos.const_data_ptr<scalar_t>();
    const int64_t row_stride = cos.stride(0), col_stride = cos.stride(1);
    const acc_t* grad_data = grad_vec.const_data_ptr<acc_t>();
    const acc_t* lse_data = lse_vec.const_data_ptr<acc_t>();
    const int64_t grad_stride = grad_vec.stride(0), lse_stride = lse_vec.stride(0);
    const int64_t* label = label_vec.const_data_ptr<int64_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    const acc_t classes = static_cast<acc_t>(num_classes);  // the global C: smoothing spreads over it
    with_vec_kernels<scalar_t>([&](auto kernels) {
      using K = decltype(kernels);
      for_each_segment(rows, cols, split_rows(rows, cols), [&](int64_t, int64_t row, int64_t first,
                                                               int64_t end) {
        scalar_t* dst_row = dst + row * cols;
        const acc_t g = grad_data[row * grad_stride];
        if (g == acc_t(0)) {  // no target anywhere (or a zero upstream): 0 whatever the row holds
          std::fill(dst_row + first, dst_row + end, scalar_t(0));
          return;
        }
        const scalar_t* src_row = src + row * row_stride;
        const acc_t row_lse = lse_data[row * lse_stride];
        const acc_t scale = acc_t(s) * g;
        K::softmax_grad(src_row + first * col_stride, col_stride, end - first, acc_t(s), row_lse,
                        scale, scale * eps / classes, dst_row + first);
        const int64_t y = label[row];
        if (y >= first && y < end) {  // so 0 <= y < C_local: the target is in this shard
          dst_row[y] = static_cast<scalar_t>(target_cos_grad<acc_t>(
              static_cast<acc_t>(src_row[y * col_stride]), row_lse, g, acc_t(s), acc_t(m1),
              acc_t(m2), acc_t(m3), acc_t(lam), eps, classes, straight_through));
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(angular, CPU, m) {
  m.impl("sharded_margin_partials", &sharded_margin_partials_cpu);
  m.impl("sharded_margin_cross_entropy_backward", &sharded_margin_cross_entropy_backward_cpu);
}

}  // namespace angular::cpu
