"""Fused linear + margin + cross-entropy as tiled Triton kernels that keep the cosine tile on chip
(issue 26, part 4, stage two). Opt-in: :func:`linear_margin_cross_entropy_triton` is not what
:func:`angular.ops.linear_margin_cross_entropy` dispatches to.

It computes exactly the function of the compiled fused linear op (:mod:`angular.ops.linear`):
``margin_cross_entropy(normalize(x) @ normalize(weight).T, labels, ...)``, with the margin math of
``csrc/margin_math.h`` / :mod:`angular.ops.reference`, but no (B, C) tile ever reaches global
memory: the CUDA op writes each chunk's fp32 cosines (rows x chunk, about 32 MiB) and reads them back
in its row kernels; here each cosine tile lives in registers between the ``tl.dot`` that makes it and
the reductions that consume it.

Tiling. Classes are cut into tiles of BLOCK_C columns, rows into blocks of BLOCK_B, the embedding
dimension into blocks of BLOCK_D (the ``tl.dot`` K loop). A cosine tile is
``sum_d x[rows, d] @ w[cols, d]^T`` accumulated in fp32 from the raw rows in the GEMM dtype (x's when
weight has it: bf16/fp16 tensor cores; fp32 "ieee" otherwise, never tf32), then scaled by
``1 / max(|x_i|, eps)`` and ``1 / max(|w_j|, eps)`` (F.normalize's eps, 1e-12), as the CUDA op does.
Rounding the normalised rows to bf16 instead would put 2^-9 on each cosine, which s = 64 turns into
10% errors in the probabilities.

- The margin touches one column per row, so it is computed outside the kernels, on B values: the
  target cosine ``cos_y`` (a gathered dot, O(B D)), ``s f_y`` and ``d f_y / d cos_y`` (guard zone and
  straight-through included) in fp32 torch ops that mirror ``csrc/margin_math.h``. The kernels only
  substitute them at the target column; no acos runs per element. (So the target logit is a per-row
  input of the kernels rather than one of their partials.)
- Forward: grid (row blocks, class splits); each program walks its split's tiles and keeps, per row,
  an online log-sum-exp (max, sum of exp(z - max)) and the sum of the logits (for label smoothing),
  then writes them as per-(row, split) partials. A few torch ops over (B, splits) merge the splits into
  the loss and the lse per row (the same merge as ``LogSumExp`` in ``csrc/margin_math.h``).
- Backward: a persistent grid over class tiles (program p takes tiles p, p + P, ...) and, inside, all
  row blocks. Each (row block, class tile) pair recomputes its cosine tile and turns it into
  ``G = d loss / d cos`` (``s g (p_j - eps / C)``, the target column from the per-row values). With the
  gradient filter on, a pair whose ``|G|`` is below 2^-12 everywhere is skipped (the two GEMMs below
  are two thirds of the backward's work, and at C = 1M nearly every tile away from the targets has
  probabilities near 1 / C): apple/ml-cross-entropy's filter (label smoothing: below). Otherwise:
  ``grad_xh[rows] += (G / |w|) @ w`` and, for the tile's classes,
  ``(A_j - w_j r_j / |w_j|) / |w_j|`` with ``A_j = sum_i G_ij x_i / |x_i|`` and
  ``r_j = sum_i G_ij cos_ij``. That expression is linear in G, so each row block's share of the
  weight gradient (docs/design.md, "Normalisation inside a fused linear op"; no projection where
  ``|w_j| <= eps``) is complete on its own and is added up over the row blocks.

Accumulation, and determinism. The weight gradient of a class tile is owned by the one program that
walks that tile, so it is accumulated with plain loads and stores, in a fixed order: deterministic.
fp32 weights accumulate straight into ``grad_weight``; bf16/fp16 ones in an fp32 slot of
BLOCK_C x D per program, cast into ``grad_weight`` once the tile is done (adding bf16 partial sums
would round each of them). ``grad_xh`` (B x D, fp32) receives every class tile's share: it uses
``tl.atomic_add``, so its summation order, and the last bits of ``grad_x``, vary from run to run.
Per-split buffers of B x D instead would cost splits x 1 MiB at B = D = 512 and a read-modify-write
of BLOCK_B x D per tile; with the filter the atomics only run for the few tiles that carry gradient.
The chain rule through ``normalize(x)`` (``(grad_xh - xh (xh . grad_xh)) / |x|``) is a few torch ops
over (B, D).

The gradient filter and label smoothing. Smoothing gives every entry of G a uniform
``-s g_i eps / C``: each one far below 2^-12 at large C, but over a million classes they add up to
``s g_i eps`` in ``grad_x`` and to a dense gradient on every centre, which skipping tiles would drop
(a bias of the order of eps, not a rounding). So when the filter is on and eps > 0, that uniform part
is taken out of G before the test and done exactly outside the tiles: with ``c_i = -s g_i eps / C``,
``grad_xh_i += c_i sum_j wh_j`` and ``grad_w_j += (u - wh_j (wh_j . u)) / |w_j|``,
``u = sum_i c_i xh_i`` (the chain rule above with a G that is constant along each row). A small
kernel writes that into every class's weight gradient first (two reads of the weight, one write of
its gradient: memory-bound) and adds up ``sum_j wh_j`` in a D-vector (atomics); the backward then
adds the tiles' shares to it. What the filter drops is ``s g_i p_ij`` below 2^-12: probabilities
the softmax has all but zeroed.

The filter is on by default for bf16/fp16 ``x`` only: the tests hold those to 1e-2 with it, as
without. fp32 is held to 1e-5 relative, which dropping entries of up to 2^-12 (2.4e-4) would break
wherever a gradient is small, so fp32 computes every tile unless ``grad_filter=True``.

Memory beyond the inputs, the loss and the gradients: the (B, splits) partials (3 fp32 each;
splits is about 4 programs per SM divided by the row blocks), the norms (B + C fp32: 4 MiB at
C = 1M), B- and D-vectors, x in fp32 (B x D, for the chain rule), ``grad_xh`` (B x D fp32: 1 MiB at
B = D = 512) and, for bf16/fp16 weights, the backward's per-program fp32 slots (P x BLOCK_C x D x 4
bytes, P = 2 programs per SM: 66 MiB on a 132-SM card with BLOCK_C = 128, D = 512). At C = 1M,
B = D = 512 that is about 75 MiB, within the 300 MiB target, and it grows with C only by the
C-vector of norms. (Estimated from the allocations; benchmarks/bench_linear.py --device cuda
measures it.)

Why Triton rather than CUTLASS. Triton ships with torch (the CUDA wheels), so this path needs no
nvcc build, no CUTLASS checkout and no per-architecture template instantiation; the kernel is a page
of Python that reads like the math, its block sizes are constexprs that ``triton.autotune`` can
search per card, and the Triton interpreter (``TRITON_INTERPRET=1``) runs the very same kernels on
CPU tensors, which is how the tests check it without a GPU. CUTLASS would reach peak tensor-core use
sooner (warp-specialised, TMA-fed mainloops with epilogue fusion are its home ground), but the
epilogue here (online log-sum-exp per row, the gradient filter, a branch per tile) is custom code
either way, and a CUTLASS kernel would have to join the extension's nvcc build for every card.

Limits: x and weight in fp32, bf16 or fp16 (fp64: use :func:`angular.ops.linear_margin_cross_entropy`);
CUDA tensors, or CPU tensors under Triton's interpreter: ``TRITON_INTERPRET=1`` set before triton
is first imported (Triton reads it when it decorates a kernel, its own ``tl.zeros``, ``tl.sum``...
included; ``import angular`` imports triton through torch). Block sizes are fixed per dtype
(chosen so that the sm_90 builds of the bf16 kernels do not spill registers: :func:`compile_kernels`
builds them without a GPU), not autotuned yet; no GPU has run these kernels so far.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from angular.ops import reference
from angular.ops.linear import check_tensors
from angular.ops.margin import check_loss_options, check_margin

try:
    import triton
    import triton.language as tl
except ImportError as error:  # a torch without triton: the function says so when called
    triton = None
    _IMPORT_ERROR = str(error)
else:
    _IMPORT_ERROR = None

__all__ = ["linear_margin_cross_entropy_triton"]

NORM_EPS = 1e-12  # F.normalize's eps
GRAD_FILTER_THRESHOLD = 2.0**-12  # apple/ml-cross-entropy's filter: skip tiles with every |G| below
# Set by tests (and benchmarks) to see the gradient filter at work: called by each backward with the
# number of (row block, class tile) pairs each program skipped (an int32 device tensor: no sync).
skip_hook = None
# Whether triton's own functions (tl.zeros, tl.sum...) and so the kernels below were decorated for
# Triton's interpreter: TRITON_INTERPRET=1 when triton was first imported. Set later, it would make
# the kernels below interpreted but not what they call, and every launch would fail.
INTERPRETED = triton is not None and type(tl.zeros).__name__ == "InterpretedFunction"


def _jit(fn):
    """triton.jit, for the interpreter exactly when triton.language is (see INTERPRETED)."""
    if triton is None:
        return fn
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


# --------------------------------------------------------------------------------------------------
# Kernels.


@_jit
def _row_norms_kernel(v_ptr, stride_row, stride_col, rows, dim, out_ptr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):  # fmt: skip
    """|v_i| in fp32 for BLOCK_R rows per program (no fp32 copy of a (C, D) weight is made)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < rows
    base = v_ptr + offs_r.to(tl.int64)[:, None] * stride_row
    total = tl.zeros((BLOCK_R,), tl.float32)
    for d in range(0, dim, BLOCK_D):
        cols = d + offs_d
        block = tl.load(base + cols[None, :] * stride_col,
                        mask=row_ok[:, None] & (cols[None, :] < dim), other=0.0).to(tl.float32)  # fmt: skip
        total += tl.sum(block * block, axis=1)
    tl.store(out_ptr + offs_r, tl.sqrt(total), mask=row_ok)


@_jit
def _rounded(v, DTYPE: tl.constexpr, BY_BITS: tl.constexpr):
    """fp32 v rounded to nearest even in DTYPE. BY_BITS (the interpreter): bf16 by integer ops, as
    the interpreter's own fp32 -> bf16 cast truncates (the GPU's rounds to nearest)."""
    if BY_BITS and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = bits.to(tl.float32, bitcast=True)  # exactly a bf16 value: the cast below is exact
    return v.to(DTYPE)


@_jit
def _cosine_tile(x_ptr, stride_xb, stride_xd, w_ptr, stride_wc, stride_wd, row0, col0, batch,
                 classes, dim, inv_xn, inv_wn, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """cos[rows, cols] in fp32: the raw rows' dot products over D blocks, scaled by the inverse
    norms. DOT: the dtype tl.dot takes (the GEMM dtype; fp32 under the interpreter, whose bf16 dot
    is wrong, which gives the same products: a bf16 x bf16 product is exact in fp32).

    Block pointers, not (rows x D) tensors of 64-bit pointers: with those, ptxas needed all 255
    registers and spilled 300 to 1200 bytes per thread at these tile sizes (sm_90, checked by
    compiling without a GPU); with block pointers it does not spill."""
    x_block = tl.make_block_ptr(x_ptr, (batch, dim), (stride_xb, stride_xd), (row0, 0),
                                (BLOCK_B, BLOCK_D), (1, 0))  # fmt: skip
    # w^T (D x C): the second operand of the dot as it is laid out in memory
    w_block = tl.make_block_ptr(w_ptr, (dim, classes), (stride_wd, stride_wc), (0, col0),
                                (BLOCK_D, BLOCK_C), (0, 1))  # fmt: skip
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for _ in range(0, dim, BLOCK_D):
        xb = tl.load(x_block, boundary_check=(0, 1), padding_option="zero")
        wb = tl.load(w_block, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(xb.to(DOT), wb.to(DOT), acc, input_precision=PRECISION)
        x_block = tl.advance(x_block, (0, BLOCK_D))
        w_block = tl.advance(w_block, (BLOCK_D, 0))
    return acc * inv_xn[:, None] * inv_wn[None, :]


@_jit
def _forward_kernel(x_ptr, stride_xb, stride_xd, w_ptr, stride_wc, stride_wd, x_norm_ptr,
                    w_norm_ptr, labels_ptr, z_target_ptr, batch, classes, dim, tiles_per_split,
                    s, part_max_ptr, part_sum_ptr, part_zsum_ptr, splits,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """One (row block, class split): per row, an online log-sum-exp of the logits over the split's
    tiles and their sum, written to the (B, splits) partials. The target column takes the row's
    precomputed ``s f_y`` (z_target)."""
    row0 = tl.program_id(0) * BLOCK_B
    offs_b = row0 + tl.arange(0, BLOCK_B)
    split = tl.program_id(1)
    b_ok = offs_b < batch
    labels = tl.load(labels_ptr + offs_b, mask=b_ok, other=-1)
    z_target = tl.load(z_target_ptr + offs_b, mask=b_ok, other=0.0)
    inv_xn = 1.0 / tl.maximum(tl.load(x_norm_ptr + offs_b, mask=b_ok, other=1.0), 1e-12)
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    z_sum = tl.zeros((BLOCK_B,), tl.float32)
    first_tile = split * tiles_per_split
    for tile in range(first_tile, first_tile + tiles_per_split):
        col0 = tile * BLOCK_C
        offs_c = col0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < classes
        inv_wn = 1.0 / tl.maximum(tl.load(w_norm_ptr + offs_c, mask=c_ok, other=1.0), 1e-12)
        cos = _cosine_tile(x_ptr, stride_xb, stride_xd, w_ptr, stride_wc, stride_wd, row0, col0,
                           batch, classes, dim, inv_xn, inv_wn, BLOCK_B, BLOCK_C, BLOCK_D, DOT,
                           PRECISION)  # fmt: skip
        is_target = offs_c[None, :] == labels[:, None]
        z = tl.where(is_target, z_target[:, None], s * cos)
        z = tl.where(c_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # exp(-inf - -inf) would be NaN: an empty state contributes nothing.
        scale = tl.where(run_sum == 0.0, 0.0, tl.exp(run_max - new_max))
        run_sum = run_sum * scale + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        z_sum += tl.sum(tl.where(c_ok[None, :], z, 0.0), axis=1)
    out = offs_b.to(tl.int64) * splits + split
    tl.store(part_max_ptr + out, run_max, mask=b_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=b_ok)
    tl.store(part_zsum_ptr + out, z_sum, mask=b_ok)


@_jit
def _backward_kernel(x_ptr, stride_xb, stride_xd, w_ptr, stride_wc, stride_wd, x_norm_ptr,
                     w_norm_ptr, labels_ptr, grad_rows_ptr, lse_ptr, grad_target_ptr, batch,
                     classes, dim, num_tiles, s, eps_over_classes, threshold, grad_xh_ptr,
                     acc_ptr, acc_rows, grad_w_ptr, stride_gwc, skipped_ptr, slot_starts_valid,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
                     SLOTS: tl.constexpr, OUT: tl.constexpr, BY_BITS: tl.constexpr,
                     SMOOTH: tl.constexpr):  # fmt: skip
    """Persistent over class tiles; for each, over all row blocks: recompute the cosine tile, form G,
    skip the pair when every |G| < threshold (threshold < 0: filter off), else add its shares to
    grad_xh (atomics) and to the tile's weight gradient (owned by this program: plain stores).

    SLOTS: the weight gradient is accumulated in this program's fp32 slot of acc_ptr (BLOCK_C rows
    of D; acc_rows rows in all) and cast into grad_w (dtype OUT) at the end of the tile; else
    acc_ptr is grad_w itself (fp32, acc_rows = C).
    ROUND: the dtype G is rounded to before the GEMMs (the GEMM dtype), DOT: what tl.dot takes;
    BY_BITS: see _rounded.
    SMOOTH: G here is without label smoothing's uniform -s g eps / C (eps_over_classes is 0 and the
    target column's value is shifted to match); _smoothing_kernel has already written that part's
    weight gradient into grad_w, which the tiles' shares are added to (slot_starts_valid = 1 makes
    an fp32 grad_w accumulate onto it; slots add it when they are copied out)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    lane_c = tl.arange(0, BLOCK_C)
    skipped = 0
    for tile in range(pid, num_tiles, programs):
        col0 = tile * BLOCK_C
        offs_c = col0 + lane_c
        c_ok = offs_c < classes
        w_norm = tl.load(w_norm_ptr + offs_c, mask=c_ok, other=1.0)
        inv_wn = 1.0 / tl.maximum(w_norm, 1e-12)
        projects = w_norm > 1e-12  # below eps, normalize is w / eps: no projection
        if SLOTS:
            acc_row0 = pid * BLOCK_C
            stride_acc = dim
        else:
            acc_row0 = col0
            stride_acc = stride_gwc
        touched = slot_starts_valid
        for row0 in range(0, batch, BLOCK_B):
            offs_b = row0 + tl.arange(0, BLOCK_B)
            b_ok = offs_b < batch
            labels = tl.load(labels_ptr + offs_b, mask=b_ok, other=-1)
            # grad_rows is 0 for rows without a target (set by the caller)
            g = tl.load(grad_rows_ptr + offs_b, mask=b_ok, other=0.0)
            lse = tl.load(lse_ptr + offs_b, mask=b_ok, other=0.0)
            g_target = tl.load(grad_target_ptr + offs_b, mask=b_ok, other=0.0)
            inv_xn = 1.0 / tl.maximum(tl.load(x_norm_ptr + offs_b, mask=b_ok, other=1.0), 1e-12)
            cos = _cosine_tile(x_ptr, stride_xb, stride_xd, w_ptr, stride_wc, stride_wd, row0,
                               col0, batch, classes, dim, inv_xn, inv_wn, BLOCK_B, BLOCK_C,
                               BLOCK_D, DOT, PRECISION)  # fmt: skip
            grad = (s * g)[:, None] * (tl.exp(s * cos - lse[:, None]) - eps_over_classes)
            grad = tl.where(offs_c[None, :] == labels[:, None], g_target[:, None], grad)
            live = (g != 0.0)[:, None] & c_ok[None, :]
            grad = tl.where(live, grad, 0.0)  # also keeps a NaN of a row without target out
            largest = tl.max(tl.abs(grad))
            # NaN compares false: a NaN tile is kept (its row's loss is NaN too), never dropped.
            if (largest >= threshold) | (largest != largest):
                r = tl.sum(grad * cos, axis=0)  # r_j = sum_i G_ij cos_ij
                # G / |w| for grad_xh, G / |x| for A, rounded to the GEMM dtype
                grad_xw = _rounded(grad * inv_wn[None, :], ROUND, BY_BITS).to(DOT)
                grad_wx = _rounded(grad * inv_xn[:, None], ROUND, BY_BITS).to(DOT)
                x_block = tl.make_block_ptr(x_ptr, (batch, dim), (stride_xb, stride_xd),
                                            (row0, 0), (BLOCK_B, BLOCK_D), (1, 0))  # fmt: skip
                w_block = tl.make_block_ptr(w_ptr, (classes, dim), (stride_wc, stride_wd),
                                            (col0, 0), (BLOCK_C, BLOCK_D), (1, 0))  # fmt: skip
                acc_block = tl.make_block_ptr(acc_ptr, (acc_rows, dim), (stride_acc, 1),
                                              (acc_row0, 0), (BLOCK_C, BLOCK_D), (1, 0))  # fmt: skip
                for d in range(0, dim, BLOCK_D):
                    xb = tl.load(x_block, boundary_check=(0, 1), padding_option="zero")
                    wb = tl.load(w_block, boundary_check=(0, 1), padding_option="zero")
                    share_xh = tl.dot(grad_xw, wb.to(DOT), input_precision=PRECISION)
                    cols = d + offs_d
                    tl.atomic_add(grad_xh_ptr + offs_b[:, None] * dim + cols[None, :], share_xh,
                                  mask=b_ok[:, None] & (cols[None, :] < dim))  # fmt: skip
                    a = tl.dot(tl.trans(grad_wx), xb.to(DOT), input_precision=PRECISION)
                    wf = wb.to(tl.float32)
                    share_w = a - tl.where(projects[:, None], wf * (inv_wn * r)[:, None], 0.0)
                    share_w = share_w * inv_wn[:, None]
                    # The slot holds an earlier tile's values until this tile first writes it.
                    if touched != 0:
                        share_w += tl.load(acc_block, boundary_check=(0, 1), padding_option="zero")
                    tl.store(acc_block, share_w, boundary_check=(0, 1))
                    x_block = tl.advance(x_block, (0, BLOCK_D))
                    w_block = tl.advance(w_block, (0, BLOCK_D))
                    acc_block = tl.advance(acc_block, (0, BLOCK_D))
                touched = 1
            else:
                skipped += 1
        if SLOTS:
            if touched != 0:
                out_block = tl.make_block_ptr(grad_w_ptr, (classes, dim), (stride_gwc, 1),
                                              (col0, 0), (BLOCK_C, BLOCK_D), (1, 0))  # fmt: skip
                acc_block = tl.make_block_ptr(acc_ptr, (acc_rows, dim), (stride_acc, 1),
                                              (acc_row0, 0), (BLOCK_C, BLOCK_D), (1, 0))  # fmt: skip
                for _ in range(0, dim, BLOCK_D):
                    total = tl.load(acc_block, boundary_check=(0, 1), padding_option="zero")
                    if SMOOTH:
                        total += tl.load(out_block, boundary_check=(0, 1)).to(tl.float32)
                    tl.store(out_block, _rounded(total, OUT, BY_BITS), boundary_check=(0, 1))
                    acc_block = tl.advance(acc_block, (0, BLOCK_D))
                    out_block = tl.advance(out_block, (0, BLOCK_D))
    tl.store(skipped_ptr + pid, skipped)


@_jit
def _smoothing_kernel(w_ptr, stride_wc, stride_wd, w_norm_ptr, classes, dim, u_ptr, w_hat_sum_ptr,
                      grad_w_ptr, stride_gwc, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      OUT: tl.constexpr, BY_BITS: tl.constexpr):  # fmt: skip
    """Label smoothing's uniform share of the weight gradient, for every class (the backward adds
    the tiles' shares to it): (u - wh (wh . u)) / |w| with u = -(s eps / C) sum_i g_i xh_i, no
    projection below eps; and sum_j wh_j into w_hat_sum (atomics), for its share of grad_xh. A pass
    of its own: inside the backward kernel, this epilogue made ptxas spill a kilobyte per thread."""
    col0 = tl.program_id(0) * BLOCK_C
    offs_c = col0 + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = offs_c < classes
    w_norm = tl.load(w_norm_ptr + offs_c, mask=c_ok, other=1.0)
    inv_wn = 1.0 / tl.maximum(w_norm, 1e-12)
    w_block = tl.make_block_ptr(w_ptr, (classes, dim), (stride_wc, stride_wd), (col0, 0),
                                (BLOCK_C, BLOCK_D), (1, 0))  # fmt: skip
    w_dot_u = tl.zeros((BLOCK_C,), tl.float32)
    for d in range(0, dim, BLOCK_D):
        cols = d + offs_d
        wf = tl.load(w_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        u = tl.load(u_ptr + cols, mask=cols < dim, other=0.0)
        w_dot_u += tl.sum(wf * u[None, :], axis=1)
        tl.atomic_add(w_hat_sum_ptr + cols, tl.sum(wf * inv_wn[:, None], axis=0), mask=cols < dim)
        w_block = tl.advance(w_block, (0, BLOCK_D))
    # wh (wh . u) = w (w . u) / |w|^2
    along = tl.where(w_norm > 1e-12, w_dot_u * inv_wn * inv_wn, 0.0)
    w_block = tl.make_block_ptr(w_ptr, (classes, dim), (stride_wc, stride_wd), (col0, 0),
                                (BLOCK_C, BLOCK_D), (1, 0))  # fmt: skip
    out_block = tl.make_block_ptr(grad_w_ptr, (classes, dim), (stride_gwc, 1), (col0, 0),
                                  (BLOCK_C, BLOCK_D), (1, 0))  # fmt: skip
    for d in range(0, dim, BLOCK_D):
        cols = d + offs_d
        wf = tl.load(w_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        u = tl.load(u_ptr + cols, mask=cols < dim, other=0.0)
        total = (u[None, :] - wf * along[:, None]) * inv_wn[:, None]
        tl.store(out_block, _rounded(total, OUT, BY_BITS), boundary_check=(0, 1))
        w_block = tl.advance(w_block, (0, BLOCK_D))
        out_block = tl.advance(out_block, (0, BLOCK_D))


# --------------------------------------------------------------------------------------------------
# Launch configuration.

_TORCH_TO_TL = {}
if triton is not None:
    _TORCH_TO_TL = {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }


def _blocks(gemm_dtype: torch.dtype) -> dict:
    """Block sizes and warps. Fixed guesses for a Hopper-class GPU (not autotuned yet: owed to a GPU
    run); tiny ones under the interpreter, which runs every program in Python (tl.dot needs >= 16)."""
    if INTERPRETED:
        return dict(
            forward=dict(BLOCK_B=16, BLOCK_C=32, BLOCK_D=32),
            backward=dict(BLOCK_B=16, BLOCK_C=32, BLOCK_D=32),
            forward_launch={},
            backward_launch={},
        )
    if gemm_dtype == torch.float32:  # fp32 "ieee" dots run on the FMA units: smaller tiles
        return dict(
            forward=dict(BLOCK_B=64, BLOCK_C=64, BLOCK_D=32),
            backward=dict(BLOCK_B=32, BLOCK_C=64, BLOCK_D=16),
            forward_launch=dict(num_warps=8, num_stages=3),
            backward_launch=dict(num_warps=8, num_stages=2),
        )
    # Compiled for sm_90 (compile_kernels, ptxas -v; no GPU needed), the bf16 kernels do not spill
    # registers (the fp16 forward spills 88 bytes per thread, the fp32 one 20); with BLOCK_D = 64
    # the backward spilled 64 bytes and the fp16 forward 220.
    return dict(
        forward=dict(BLOCK_B=128, BLOCK_C=128, BLOCK_D=32),
        backward=dict(BLOCK_B=64, BLOCK_C=128, BLOCK_D=32),
        forward_launch=dict(num_warps=8, num_stages=3),
        backward_launch=dict(num_warps=8, num_stages=2),
    )


def _programs_wanted(device: torch.device, per_sm: int, interpreted_count: int) -> int:
    """``per_sm`` programs per SM on a GPU; ``interpreted_count`` under the interpreter (a few: each
    runs in Python, but there should be several class splits and persistent programs that take
    several tiles each, so that merging them is exercised)."""
    if device.type != "cuda" or INTERPRETED:
        return interpreted_count
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _gemm_dtypes(x: torch.Tensor, weight: torch.Tensor):
    """(the dtype G is rounded to, the dtype tl.dot takes, its input precision). The GEMM dtype is
    x's when weight has it, else fp32 (neither operand rounded to the other's narrower dtype)."""
    gemm = x.dtype if x.dtype == weight.dtype else torch.float32
    dot = torch.float32 if INTERPRETED else gemm
    return _TORCH_TO_TL[gemm], _TORCH_TO_TL[dot], "ieee" if gemm == torch.float32 else "tf32"


@contextlib.contextmanager
def _block_pointers_allowed():
    """Triton 3.8 warns that tl.make_block_ptr is deprecated (for tensor descriptors, which need
    16-byte aligned strides, i.e. D a multiple of 8 in bf16, and an allocator); it still compiles
    and keeps the kernels from spilling (see _cosine_tile), so the warning is not repeated here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")
        yield


def _row_norms(v: torch.Tensor) -> torch.Tensor:
    rows, dim = v.shape
    out = torch.empty(rows, device=v.device, dtype=torch.float32)
    block_r = 64
    _row_norms_kernel[(triton.cdiv(rows, block_r),)](
        v, v.stride(0), v.stride(1), rows, dim, out, BLOCK_R=block_r,
        BLOCK_D=min(128, triton.next_power_of_2(dim)),
    )  # fmt: skip
    return out


def compile_kernels(x_dtype: torch.dtype, weight_dtype: torch.dtype, arch: int = 90) -> dict:
    """Compile, for an NVIDIA architecture and without a GPU, every kernel variant the op launches
    for these dtypes (the CUDA configs, with and without the smoothing path): {name: compiled
    kernel}. What a machine without a GPU can check of the compiled path (the interpreter runs the
    same code, but not through Triton's compiler)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_kernels needs triton imported without TRITON_INTERPRET=1")
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    gemm = x_dtype if x_dtype == weight_dtype else torch.float32
    blocks = _blocks(gemm)
    precision = "ieee" if gemm == torch.float32 else "tf32"
    x_t, w_t = f"*{names[x_dtype]}", f"*{names[weight_dtype]}"
    pointers = dict(x_ptr=x_t, w_ptr=w_t, grad_w_ptr=w_t, labels_ptr="*i32", skipped_ptr="*i32")
    floats = ("s", "eps_over_classes", "threshold")

    def kind(name, constexprs):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return pointers.get(name, "*fp32")
        return "fp32" if name in floats else "i32"

    def build(fn, constexprs, options):
        signature = {name: kind(name, constexprs) for name in fn.arg_names}
        source = ASTSource(fn, signature, constexprs)
        with _block_pointers_allowed():
            return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)

    common = dict(DOT=_TORCH_TO_TL[gemm], PRECISION=precision)
    out = {"forward": build(_forward_kernel, dict(common, **blocks["forward"]),
                            blocks["forward_launch"])}  # fmt: skip
    for smooth in (False, True):
        constexprs = dict(
            common, ROUND=_TORCH_TO_TL[gemm], SLOTS=weight_dtype != torch.float32,
            OUT=_TORCH_TO_TL[weight_dtype], BY_BITS=False, SMOOTH=smooth, **blocks["backward"],
        )  # fmt: skip
        name = "backward, smoothing" if smooth else "backward"
        out[name] = build(_backward_kernel, constexprs, blocks["backward_launch"])
    tile = {key: blocks["backward"][key] for key in ("BLOCK_C", "BLOCK_D")}
    out["smoothing"] = build(
        _smoothing_kernel, dict(tile, OUT=_TORCH_TO_TL[weight_dtype], BY_BITS=False),
        blocks["backward_launch"],
    )  # fmt: skip
    out["row norms"] = build(_row_norms_kernel, dict(BLOCK_R=64, BLOCK_D=128), {})
    return out


# --------------------------------------------------------------------------------------------------
# The margin at the target column, on B values (csrc/margin_math.h, target_logit and
# target_logit_grad, in fp32).


def _target_terms(cos_y, m1, m2, m3, lam, straight_through):
    """(f_y, d f_y / d cos_y) for fp32 target cosines: the exact value, the derivative at the angle
    clamped to the guard zone (1 with straight_through)."""
    theta = torch.acos(cos_y.clamp(-1.0, 1.0))
    t = m1 * theta + m2
    k = torch.floor(t / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    f_y = (lam * cos_y + sign * torch.cos(t) - 2.0 * k - m3) / (1.0 + lam)
    if straight_through:
        return f_y, torch.ones_like(f_y)
    c = cos_y.clamp(-reference.COS_MAX, reference.COS_MAX)
    t = m1 * torch.acos(c) + m2
    k = torch.floor(t / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    dpsi = sign * m1 * torch.sin(t) / torch.sqrt(1.0 - c * c)
    return f_y, (lam + dpsi) / (1.0 + lam)


def _int32_labels(labels, has_target):
    """The labels as the kernels take them: int32 (C < 2^31), -1 for no target. An int64 label
    compared with a tile's columns would make an int64 (rows x columns) mask: twice the registers
    of the cosine tile itself (the compiled kernels spilled)."""
    return torch.where(has_target, labels, -1).to(torch.int32)


def _target_cosines(x, weight, labels, x_norm, w_norm, has_target):
    """cos_y per row in fp32 from the gathered target rows of weight (O(B D)); 0 without target."""
    safe = torch.where(has_target, labels, 0)
    dots = (x.float() * weight.index_select(0, safe).float()).sum(1)
    cos_y = dots / x_norm.clamp_min(NORM_EPS) / w_norm.index_select(0, safe).clamp_min(NORM_EPS)
    return torch.where(has_target, cos_y, 0.0)


# --------------------------------------------------------------------------------------------------
# Autograd.


class _LinearMarginTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, margin, label_smoothing, grad_filter):
        s, m1, m2, m3, lam, straight_through = margin
        batch, dim = x.shape
        classes = weight.shape[0]
        has_target = (labels >= 0) & (labels < classes)
        x_norm, w_norm = _row_norms(x), _row_norms(weight)
        cos_y = _target_cosines(x, weight, labels, x_norm, w_norm, has_target)
        f_y, df_y = _target_terms(cos_y, m1, m2, m3, lam, straight_through)
        z_target = s * f_y
        blocks = _blocks(x.dtype if x.dtype == weight.dtype else torch.float32)
        config = blocks["forward"]
        _, dot, precision = _gemm_dtypes(x, weight)
        row_blocks = triton.cdiv(batch, config["BLOCK_B"])
        tiles = triton.cdiv(classes, config["BLOCK_C"])
        splits = max(1, min(tiles, _programs_wanted(x.device, 4, 6) // row_blocks))
        per_split = triton.cdiv(tiles, splits)
        splits = triton.cdiv(tiles, per_split)  # no empty split
        parts = torch.empty(3, batch, splits, device=x.device, dtype=torch.float32)
        with _block_pointers_allowed():
            _forward_kernel[(row_blocks, splits)](
                x, x.stride(0), x.stride(1), weight, weight.stride(0), weight.stride(1), x_norm,
                w_norm, _int32_labels(labels, has_target), z_target, batch, classes, dim,
                per_split, s, parts[0], parts[1], parts[2], splits, DOT=dot, PRECISION=precision,
                **config, **blocks["forward_launch"],
            )  # fmt: skip
        # Merge the splits (LogSumExp's merge in csrc/margin_math.h) and finish each row
        # (smoothed_loss).
        part_max, part_sum, part_zsum = parts
        row_max = part_max.max(dim=1).values
        lse = row_max + torch.log((part_sum * torch.exp(part_max - row_max[:, None])).sum(1))
        z_sum = part_zsum.sum(1)
        nll = lse - z_target
        eps = label_smoothing
        loss = nll if eps == 0.0 else (1.0 - eps) * nll + eps * (lse - z_sum / classes)
        loss = torch.where(has_target, loss, 0.0)
        ctx.save_for_backward(x, weight, labels, lse, x_norm, w_norm, f_y, df_y)
        ctx.margin, ctx.label_smoothing, ctx.grad_filter = margin, label_smoothing, grad_filter
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        x, weight, labels, lse, x_norm, w_norm, f_y, df_y = ctx.saved_tensors
        grad_x, grad_weight = _backward(
            grad_loss, x, weight, labels, lse, x_norm, w_norm, f_y, df_y, ctx.margin,
            ctx.label_smoothing, ctx.grad_filter,
        )  # fmt: skip
        return grad_x, grad_weight, None, None, None, None


def _backward(grad_loss, x, weight, labels, lse, x_norm, w_norm, f_y, df_y, margin, eps,
              grad_filter):  # fmt: skip
    """(grad_x, grad_weight); hands skip_hook the pairs each program skipped."""
    s = margin[0]
    batch, dim = x.shape
    classes = weight.shape[0]
    has_target = (labels >= 0) & (labels < classes)
    g = torch.where(has_target, grad_loss.float(), 0.0).contiguous()
    # d loss / d cos_y at the target column (target_cos_grad in csrc/margin_math.h)
    grad_target = s * g * (torch.exp(s * f_y - lse) - eps / classes - (1.0 - eps)) * df_y
    grad_target = torch.where(has_target, grad_target, 0.0)
    denom = x_norm.clamp_min(NORM_EPS)[:, None]
    xh = x.float() / denom
    # With the filter and label smoothing, the uniform -s g eps / C of every entry is taken out of G
    # and done exactly outside the tiles (see the module docstring): c_i per row, u = sum_i c_i xh_i.
    smooth = grad_filter and eps > 0.0
    uniform = -(s * eps / classes) * g
    u = (uniform[:, None] * xh).sum(0) if smooth else xh.new_zeros(1)
    if smooth:
        grad_target = grad_target - uniform
    w_hat_sum = torch.zeros(dim if smooth else 1, device=x.device, dtype=torch.float32)
    blocks = _blocks(x.dtype if x.dtype == weight.dtype else torch.float32)
    config = blocks["backward"]
    round_to, dot, precision = _gemm_dtypes(x, weight)
    tiles = triton.cdiv(classes, config["BLOCK_C"])
    programs = max(1, min(tiles, _programs_wanted(x.device, 2, 3)))
    slots = weight.dtype != torch.float32
    # Every class's gradient row is written when smooth (by _smoothing_kernel); else only the
    # tiles that carry gradient are.
    grad_weight = (torch.empty if smooth else torch.zeros)(
        weight.shape, device=weight.device, dtype=weight.dtype
    )
    if smooth:
        with _block_pointers_allowed():
            _smoothing_kernel[(tiles,)](
                weight, weight.stride(0), weight.stride(1), w_norm, classes, dim, u, w_hat_sum,
                grad_weight, grad_weight.stride(0), BLOCK_C=config["BLOCK_C"],
                BLOCK_D=config["BLOCK_D"], OUT=_TORCH_TO_TL[weight.dtype], BY_BITS=INTERPRETED,
            )  # fmt: skip
    if slots:
        acc = torch.empty(programs * config["BLOCK_C"], dim, device=x.device, dtype=torch.float32)
    else:
        acc = grad_weight
    grad_xh = torch.zeros(batch, dim, device=x.device, dtype=torch.float32)
    skipped = torch.zeros(programs, device=x.device, dtype=torch.int32)
    threshold = GRAD_FILTER_THRESHOLD if grad_filter else -1.0
    with _block_pointers_allowed():
        _backward_kernel[(programs,)](
            x, x.stride(0), x.stride(1), weight, weight.stride(0), weight.stride(1), x_norm,
            w_norm, _int32_labels(labels, has_target), g, lse, grad_target, batch, classes, dim,
            tiles, s, 0.0 if smooth else eps / classes, threshold, grad_xh, acc, acc.shape[0],
            grad_weight, grad_weight.stride(0), skipped, int(smooth and not slots), DOT=dot,
            ROUND=round_to, PRECISION=precision, SLOTS=slots, OUT=_TORCH_TO_TL[weight.dtype],
            BY_BITS=INTERPRETED, SMOOTH=smooth, **config, **blocks["backward_launch"],
        )  # fmt: skip
    if skip_hook is not None:
        skip_hook(skipped)
    if smooth:
        grad_xh += uniform[:, None] * w_hat_sum[None, :]
    # Through normalize(x): (grad_xh - xh (xh . grad_xh)) / |x|; below eps, x / eps, no projection.
    dot_xh = torch.where(x_norm[:, None] > NORM_EPS, (xh * grad_xh).sum(1, keepdim=True), 0.0)
    grad_x = ((grad_xh - xh * dot_xh) / denom).to(x.dtype)
    return grad_x, grad_weight


# --------------------------------------------------------------------------------------------------
# Public function.


def check_device(x: torch.Tensor, weight: torch.Tensor) -> None:
    """That Triton can run on these tensors here, else one line saying why."""
    if triton is None:
        raise RuntimeError(f"linear_margin_cross_entropy_triton needs triton: {_IMPORT_ERROR}")
    for name, value in (("x", x), ("weight", weight)):
        if value.dtype == torch.float64:
            raise TypeError(
                f"linear_margin_cross_entropy_triton supports float32, bfloat16 and float16 {name}, "
                "got torch.float64 (use angular.ops.linear_margin_cross_entropy)"
            )
    if x.device.type == "cuda" or INTERPRETED:
        return
    raise RuntimeError(
        f"linear_margin_cross_entropy_triton runs on CUDA tensors, got {x.device.type} tensors "
        "(on CPU, only under Triton's interpreter: TRITON_INTERPRET=1 set before triton is first "
        "imported)"
    )


def linear_margin_cross_entropy_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    lam: float = 0.0,
    label_smoothing: float = 0.0,
    straight_through: bool = False,
    reduction: str = "mean",
    grad_filter: bool | None = None,
) -> torch.Tensor:
    """``margin_cross_entropy(normalize(x) @ normalize(weight).T, labels, ...)`` by the tiled Triton
    kernels of this module: x (B, D), weight (C, D) (its own dtype allowed), labels int64 (B,)
    (negative: no target, loss 0, gradient 0, not counted by ``"mean"``). Arguments as
    :func:`angular.ops.linear_margin_cross_entropy`.

    ``grad_filter``: skip, in the backward, the (row block, class tile) pairs whose gradient
    entries are all below 2^-12 in magnitude. None (default): on for bf16/fp16 ``x``, off for fp32
    (see the module docstring). Gradients accumulate ``grad_x`` with atomics: its last bits are not
    deterministic; the loss and ``grad_weight`` are.
    """
    s, m1, m2, m3, lam = check_margin(s, m1, m2, m3, lam)
    label_smoothing = check_loss_options(label_smoothing, reduction)
    if grad_filter is not None and not isinstance(grad_filter, bool):
        raise TypeError(f"grad_filter must be True, False or None, got {grad_filter!r}")
    check_tensors(x, weight, labels)
    check_device(x, weight)
    if grad_filter is None:
        grad_filter = x.dtype != torch.float32
    margin = (s, m1, m2, m3, lam, bool(straight_through))
    per_row, _ = _LinearMarginTriton.apply(
        x, weight, labels, margin, float(label_smoothing), grad_filter
    )
    return reference.reduce_rows(per_row, labels >= 0, reduction)
