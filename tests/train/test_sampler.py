"""The prioritized sampler (``angular.train.sampler``): batches of a shuffled pass's sizes, draws
in proportion to ``(loss + eps)^alpha``, importance weights ``(N P)^-beta`` over their largest,
priorities from per-sample losses, unseen images at the largest priority, seeded repeatability and
its state in a checkpoint."""

from __future__ import annotations

import pytest
import torch

from angular.train.sampler import IndexedDataset, PrioritizedSampler


def _sampler(size=10, batch_size=4, seed=0, **kw) -> PrioritizedSampler:
    settings = dict(alpha=0.6, beta=0.4, eps=1e-6) | kw
    return PrioritizedSampler(
        size, batch_size, generator=torch.Generator().manual_seed(seed), **settings
    )


def test_an_epoch_has_the_batches_of_a_shuffled_pass():
    assert [len(batch) for batch in _sampler(10, 4)] == [4, 4, 2]
    assert [len(batch) for batch in _sampler(9, 4, drop_last=True)] == [4, 4]
    assert len(_sampler(10, 4)) == 3 and len(_sampler(8, 4)) == 2
    assert all(0 <= i < 10 for batch in _sampler(10, 4) for i in batch)


def test_priorities_weights_and_unseen_images():
    sampler = _sampler(5, 3, alpha=0.5, beta=0.7, eps=0.01)
    losses = torch.rand(3, dtype=torch.float64) * 4
    sampler.update(torch.tensor([4, 0, 2]), losses)
    expected = (losses + 0.01) ** 0.5
    assert torch.equal(sampler.priorities[[4, 0, 2]], expected)
    # Images not drawn yet (1, 3) sit at the largest priority seen.
    assert torch.equal(sampler.priorities[[1, 3]], expected.max().repeat(2))
    probabilities = sampler.probabilities()
    torch.testing.assert_close(probabilities, sampler.priorities / sampler.priorities.sum())
    weights = sampler.weights(torch.tensor([0, 1, 2]))
    raw = (5 * probabilities) ** -0.7
    torch.testing.assert_close(weights, (raw[[0, 1, 2]] / raw.max()).float())
    assert weights.max() <= 1.0
    # An image drawn twice in a batch gets the mean of its priorities.
    sampler.update(torch.tensor([3, 3]), torch.tensor([1.0, 3.0]))
    assert sampler.priorities[3] == pytest.approx(((1.01**0.5) + (3.01**0.5)) / 2)


def test_draws_follow_the_priorities():
    sampler = _sampler(4, 2, seed=1, alpha=1.0, eps=1e-9)
    sampler.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    drawn = [i for _ in range(1000) for batch in sampler for i in batch]
    counts = torch.bincount(torch.tensor(drawn), minlength=4).double()
    # 4000 draws: each share within 4 standard deviations of p (1/10, 2/10, 3/10, 4/10).
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert ((counts / 4000 - p).abs() < 4 * (p * (1 - p) / 4000).sqrt()).all()
    # With alpha = 0 every priority is 1: uniform draws and weights of 1.
    flat = _sampler(4, 2, alpha=0.0)
    flat.update(torch.tensor([0, 1]), torch.tensor([0.1, 9.0]))
    assert torch.equal(flat.weights(torch.arange(4)), torch.ones(4))


def test_seeded_repeatable_and_resumable():
    def run(sampler, epochs):
        drawn = []
        for _ in range(epochs):
            for batch in sampler:
                drawn.append(batch)
                sampler.update(torch.tensor(batch), torch.tensor(batch, dtype=torch.float64))
        return drawn

    uninterrupted = run(_sampler(seed=5), 3)
    assert uninterrupted == run(_sampler(seed=5), 3)
    assert uninterrupted != run(_sampler(seed=6), 3)
    first = _sampler(seed=5)
    head = run(first, 1)
    state, generator_state = first.state_dict(), first.generator.get_state()
    resumed = _sampler(seed=123)
    resumed.load_state_dict(state)
    resumed.generator.set_state(generator_state)
    assert head + run(resumed, 2) == uninterrupted


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        _sampler(10, 0)
    with pytest.raises(ValueError, match="beta is out of range"):
        _sampler(beta=1.5)
    with pytest.raises(ValueError, match="eps is out of range"):
        _sampler(eps=0.0)
    sampler = _sampler()
    with pytest.raises(ValueError, match="losses must be finite"):
        sampler.update(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"indices and losses must be \(B,\) alike"):
        sampler.update(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="holds 3 priorities, the data 10"):
        sampler.load_state_dict({"priorities": torch.ones(3), "seen": torch.zeros(3)})


def test_indexed_dataset_appends_the_index():
    data = IndexedDataset([(torch.zeros(1), 3), (torch.ones(1), 5)])
    assert len(data) == 2 and data[1][1:] == (5, 1)
