"""The margin cross-entropy over class centres sharded across processes (docs/design.md, "Sharded
softmax"): the ops under :class:`angular.nn.sharded.ShardedMarginHead`.

Every process (rank) holds the cosines of the *whole gathered batch* against its own block of
classes, ``cos`` (B, C_local). Per row it computes partial statistics over its columns, the ranks
all-reduce them (the maximum, then the rescaled sums), and each rank gets the global log-sum-exp
and loss of every row without the (B, C) matrix ever being gathered: the communication is 4 B
numbers per step whatever C is.

The compiled ops (schemas in ``csrc/sharded_ops.cpp``; kernels in ``csrc/cpu/margin_cpu.cpp`` and
``csrc/cuda/margin_cuda.cpp``, the margin cross-entropy's own forward pass and backward)::

    sharded_margin_partials(cos, labels, s, m1, m2, m3, lam)
        -> (max, sum_exp, target, logit_sum), each (B,)
    sharded_margin_cross_entropy_backward(grad_rows, cos, labels, lse, s, m1, m2, m3, lam,
                                          label_smoothing, num_classes, straight_through)
        -> grad_cos (B, C_local)

``labels`` are *local* column indices: the target's column when this shard owns it, -1 when the
target lives in another shard or the row has none. Per row, over the shard's logits ``z`` (the margin
on the local target, ``s * cos`` elsewhere): ``max = max_j z_j``, ``sum_exp = sum_j exp(z_j - max)``,
``target = z_y`` (0 when the shard does not own y), ``logit_sum = sum_j z_j``; all in fp32 (fp64 for
fp64 ``cos``). The backward takes the global log-sum-exp and the global class count ``num_classes``
(label smoothing spreads over it) and returns ``s g (p_j - eps / C)`` off target and the margin's
chain rule on the local target; a row whose upstream gradient ``g`` is 0 gets 0 whatever it holds.
When the extension lacks the ops, the eager reference below computes the same function, built on
:func:`angular.ops.reference.margin_logits` (the one Python margin formula).

The same two without the shard's cosines (:func:`sharded_linear_margin_cross_entropy`): the fused
linear op's kernels (``csrc/cpu/linear_margin_cpu.cpp``, ``csrc/cuda/linear_margin_cuda.cpp``) run
in *shard mode* on the gathered embeddings ``x`` (B, D) and the shard's centres (C_local, D), chunk
by chunk over the classes, so that neither the (B, C_local) cosines nor their gradient exist::

    sharded_linear_margin_partials(x, weight, labels, s, m1, m2, m3, lam)
        -> (max, sum_exp, target, logit_sum, |x| per row, |weight| per class)
    sharded_linear_margin_backward(grad_rows, x, weight, labels, lse, x_norm, weight_norm,
                                   s, m1, m2, m3, lam, label_smoothing, num_classes,
                                   straight_through) -> (grad_x, grad_weight)
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from angular.ops import _extension, linear, reference
from angular.ops.margin import check_loss_options, check_margin

__all__ = [
    "all_reduce_sum",
    "count_communication",
    "gather_rows",
    "sharded_cross_entropy",
    "sharded_linear_margin_cross_entropy",
    "sharded_margin_cross_entropy",
    "sharded_margin_partials",
    "sharded_margin_cross_entropy_backward",
    "shard_cosine",
    "shard_range",
]

PARTIALS_OP = "angular::sharded_margin_partials"
BACKWARD_OP = "angular::sharded_margin_cross_entropy_backward"
LINEAR_PARTIALS_OP = "angular::sharded_linear_margin_partials"
LINEAR_BACKWARD_OP = "angular::sharded_linear_margin_backward"


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, class_count)`` of ``rank``: contiguous blocks, the first ``C % W`` ranks one
    class more (``C // W + (rank < C % W)``)."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


# --------------------------------------------------------------------------------------------------
# Communication: every collective goes through these, so that a benchmark can count its bytes.

_counters: list[dict] = []


@contextlib.contextmanager
def count_communication():
    """Count the bytes of the collectives run inside the block: ``{"bytes": n, "calls": k}``. A
    collective counts its result buffer on this rank (all-gather: W times the input; all-reduce:
    the tensor), the payload whatever algorithm the backend uses."""
    counter = {"bytes": 0, "calls": 0}
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _count(nbytes: int) -> None:
    for counter in _counters:
        counter["bytes"] += nbytes
        counter["calls"] += 1


def world_of(group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    _count(tensor.numel() * tensor.element_size())
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_equal(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """All-gather of same-shaped tensors (the only kind gloo gathers)."""
    _, world = world_of(group)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    _count(world * tensor.numel() * tensor.element_size())
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; the backward sums every rank's gradient of this rank's rows
    with an all-reduce (gloo has no reduce-scatter) and multiplies it by W, so that DDP's average
    over the ranks gives the gradient of the whole-batch loss (docs/design.md, "Sharded softmax")."""

    @staticmethod
    def forward(ctx, rows, group):
        ctx.group = group
        ctx.rank, ctx.world = world_of(group)
        ctx.batch = rows.shape[0]
        return torch.cat(all_gather_equal(rows, group))

    @staticmethod
    def backward(ctx, grad):
        grad = _all_reduce(grad.contiguous().clone(), dist.ReduceOp.SUM, ctx.group)
        mine = grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]
        return mine * ctx.world, None


def gather_rows(x: torch.Tensor, labels: torch.Tensor, group=None):
    """All-gather embeddings (differentiably, see :class:`_GatherRows`) and labels of every rank,
    in rank order. Every rank must hold the same number of rows: a clear error on every rank
    otherwise (the sizes are gathered first)."""
    rank, world = world_of(group)
    if world == 1:
        return x, labels
    sizes = all_gather_equal(torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device), group)
    sizes = [int(size) for size in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(
            "every rank must hold the same batch size for the sharded head, got "
            + ", ".join(f"rank {r}: {size}" for r, size in enumerate(sizes))
        )
    return _GatherRows.apply(x, group), torch.cat(all_gather_equal(labels, group))


# --------------------------------------------------------------------------------------------------
# Cosines against a shard without a normalised copy of its centres.


class _ShardCosine(torch.autograd.Function):
    """``normalize(x) @ normalize(weight).T`` for normalised ``x``, keeping no (C, D) copy: the
    forward scales the product's columns by ``1 / |w_j|``; the backward writes the centres'
    gradient in one (C, D) buffer, ``(G_j - w_j (w_j . G_j) / |w_j|^2) / |w_j|`` with
    ``G = grad^T x`` (docs/design.md, "Normalisation inside a fused linear op"). Autograd through
    ``F.normalize(weight)`` would hold a normalised copy and its gradient, 2 x C x D more."""

    @staticmethod
    def forward(ctx, x_unit, weight):
        inv_norm = 1.0 / weight.norm(dim=1).clamp(min=1e-12)  # F.normalize's floor
        cos = (x_unit @ weight.t()).mul_(inv_norm)
        ctx.save_for_backward(x_unit, weight, inv_norm)
        return cos

    @staticmethod
    def backward(ctx, grad):
        x_unit, weight, inv_norm = ctx.saved_tensors
        scaled = grad * inv_norm
        grad_x = scaled @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = scaled.t() @ x_unit  # G_j / |w_j|
            along = torch.bmm(grad_weight.unsqueeze(1), weight.unsqueeze(2)).flatten()
            grad_weight.addcmul_(weight, (along * inv_norm * inv_norm).unsqueeze(1), value=-1.0)
        return grad_x, grad_weight


def shard_cosine(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos`` (B, C_local) of the rows of ``x`` (B, D) with the centres ``weight`` (C_local, D),
    computed in ``x``'s dtype (the centres are converted when theirs differs, as MarginHead does)."""
    weight = weight.to(x.dtype) if weight.dtype != x.dtype else weight
    return _ShardCosine.apply(torch.nn.functional.normalize(x, dim=1), weight)


# --------------------------------------------------------------------------------------------------
# The two ops: compiled when the extension has them, else the eager reference.


def _has_kernel(device_type: str, op: str = PARTIALS_OP) -> bool:
    loaded, _ = _extension.load()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if not loaded or key is None or not hasattr(torch.ops.angular, op.split("::")[1]):
        return False  # an extension built before these ops existed
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def has_linear_kernel(device_type: str) -> bool:
    """Whether the extension runs the fused linear op in shard mode on ``device_type`` tensors
    (:func:`sharded_linear_margin_cross_entropy` falls back to the cosines otherwise)."""
    return _has_kernel(device_type, LINEAR_PARTIALS_OP)


def _fused_for(device_type: str) -> bool:
    if _has_kernel(device_type):
        _register_fake_impls()
        return True
    loaded, reason = _extension.load()
    if loaded:
        reason = f"the extension has no sharded margin kernel for {device_type} tensors"
    _extension.warn_fallback_once(reason)
    return False


def _check_local(cos, labels) -> None:
    if not isinstance(cos, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("cos and labels must be torch.Tensors")
    if cos.dim() != 2 or cos.shape[0] == 0 or cos.shape[1] == 0:
        raise ValueError(
            f"cos must have shape (B, C_local) with B, C_local >= 1, got {tuple(cos.shape)}"
        )
    if cos.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"cos must be float16, bfloat16, float32 or float64, got {cos.dtype}")
    if labels.dtype != torch.int64 or labels.shape != (cos.shape[0],):
        raise ValueError(
            f"labels must be int64 of shape ({cos.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.device != cos.device:
        raise ValueError(f"labels is on {labels.device} but cos is on {cos.device}")
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(labels.max()) >= cos.shape[1]:
            raise ValueError(
                f"labels are local columns: each must be < C_local = {cos.shape[1]} or -1, "
                f"got {int(labels.max())}"
            )


def reference_partials(cos, labels, *, s, m1, m2, m3, lam):
    """Eager :func:`sharded_margin_partials`."""
    z = reference.margin_logits(
        cos.to(reference.compute_dtype(cos.dtype)), labels, s=s, m1=m1, m2=m2, m3=m3, lam=lam
    )
    return logit_partials(z, labels)


def logit_partials(z, labels):
    """Per-row ``(max, sum_exp, target, logit_sum)`` of a shard's logits ``z`` (B, C_local)."""
    row_max = z.max(dim=1).values
    sum_exp = torch.exp(z - row_max.unsqueeze(1)).sum(dim=1)
    own = labels >= 0
    target = torch.where(own, z.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    return row_max, sum_exp, target, z.sum(dim=1)


def reference_backward(
    grad_rows,
    cos,
    labels,
    lse,
    *,
    s,
    m1,
    m2,
    m3,
    lam,
    label_smoothing,
    num_classes,
    straight_through,
):
    """Eager :func:`sharded_margin_cross_entropy_backward`: autograd of ``sum_j g (p_j - q_j) z_j``
    with ``p`` held constant, whose derivative in ``z_j`` is ``g (p_j - q_j)``."""
    dtype = reference.compute_dtype(cos.dtype)
    grad_rows = grad_rows.to(dtype)
    live = (grad_rows != 0).unsqueeze(1)
    # Rows with g = 0 are zeroed first, so that whatever they hold their gradient is exactly 0.
    work = torch.where(live, cos.detach().to(dtype), 0.0).requires_grad_()
    with torch.enable_grad():
        z = reference.margin_logits(
            work, labels, s=s, m1=m1, m2=m2, m3=m3, lam=lam, straight_through=straight_through
        )
        p = torch.exp(z.detach() - lse.to(dtype).unsqueeze(1))
        q = torch.full_like(p, label_smoothing / num_classes)
        own = labels >= 0
        q[own, labels[own]] += 1.0 - label_smoothing
        surrogate = (torch.where(live, grad_rows.unsqueeze(1) * (p - q), 0.0) * z).sum()
        (grad,) = torch.autograd.grad(surrogate, work)
    return grad.to(cos.dtype)


def sharded_margin_partials(cos, labels, *, s, m1=1.0, m2=0.0, m3=0.0, lam=0.0):
    """Per-row ``(max, sum_exp, target, logit_sum)`` of one shard (module docstring)."""
    s, m1, m2, m3, lam = check_margin(s, m1, m2, m3, lam)
    _check_local(cos, labels)
    if _fused_for(cos.device.type):
        return torch.ops.angular.sharded_margin_partials(cos, labels, s, m1, m2, m3, lam)
    return reference_partials(cos, labels, s=s, m1=m1, m2=m2, m3=m3, lam=lam)


def sharded_margin_cross_entropy_backward(
    grad_rows,
    cos,
    labels,
    lse,
    *,
    s,
    m1=1.0,
    m2=0.0,
    m3=0.0,
    lam=0.0,
    label_smoothing=0.0,
    num_classes: int,
    straight_through=False,
):
    """``d loss / d cos`` of one shard, given every row's global log-sum-exp (module docstring)."""
    s, m1, m2, m3, lam = check_margin(s, m1, m2, m3, lam)
    _check_local(cos, labels)
    for name, rows in (("grad_rows", grad_rows), ("lse", lse)):
        if rows.shape != (cos.shape[0],):
            raise ValueError(f"{name} must have shape ({cos.shape[0]},), got {tuple(rows.shape)}")
    _check_num_classes(num_classes, cos.shape[1])
    args = (s, m1, m2, m3, lam, float(label_smoothing), int(num_classes), bool(straight_through))
    if _fused_for(cos.device.type):
        return torch.ops.angular.sharded_margin_cross_entropy_backward(
            grad_rows, cos, labels, lse, *args
        )
    return reference_backward(
        grad_rows,
        cos,
        labels,
        lse,
        s=s,
        m1=m1,
        m2=m2,
        m3=m3,
        lam=lam,
        label_smoothing=float(label_smoothing),
        num_classes=int(num_classes),
        straight_through=bool(straight_through),
    )


def _global_rows(partials, has_target, label_smoothing: float, num_classes: int, group):
    """Every row's loss and log-sum-exp from the shards' partial statistics: the maximum, then the
    rescaled sums, all-reduced (3 + 1 numbers a row; nothing when W = 1)."""
    row_max, sum_exp, target, logit_sum = partials
    _, world = world_of(group)
    if world > 1:
        global_max = _all_reduce(row_max.clone(), dist.ReduceOp.MAX, group)
        sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target, logit_sum])
        sum_exp, target, logit_sum = _all_reduce(sums, dist.ReduceOp.SUM, group)
        row_max = global_max
    lse = row_max + torch.log(sum_exp)
    # F.cross_entropy with smoothing eps over num_classes (csrc/margin_math.h, smoothed_loss).
    loss = lse - target
    if label_smoothing != 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - logit_sum / num_classes)
    return torch.where(has_target, loss, torch.zeros_like(loss)), lse


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over the ranks of ``tensor`` (a new tensor; counted by :func:`count_communication`;
    a copy when torch.distributed is not initialised)."""
    total = tensor.detach().clone()
    if world_of(group)[1] > 1:
        _all_reduce(total, dist.ReduceOp.SUM, group)
    return total


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-row losses of the gathered batch; partial statistics all-reduced in the forward, the
    shard's gradient from the backward op (no communication in the backward)."""

    @staticmethod
    def forward(ctx, cos, labels, has_target, margin, label_smoothing, num_classes, group):
        s, m1, m2, m3, lam, straight_through = margin
        partials = sharded_margin_partials(cos, labels, s=s, m1=m1, m2=m2, m3=m3, lam=lam)
        loss, lse = _global_rows(partials, has_target, label_smoothing, num_classes, group)
        ctx.save_for_backward(cos, labels, lse, has_target)
        ctx.args = dict(
            s=s,
            m1=m1,
            m2=m2,
            m3=m3,
            lam=lam,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
            straight_through=straight_through,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        cos, labels, lse, has_target = ctx.saved_tensors
        grad_rows = torch.where(has_target, grad_rows.to(lse.dtype), 0.0)
        grad_cos = sharded_margin_cross_entropy_backward(grad_rows, cos, labels, lse, **ctx.args)
        return grad_cos, None, None, None, None, None, None


def _check_num_classes(num_classes: int, columns: int) -> int:
    """The global class count a shard of ``columns`` classes is part of, as an int."""
    if int(num_classes) < columns:
        raise ValueError(f"num_classes must be >= C_local = {columns}, got {num_classes}")
    return int(num_classes)


def _check_loss_arguments(label_smoothing, reduction, has_target, labels) -> float:
    """The checks both sharded losses share; returns ``label_smoothing`` as a float."""
    label_smoothing = check_loss_options(label_smoothing, reduction)
    if has_target.dtype != torch.bool or has_target.shape != labels.shape:
        raise ValueError(f"has_target must be bool of shape {tuple(labels.shape)}")
    return label_smoothing


def sharded_margin_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    has_target: torch.Tensor,
    *,
    num_classes: int,
    s: float,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    lam: float = 0.0,
    label_smoothing: float = 0.0,
    straight_through: bool = False,
    reduction: str = "mean",
    group=None,
) -> torch.Tensor:
    """The margin cross-entropy of the gathered batch, this rank holding the columns ``cos``
    (B, C_local) of ``num_classes`` in all (label smoothing spreads over ``num_classes``).

    ``labels``: local columns (-1 where another shard owns the target or the row has none);
    ``has_target`` (B,) bool: whether the row has a target in any shard (rows without one have loss 0
    and are not counted by ``"mean"``). Every rank returns the same loss (``"none"``: the B per-row
    losses); the gradient reaches this rank's ``cos`` only. Collective: every rank of ``group`` must
    call it with the same B.
    """
    s, m1, m2, m3, lam = check_margin(s, m1, m2, m3, lam)
    label_smoothing = _check_loss_arguments(label_smoothing, reduction, has_target, labels)
    margin = (s, m1, m2, m3, lam, bool(straight_through))
    per_row = _ShardedCrossEntropy.apply(
        cos, labels, has_target, margin, label_smoothing, int(num_classes), group
    )
    return reference.reduce_rows(per_row, has_target, reduction)


class _ShardedLogitsCrossEntropy(torch.autograd.Function):
    """Per-row losses of the gathered batch from a shard's finished logits ``z`` (B, C_local): the
    same all-reduced statistics as :class:`_ShardedCrossEntropy`; the backward (local, no
    communication) is ``g (p_j - q_j)``, ``p = exp(z - lse)``, ``q`` the smoothed one-hot target."""

    @staticmethod
    def forward(ctx, z, labels, has_target, label_smoothing, num_classes, group):
        partials = logit_partials(z, labels)
        loss, lse = _global_rows(partials, has_target, label_smoothing, num_classes, group)
        ctx.save_for_backward(z, labels, lse, has_target)
        ctx.label_smoothing, ctx.num_classes = label_smoothing, num_classes
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        z, labels, lse, has_target = ctx.saved_tensors
        live = has_target.unsqueeze(1)
        p = torch.exp(torch.where(live, z, 0.0) - torch.where(has_target, lse, 0.0).unsqueeze(1))
        p.sub_(ctx.label_smoothing / ctx.num_classes)
        own = labels >= 0
        p[own, labels[own]] -= 1.0 - ctx.label_smoothing
        grad = torch.where(live, grad_rows.to(z.dtype).unsqueeze(1) * p, 0.0)
        return grad, None, None, None, None, None


def sharded_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    has_target: torch.Tensor,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    group=None,
) -> torch.Tensor:
    """:func:`sharded_margin_cross_entropy` for logits the caller has already built (with any
    margin, per-row or not, and autograd through it): each rank passes its shard's columns
    ``logits`` (B, C_local, fp32 or fp64), the local ``labels`` and ``has_target`` as there. The
    adaptive sharded heads use it (:class:`angular.nn.sharded.ShardedAdaptiveHead`)."""
    _check_local(logits, labels)
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"logits must be float32 or float64, got {logits.dtype}")
    label_smoothing = _check_loss_arguments(label_smoothing, reduction, has_target, labels)
    _check_num_classes(num_classes, logits.shape[1])
    per_row = _ShardedLogitsCrossEntropy.apply(
        logits, labels, has_target, label_smoothing, int(num_classes), group
    )
    return reference.reduce_rows(per_row, has_target, reduction)


class _ShardedLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of the gathered batch from the embeddings and the shard's centres: the shard's
    partial statistics from the fused linear kernel, all-reduced as in
    :class:`_ShardedCrossEntropy`; the backward recomputes each cosine tile in the kernel (no
    communication)."""

    @staticmethod
    def forward(ctx, x, weight, labels, has_target, margin, label_smoothing, num_classes, group):
        s, m1, m2, m3, lam, straight_through = margin
        *partials, x_norm, w_norm = torch.ops.angular.sharded_linear_margin_partials(
            x, weight, labels, s, m1, m2, m3, lam
        )
        loss, lse = _global_rows(partials, has_target, label_smoothing, num_classes, group)
        ctx.save_for_backward(x, weight, labels, lse, x_norm, w_norm, has_target)
        ctx.args = (s, m1, m2, m3, lam, label_smoothing, num_classes, straight_through)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        x, weight, labels, lse, x_norm, w_norm, has_target = ctx.saved_tensors
        grad_rows = torch.where(has_target, grad_rows.to(lse.dtype), 0.0)
        grad_x, grad_weight = torch.ops.angular.sharded_linear_margin_backward(
            grad_rows, x, weight, labels, lse, x_norm, w_norm, *ctx.args
        )
        return grad_x, grad_weight, None, None, None, None, None, None


def sharded_linear_margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    has_target: torch.Tensor,
    *,
    num_classes: int,
    s: float,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    lam: float = 0.0,
    label_smoothing: float = 0.0,
    straight_through: bool = False,
    reduction: str = "mean",
    group=None,
) -> torch.Tensor:
    """:func:`sharded_margin_cross_entropy` of ``cos = normalize(x) @ normalize(weight).T`` without
    the cosines: ``x`` (B, D) the gathered embeddings (every rank the same), ``weight`` (C_local, D)
    this rank's centres (another dtype than ``x`` is converted chunk by chunk), ``labels`` local
    columns and ``has_target`` as there. Per rank, beyond the inputs and the gradients of ``x`` and
    ``weight``, the kernels hold a few (B, chunk) tiles and O(B + C_local) vectors.

    Without the extension's kernel for the device it computes the same function from the shard's
    cosines (:func:`shard_cosine`, then :func:`sharded_margin_cross_entropy`), with a warning once.
    Collective: every rank of ``group`` must call it with the same B.
    """
    s, m1, m2, m3, lam = check_margin(s, m1, m2, m3, lam)
    label_smoothing = _check_loss_arguments(label_smoothing, reduction, has_target, labels)
    linear.check_tensors(x, weight, labels)
    _check_num_classes(num_classes, weight.shape[0])
    margin = dict(s=s, m1=m1, m2=m2, m3=m3, lam=lam, straight_through=bool(straight_through))
    if not has_linear_kernel(x.device.type):
        _fused_for(x.device.type)  # warns once when the extension is missing
        return sharded_margin_cross_entropy(
            shard_cosine(x, weight),
            labels,
            has_target,
            num_classes=num_classes,
            label_smoothing=label_smoothing,
            reduction=reduction,
            group=group,
            **margin,
        )
    _register_fake_impls()
    per_row = _ShardedLinearCrossEntropy.apply(
        x,
        weight,
        labels,
        has_target,
        (s, m1, m2, m3, lam, bool(straight_through)),
        label_smoothing,
        int(num_classes),
        group,
    )
    return reference.reduce_rows(per_row, has_target, reduction)


# --------------------------------------------------------------------------------------------------
# Fake (meta) implementations of the compiled ops, for torch.compile and opcheck.

_registered = False


def _register_fake_impls() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake(PARTIALS_OP)
    def _(cos, labels, s, m1, m2, m3, lam):
        rows = cos.new_empty(cos.shape[0], dtype=reference.compute_dtype(cos.dtype))
        return rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows)

    @torch.library.register_fake(BACKWARD_OP)
    def _(grad_rows, cos, labels, lse, *params):
        return torch.empty_like(cos, memory_format=torch.contiguous_format)

    if not hasattr(torch.ops.angular, "sharded_linear_margin_partials"):
        return  # an extension built before the linear ops existed

    @torch.library.register_fake(LINEAR_PARTIALS_OP)
    def _(x, weight, labels, s, m1, m2, m3, lam):
        dtype = reference.compute_dtype(x.dtype)
        rows = x.new_empty(x.shape[0], dtype=dtype)
        return (
            rows,
            torch.empty_like(rows),
            torch.empty_like(rows),
            torch.empty_like(rows),
            torch.empty_like(rows),
            x.new_empty(weight.shape[0], dtype=dtype),
        )

    @torch.library.register_fake(LINEAR_BACKWARD_OP)
    def _(grad_rows, x, weight, labels, lse, x_norm, w_norm, *params):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
        )


def ceil_sample(sample_rate: float, class_count: int) -> int:
    """How many classes a shard of ``class_count`` samples at ``sample_rate`` (before positives)."""
    # round() first: 0.7 * 10 is 7.000000000000001 in floating point, and must give 7.
    return min(class_count, max(1, math.ceil(round(sample_rate * class_count, 9))))
