// CPU kernel of angular::linear_margin_cross_entropy and its backward (schemas in csrc/ops.cpp;
// Python side, fake kernels and autograd in angular/ops/linear.py; margin math in
// csrc/margin_math.h).
//
// The classes are cut into chunks of a few hundred columns; at::parallel_for hands each thread a
// run of chunks. Per chunk a thread computes its (B, chunk) cosine tile with one GEMM (at::mm_out
// on chunk views: called inside the parallel region, the BLAS runs single-threaded on this thread's
// cores' cache), scales its columns by 1 / |w_j|, and then:
//
//   forward:  merges the tile into per-row online log-sum-exp states (one set per thread, merged
//             at the end), with the margin on the target column (csrc/cpu/vec_kernels.h);
//   backward: turns the tile into d loss / d cos (the same formula as margin_cross_entropy's
//             backward), adds its contribution to the thread's grad of normalize(x) with one GEMM,
//             and writes the chunk's rows of grad_weight with one more GEMM plus the chain rule
//             through normalize(w) (docs/design.md, "Normalisation inside a fused linear op").
//
// The weight is never normalised as a whole: with G' = G / |w_j| (per column),
//   d loss / d xh_i = sum_j G'_ij w_j                       (GEMM with the raw weight rows)
//   d loss / d w_j  = sum_i G'_ij xh_i - w_j r'_j / |w_j|,  r'_j = sum_i G'_ij cos_ij
// (the projection term wh_j (wh_j . A_j) of the design's formula, with wh_j . A_j computed from the
// tile instead of a dot product over D). F.normalize's eps: for |v| <= 1e-12 the map is v / 1e-12,
// whose derivative has no projection term.
//
// Memory beyond the inputs and grad_weight: per thread two tiles of B x chunk and, when the weight
// is not in the arithmetic dtype, chunk x D conversion buffers; B x D per thread for grad_x; the
// per-row and per-class vectors. Nothing of size B x C.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/row_segments.h"
#include "margin_math.h"
#include "op_common.h"

namespace angular::cpu {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

using segments::with_vec_kernels;

// Columns per chunk. A thread's working set per chunk is two B x chunk tiles (cosines and their
// gradient) plus the chunk's weight rows (chunk x D, read by two GEMMs): keeping it within about
// 1 MiB leaves it in a core's L2, so the GEMM outputs are re-read from cache. At least 64 columns
// (smaller GEMMs lose more to overhead than the cache saves); ANGULAR_LINEAR_CHUNK overrides (for
// tuning benchmarks).
int64_t chunk_columns(int64_t rows, int64_t dim, int64_t classes, int64_t element_size) {
  static const int64_t forced = [] {
    const char* env = std::getenv("ANGULAR_LINEAR_CHUNK");
    return env == nullptr ? int64_t(0) : std::max<int64_t>(0, std::atoll(env));
  }();
  int64_t chunk = forced;
  if (chunk == 0) {
    constexpr int64_t kBudgetBytes = int64_t(1) << 20;
    chunk = kBudgetBytes / (element_size * (2 * rows + dim));
    chunk = std::clamp<int64_t>(chunk / 16 * 16, 64, 1024);
  }
  return std::min(chunk, classes);
}

// Per-row share of the loss from the chunks one thread has seen (logits units, z = s * cos).
struct RowState {
  LogSumExp<double> lse{0.0, 0.0};
  double z_sum = 0.0;
  double z_target = 0.0;
};

// Normalised embeddings in the arithmetic dtype, and their norms.
std::pair<at::Tensor, at::Tensor> normalized_x(const at::Tensor& x, at::ScalarType acc) {
  const at::Tensor xa = x.to(acc).contiguous();
  at::Tensor norm = at::linalg_vector_norm(xa, 2, {1});
  return {xa / norm.clamp_min(kNormEps).unsqueeze(1), norm};
}

// The weight rows of a chunk, readable by at::mm: the view itself when it is in the arithmetic
// dtype with unit column stride, otherwise converted into buffer.
at::Tensor weight_chunk(const at::Tensor& weight, int64_t first, int64_t n, at::Tensor& buffer,
                        at::ScalarType acc) {
  at::Tensor view = weight.narrow(0, first, n);
  if (view.scalar_type() == acc && view.stride(1) == 1) {
    return view;
  }
  at::Tensor out = buffer.narrow(0, 0, n);
  out.copy_(view);
  return out;
}

// The forward pass over the class chunks: every row's merged state (logits units), and the norms.
// shard: the weight is one shard of the classes (angular/ops/sharded.py); rows whose label is
// outside [0, classes) (the target lives in another shard) are accumulated all the same, without
// a target column. Otherwise such rows have no target and are skipped (loss 0).
struct ForwardPass {
  std::vector<RowState> rows;
  at::Tensor x_norm;
  at::Tensor w_norm;
};

ForwardPass forward_pass(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                         double s, double m1, double m2, double m3, double lam, bool shard,
                         const char* op) {
  check_linear_inputs(x, weight, labels, op);
  const at::ScalarType acc = compute_dtype(x.scalar_type());
  const int64_t rows = x.size(0), dim = x.size(1), classes = weight.size(0);
  const auto options = x.options().dtype(acc);
  ForwardPass pass{std::vector<RowState>(rows), at::Tensor(), at::empty({classes}, options)};
  if (rows == 0 || classes == 0) {
    pass.x_norm = at::linalg_vector_norm(x.to(acc), 2, {1});
    pass.w_norm.zero_();
    return pass;
  }
  auto [xh, x_norm] = normalized_x(x, acc);
  pass.x_norm = x_norm;
  at::Tensor& w_norm = pass.w_norm;
  const at::Tensor label_vec = labels.contiguous();
  const int64_t* label = label_vec.const_data_ptr<int64_t>();
  const int64_t chunk = chunk_columns(rows, dim, classes, at::elementSize(acc));
  const int64_t num_chunks = (classes + chunk - 1) / chunk;
  const int64_t threads = at::get_num_threads();
  std::vector<RowState> states(threads * rows);

  AT_DISPATCH_FLOATING_TYPES(acc, "linear_margin_cross_entropy", [&] {
    using acc_t = scalar_t;
    const acc_t sf = acc_t(s);
    with_vec_kernels<acc_t>([&](auto kernels) {
      using K = decltype(kernels);
      at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
        // Worker threads do not inherit the caller's dispatch state: keep autograd out of the
        // chunk ops (the weight may require grad, and out= ops refuse such arguments).
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const int64_t thread = at::get_thread_num();
        TORCH_CHECK(thread < threads, op, ": thread ", thread, " of ", threads);
        RowState* state = states.data() + thread * rows;
        at::Tensor tile_buffer = at::empty({rows * chunk}, options);
        at::Tensor weight_buffer;
        if (weight.scalar_type() != acc || weight.stride(1) != 1) {
          weight_buffer = at::empty({chunk, dim}, options);
        }
        for (int64_t c = begin; c < end; ++c) {
          const int64_t first = c * chunk, n = std::min(chunk, classes - first);
          const at::Tensor wc = weight_chunk(weight, first, n, weight_buffer, acc);
          at::Tensor norm = w_norm.narrow(0, first, n);
          at::linalg_vector_norm_out(norm, wc, 2, {1});
          at::Tensor tile = tile_buffer.narrow(0, 0, rows * n).view({rows, n});
          at::mm_out(tile, xh, wc.t());
          tile.div_(norm.clamp_min(kNormEps).unsqueeze(0));  // now the cosines
          const acc_t* cos = tile.const_data_ptr<acc_t>();
          for (int64_t row = 0; row < rows; ++row) {
            const int64_t y = label[row];
            if (!shard && (y < 0 || y >= classes)) {
              continue;  // no target: loss 0
            }
            const acc_t* cos_row = cos + row * n;
            const bool has_target = y >= first && y < first + n;
            const acc_t f_y = has_target ? target_logit<acc_t>(cos_row[y - first], acc_t(m1),
                                                                acc_t(m2), acc_t(m3), acc_t(lam))
                                         : acc_t(0);
            const RowPartial part =
                K::logsumexp(cos_row, 1, n, sf, has_target ? y - first : -1, f_y);
            state[row].lse = merge(state[row].lse, part.lse);
            state[row].z_sum += part.z_sum;
            if (has_target) {
              state[row].z_target = s * static_cast<double>(f_y);
            }
          }
        }
      });
    });
  });
  for (int64_t row = 0; row < rows; ++row) {
    RowState& total = pass.rows[row];
    for (int64_t thread = 0; thread < threads; ++thread) {
      const RowState& part = states[thread * rows + row];
      total.lse = merge(total.lse, part.lse);
      total.z_sum += part.z_sum;
      total.z_target += part.z_target;  // only the thread that saw the target column wrote it
    }
  }
  return pass;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_margin_cross_entropy_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels, double s, double m1,
    double m2, double m3, double lam, double label_smoothing, bool straight_through) {
  const ForwardPass pass = forward_pass(x, weight, labels, s, m1, m2, m3, lam, /*shard=*/false,
                                        "angular::linear_margin_cross_entropy");
  const int64_t rows = x.size(0), classes = weight.size(0);
  const auto options = x.options().dtype(compute_dtype(x.scalar_type()));
  at::Tensor loss = at::zeros({rows}, options);
  at::Tensor lse = at::zeros({rows}, options);
  const at::Tensor label_vec = labels.contiguous();
  const int64_t* label = label_vec.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "linear_margin_cross_entropy", [&] {
    scalar_t* loss_data = loss.mutable_data_ptr<scalar_t>();
    scalar_t* lse_data = lse.mutable_data_ptr<scalar_t>();
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t y = label[row];
      if (y < 0 || y >= classes) {
        continue;  // loss and lse stay 0
      }
      const RowState& total = pass.rows[row];
      const double row_lse = total.lse.max + std::log(total.lse.sum);
      loss_data[row] = static_cast<scalar_t>(smoothed_loss<double>(
          row_lse, total.z_target, total.z_sum, static_cast<double>(classes), label_smoothing));
      lse_data[row] = static_cast<scalar_t>(row_lse);
    }
  });
  return {loss, lse, pass.x_norm, pass.w_norm};
}

// One shard's per-row partial statistics (max, sum of exp(z - max), target logit (0 when not
// local), sum of z), with the norms the backward takes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sharded_linear_margin_partials_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& labels, double s, double m1, double m2,
                                   double m3, double lam) {
  const ForwardPass pass = forward_pass(x, weight, labels, s, m1, m2, m3, lam, /*shard=*/true,
                                        "angular::sharded_linear_margin_partials");
  const int64_t rows = x.size(0);
  at::Tensor out = at::zeros({4, rows}, x.options().dtype(at::kDouble));
  double* data = out.mutable_data_ptr<double>();
  for (int64_t row = 0; row < rows; ++row) {
    const RowState& total = pass.rows[row];
    data[row] = total.lse.max;
    data[rows + row] = total.lse.sum;
    data[2 * rows + row] = total.z_target;
    data[3 * rows + row] = total.z_sum;
  }
  out = out.to(compute_dtype(x.scalar_type()));
  return {out[0].clone(), out[1].clone(), out[2].clone(), out[3].clone(), pass.x_norm,
          pass.w_norm};
}

// The backward pass. shard (angular/ops/sharded.py): lse is the global log-sum-exp, rows whose
// target lives in another shard (labels outside [0, classes)) get their off-target gradient, a row
// whose upstream gradient is 0 gets 0 whatever it holds, and label smoothing spreads over
// smoothing_classes (the global class count). Otherwise rows without a target get 0 and
// smoothing_classes is the weight's row count.
std::tuple<at::Tensor, at::Tensor> backward_pass(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& x_norm,
    const at::Tensor& w_norm, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, bool straight_through, bool shard, int64_t smoothing_classes,
    const char* op) {
  check_linear_inputs(x, weight, labels, op);
  check_rows(grad_rows, x, op, "grad_rows");
  check_rows(lse, x, op, "lse");
  check_rows(x_norm, x, op, "x_norm");
  check_rows(w_norm, weight, op, "weight_norm");
  const at::ScalarType acc = compute_dtype(x.scalar_type());
  const int64_t rows = x.size(0), dim = x.size(1), classes = weight.size(0);
  const auto options = x.options().dtype(acc);
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options().memory_format(
                                                         at::MemoryFormat::Contiguous));
  if (rows == 0 || classes == 0 || dim == 0) {
    return {at::zeros_like(x, at::MemoryFormat::Contiguous), grad_weight.zero_()};
  }
  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor x_denom = as_dtype(x_norm, acc).clamp_min(kNormEps);
  const at::Tensor xh = xa / x_denom.unsqueeze(1);
  const at::Tensor grad_vec = as_dtype(grad_rows, acc).contiguous();
  const at::Tensor lse_vec = as_dtype(lse, acc).contiguous();
  const at::Tensor w_norm_vec = as_dtype(w_norm, acc).contiguous();
  const at::Tensor label_vec = labels.contiguous();
  const int64_t* label = label_vec.const_data_ptr<int64_t>();
  const int64_t chunk = chunk_columns(rows, dim, classes, at::elementSize(acc));
  const int64_t num_chunks = (classes + chunk - 1) / chunk;
  const int64_t threads = at::get_num_threads();
  // Each thread's sum of d loss / d normalize(x) over its chunks.
  at::Tensor grad_xh_parts = at::zeros({threads, rows, dim}, options);
  const bool write_in_place = grad_weight.scalar_type() == acc;

  AT_DISPATCH_FLOATING_TYPES(acc, "linear_margin_cross_entropy_backward", [&] {
    using acc_t = scalar_t;
    const acc_t sf = acc_t(s);
    const acc_t eps = acc_t(label_smoothing);
    const acc_t num_classes = acc_t(smoothing_classes);
    const acc_t* grad_data = grad_vec.const_data_ptr<acc_t>();
    const acc_t* lse_data = lse_vec.const_data_ptr<acc_t>();
    const acc_t* w_norm_data = w_norm_vec.const_data_ptr<acc_t>();
    with_vec_kernels<acc_t>([&](auto kernels) {
      using K = decltype(kernels);
      at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
        // Worker threads do not inherit the caller's dispatch state: keep autograd out of the
        // chunk ops (the weight may require grad, and out= ops refuse such arguments).
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const int64_t thread = at::get_thread_num();
        TORCH_CHECK(thread < threads, op, ": thread ", thread, " of ", threads);
        at::Tensor grad_xh = grad_xh_parts[thread];
        at::Tensor cos_buffer = at::empty({rows * chunk}, options);
        at::Tensor grad_buffer = at::empty({rows * chunk}, options);
        at::Tensor inv_buffer = at::empty({chunk}, options);
        at::Tensor coef_buffer = at::empty({chunk}, options);
        at::Tensor weight_buffer, grad_weight_buffer;
        if (weight.scalar_type() != acc || weight.stride(1) != 1) {
          weight_buffer = at::empty({chunk, dim}, options);
        }
        if (!write_in_place) {
          grad_weight_buffer = at::empty({chunk, dim}, options);
        }
        for (int64_t c = begin; c < end; ++c) {
          const int64_t first = c * chunk, n = std::min(chunk, classes - first);
          const at::Tensor wc = weight_chunk(weight, first, n, weight_buffer, acc);
          acc_t* inv = inv_buffer.mutable_data_ptr<acc_t>();
          acc_t* coef = coef_buffer.mutable_data_ptr<acc_t>();
          for (int64_t j = 0; j < n; ++j) {
            inv[j] = acc_t(1) / std::max(w_norm_data[first + j], acc_t(kNormEps));
            coef[j] = acc_t(0);
          }
          at::Tensor tile = cos_buffer.narrow(0, 0, rows * n).view({rows, n});
          at::mm_out(tile, xh, wc.t());
          acc_t* cos = tile.mutable_data_ptr<acc_t>();
          acc_t* grad = grad_buffer.mutable_data_ptr<acc_t>();
          for (int64_t row = 0; row < rows; ++row) {
            acc_t* cos_row = cos + row * n;
            acc_t* grad_row = grad + row * n;
            for (int64_t j = 0; j < n; ++j) {
              cos_row[j] *= inv[j];
            }
            const int64_t y = label[row];
            const acc_t g = grad_data[row];
            if (shard ? g == acc_t(0) : (y < 0 || y >= classes)) {
              std::fill(grad_row, grad_row + n, acc_t(0));  // no target: gradient 0
              continue;
            }
            const acc_t scale = sf * g;
            K::softmax_grad(cos_row, 1, n, sf, lse_data[row], scale, scale * eps / num_classes,
                            grad_row);
            if (y >= first && y < first + n) {
              grad_row[y - first] = target_cos_grad<acc_t>(
                  cos_row[y - first], lse_data[row], g, sf, acc_t(m1), acc_t(m2), acc_t(m3),
                  acc_t(lam), eps, num_classes, straight_through);
            }
            // G' = G / |w_j|, and r'_j = sum_i G'_ij cos_ij for the projection term.
            for (int64_t j = 0; j < n; ++j) {
              grad_row[j] *= inv[j];
              coef[j] += grad_row[j] * cos_row[j];
            }
          }
          for (int64_t j = 0; j < n; ++j) {  // coef_j = r'_j / |w_j|, no projection below eps
            coef[j] = w_norm_data[first + j] > acc_t(kNormEps) ? coef[j] * inv[j] : acc_t(0);
          }
          const at::Tensor grad_tile = grad_buffer.narrow(0, 0, rows * n).view({rows, n});
          grad_xh.addmm_(grad_tile, wc);
          at::Tensor gw = write_in_place ? grad_weight.narrow(0, first, n)
                                         : grad_weight_buffer.narrow(0, 0, n);
          at::mm_out(gw, grad_tile.t(), xh);
          gw.addcmul_(wc, coef_buffer.narrow(0, 0, n).unsqueeze(1), -1);
          if (!write_in_place) {
            grad_weight.narrow(0, first, n).copy_(gw);
          }
        }
      });
    });
  });
  // Through normalize(x): (g - xh (xh . g)) / |x|, no projection below eps.
  const at::Tensor grad_xh = grad_xh_parts.sum(0);
  const at::Tensor dot = (xh * grad_xh).sum(1, /*keepdim=*/true);
  const at::Tensor projection = at::where(as_dtype(x_norm, acc).unsqueeze(1) > kNormEps, dot, 0);
  const at::Tensor grad_x = (grad_xh - xh * projection) / x_denom.unsqueeze(1);
  return {grad_x.to(x.scalar_type()).contiguous(), grad_weight};
}

std::tuple<at::Tensor, at::Tensor> linear_margin_cross_entropy_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& x_norm,
    const at::Tensor& w_norm, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, bool straight_through) {
  return backward_pass(grad_rows, x, weight, labels, lse, x_norm, w_norm, s, m1, m2, m3, lam,
                       label_smoothing, straight_through, /*shard=*/false, weight.size(0),
                       "angular::linear_margin_cross_entropy_backward");
}

std::tuple<at::Tensor, at::Tensor> sharded_linear_margin_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& x_norm,
    const at::Tensor& w_norm, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, int64_t num_classes, bool straight_through) {
  const char* op = "angular::sharded_linear_margin_backward";
  TORCH_CHECK(num_classes >= weight.size(0), op, ": num_classes must be >= the shard's ",
              weight.size(0), " classes, got ", num_classes);
  return backward_pass(grad_rows, x, weight, labels, lse, x_norm, w_norm, s, m1, m2, m3, lam,
                       label_smoothing, straight_through, /*shard=*/true, num_classes, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(angular, CPU, m) {
  m.impl("linear_margin_cross_entropy", &linear_margin_cross_entropy_cpu);
  m.impl("linear_margin_cross_entropy_backward", &linear_margin_cross_entropy_backward_cpu);
  m.impl("sharded_linear_margin_partials", &sharded_linear_margin_partials_cpu);
  m.impl("sharded_linear_margin_backward", &sharded_linear_margin_backward_cpu);
}

}  // namespace angular::cpu
