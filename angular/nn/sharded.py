"""The sharded (model-parallel, Partial FC) margin head (docs/design.md, Heads and backbones, and
"Sharded softmax").

:class:`ShardedMarginHead` stands in for :class:`angular.nn.heads.MarginHead` when the class centres
are split across the ranks of a ``torch.distributed`` process group: rank r of W holds the
contiguous block of ``C // W + (r < C % W)`` centres. ``loss(x_local, labels_local)`` all-gathers
the embeddings and labels (every rank the same batch size), takes the cosines of the gathered batch
against the local centres (or a sample of them, ``sample_rate < 1``) and computes the margin
cross-entropy with all-reduced per-row statistics (:mod:`angular.ops.sharded`): the (B, C) logits
are never gathered, and the bytes sent per step do not depend on C.

Gradients: the all-gather's backward multiplies this rank's embedding gradient by W, so that when
DDP averages the backbone's gradients over the W ranks they equal the single-process head's on the
concatenated batch; the centres (not under DDP) get the exact gradient of that loss. With W = 1 and
``sample_rate = 1`` the head computes exactly what ``MarginHead`` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from angular import ops
from angular.nn.backbones import check_size
from angular.nn.heads import FUSED_LINEAR_MIN_CLASSES, MarginSpec
from angular.ops import sharded

__all__ = ["ShardedMarginHead", "initial_centres"]

# Initial centres are drawn block by block, each block from its own seed, so the full (C, D)
# matrix is the same whatever the world size: a run on 2 ranks starts where a run on 4 does.
INIT_BLOCK_ROWS = 4096
INIT_STD = 0.01  # as MarginHead


def _seed(*parts: int) -> int:
    """A 63-bit seed from small integers (deterministic across processes, unlike hash of a str)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 25)
    return value


def initial_centres(
    start: int, count: int, embedding_dim: int, seed: int, dtype=torch.float32
) -> torch.Tensor:
    """Rows ``[start, start + count)`` of the N(0, 0.01) initial centres of seed ``seed``."""
    first_block = start // INIT_BLOCK_ROWS
    last_block = (start + count - 1) // INIT_BLOCK_ROWS
    blocks = []
    generator = torch.Generator()
    for block in range(first_block, last_block + 1):
        generator.manual_seed(_seed(seed, block))
        blocks.append(torch.randn(INIT_BLOCK_ROWS, embedding_dim, generator=generator, dtype=dtype))
    rows = torch.cat(blocks)
    offset = start - first_block * INIT_BLOCK_ROWS
    return rows[offset : offset + count].mul_(INIT_STD).contiguous()


class ShardedMarginHead(nn.Module):
    """A margin head whose ``num_classes`` centres are split across the ranks of ``group`` (the
    default group when None; one process, W = 1, when torch.distributed is not initialised).

    ``weight`` is this rank's shard (``class_count`` x D) of classes ``[class_start, class_start +
    class_count)``. ``sample_rate`` in (0, 1]: each step every rank keeps the positive classes of the
    gathered batch that fall in its shard plus random negatives up to ``ceil(sample_rate *
    class_count)``, from a generator seeded by ``(generator_seed, rank, step)`` (the same samples on
    resume). ``step`` (a buffer) drives the SphereFace ``lam`` schedule and the sampling, and advances
    once per :meth:`loss` in training mode. Initial centres come from ``generator_seed`` too, and do
    not depend on W (:func:`initial_centres`).

    The optimizer sees ``weight`` as one dense parameter: unsampled centres get a zero gradient, and
    whatever the optimizer does with a zero gradient (weight decay, momentum) still applies to them
    (docs/design.md, "Sharded softmax", says why).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: MarginSpec,
        *,
        label_smoothing: float = 0.0,
        straight_through: bool = False,
        sample_rate: float = 1.0,
        group=None,
        generator_seed: int = 0,
    ):
        super().__init__()
        embedding_dim = check_size("embedding_dim", embedding_dim)
        num_classes = check_size("num_classes", num_classes)
        if not isinstance(margin, MarginSpec):
            raise TypeError(f"margin must be a MarginSpec, got {type(margin).__name__}")
        label_smoothing = ops.check_number("label_smoothing", label_smoothing, low=0.0)
        if label_smoothing > 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        sample_rate = ops.check_number("sample_rate", sample_rate, low=0.0, strict=True)
        if sample_rate > 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if isinstance(generator_seed, bool) or not isinstance(generator_seed, int):
            raise TypeError(f"generator_seed must be an int, got {type(generator_seed).__name__}")
        self.rank, self.world_size = sharded.world_of(group)
        if num_classes < self.world_size:
            raise ValueError(
                f"num_classes ({num_classes}) must be >= the world size ({self.world_size}): "
                "every rank holds at least one class"
            )
        self.group = group
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.margin = margin
        self.label_smoothing = label_smoothing
        self.straight_through = bool(straight_through)
        self.sample_rate = sample_rate
        self.generator_seed = generator_seed
        self.class_start, self.class_count = sharded.shard_range(
            num_classes, self.world_size, self.rank
        )
        self.weight = nn.Parameter(
            initial_centres(self.class_start, self.class_count, embedding_dim, generator_seed)
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    # ----------------------------------------------------------------------------------------------

    @property
    def lam(self) -> float:
        if self.margin.lam_schedule is None:
            return 0.0
        return self.margin.lam(int(self.step))

    def _margin_args(self) -> dict:
        m = self.margin
        return dict(
            s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, lam=self.lam, straight_through=self.straight_through
        )

    def _check_batch(self, x, labels) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.embedding_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (b, {self.embedding_dim}), got {shape}")
        if x.shape[0] == 0:
            raise ValueError("x must hold at least one row")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError("labels must be an int64 torch.Tensor")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        if labels.device != x.device:
            raise ValueError(f"labels is on {labels.device} but x is on {x.device}")

    def cosine(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``cos`` of each row of ``x`` with this rank's centres (or ``weight``): (B, C_local)."""
        return sharded.shard_cosine(x, self.weight if weight is None else weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``s * cos`` against this rank's shard only, (B, class_count), no margin and no
        communication; column j is class ``class_start + j``. For the whole head's logits use
        :meth:`full_weight` (or the saved model) with a plain :class:`MarginHead`."""
        return self.margin.s * self.cosine(x)

    # ----------------------------------------------------------------------------------------------

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        """The step's class sample for the gathered ``labels``: ``(index, local_labels,
        num_sampled)``. ``index`` (sorted local rows, None: every class), ``local_labels`` the labels
        as columns of the sample (-1: not in this shard, or no target), ``num_sampled`` the classes
        all ranks together sample (the C that label smoothing spreads over)."""
        start, count = self.class_start, self.class_count
        in_shard = (labels >= start) & (labels < start + count)
        if self.sample_rate >= 1.0:
            return None, torch.where(in_shard, labels - start, -1), self.num_classes
        wanted = sharded.ceil_sample(self.sample_rate, count)
        positives = torch.unique(labels[in_shard] - start)
        if positives.numel() >= wanted:
            index = positives
        else:
            generator = torch.Generator(device=self.weight.device)
            generator.manual_seed(_seed(self.generator_seed, self.rank, int(self.step)))
            score = torch.rand(count, generator=generator, device=self.weight.device)
            score[positives] = 2.0  # above every random score: positives are always kept
            index = torch.topk(score, wanted, sorted=False).indices.sort().values
        local = torch.searchsorted(index, (labels - start).clamp(0, count - 1))
        local_labels = torch.where(in_shard, local, -1)
        # Every rank knows every shard's positives (the labels are gathered), so the total needs no
        # communication.
        num_sampled = 0
        for rank in range(self.world_size):
            r_start, r_count = sharded.shard_range(self.num_classes, self.world_size, rank)
            r_labels = labels[(labels >= r_start) & (labels < r_start + r_count)]
            r_wanted = sharded.ceil_sample(self.sample_rate, r_count)
            num_sampled += max(r_wanted, int(torch.unique(r_labels).numel()))
        return index, local_labels, num_sampled

    def loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The margin cross-entropy of the batch gathered from every rank (collective: every rank
        calls it with the same batch size). Every rank returns the same value; ``"mean"`` is over the
        gathered rows that have a target, ``"none"`` gives the gathered batch's per-row losses in rank
        order. Advances ``step`` in training mode."""
        self._check_batch(x, labels)
        if reduction not in ops.REDUCTIONS:
            raise ValueError(f"reduction must be one of {ops.REDUCTIONS}, got {reduction!r}")
        if self.world_size == 1 and self.sample_rate >= 1.0:
            loss = self._single_process_loss(x, labels, reduction)
        else:
            loss = self._sharded_loss(x, labels, reduction)
        if self.training:
            self.step += 1
        return loss

    def _single_process_loss(self, x, labels, reduction):
        # What MarginHead.loss computes, so that W = 1 is exactly the single-process head.
        if self.num_classes >= FUSED_LINEAR_MIN_CLASSES:
            return ops.linear_margin_cross_entropy(
                x,
                self.weight,
                labels,
                label_smoothing=self.label_smoothing,
                reduction=reduction,
                **self._margin_args(),
            )
        weight = self.weight.to(x.dtype) if self.weight.dtype != x.dtype else self.weight
        return ops.margin_cross_entropy(
            F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1)),  # MarginHead.cosine
            labels,
            label_smoothing=self.label_smoothing,
            reduction=reduction,
            **self._margin_args(),
        )

    def _sharded_loss(self, x, labels, reduction):
        x_all, labels_all = sharded.gather_rows(x, labels, self.group)
        if labels_all.device.type == "cpu" and int(labels_all.max()) >= self.num_classes:
            # Gathered: every rank sees the same labels and raises the same error.
            raise ValueError(
                f"labels must be < num_classes = {self.num_classes}, got a label {int(labels_all.max())}"
            )
        index, local_labels, num_sampled = self.sample(labels_all)
        weight = self.weight if index is None else self.weight[index]
        return sharded.sharded_margin_cross_entropy(
            self.cosine(x_all, weight),
            local_labels,
            labels_all >= 0,
            num_classes=num_sampled,
            label_smoothing=self.label_smoothing,
            reduction=reduction,
            group=self.group,
            **self._margin_args(),
        )

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full (C, D) centres on every rank (collective: an all-gather of the shards, padded to
        one size since gloo gathers only equal shapes)."""
        if self.world_size == 1:
            return self.weight.detach().clone()
        largest = sharded.shard_range(self.num_classes, self.world_size, 0)[1]
        padded = self.weight.new_zeros(largest, self.embedding_dim)
        padded[: self.class_count] = self.weight
        parts = sharded.all_gather_equal(padded, self.group)
        return torch.cat(
            [
                part[: sharded.shard_range(self.num_classes, self.world_size, rank)[1]]
                for rank, part in enumerate(parts)
            ]
        )

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows of a full (C, D) centre matrix into ``weight`` (no communication)."""
        expected = (self.num_classes, self.embedding_dim)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            shape = (
                tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            )
            raise ValueError(f"weight must have shape {expected}, got {shape}")
        self.weight.copy_(weight[self.class_start : self.class_start + self.class_count])

    def extra_repr(self) -> str:
        m = self.margin
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_start + self.class_count}), "
            f"rank={self.rank}/{self.world_size}, sample_rate={self.sample_rate}, "
            f"s={m.s}, m1={m.m1}, m2={m.m2}, m3={m.m3}, lam_schedule={m.lam_schedule}"
        )
