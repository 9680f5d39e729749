"""Prioritized sampling of training images (``train.sampler: prioritized``; docs/design.md, Heads
and backbones): the original repository's prioritized replay, after Schaul et al. 2016
("Prioritized Experience Replay", proportional variant).

Each training image ``i`` has a priority ``p_i = (loss_i + eps)^alpha``, ``loss_i`` its latest
per-sample loss (the heads' losses summed, ``reduction="none"``). Each batch is drawn with
replacement with ``P(i) = p_i / sum_j p_j`` and each of its losses is weighted by the importance
weight ``w_i = (N P(i))^-beta / max_j (N P(j))^-beta`` (at most 1), which undoes the bias of the
non-uniform draw as ``beta -> 1``. An image not drawn yet has the largest priority seen so far, so
that every image is likely to be seen early (as replay buffers treat new transitions).

The draws use the loop's seeded generator (saved in checkpoints), and :meth:`state_dict` holds the
priorities: a run resumed from a checkpoint draws what an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping

import torch
from torch.utils.data import Dataset, RandomSampler, Sampler

__all__ = ["EpochBatchSampler", "IndexedDataset", "PrioritizedSampler", "order_permutation"]


class IndexedDataset(Dataset):
    """``dataset[i]`` followed by ``i``: the loop needs the index to update its priority."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


class PrioritizedSampler(Sampler[list[int]]):
    """A batch sampler (``DataLoader(batch_sampler=...)``) drawing each batch from the current
    priorities. An epoch has as many batches, of the same sizes, as a shuffled pass over the data
    (``drop_last``: leave out a last, smaller batch)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        alpha: float,
        beta: float,
        eps: float,
        generator: torch.Generator,
        drop_last: bool = False,
    ):
        super().__init__()
        for name, value in (("size", size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value, valid in (
            ("alpha", alpha, alpha >= 0),
            ("beta", beta, 0 <= beta <= 1),
            ("eps", eps, eps > 0),
        ):
            if not (math.isfinite(value) and valid):
                raise ValueError(f"{name} is out of range: {value!r}")
        self.size, self.batch_size, self.drop_last = size, batch_size, drop_last
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.generator = generator
        self.priorities = torch.ones(size, dtype=torch.float64)
        self.seen = torch.zeros(size, dtype=torch.bool)
        self.skip = 0  # batches of the next pass already taken (a resume within an epoch)

    def resume_after(self, batches: int) -> None:
        """The next pass draws only the epoch's batches after its first ``batches`` (the draws
        continue from the generator's state, which the checkpoint restores)."""
        self.skip = int(batches)

    def _batch_sizes(self) -> list[int]:
        full, rest = divmod(self.size, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest and not self.drop_last else [])

    def __len__(self) -> int:
        return len(self._batch_sizes())

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for size in self._batch_sizes()[skip:]:
            draw = torch.multinomial(
                self.probabilities(), size, replacement=True, generator=self.generator
            )
            yield draw.tolist()

    def probabilities(self) -> torch.Tensor:
        """``P(i)`` of every image (float64)."""
        return self.priorities / self.priorities.sum()

    def weights(self, indices: torch.Tensor) -> torch.Tensor:
        """Importance weights (float32, at most 1) of the images ``indices`` under the current
        priorities."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        probabilities = self.probabilities()
        weights = (self.size * probabilities[indices]) ** -self.beta
        largest = (self.size * probabilities.min()) ** -self.beta
        return (weights / largest).float()

    @torch.no_grad()
    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """New priorities ``(loss + eps)^alpha`` from the per-sample losses of a batch; an image
        drawn twice in the batch gets the mean of its two priorities."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        losses = losses.detach().to(device="cpu", dtype=torch.float64)
        if indices.shape != losses.shape or indices.dim() != 1:
            raise ValueError(
                f"indices and losses must be (B,) alike, got {tuple(indices.shape)} and "
                f"{tuple(losses.shape)}"
            )
        if not torch.isfinite(losses).all() or (losses < 0).any():
            raise ValueError("losses must be finite and >= 0 to become priorities")
        priorities = (losses + self.eps) ** self.alpha
        sums = torch.zeros_like(self.priorities).index_add_(0, indices, priorities)
        counts = torch.zeros_like(self.priorities).index_add_(0, indices, torch.ones_like(losses))
        drawn = counts > 0
        self.priorities[drawn] = sums[drawn] / counts[drawn]
        self.seen[indices] = True
        self.priorities[~self.seen] = self.priorities[self.seen].max()

    def state_dict(self) -> dict:
        return {"priorities": self.priorities.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        priorities, seen = state["priorities"], state["seen"]
        if priorities.shape != (self.size,) or seen.shape != (self.size,):
            raise ValueError(
                f"the sampler state holds {priorities.shape[0]} priorities, the data {self.size}"
            )
        self.priorities = priorities.to(torch.float64).clone()
        self.seen = seen.to(torch.bool).clone()


class EpochBatchSampler(Sampler[list[int]]):
    """The batches one rank takes each epoch, resumable at any point of the epoch, on any world
    size (docs/design.md, "Resume").

    Each epoch has an *order*, a permutation of the ``size`` images. One process (``generator``
    given, ``world_size`` 1): the permutation torch's ``RandomSampler`` draws from the loader's
    seeded generator, drawn exactly as ``DataLoader(shuffle=True)`` draws it (today's order, bitwise);
    the order is recorded as the generator's state before that draw. Several processes: the
    permutation of a generator seeded ``seed + epoch`` (``DistributedSampler``'s); the order is that
    seed. Rank r of W takes positions r, r + W, ... of the permutation (its ``size mod W`` last
    images are dropped, so every rank has as many) and cuts them into batches of ``batch_size``; a
    last batch of one image is dropped (it would break batch norm).

    "Where an epoch stopped" is its order and its *position*: the images of the permutation the
    ranks consumed together (the global batches taken). :meth:`resume` makes the next pass continue
    from there, on this world size or another: the rest of the permutation is cut as above (the
    rest's ``len mod W`` last images dropped). On the world size that stopped this gives exactly the
    batches the uninterrupted pass would have given.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (("size", size), ("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if generator is None and world_size == 1:
            raise ValueError("one process draws its order from a generator: give one")
        self.size, self.batch_size = size, batch_size
        self.world_size, self.rank = world_size, rank
        self.generator, self.seed = generator, seed
        self.epoch = 0
        self.order: dict | None = None  # the order of the pass under way (or last)
        self.pending: tuple[dict, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, order: dict, position: int) -> None:
        """The next pass continues the epoch of ``order`` after its first ``position`` images."""
        if not 0 <= position <= self.size:
            raise ValueError(f"position must be in [0, {self.size}], got {position!r}")
        self.pending = (dict(order), int(position))
        self.order = self.pending[0]

    def __len__(self) -> int:
        """The batches of a whole epoch (from its start)."""
        return self.batches_of((self.size - self.size % self.world_size) // self.world_size)

    def batches_of(self, images: int) -> int:
        full, rest = divmod(images, self.batch_size)
        return full + (rest > 1)

    def __iter__(self) -> Iterator[list[int]]:
        if self.pending is not None:
            order, position = self.pending
            self.pending = None
        else:
            order, position = self.fresh_order(), 0
        self.order = order
        if "generator" in order and self.world_size == 1 and self.generator is not None:
            # One process: RandomSampler's own pass (it draws a second, empty permutation at its
            # end), so that the generator moves on exactly as in an uninterrupted run.
            self.generator.set_state(order["generator"])
            indices = iter(RandomSampler(range(self.size), generator=self.generator))
            for _ in itertools.islice(indices, position):
                pass
        else:
            rest = order_permutation(order, self.size)[position:]
            rest = rest[: len(rest) - len(rest) % self.world_size]
            indices = iter(rest[self.rank :: self.world_size].tolist())
        batch = list(itertools.islice(indices, self.batch_size))
        while batch:
            following = list(itertools.islice(indices, self.batch_size))
            if following or len(batch) > 1 or self.batch_size == 1:
                yield batch
            batch = following

    def fresh_order(self) -> dict:
        if self.world_size == 1:
            return {"generator": self.generator.get_state()}
        return {"seed": self.seed + self.epoch}


def order_permutation(order: Mapping, size: int) -> torch.Tensor:
    """The permutation of ``size`` images an epoch's order (:class:`EpochBatchSampler`) names."""
    generator = torch.Generator()
    if "generator" in order:
        generator.set_state(order["generator"])
    else:
        generator.manual_seed(int(order["seed"]))
    return torch.randperm(size, generator=generator)
