"""Watching a margin head for collapse (docs/design.md, Collapse).

A margin head collapses when its class centres fall onto one direction and the embeddings onto
that direction or its opposite: every class then gets the same logit except the target's margin
penalty, a state whose loss can be lower than what the discriminative solution has reached. For
ArcFace the penalty shrinks towards the ends: ``s (1 - cos m)`` at ``theta = 0`` and ``pi``, and
least, ``2 s (1 - cos(m / 2))`` (about ``s m^2 / 4``), at ``theta = pi - m / 2``, where the
monotone extension turns; a collapsed ArcFace head keeps a loss of about ``log C + (1 - eps) d``
with that least penalty ``d`` while its accuracy falls to chance.

- :func:`centre_cosine` and :func:`embedding_spread` measure it each epoch (a sharded head's
  centre cosine from its shards' :func:`unit_sum`, :func:`cosine_of_unit_sum`);
- :func:`collapsed_loss` is the loss of the collapsed state for a margin, and
  :func:`collapse_room` its height above chance (``log C``), checked when training starts;
- :class:`CollapseMonitor` applies the thresholds of ``train.collapse`` to the history;
- :class:`DriftMonitor` sees a partial collapse: centres drifting together, a falling spread.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from angular.nn.heads import MarginSpec
from angular.ops import reference

__all__ = [
    "CollapseError",
    "CollapseMonitor",
    "DriftMonitor",
    "centre_cosine",
    "collapse_room",
    "collapsed_loss",
    "cosine_of_unit_sum",
    "embedding_spread",
    "unit_sum",
]


class CollapseError(RuntimeError):
    """A head collapsed during training (``train.on_collapse: stop``)."""


@torch.no_grad()
def init_centres(head, norm: float | None) -> None:
    """``None``: leave the head's N(0, 0.01) centres. A number: scale each centre to that norm,
    keeping its random direction (no new random draws, so the rest of a seeded run is unchanged);
    ``sqrt(D)`` is the norm N(0, 1) centres would have.

    Only a centre's direction enters the cosine, so Adam's steps (about ``lr`` per coordinate,
    whatever the gradient's scale) turn a centre of norm r by about ``lr / r``: small centres turn
    ten times faster, which helps a run start but lets noisy early gradients throw every centre
    onto one direction on hard data (docs/design.md, Collapse)."""
    if norm is None:
        return
    if not (isinstance(norm, (int, float)) and math.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be a finite number > 0 or None, got {norm!r}")
    head.weight.mul_(norm / head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def centre_cosine(weight: torch.Tensor) -> float:
    """The mean cosine between the C class centres (rows of ``weight``), over all pairs i != j.

    ``|sum_i w_i|^2 = C + sum_{i != j} cos_ij`` for unit rows: one pass, no C x C matrix.
    Near ``-1 / (C - 1)`` or 0 for spread centres, 1 for collapsed ones; nan for one class."""
    rows = weight.shape[0]
    if rows < 2:
        return math.nan
    return cosine_of_unit_sum(unit_sum(weight), rows)


@torch.no_grad()
def unit_sum(weight: torch.Tensor) -> torch.Tensor:
    """The sum of the rows of ``weight`` made unit (in float64, D values): the shards of a head
    add theirs up, and :func:`cosine_of_unit_sum` gives the head's :func:`centre_cosine`."""
    return F.normalize(weight.detach().double(), dim=1).sum(dim=0)


def cosine_of_unit_sum(total: torch.Tensor, rows: int) -> float:
    """:func:`centre_cosine` of ``rows`` centres whose unit rows sum to ``total``."""
    if rows < 2:
        return math.nan
    return float((total.pow(2).sum() - rows) / (rows * (rows - 1)))


@torch.no_grad()
def embedding_spread(embeddings: torch.Tensor) -> float:
    """The share of the normalised embeddings' second moment off its main axis:
    ``1 - lambda_max(E[e e^T])`` for unit ``e`` (the eigenvalues sum to 1).

    0 when every embedding lies on one line (the collapsed state: ``+-w``), up to ``1 - 1/D`` when
    they fill the sphere evenly; nan for fewer than 2 embeddings."""
    if embeddings.shape[0] < 2:
        return math.nan
    unit = F.normalize(embeddings.detach().double(), dim=1)
    moment = unit.T @ unit / unit.shape[0]
    return float(1.0 - torch.linalg.eigvalsh(moment)[-1])


def _least_penalty(margin: MarginSpec, lam: float) -> float:
    """``min over theta of s (cos theta - f(cos theta))``: the smallest margin penalty any angle
    leaves, evaluated by the one Python definition of the margin (:mod:`angular.ops.reference`)."""
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    cos = torch.cos(theta)
    f = reference.target_logit(cos, m1=margin.m1, m2=margin.m2, m3=margin.m3, lam=lam)
    return float(margin.s * (cos - f).min().clamp_min(0.0))


def _lam_at_rest(margin: MarginSpec) -> float:
    """SphereFace's ``lam`` once annealed (its floor); 0 without a schedule."""
    return 0.0 if margin.lam_schedule is None else margin.lam_schedule.lam_min


def collapsed_loss(margin: MarginSpec, num_classes: int, label_smoothing: float = 0.0) -> float:
    """The cross-entropy of the collapsed state: every logit ``s c`` but the target's ``s f(c)``,
    at the angle where the penalty ``d = s (c - f(c))`` is smallest. With PyTorch's smoothing
    ``eps`` over all C classes::

        log(C - 1 + exp(-d)) + (1 - eps + eps / C) d      ~  log C + (1 - eps) d
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    d = _least_penalty(margin, _lam_at_rest(margin))
    eps, c = label_smoothing, num_classes
    return math.log(c - 1 + math.exp(-d)) + (1.0 - eps + eps / c) * d


def collapse_room(
    margin: MarginSpec, num_classes: int, label_smoothing: float = 0.0
) -> float | None:
    """How far (in nats) the collapsed state's loss sits above chance, ``log C``; the smaller, the
    more easily a head trapped there stays (the ArcFace recipe that collapsed had 1.3).

    None for a purely multiplicative margin (SphereFace: ``m2 = m3 = 0``): its penalty is 0 at
    ``theta = 0``, so a collapsed head scores exactly chance, which training leaves behind in its
    first steps; the bound then says nothing and the monitor alone watches it."""
    if margin.m2 == 0.0 and margin.m3 == 0.0:
        return None
    return collapsed_loss(margin, num_classes, label_smoothing) - math.log(num_classes)


@dataclasses.dataclass(frozen=True)
class CollapseMonitor:
    """The collapse rule of ``train.collapse``, applied after each epoch.

    A head has collapsed when its centres' mean pairwise cosine exceeds ``max_centre_cosine``, or
    when its train accuracy has fallen below ``(1 - max_accuracy_drop)`` of its best epoch's while
    the loss kept falling below that epoch's (a discriminative run loses accuracy only with its
    loss rising). The accuracy rule waits until the best accuracy is at least twice chance."""

    max_centre_cosine: float
    max_accuracy_drop: float

    def verdict(self, history: list[dict], num_classes: int) -> str | None:
        """What collapsed, in words, or None. ``history`` rows as training writes them."""
        row = history[-1]
        # A joint item has a column per head (centre_cosine_<head>): name the head that collapsed.
        keys = [k for k in row if k.startswith("centre_cosine_")] or ["centre_cosine"]
        for key in keys:
            value = row[key]
            if value > self.max_centre_cosine:
                head = key.removeprefix("centre_cosine").lstrip("_") or "the head"
                return (
                    f"the class centres of {head} collapsed onto one direction (mean pairwise "
                    f"cosine {value:.3f} > train.collapse.max_centre_cosine "
                    f"{self.max_centre_cosine})"
                )
        best = max(history, key=lambda r: r["train_accuracy"])
        chance = 1.0 / max(num_classes, 1)
        floor = (1.0 - self.max_accuracy_drop) * best["train_accuracy"]
        if (
            best is not row
            and best["train_accuracy"] >= 2.0 * chance
            and row["train_accuracy"] < floor
            and row["train_loss"] < best["train_loss"]
        ):
            return (
                f"train accuracy fell to {row['train_accuracy']:.3f} from "
                f"{best['train_accuracy']:.3f} at epoch {best['epoch']} while the loss kept "
                f"falling ({best['train_loss']:.3f} -> {row['train_loss']:.3f}): the head is "
                "trading accuracy for a collapsed state"
            )
        return None


# The spread of a fresh network's embeddings is high and falls in the first epochs before training
# spreads them again (lfw-dev: 0.63, 0.34, 0.43 ...), and it moves by up to 40% from one epoch to the
# next; the drift rule compares 3-epoch means from the third epoch on.
SPREAD_SETTLE_EPOCHS = 2
SPREAD_WINDOW = 3


@dataclasses.dataclass(frozen=True)
class DriftMonitor:
    """Partial collapse: the centres drift together, or the embeddings fall onto fewer directions,
    while the training loss still improves (docs/design.md, Collapse). Far from the full collapse
    :class:`CollapseMonitor` stops, it costs verification of unseen people and nothing else shows
    it. Applied after each epoch; it warns, it never stops a run.

    - the centres' mean pairwise cosine rose by more than ``max_centre_cosine_rise`` above its
      lowest value so far, and the loss is below that epoch's;
    - the embedding spread's 3-epoch mean fell below ``(1 - max_spread_drop)`` of its best so far
      (from the third epoch on), and the loss is below that epoch's.

    The thresholds were chosen on the committed runs (digits, ORL, lfw-dev; the healthy ones rise
    by at most 0.21 and drop by at most 0.16) and on the drifting ArcFace run of issue 27
    (0.01 -> 0.47 -> 0.81, spread 0.41 -> 0.21), which both rules flag."""

    max_centre_cosine_rise: float = 0.3
    max_spread_drop: float = 0.3

    def measures(self, history: list[dict]) -> dict[str, float]:
        """The latest epoch's ``centre_cosine_rise`` (the largest over a joint item's heads) and
        ``spread_drop``, nan where the history is too short to say."""
        return {
            "centre_cosine_rise": max(
                (rise for _, rise, _ in self._cosine_rises(history)), default=math.nan
            ),
            "spread_drop": self._spread_drop(history)[0],
        }

    def verdict(self, history: list[dict]) -> str | None:
        """What drifted, in words, or None. ``history`` rows as training writes them."""
        loss = history[-1]["train_loss"]
        for head, rise, low in self._cosine_rises(history):
            if rise > self.max_centre_cosine_rise and loss < low["train_loss"]:
                value = history[-1][f"centre_cosine{head and '_' + head}"]
                return (
                    f"the class centres of {head or 'the head'} drift together: their mean "
                    f"pairwise cosine rose from {value - rise:.3f} at epoch {low['epoch']} to "
                    f"{value:.3f} (> train.collapse.max_centre_cosine_rise "
                    f"{self.max_centre_cosine_rise}) while the loss kept falling"
                )
        drop, best = self._spread_drop(history)
        if drop > self.max_spread_drop and loss < best["train_loss"]:
            return (
                f"the embedding spread (3-epoch mean) fell by {drop:.0%} from its best at epoch "
                f"{best['epoch']} (> train.collapse.max_spread_drop {self.max_spread_drop}) while "
                "the loss kept falling: the embeddings crowd onto fewer directions"
            )
        return None

    @staticmethod
    def _cosine_rises(history: list[dict]):
        """(head, rise above the lowest value so far, the row of that lowest value) per head;
        head is "" for an item of one head."""
        keys = [k for k in history[-1] if k.startswith("centre_cosine_")] or ["centre_cosine"]
        for key in keys:
            rows = [r for r in history if math.isfinite(r[key])]
            if not rows:
                continue
            low = min(rows, key=lambda r: r[key])
            yield key.removeprefix("centre_cosine").lstrip("_"), rows[-1][key] - low[key], low

    @staticmethod
    def _spread_drop(history: list[dict]) -> tuple[float, dict | None]:
        """(how far the latest 3-epoch mean of the spread is below its best, the best's last row)."""
        rows = [
            r
            for r in history[SPREAD_SETTLE_EPOCHS:]
            if math.isfinite(r.get("embedding_spread", math.nan))  # nan: no validation split
        ]
        if len(rows) < SPREAD_WINDOW:
            return math.nan, None
        means = []
        for end in range(SPREAD_WINDOW, len(rows) + 1):
            window = [r["embedding_spread"] for r in rows[end - SPREAD_WINDOW : end]]
            means.append((sum(window) / SPREAD_WINDOW, rows[end - 1]))
        best_mean, best_row = max(means, key=lambda m: m[0])
        if not (math.isfinite(best_mean) and best_mean > 0):
            return math.nan, None
        return 1.0 - means[-1][0] / best_mean, best_row


REMEDY = (
    "Remedies: train.centre_norm (larger centres turn more slowly under Adam; e.g. the square root "
    "of model.embedding_dim), a smaller train.lr, or CosFace (a margin penalty at every angle); see "
    "docs/design.md, Collapse"
)
