"""The sharded (model-parallel, Partial FC) margin head (docs/design.md, Heads and backbones, and
"Sharded softmax").

:class:`ShardedMarginHead` is a :class:`angular.nn.heads.MarginHead` whose class centres are
split across the ranks of a ``torch.distributed`` process group: rank r of W holds the
contiguous block of ``C // W + (r < C % W)`` centres. ``loss(x_local, labels_local)`` all-gathers
the embeddings and labels (every rank the same batch size), and computes the margin cross-entropy
of the gathered batch against the local centres (or a sample of them, ``sample_rate < 1``) with
all-reduced per-row statistics (:mod:`angular.ops.sharded`): the (B, C) logits are never gathered,
and the bytes sent per step do not depend on C. With ``fused_linear`` (MarginHead's rule: on from
``FUSED_LINEAR_MIN_CLASSES`` classes) a fixed-margin head with one centre per class does not even
form its shard's (W b, C_local) cosines: the fused linear kernel runs over the centres in shard
mode (:func:`angular.ops.sharded.sharded_linear_margin_cross_entropy`); otherwise the shard's
cosines are formed, as the adaptive and sub-center heads need them.

Gradients: the all-gather's backward multiplies this rank's embedding gradient by W, so that when
DDP averages the backbone's gradients over the W ranks they equal the single-process head's on the
concatenated batch; the centres (not under DDP) get the exact gradient of that loss. With W = 1 and
``sample_rate = 1`` (a fixed margin, one centre per class) the head runs ``MarginHead``'s loss.

:class:`ShardedAdaptiveHead` does the same for the adaptive heads of :mod:`angular.nn.adaptive`
(per-row margins, CurricularFace's modulation, sub-centres): their per-row margins come from the
gathered batch, identical on every rank; CurricularFace's target cosines are all-reduced (B floats);
a sub-center head is sharded and sampled by class.
"""

from __future__ import annotations

import torch
from torch import nn

from angular import ops
from angular.nn.adaptive import AdaptiveMarginHead
from angular.nn.backbones import check_size
from angular.nn.heads import MarginHead, MarginSpec, RowContext, add_row_term, check_reduction
from angular.ops import reference, sharded

__all__ = ["ShardedAdaptiveHead", "ShardedMarginHead", "initial_centres"]

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


def _options_of(head: MarginHead) -> dict:
    """The constructor arguments a shard takes from the one-process head it shards."""
    return {
        "embedding_dim": head.embedding_dim,
        "num_classes": head.num_classes,
        "margin": head.margin,
        "label_smoothing": head.label_smoothing,
        "straight_through": head.straight_through,
        "fused_linear": head.fused_linear,
    }


class ShardedMarginHead(MarginHead):
    """A margin head whose ``num_classes`` centres are split across the ranks of ``group`` (the
    default group when None; one process, W = 1, when torch.distributed is not initialised).

    ``weight`` is this rank's shard (``class_count`` x D) of classes ``[class_start, class_start +
    class_count)``. ``sample_rate`` in (0, 1]: each step every rank keeps the positive classes of the
    gathered batch that fall in its shard plus random negatives up to ``ceil(sample_rate *
    class_count)``, from a generator seeded by ``(generator_seed, rank, step)`` (the same samples on
    resume). ``step`` (a buffer) drives the SphereFace ``lam`` schedule and the sampling, and advances
    once per :meth:`loss` in training mode. Initial centres come from ``generator_seed`` too, and do
    not depend on W (:func:`initial_centres`).

    ``centres_per_class`` K > 1 (sub-center ArcFace): ``weight`` holds the K sub-centres of each of
    its classes, class-major (rows ``[class_start K, (class_start + class_count) K)`` of the full
    (C K, D) matrix); a class's cosine is the max over its K; sampling keeps or drops whole classes.

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
        centres_per_class: int = 1,
        fused_linear: bool | None = None,
    ):
        centres_per_class = check_size("centres_per_class", centres_per_class)
        # The rule and its checks are MarginHead's; the centres are this rank's shard, drawn below.
        super().__init__(
            embedding_dim,
            num_classes,
            margin,
            label_smoothing=label_smoothing,
            straight_through=bool(straight_through),
            fused_linear=fused_linear,
            centres=False,
        )
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
        self.sample_rate = sample_rate
        self.generator_seed = generator_seed
        self.centres_per_class = centres_per_class
        self.class_start, self.class_count = sharded.shard_range(
            num_classes, self.world_size, self.rank
        )
        k = centres_per_class
        self.weight = nn.Parameter(
            initial_centres(
                self.class_start * k, self.class_count * k, embedding_dim, generator_seed
            )
        )

    @classmethod
    def from_head(
        cls, head: MarginHead, *, sample_rate: float = 1.0, group=None, generator_seed: int = 0
    ) -> ShardedMarginHead:
        """This rank's shard of a one-process head, with its margin, options and centres (no
        communication): a :class:`ShardedAdaptiveHead` for an adaptive head."""
        if isinstance(head, AdaptiveMarginHead):
            return ShardedAdaptiveHead(
                head, sample_rate=sample_rate, group=group, generator_seed=generator_seed
            )
        if not isinstance(head, MarginHead):
            raise TypeError(f"head must be a MarginHead, got {type(head).__name__}")
        shard = ShardedMarginHead(
            **_options_of(head),
            sample_rate=sample_rate,
            group=group,
            generator_seed=generator_seed,
        )
        shard.take_centres_of(head)
        return shard

    # ----------------------------------------------------------------------------------------------

    # A sharded head has no (B, C) margin logits: nn.Module's forward (which raises) stands.
    forward = nn.Module.forward

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
        """``cos`` of each row of ``x`` with this rank's classes (or those of ``weight``, K rows a
        class): (B, C_local), the max over a class's K sub-centres."""
        cos = sharded.shard_cosine(x, self.weight if weight is None else weight)
        if self.centres_per_class == 1:
            return cos
        return cos.view(cos.shape[0], -1, self.centres_per_class).amax(dim=2)

    def _sampled_weight(self, index: torch.Tensor | None) -> torch.Tensor:
        """The centres of the sampled local classes ``index`` (all K sub-centres of each)."""
        if index is None:
            return self.weight
        if self.centres_per_class == 1:
            return self.weight[index]
        k = self.centres_per_class
        return self.weight.view(self.class_count, k, -1)[index].reshape(index.numel() * k, -1)

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
        order. Advances ``step`` (and an adaptive rule's state) in training mode."""
        return super().loss(x, labels, reduction)

    def batch_loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        self._check_batch(x, labels)
        check_reduction(reduction)
        if (
            self.world_size == 1
            and self.sample_rate >= 1.0
            and self.centres_per_class == 1
            and not self.per_row
        ):
            # One rank holding every class with a fixed margin: the one-process head's loss.
            return super().batch_loss(x, labels, reduction)
        x_all, labels_all, index, local_labels, num_sampled = self._gather(x, labels)
        weight = self._sampled_weight(index)
        if self.fused_linear and not self.per_row and self.centres_per_class == 1:
            # No (W b, C_local) cosines: the fused linear kernel runs over the shard's centres.
            return sharded.sharded_linear_margin_cross_entropy(
                x_all,
                weight,
                local_labels,
                labels_all >= 0,
                num_classes=num_sampled,
                label_smoothing=self.label_smoothing,
                reduction=reduction,
                group=self.group,
                **self.margin_arguments(),
            )
        cos = self.cosine(x_all, weight)
        if not self.per_row:
            return sharded.sharded_margin_cross_entropy(
                cos,
                local_labels,
                labels_all >= 0,
                num_classes=num_sampled,
                label_smoothing=self.label_smoothing,
                reduction=reduction,
                group=self.group,
                **self.margin_arguments(),
            )
        return self._per_row_loss(x_all, labels_all, cos, local_labels, num_sampled, reduction)

    def dense_cosine(self, x: torch.Tensor) -> torch.Tensor:
        return MarginHead.cosine(self, x)  # the shard is every class: the one-process cosine

    def _gather(self, x, labels):
        """The gathered batch, this step's local sample of classes (:meth:`sample`), the local
        labels and the number of classes sampled over all ranks (collective)."""
        x_all, labels_all = sharded.gather_rows(x, labels, self.group)
        if labels_all.device.type == "cpu" and int(labels_all.max()) >= self.num_classes:
            # Gathered: every rank sees the same labels and raises the same error.
            raise ValueError(
                f"labels must be < num_classes = {self.num_classes}, got a label {int(labels_all.max())}"
            )
        index, local_labels, num_sampled = self.sample(labels_all)
        return x_all, labels_all, index, local_labels, num_sampled

    def _global_target_cos(self, work: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Every row's target cosine (detached, 0 without a target): the shard that owns it sends
        it, the others 0 (an all-reduce of B floats)."""
        own = local_labels >= 0
        local = work.detach().gather(1, local_labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        return sharded.all_reduce_sum(torch.where(own, local, 0.0), self.group)

    def _per_row_loss(self, x_all, labels_all, cos, local_labels, num_sampled, reduction):
        """The loss of the shard's cosines with the rule's per-row margins (an adaptive head),
        its state updated in training mode alike on every rank."""
        work = cos.to(reference.compute_dtype(cos.dtype))
        rows = RowContext(cos, lambda: self._global_target_cos(work, local_labels))
        overrides, extra = self.per_row_margins(x_all, rows, labels_all, self.training)
        arguments = {**self.margin_arguments(), **overrides}
        negative_t = arguments.pop("negative_t", None)
        threshold = None
        if negative_t is not None:
            threshold = self._global_threshold(rows.target_cos(), labels_all >= 0, arguments)
        logits = reference.margin_logits(
            work, local_labels, negative_t=negative_t, negative_threshold=threshold, **arguments
        )
        per_row = sharded.sharded_cross_entropy(
            logits,
            local_labels,
            labels_all >= 0,
            num_classes=num_sampled,
            label_smoothing=self.label_smoothing,
            reduction="none",
            group=self.group,
        )
        if extra is not None and self.rank != 0:
            extra = extra.detach()  # its value on every rank, its gradient once (rank 0)
        return add_row_term(per_row, extra, labels_all, reduction)

    @staticmethod
    def _global_threshold(target_cos, has_target, arguments) -> torch.Tensor:
        """CurricularFace's per-row threshold ``f_y`` of the global target cosines (+inf for rows
        without a target: nothing to modulate), from the one Python margin formula."""
        margins = {
            name: value.detach() if isinstance(value, torch.Tensor) else value
            for name, value in arguments.items()
            if name in ("m1", "m2", "m3", "lam")
        }
        f_y = reference.target_logit(torch.where(has_target, target_cos, 0.0), **margins)
        return torch.where(has_target, f_y.detach(), torch.inf)

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full (C K, D) centres on every rank (collective: an all-gather of the shards, padded
        to one size since gloo gathers only equal shapes)."""
        if self.world_size == 1:
            return self.weight.detach().clone()
        k = self.centres_per_class
        largest = sharded.shard_range(self.num_classes, self.world_size, 0)[1] * k
        padded = self.weight.new_zeros(largest, self.embedding_dim)
        padded[: self.class_count * k] = self.weight
        parts = sharded.all_gather_equal(padded, self.group)
        return torch.cat(
            [
                part[: sharded.shard_range(self.num_classes, self.world_size, rank)[1] * k]
                for rank, part in enumerate(parts)
            ]
        )

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The state dict of the one-process head this head shards (collective): the full centres
        and ``step`` (and, for an adaptive head, its buffers and extra state)."""
        return {"weight": self.full_weight(), "step": self.step.detach().clone()}

    @torch.no_grad()
    def take_centres_of(self, head: MarginHead) -> None:
        """Copy this rank's centres from the one-process ``head``: its full centres, or the shard
        it kept (:func:`angular.nn.heads.keeping_shard`), which must be this rank's."""
        kept = getattr(head, "kept_classes", None)
        if kept is None:
            self.load_full_weight(head.weight.detach())
            return
        if tuple(kept) != (self.class_start, self.class_count):
            raise ValueError(
                f"the head kept classes [{kept[0]}, {kept[0] + kept[1]}), this rank's shard is "
                f"[{self.class_start}, {self.class_start + self.class_count})"
            )
        self.weight.copy_(head.weight.detach())

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows of a full (C K, D) centre matrix into ``weight`` (no
        communication)."""
        expected = (self.num_classes * self.centres_per_class, self.embedding_dim)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            shape = (
                tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            )
            raise ValueError(f"weight must have shape {expected}, got {shape}")
        k = self.centres_per_class
        self.weight.copy_(weight[self.class_start * k : (self.class_start + self.class_count) * k])

    def extra_repr(self) -> str:
        m = self.margin
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_start + self.class_count}), "
            f"rank={self.rank}/{self.world_size}, sample_rate={self.sample_rate}, "
            f"s={m.s}, m1={m.m1}, m2={m.m2}, m3={m.m3}, lam_schedule={m.lam_schedule}"
        )

    @torch.no_grad()
    def state_without_centres(self) -> dict:
        """:meth:`full_state_dict` but the centres (no communication): what every rank holds
        alike, saved beside the shards of a head too large to gather."""
        return {"step": self.step.detach().clone()}


class ShardedAdaptiveHead(ShardedMarginHead):
    """An adaptive head (:mod:`angular.nn.adaptive`) sharded by class like :class:`ShardedMarginHead`,
    computing what ``head`` computes on the gathered batch (docs/design.md, "Sharded softmax").

    Built from the one-process ``head``: its type, options, scale, smoothing, its margin rule and
    state (``rule``, :meth:`~angular.nn.adaptive.AdaptiveMarginHead.margin_rule`: a head of its type
    without centres, holding AdaFace's and CurricularFace's buffers, ElasticFace's generator) and
    this rank's shard of its centres (all K sub-centres of each class for sub-center ArcFace). Its
    loss is :class:`ShardedMarginHead`'s. Each step the rule's
    :meth:`~angular.nn.adaptive.AdaptiveMarginHead.per_row_margins` runs on the gathered batch, identical on
    every rank: per-row margins, AdaFace's statistics and ElasticFace's draws need no extra
    communication; the target cosine of each row (CurricularFace's ``t`` and threshold ``f_y``,
    ElasticFace-plus's order) is all-reduced as B floats, zeros from the ranks without the target.
    The shard's logits are :func:`angular.ops.reference.margin_logits` (autograd gives the margins'
    gradient, MagFace's reaches ``x``), their loss :func:`angular.ops.sharded.sharded_cross_entropy`.
    A per-row loss term (MagFace's regulariser) is added on every rank but differentiated on rank 0
    alone, since the gathered rows' gradients are summed over the ranks.

    Not sharded: a sub-center head's :meth:`~angular.nn.adaptive.SubCenterArcFace.keep_dominant`
    (call it on the full head, :meth:`full_state_dict`); a head that already uses its dominant
    sub-centres is refused.
    """

    per_row = True

    def __init__(
        self,
        head: AdaptiveMarginHead,
        *,
        sample_rate: float = 1.0,
        group=None,
        generator_seed: int = 0,
    ):
        if not isinstance(head, AdaptiveMarginHead):
            raise TypeError(f"head must be an AdaptiveMarginHead, got {type(head).__name__}")
        if getattr(head, "uses_dominant", False):
            raise ValueError(
                "head uses its dominant sub-centres (keep_dominant), which the sharded head does "
                "not: shard it before keep_dominant"
            )
        super().__init__(
            **_options_of(head),
            sample_rate=sample_rate,
            group=group,
            generator_seed=generator_seed,
            centres_per_class=head.centres_per_class,
        )
        source = head.weight
        self.weight = nn.Parameter(source.new_empty(self.weight.shape))  # the head's dtype, device
        self.take_centres_of(head)
        self.step.copy_(head.step)
        self.rule = head.margin_rule()  # its type, options and state, without the (C, D) centres
        self.rule.train(self.training)

    @property
    def type_name(self) -> str:
        return self.rule.type_name

    @property
    def options(self) -> dict:
        return self.rule.options

    def per_row_margins(self, x, rows, labels, update):
        return self.rule.per_row_margins(x, rows, labels, update)

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        return {**self.rule.state_dict(), **super().full_state_dict()}

    @torch.no_grad()
    def state_without_centres(self) -> dict:
        return {**self.rule.state_dict(), **super().state_without_centres()}
