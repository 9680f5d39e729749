// CPU kernels of the angular margin ops (schemas in csrc/ops.cpp and csrc/sharded_ops.cpp; math in
// csrc/margin_math.h): the four scalar ops and their *_rows variants (per-row margins, negative
// modulation), which share one implementation per op, and the two sharded ops (docs/design.md,
// "Sharded softmax"), which reuse the cross-entropy's forward pass (forward_rows) and backward
// (cross_entropy_backward, parameterised by the global class count).
//
// Work is split into (row, column chunk) segments run by at::parallel_for (csrc/cpu/row_segments.h:
// one chunk per row when there are at least as many rows as threads, otherwise each row is cut into
// chunks so that a few huge rows still use every thread; denormals flushed). The vector primitives
// over a segment come from csrc/cpu/vec_kernels_impl.h, compiled per CPU capability.
//
// margin_cross_entropy reads cos once (online log-sum-exp per segment, merged per row) and keeps
// only the per-row log-sum-exp; its backward reads cos once more and writes the gradient. No other
// (B, C) buffer is allocated. Strided cos (any row and column stride) is read in place.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/row_segments.h"
#include "margin_math.h"
#include "op_common.h"

namespace angular::cpu {
namespace {

using segments::for_each_segment;
using segments::Split;
using segments::split_rows;
using segments::with_vec_kernels;

// A fresh (B, C) output is first touched by the kernel, and on Linux each first touch of a 4 KiB
// page is a fault: for tens of MiB that costs more than the kernel's arithmetic. Asking for
// transparent huge pages (a hint; nothing changes where THP is off) makes it one fault per 2 MiB,
// as torch's THP_MEM_ALLOC_ENABLE does for all its allocations.
at::Tensor empty_output(const at::Tensor& cos) {
  at::Tensor out = empty_matrix(cos);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (out.nbytes() >= 2 * kHugePage && last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: ignore errors
  }
#endif
  return out;
}

// The margins of one call: four scalars, or the (4, B) per-row values of the *_rows ops, and the
// negative modulation, if any (docs/design.md, Per-row margins and negative modulation).
struct OpMargins {
  RowMargin<double> scalar;
  const at::Tensor* rows = nullptr;  // contiguous (4, B) in the arithmetic type
  std::optional<double> negative_t;
};

// Reads a row's margins: the scalars, or that row's column of the (4, B) array (one branch per row
// segment, so the scalar ops keep their speed).
template <typename acc_t>
struct MarginReader {
  RowMargin<acc_t> scalar;
  const acc_t* rows;
  int64_t batch;

  MarginReader(const OpMargins& m, int64_t batch_size)
      : scalar{acc_t(m.scalar.m1), acc_t(m.scalar.m2), acc_t(m.scalar.m3), acc_t(m.scalar.lam)},
        rows(m.rows != nullptr ? m.rows->const_data_ptr<acc_t>() : nullptr),
        batch(batch_size) {}

  RowMargin<acc_t> at(int64_t row) const {
    if (rows == nullptr) {
      return scalar;
    }
    return RowMargin<acc_t>{rows[row], rows[batch + row], rows[2 * batch + row],
                            rows[3 * batch + row]};
  }
};

template <typename acc_t>
acc_t target_logit_of(acc_t cos_y, const RowMargin<acc_t>& m) {
  return target_logit<acc_t>(cos_y, m.m1, m.m2, m.m3, m.lam);
}

// d loss / d margins of one row, times `scale` (zeros elsewhere), into the (4, B) gradient.
template <typename acc_t>
void store_margin_grad(acc_t* margin_grad, int64_t batch, int64_t row, acc_t cos_y,
                       const RowMargin<acc_t>& m, acc_t scale) {
  const RowMargin<acc_t> d = target_logit_margin_grad(cos_y, m);
  margin_grad[row] = scale * d.m1;
  margin_grad[batch + row] = scale * d.m2;
  margin_grad[2 * batch + row] = scale * d.m3;
  margin_grad[3 * batch + row] = scale * d.lam;
}

at::Tensor logits_forward(const at::Tensor& cos, const at::Tensor& labels, double s,
                          const OpMargins& margins) {
  const at::Tensor label_vec = labels.contiguous();
  at::Tensor out = empty_output(cos);
  const int64_t rows = cos.size(0), cols = cos.size(1);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), "margin_logits",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* src = cos.const_data_ptr<scalar_t>();
    const int64_t row_stride = cos.stride(0), col_stride = cos.stride(1);
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t* label = label_vec.const_data_ptr<int64_t>();
    const MarginReader<acc_t> reader(margins, rows);
    const bool modulate = margins.negative_t.has_value();
    const acc_t t = static_cast<acc_t>(margins.negative_t.value_or(0.0));
    with_vec_kernels<scalar_t>([&](auto kernels) {
      using K = decltype(kernels);
      for_each_segment(rows, cols, split_rows(rows, cols), [&](int64_t, int64_t row, int64_t first,
                                                               int64_t end) {
        const scalar_t* src_row = src + row * row_stride;
        scalar_t* dst_row = dst + row * cols;
        const int64_t y = label[row];
        const bool in_segment = y >= first && y < end;  // so 0 <= y < C: others mean no target
        const bool modulated = modulate && y >= 0 && y < cols;
        acc_t f_y = acc_t(0);
        if (in_segment || modulated) {
          f_y = target_logit_of(static_cast<acc_t>(src_row[y * col_stride]), reader.at(row));
        }
        if (modulated) {
          K::scale_modulated(src_row + first * col_stride, col_stride, end - first, acc_t(s), f_y,
                             t, dst_row + first);
        } else {
          K::scale(src_row + first * col_stride, col_stride, end - first, acc_t(s),
                   dst_row + first);
        }
        if (in_segment) {
          dst_row[y] = static_cast<scalar_t>(acc_t(s) * f_y);
        }
      });
    });
  });
  return out;
}

// d logits / d cos applied to grad; and d / d margins into margin_grad ((4, B), zeros) if defined.
at::Tensor logits_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& labels,
                           double s, const OpMargins& margins, bool straight_through,
                           const at::Tensor& margin_grad) {
  const at::Tensor grad_in = as_dtype(grad, cos.scalar_type());
  const at::Tensor label_vec = labels.contiguous();
  at::Tensor out = empty_output(cos);
  const int64_t rows = cos.size(0), cols = cos.size(1);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(),
                                  "margin_logits_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* cos_data = cos.const_data_ptr<scalar_t>();
    const scalar_t* grad_data = grad_in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t* label = label_vec.const_data_ptr<int64_t>();
    const MarginReader<acc_t> reader(margins, rows);
    acc_t* margin_grad_data =
        margin_grad.defined() ? margin_grad.mutable_data_ptr<acc_t>() : nullptr;
    const bool modulate = margins.negative_t.has_value();
    const acc_t t = static_cast<acc_t>(margins.negative_t.value_or(0.0));
    with_vec_kernels<scalar_t>([&](auto kernels) {
      using K = decltype(kernels);
      for_each_segment(rows, cols, split_rows(rows, cols), [&](int64_t, int64_t row, int64_t first,
                                                               int64_t end) {
        const scalar_t* grad_row = grad_data + row * grad_in.stride(0);
        const int64_t grad_col_stride = grad_in.stride(1);
        const scalar_t* cos_row = cos_data + row * cos.stride(0);
        const int64_t cos_col_stride = cos.stride(1);
        scalar_t* dst_row = dst + row * cols;
        const int64_t y = label[row];
        const bool in_segment = y >= first && y < end;
        const bool modulated = modulate && y >= 0 && y < cols;
        const RowMargin<acc_t> m = reader.at(row);
        if (modulated) {
          const acc_t f_y = target_logit_of(static_cast<acc_t>(cos_row[y * cos_col_stride]), m);
          K::scale_grad_modulated(grad_row + first * grad_col_stride, grad_col_stride,
                                  cos_row + first * cos_col_stride, cos_col_stride, end - first,
                                  acc_t(s), f_y, t, dst_row + first);
        } else {
          K::scale(grad_row + first * grad_col_stride, grad_col_stride, end - first, acc_t(s),
                   dst_row + first);
        }
        if (in_segment) {
          const acc_t cos_y = static_cast<acc_t>(cos_row[y * cos_col_stride]);
          const acc_t dfy = target_logit_grad<acc_t>(cos_y, m.m1, m.m2, m.lam, straight_through);
          const acc_t g = static_cast<acc_t>(grad_row[y * grad_col_stride]);
          dst_row[y] = static_cast<scalar_t>(acc_t(s) * g * dfy);
          if (margin_grad_data != nullptr) {
            store_margin_grad(margin_grad_data, rows, row, cos_y, m, acc_t(s) * g);
          }
        }
      });
    });
  });
  return out;
}

// The merged statistics of one row of the cross-entropy forward pass, in double.
struct RowTotal {
  LogSumExp<double> lse;  // of the row's logits z (empty for a row that was not read)
  double z_sum;           // sum of its logits
  double f_y;             // the target logit over s (the margin), when has_target
  bool has_target;        // its label is one of the columns of cos
};

// The cross-entropy forward's pass over cos, shared by margin_cross_entropy(_rows) and
// sharded_margin_partials: cos is read once, one partial log-sum-exp per (row, column chunk)
// segment (B x chunks, never B x C), merged per row. Rows without a target among the columns are
// read only when read_rows_without_target (a shard of the sharded op: the target is on another
// shard); otherwise their total stays empty.
std::vector<RowTotal> forward_rows(const at::Tensor& cos, const at::Tensor& labels, double s,
                                   const OpMargins& margins, bool read_rows_without_target) {
  const at::Tensor label_vec = labels.contiguous();
  const int64_t rows = cos.size(0), cols = cos.size(1);
  std::vector<RowTotal> totals(rows);
  if (rows == 0) {
    return totals;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(),
                                  "margin_cross_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* src = cos.const_data_ptr<scalar_t>();
    const int64_t row_stride = cos.stride(0), col_stride = cos.stride(1);
    const int64_t* label = label_vec.const_data_ptr<int64_t>();
    const Split split = split_rows(rows, cols);
    const MarginReader<acc_t> reader(margins, rows);
    const bool modulate = margins.negative_t.has_value();
    const acc_t t = static_cast<acc_t>(margins.negative_t.value_or(0.0));
    auto target_of = [&](int64_t row) {  // f_y of a row whose label is a valid column
      const acc_t cos_y = static_cast<acc_t>(src[row * row_stride + label[row] * col_stride]);
      return target_logit_of(cos_y, reader.at(row));
    };
    std::vector<RowPartial> partials(rows * split.chunks);
    with_vec_kernels<scalar_t>([&](auto kernels) {
      using K = decltype(kernels);
      for_each_segment(rows, cols, split, [&](int64_t segment, int64_t row, int64_t first,
                                              int64_t end) {
        const int64_t y = label[row];
        const bool row_has_target = y >= 0 && y < cols;
        if (!row_has_target && !read_rows_without_target) {
          return;  // no target: loss 0, nothing to read
        }
        const bool has_target = y >= first && y < end;  // so 0 <= y < C
        const scalar_t* segment_src = src + row * row_stride + first * col_stride;
        if (modulate && row_has_target) {
          const acc_t f_y = target_of(row);
          partials[segment] = K::logsumexp_modulated(segment_src, col_stride, end - first,
                                                     acc_t(s), has_target ? y - first : -1, f_y,
                                                     f_y, t);
        } else {
          partials[segment] = K::logsumexp(segment_src, col_stride, end - first, acc_t(s),
                                           has_target ? y - first : -1,
                                           has_target ? target_of(row) : acc_t(0));
        }
      });
    });
    at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        RowTotal& total = totals[row];
        total.lse = LogSumExp<double>{0.0, 0.0};
        total.z_sum = 0.0;
        total.has_target = label[row] >= 0 && label[row] < cols;
        total.f_y = total.has_target ? static_cast<double>(target_of(row)) : 0.0;
        if (!total.has_target && !read_rows_without_target) {
          continue;
        }
        for (int64_t chunk = 0; chunk < split.chunks; ++chunk) {
          const RowPartial& part = partials[row * split.chunks + chunk];
          total.lse = merge(total.lse, part.lse);
          total.z_sum += part.z_sum;
        }
      }
    });
  });
  return totals;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& cos,
                                                         const at::Tensor& labels, double s,
                                                         const OpMargins& margins,
                                                         double label_smoothing, const char* op) {
  check_columns(cos, op, "C");
  const std::vector<RowTotal> totals = forward_rows(cos, labels, s, margins, false);
  const int64_t rows = cos.size(0);
  at::Tensor loss = at::empty({rows}, cos.options().dtype(compute_dtype(cos.scalar_type())));
  at::Tensor lse = at::empty({rows}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "margin_cross_entropy", [&] {
    scalar_t* loss_data = loss.mutable_data_ptr<scalar_t>();
    scalar_t* lse_data = lse.mutable_data_ptr<scalar_t>();
    for (int64_t row = 0; row < rows; ++row) {
      const RowTotal& total = totals[row];
      if (!total.has_target) {
        loss_data[row] = scalar_t(0);
        lse_data[row] = scalar_t(0);  // unused by the backward of a row without target
        continue;
      }
      const double row_lse = total.lse.max + std::log(total.lse.sum);
      loss_data[row] = static_cast<scalar_t>(smoothed_loss<double>(
          row_lse, s * total.f_y, total.z_sum, static_cast<double>(cos.size(1)), label_smoothing));
      lse_data[row] = static_cast<scalar_t>(row_lse);
    }
  });
  return {loss, lse};
}

// The largest label, checked against C (the Python check's message); -1 ... are rows without a
// target.
void check_labels(const at::Tensor& label_vec, int64_t classes) {
  const int64_t* label = label_vec.const_data_ptr<int64_t>();
  int64_t largest = label[0];
  for (int64_t row = 1; row < label_vec.size(0); ++row) {
    largest = std::max(largest, label[row]);
  }
  check_largest_label(largest, classes);
}

// The reduced loss, the per-row loss reduced in row order (in double, rounded once), and the
// divisor the backward scales the upstream gradient by: the rows with a target (at least 1) for
// mean, else 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_loss(const at::Tensor& per_row,
                                                           const at::Tensor& lse,
                                                           const at::Tensor& label_vec,
                                                           int64_t reduction) {
  const auto kind = static_cast<Reduction>(reduction);
  at::Tensor divisor = at::empty({}, per_row.options());
  at::Tensor loss = kind == Reduction::kNone ? per_row : at::empty({}, per_row.options());
  AT_DISPATCH_FLOATING_TYPES(per_row.scalar_type(), "margin_cross_entropy_loss", [&] {
    const scalar_t* rows = per_row.const_data_ptr<scalar_t>();
    const int64_t* label = label_vec.const_data_ptr<int64_t>();
    double total = 0.0;
    int64_t targets = 0;
    for (int64_t row = 0; row < per_row.size(0); ++row) {
      total += static_cast<double>(rows[row]);
      targets += label[row] >= 0 ? 1 : 0;
    }
    const scalar_t divide_by =
        kind == Reduction::kMean ? static_cast<scalar_t>(std::max<int64_t>(targets, 1)) : 1;
    *divisor.mutable_data_ptr<scalar_t>() = divide_by;
    if (kind != Reduction::kNone) {
      *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total) / divide_by;
    }
  });
  return {loss, lse, divisor};
}

// d loss / d cos; and d loss / d margins into margin_grad ((4, B), zeros) if defined. The one
// backward of margin_cross_entropy(_rows) (global_classes 0: label smoothing over the C columns,
// rows without a target are 0) and of sharded_margin_cross_entropy_backward (global_classes > 0:
// smoothing over the global class count, lse the global one, rows whose target is on another shard
// get the off-target gradient, rows whose upstream gradient is 0 are 0 unread).
at::Tensor cross_entropy_backward(const at::Tensor& grad_rows, const at::Tensor& cos,
                                  const at::Tensor& labels, const at::Tensor& lse, double s,
                                  const OpMargins& margins, double label_smoothing,
                                  bool straight_through, const at::Tensor& margin_grad,
                                  int64_t global_classes, const at::Tensor& divisor = {}) {
  const at::ScalarType acc_dtype = compute_dtype(cos.scalar_type());
  // Often expanded: read by stride; a scalar (a reduced loss's gradient) is every row's.
  const at::Tensor grad_vec = as_dtype(grad_rows, acc_dtype);
  const at::Tensor lse_vec = as_dtype(lse, acc_dtype);
  const at::Tensor label_vec = labels.contiguous();
  at::Tensor out = empty_output(cos);
  const int64_t rows = cos.size(0), cols = cos.size(1);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(),
                                  "margin_cross_entropy_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* src = cos.const_data_ptr<scalar_t>();
    const int64_t row_stride = cos.stride(0), col_stride = cos.stride(1);
    const acc_t* grad_data = grad_vec.const_data_ptr<acc_t>();
    const acc_t* lse_data = lse_vec.const_data_ptr<acc_t>();
    const int64_t grad_stride = grad_vec.dim() == 0 ? 0 : grad_vec.stride(0);
    const int64_t lse_stride = lse_vec.stride(0);
    // The mean's divisor divides the upstream gradient, as autograd's division did; x / 1 == x.
    const acc_t divide_by = divisor.defined() ? *divisor.const_data_ptr<acc_t>() : acc_t(1);
    const int64_t* label = label_vec.const_data_ptr<int64_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    const bool sharded = global_classes > 0;
    const acc_t num_classes = static_cast<acc_t>(sharded ? global_classes : cols);
    const MarginReader<acc_t> reader(margins, rows);
    acc_t* margin_grad_data =
        margin_grad.defined() ? margin_grad.mutable_data_ptr<acc_t>() : nullptr;
    const bool modulate = margins.negative_t.has_value();
    const acc_t t = static_cast<acc_t>(margins.negative_t.value_or(0.0));
    with_vec_kernels<scalar_t>([&](auto kernels) {
      using K = decltype(kernels);
      for_each_segment(rows, cols, split_rows(rows, cols), [&](int64_t, int64_t row, int64_t first,
                                                               int64_t end) {
        scalar_t* dst_row = dst + row * cols;
        const int64_t y = label[row];
        const bool has_target = y >= 0 && y < cols;
        const acc_t g = grad_data[row * grad_stride] / divide_by;
        if (sharded ? g == acc_t(0) : !has_target) {
          std::fill(dst_row + first, dst_row + end, scalar_t(0));
          return;
        }
        const scalar_t* src_row = src + row * row_stride;
        const acc_t row_lse = lse_data[row * lse_stride];
        const acc_t scale = acc_t(s) * g;
        const RowMargin<acc_t> m = reader.at(row);
        if (modulate && has_target) {
          const acc_t f_y = target_logit_of(static_cast<acc_t>(src_row[y * col_stride]), m);
          K::softmax_grad_modulated(src_row + first * col_stride, col_stride, end - first,
                                    acc_t(s), row_lse, scale, scale * eps / num_classes, f_y, t,
                                    dst_row + first);
        } else {
          K::softmax_grad(src_row + first * col_stride, col_stride, end - first, acc_t(s),
                          row_lse, scale, scale * eps / num_classes, dst_row + first);
        }
        if (y >= first && y < end) {
          const acc_t cos_y = static_cast<acc_t>(src_row[y * col_stride]);
          dst_row[y] = static_cast<scalar_t>(target_cos_grad<acc_t>(
              cos_y, row_lse, g, acc_t(s), m.m1, m.m2, m.m3, m.lam, eps, num_classes,
              straight_through));
          if (margin_grad_data != nullptr) {
            const acc_t dz = target_logit_upstream(target_logit_of(cos_y, m), row_lse, g,
                                                   acc_t(s), eps, num_classes);
            store_margin_grad(margin_grad_data, rows, row, cos_y, m, acc_t(s) * dz);
          }
        }
      });
    });
  });
  return out;
}

OpMargins scalar_margins(double m1, double m2, double m3, double lam) {
  return OpMargins{RowMargin<double>{m1, m2, m3, lam}, nullptr, std::nullopt};
}

// ---------------------------------------------------------------------------------------------
// The registered kernels: the scalar ops, the *_rows ops (per-row margins, modulation), then the
// sharded ops.

at::Tensor margin_logits_cpu(const at::Tensor& cos, const at::Tensor& labels, double s, double m1,
                             double m2, double m3, double lam, bool straight_through) {
  check_cos_labels(cos, labels, "angular::margin_logits");
  return logits_forward(cos, labels, s, scalar_margins(m1, m2, m3, lam));
}

at::Tensor margin_logits_backward_cpu(const at::Tensor& grad, const at::Tensor& cos,
                                      const at::Tensor& labels, double s, double m1, double m2,
                                      double m3, double lam, bool straight_through) {
  const char* op = "angular::margin_logits_backward";
  check_cos_labels(cos, labels, op);
  check_same_shape(grad, cos, op);
  return logits_backward(grad, cos, labels, s, scalar_margins(m1, m2, m3, lam), straight_through,
                         at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_cpu(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam, double label_smoothing, bool straight_through) {
  const char* op = "angular::margin_cross_entropy";
  check_cos_labels(cos, labels, op);
  return cross_entropy_forward(cos, labels, s, scalar_margins(m1, m2, m3, lam), label_smoothing,
                               op);
}

at::Tensor margin_cross_entropy_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& cos,
                                             const at::Tensor& labels, const at::Tensor& lse,
                                             double s, double m1, double m2, double m3, double lam,
                                             double label_smoothing, bool straight_through) {
  const char* op = "angular::margin_cross_entropy_backward";
  check_cross_entropy_backward(grad_rows, cos, labels, lse, op);
  return cross_entropy_backward(grad_rows, cos, labels, lse, s, scalar_margins(m1, m2, m3, lam),
                                label_smoothing, straight_through, at::Tensor(), 0);
}

// The reduced loss (csrc/ops.cpp): every argument checked here (check_loss_arguments, then the
// labels' values), so that the Python entry point validates nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_cross_entropy_loss_cpu(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam, double label_smoothing, bool straight_through, int64_t reduction) {
  check_loss_arguments(cos, labels, s, m1, m2, m3, lam, label_smoothing, reduction);
  const at::Tensor label_vec = labels.contiguous();
  check_labels(label_vec, cos.size(1));
  auto [per_row, lse] = cross_entropy_forward(cos, label_vec, s, scalar_margins(m1, m2, m3, lam),
                                              label_smoothing, "angular::margin_cross_entropy_loss");
  return reduce_loss(per_row, lse, label_vec, reduction);
}

at::Tensor margin_cross_entropy_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& divisor, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, bool straight_through, int64_t reduction) {
  check_loss_backward(grad, cos, labels, lse, divisor, reduction,
                      "angular::margin_cross_entropy_loss_backward");
  return cross_entropy_backward(grad, cos, labels, lse, s, scalar_margins(m1, m2, m3, lam),
                                label_smoothing, straight_through, at::Tensor(), 0, divisor);
}

OpMargins row_margins(const at::Tensor& rows, std::optional<double> negative_t) {
  return OpMargins{RowMargin<double>{1.0, 0.0, 0.0, 0.0}, &rows, negative_t};
}

at::Tensor margin_logits_rows_cpu(const at::Tensor& cos, const at::Tensor& labels,
                                  const at::Tensor& margins, double s, bool straight_through,
                                  std::optional<double> negative_t) {
  const char* op = "angular::margin_logits_rows";
  check_cos_labels(cos, labels, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  return logits_forward(cos, labels, s, row_margins(rows, negative_t));
}

std::tuple<at::Tensor, at::Tensor> margin_logits_rows_backward_cpu(
    const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& margins, double s, bool straight_through, std::optional<double> negative_t) {
  const char* op = "angular::margin_logits_rows_backward";
  check_cos_labels(cos, labels, op);
  check_same_shape(grad, cos, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  at::Tensor margin_grad = at::zeros_like(rows);
  at::Tensor grad_cos = logits_backward(grad, cos, labels, s, row_margins(rows, negative_t),
                                        straight_through, margin_grad);
  return {grad_cos, margin_grad};
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_rows_cpu(
    const at::Tensor& cos, const at::Tensor& labels, const at::Tensor& margins, double s,
    double label_smoothing, bool straight_through, std::optional<double> negative_t) {
  const char* op = "angular::margin_cross_entropy_rows";
  check_cos_labels(cos, labels, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  return cross_entropy_forward(cos, labels, s, row_margins(rows, negative_t), label_smoothing, op);
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_rows_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& lse, const at::Tensor& margins, double s, double label_smoothing,
    bool straight_through, std::optional<double> negative_t) {
  const char* op = "angular::margin_cross_entropy_rows_backward";
  check_cross_entropy_backward(grad_rows, cos, labels, lse, op);
  const at::Tensor rows = checked_row_margins(margins, cos, op);
  at::Tensor margin_grad = at::zeros_like(rows);
  at::Tensor grad_cos =
      cross_entropy_backward(grad_rows, cos, labels, lse, s, row_margins(rows, negative_t),
                             label_smoothing, straight_through, margin_grad, 0);
  return {grad_cos, margin_grad};
}

// The sharded ops (schemas in csrc/sharded_ops.cpp; docs/design.md, "Sharded softmax"): the
// forward's pass and the backward above, over one shard of the classes.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sharded_margin_partials_cpu(
    const at::Tensor& cos, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double lam) {
  const char* op = "angular::sharded_margin_partials";
  check_cos_labels(cos, labels, op);
  check_columns(cos, op, "C_local");
  const std::vector<RowTotal> totals =
      forward_rows(cos, labels, s, scalar_margins(m1, m2, m3, lam), true);
  const int64_t rows = cos.size(0);
  const auto options = cos.options().dtype(compute_dtype(cos.scalar_type()));
  at::Tensor row_max = at::empty({rows}, options), sum_exp = at::empty({rows}, options);
  at::Tensor target = at::empty({rows}, options), logit_sum = at::empty({rows}, options);
  AT_DISPATCH_FLOATING_TYPES(row_max.scalar_type(), "sharded_margin_partials", [&] {
    scalar_t* max_data = row_max.mutable_data_ptr<scalar_t>();
    scalar_t* sum_data = sum_exp.mutable_data_ptr<scalar_t>();
    scalar_t* target_data = target.mutable_data_ptr<scalar_t>();
    scalar_t* z_sum_data = logit_sum.mutable_data_ptr<scalar_t>();
    for (int64_t row = 0; row < rows; ++row) {
      const RowTotal& total = totals[row];
      max_data[row] = static_cast<scalar_t>(total.lse.max);
      sum_data[row] = static_cast<scalar_t>(total.lse.sum);
      // s f_y in the arithmetic type; 0 when another shard owns the target
      target_data[row] =
          total.has_target ? scalar_t(s) * static_cast<scalar_t>(total.f_y) : scalar_t(0);
      z_sum_data[row] = static_cast<scalar_t>(total.z_sum);
    }
  });
  return {row_max, sum_exp, target, logit_sum};
}

at::Tensor sharded_margin_cross_entropy_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& cos, const at::Tensor& labels,
    const at::Tensor& lse, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, int64_t num_classes, bool straight_through) {
  const char* op = "angular::sharded_margin_cross_entropy_backward";
  check_cross_entropy_backward(grad_rows, cos, labels, lse, op);
  check_num_classes(num_classes, cos, op);
  return cross_entropy_backward(grad_rows, cos, labels, lse, s, scalar_margins(m1, m2, m3, lam),
                                label_smoothing, straight_through, at::Tensor(), num_classes);
}

}  // namespace

TORCH_LIBRARY_IMPL(angular, CPU, m) {
  m.impl("margin_logits", &margin_logits_cpu);
  m.impl("margin_logits_backward", &margin_logits_backward_cpu);
  m.impl("margin_cross_entropy", &margin_cross_entropy_cpu);
  m.impl("margin_cross_entropy_backward", &margin_cross_entropy_backward_cpu);
  m.impl("margin_cross_entropy_loss", &margin_cross_entropy_loss_cpu);
  m.impl("margin_cross_entropy_loss_backward", &margin_cross_entropy_loss_backward_cpu);
  m.impl("margin_logits_rows", &margin_logits_rows_cpu);
  m.impl("margin_logits_rows_backward", &margin_logits_rows_backward_cpu);
  m.impl("margin_cross_entropy_rows", &margin_cross_entropy_rows_cpu);
  m.impl("margin_cross_entropy_rows_backward", &margin_cross_entropy_rows_backward_cpu);
  m.impl("sharded_margin_partials", &sharded_margin_partials_cpu);
  m.impl("sharded_margin_cross_entropy_backward", &sharded_margin_cross_entropy_backward_cpu);
}

}  // namespace angular::cpu
