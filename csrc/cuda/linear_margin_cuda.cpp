// CUDA implementation of angular::linear_margin_cross_entropy and its backward (schemas in
// csrc/ops.cpp; Python side in angular/ops/linear.py): cuBLAS GEMMs (at::mm) on class chunks, plus
// the row kernels of csrc/cuda/linear_margin_kernels.cu on each chunk's cosine tile.
//
// Per chunk of columns [first, first + n):
//   tile  = (x @ w^T) / (|x| |w|)                    (rows x n, fp32 (fp64 for fp64 x))
//           The GEMM takes the raw rows in the GEMM dtype (x's when weight has it: tensor cores for
//           bf16/fp16) and returns fp32 (cuBLAS's mixed-precision GEMM); the norms are divided out
//           of the fp32 tile. Rounding the tile, or normalised rows, to bf16 would put an error of
//           2^-9 on each cosine, which s = 64 turns into 10% errors in the probabilities (the first
//           H200 run of the tests showed it).
//   forward:  tile_lse merges the tile into per-row online log-sum-exp states (the margin on the
//             target column); the loss comes from the states at the end.
//   backward: tile_grad turns the tile into G = d loss / d cos in place; then
//             grad_xh += (G / |w|) @ w, A = (G / |x|)^T @ x (G rounded to the GEMM dtype), and the
//             chunk's rows of grad_weight = (A - wh (wh . A)) / |w| (docs/design.md,
//             "Normalisation inside a fused linear op"), written into grad_weight directly.
// Memory beyond the inputs and grad_weight: a few tiles of rows x chunk (chunk chosen so that one
// fp32 tile is about 32 MiB), the chunk's normalised weight rows and A (chunk x D), and
// O(rows + classes) vectors. The tile does go through global memory (a tiled kernel keeping it on
// chip would not).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cuda/linear_launchers.h"
#include "op_common.h"

namespace angular::cuda::linear {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

TileType tile_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return TileType::kHalf;
    case at::kBFloat16:
      return TileType::kBFloat16;
    case at::kDouble:
      return TileType::kDouble;
    default:
      return TileType::kFloat;
  }
}

int64_t chunk_columns(int64_t rows, int64_t classes, int64_t element_size) {
  constexpr int64_t kTileBytes = int64_t(32) << 20;
  int64_t chunk = kTileBytes / std::max<int64_t>(1, rows * element_size);
  chunk = std::max<int64_t>(1024, chunk / 256 * 256);
  return std::min(chunk, classes);
}

MarginParams params_of(double s, double m1, double m2, double m3, double lam, double eps,
                       bool straight_through) {
  return MarginParams{s, m1, m2, m3, lam, eps, straight_through};
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The chunk's weight rows divided by their norms (F.normalize), in the arithmetic dtype.
at::Tensor normalized_rows(const at::Tensor& rows, const at::Tensor& norm, at::ScalarType acc) {
  return rows.to(acc) / norm.clamp_min(kNormEps).unsqueeze(1);
}

// The GEMMs' input dtype: x's when weight has it too, else the arithmetic dtype, so that neither
// operand is rounded to the other's narrower dtype.
at::ScalarType gemm_dtype(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == weight.scalar_type() ? x.scalar_type()
                                                 : compute_dtype(x.scalar_type());
}

// a @ b for a and b in one dtype, accumulated and returned in acc (aten::mm.dtype: cuBLAS's
// bf16/fp16 GEMM with an fp32 result).
at::Tensor mm_to(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

// The forward pass over the class chunks: the per-row state (rows x 4: max, sum of exp(z - max),
// sum of z, target logit) and the norms. p.shard: rows whose target is in another shard are
// accumulated too (csrc/cuda/linear_launchers.h).
struct ForwardPass {
  at::Tensor state;
  at::Tensor x_norm;
  at::Tensor w_norm;
};

ForwardPass forward_pass(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                         const MarginParams& p, const char* op) {
  check_linear_inputs(x, weight, labels, op);
  const at::ScalarType acc = compute_dtype(x.scalar_type());
  const at::ScalarType gemm = gemm_dtype(x, weight);
  const int64_t rows = x.size(0), classes = weight.size(0);
  const auto options = x.options().dtype(acc);
  ForwardPass pass{at::zeros({rows, 4}, options), at::linalg_vector_norm(x, 2, {1}, false, acc),
                   at::zeros({classes}, options)};
  if (rows == 0 || classes == 0) {
    return pass;
  }
  const at::Tensor x_denom = pass.x_norm.clamp_min(kNormEps).unsqueeze(1);
  const at::Tensor xg = as_dtype(x, gemm).contiguous();
  const at::Tensor label_vec = labels.contiguous();
  const int64_t chunk = chunk_columns(rows, classes, at::elementSize(acc));
  for (int64_t first = 0; first < classes; first += chunk) {
    const int64_t n = std::min(chunk, classes - first);
    const at::Tensor wc = weight.narrow(0, first, n);
    at::Tensor norm = pass.w_norm.narrow(0, first, n);
    norm.copy_(at::linalg_vector_norm(wc, 2, {1}, false, acc));
    at::Tensor tile = mm_to(xg, as_dtype(wc, gemm).t(), acc);
    tile.div_(x_denom).div_(norm.clamp_min(kNormEps).unsqueeze(0));
    C10_CUDA_CHECK(launch_tile_lse(tile_type(acc), tile.const_data_ptr(), rows, n, first, classes,
                                   label_vec.const_data_ptr<int64_t>(), p,
                                   pass.state.mutable_data_ptr(), current_stream()));
  }
  return pass;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_margin_cross_entropy_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels, double s, double m1,
    double m2, double m3, double lam, double label_smoothing, bool straight_through) {
  const c10::cuda::CUDAGuard guard(x.device());
  const MarginParams p = params_of(s, m1, m2, m3, lam, label_smoothing, straight_through);
  const ForwardPass pass =
      forward_pass(x, weight, labels, p, "angular::linear_margin_cross_entropy");
  const int64_t rows = x.size(0), classes = weight.size(0);
  const auto options = x.options().dtype(compute_dtype(x.scalar_type()));
  at::Tensor loss = at::zeros({rows}, options);
  at::Tensor lse = at::zeros({rows}, options);
  if (rows == 0 || classes == 0) {
    return {loss, lse, pass.x_norm, pass.w_norm};
  }
  const at::Tensor label_vec = labels.contiguous();
  C10_CUDA_CHECK(launch_finish(loss.scalar_type() == at::kDouble, pass.state.const_data_ptr(),
                               rows, classes, label_vec.const_data_ptr<int64_t>(), p,
                               loss.mutable_data_ptr(), lse.mutable_data_ptr(), current_stream()));
  return {loss, lse, pass.x_norm, pass.w_norm};
}

// One shard's per-row partial statistics (max, sum of exp(z - max), target logit, sum of z) and
// the norms (angular/ops/sharded.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sharded_linear_margin_partials_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& labels, double s, double m1, double m2,
                                    double m3, double lam) {
  const c10::cuda::CUDAGuard guard(x.device());
  MarginParams p = params_of(s, m1, m2, m3, lam, 0.0, false);
  p.shard = true;
  const ForwardPass pass =
      forward_pass(x, weight, labels, p, "angular::sharded_linear_margin_partials");
  const at::Tensor& st = pass.state;
  return {st.select(1, 0).contiguous(), st.select(1, 1).contiguous(),
          st.select(1, 3).contiguous(), st.select(1, 2).contiguous(),
          pass.x_norm, pass.w_norm};
}

// The backward pass; p.shard: lse is the global one, rows whose target is in another shard get
// their off-target gradient, rows whose upstream gradient is 0 get 0, smoothing over
// p.num_classes.
std::tuple<at::Tensor, at::Tensor> backward_pass(const at::Tensor& grad_rows, const at::Tensor& x,
                                                 const at::Tensor& weight,
                                                 const at::Tensor& labels, const at::Tensor& lse,
                                                 const at::Tensor& x_norm,
                                                 const at::Tensor& w_norm, const MarginParams& p,
                                                 const char* op) {
  check_linear_inputs(x, weight, labels, op);
  check_rows(grad_rows, x, op, "grad_rows");
  check_rows(lse, x, op, "lse");
  check_rows(x_norm, x, op, "x_norm");
  check_rows(w_norm, weight, op, "weight_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = compute_dtype(x.scalar_type());
  const at::ScalarType gemm = gemm_dtype(x, weight);
  const int64_t rows = x.size(0), dim = x.size(1), classes = weight.size(0);
  const auto options = x.options().dtype(acc);
  at::Tensor grad_weight =
      at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0 || classes == 0 || dim == 0) {
    return {at::zeros_like(x, at::MemoryFormat::Contiguous), grad_weight.zero_()};
  }
  const at::Tensor x_norm_acc = as_dtype(x_norm, acc);
  const at::Tensor x_denom = x_norm_acc.clamp_min(kNormEps).unsqueeze(1);
  const at::Tensor xh_acc = x.to(acc) / x_denom;
  const at::Tensor xg = as_dtype(x, gemm).contiguous();
  const at::Tensor grad_vec = as_dtype(grad_rows, acc).contiguous();
  const at::Tensor lse_vec = as_dtype(lse, acc).contiguous();
  const at::Tensor w_norm_acc = as_dtype(w_norm, acc);
  const at::Tensor label_vec = labels.contiguous();
  at::Tensor grad_xh = at::zeros({rows, dim}, options);
  const int64_t chunk = chunk_columns(rows, classes, at::elementSize(acc));
  for (int64_t first = 0; first < classes; first += chunk) {
    const int64_t n = std::min(chunk, classes - first);
    const at::Tensor norm = w_norm_acc.narrow(0, first, n);
    const at::Tensor w_denom = norm.clamp_min(kNormEps);
    const at::Tensor wc = weight.narrow(0, first, n);
    const at::Tensor wg = as_dtype(wc, gemm);
    at::Tensor tile = mm_to(xg, wg.t(), acc);
    tile.div_(x_denom).div_(w_denom.unsqueeze(0));
    C10_CUDA_CHECK(launch_tile_grad(tile_type(acc), tile.mutable_data_ptr(), rows, n, first,
                                    classes, label_vec.const_data_ptr<int64_t>(),
                                    grad_vec.const_data_ptr(), lse_vec.const_data_ptr(), p,
                                    current_stream()));
    // The tile is now G = d loss / d cos. With cos_ij = x_i . w_j / (|x_i| |w_j|), the norms go
    // onto G so that the GEMMs take the raw rows: grad_xh_i = sum_j G_ij w_j / |w_j| and
    // A_j = sum_i G_ij x_i / |x_i|.
    grad_xh.add_(mm_to(as_dtype(tile / w_denom.unsqueeze(0), gemm), wg, acc));
    const at::Tensor a = mm_to(as_dtype(tile.div_(x_denom), gemm).t(), xg, acc);
    const at::Tensor wh_acc = normalized_rows(wc, norm, acc);
    // Through normalize(w): (A - wh (wh . A)) / |w|; below eps the map is w / eps (no projection).
    const at::Tensor dot = at::where(norm.unsqueeze(1) > kNormEps,
                                     (wh_acc * a).sum(1, /*keepdim=*/true), 0);
    grad_weight.narrow(0, first, n).copy_((a - wh_acc * dot) / w_denom.unsqueeze(1));
  }
  const at::Tensor dot =
      at::where(x_norm_acc.unsqueeze(1) > kNormEps, (xh_acc * grad_xh).sum(1, true), 0);
  const at::Tensor grad_x = (grad_xh - xh_acc * dot) / x_denom;
  return {grad_x.to(x.scalar_type()).contiguous(), grad_weight};
}

std::tuple<at::Tensor, at::Tensor> linear_margin_cross_entropy_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& x_norm,
    const at::Tensor& w_norm, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, bool straight_through) {
  const MarginParams p = params_of(s, m1, m2, m3, lam, label_smoothing, straight_through);
  return backward_pass(grad_rows, x, weight, labels, lse, x_norm, w_norm, p,
                       "angular::linear_margin_cross_entropy_backward");
}

std::tuple<at::Tensor, at::Tensor> sharded_linear_margin_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& x_norm,
    const at::Tensor& w_norm, double s, double m1, double m2, double m3, double lam,
    double label_smoothing, int64_t num_classes, bool straight_through) {
  const char* op = "angular::sharded_linear_margin_backward";
  TORCH_CHECK(num_classes >= weight.size(0), op, ": num_classes must be >= the shard's ",
              weight.size(0), " classes, got ", num_classes);
  MarginParams p = params_of(s, m1, m2, m3, lam, label_smoothing, straight_through);
  p.shard = true;
  p.num_classes = num_classes;
  return backward_pass(grad_rows, x, weight, labels, lse, x_norm, w_norm, p, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(angular, CUDA, m) {
  m.impl("linear_margin_cross_entropy", &linear_margin_cross_entropy_cuda);
  m.impl("linear_margin_cross_entropy_backward", &linear_margin_cross_entropy_backward_cuda);
  m.impl("sharded_linear_margin_partials", &sharded_linear_margin_partials_cuda);
  m.impl("sharded_linear_margin_backward", &sharded_linear_margin_backward_cuda);
}

}  // namespace angular::cuda::linear
