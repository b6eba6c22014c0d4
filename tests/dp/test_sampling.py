"""Poisson sampling: batch sizes ~ Binomial(N, q), empty batches with the right shapes."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

import psgfunc.dp as dp


def test_batch_sizes_have_mean_qn_and_binomial_variance():
    n, q, steps = 1000, 0.05, 400
    sizes = torch.tensor(
        [len(b) for b in dp.poisson_batches(n, q, steps, generator=torch.Generator().manual_seed(0))],
        dtype=torch.float64,
    )
    assert sizes.numel() == steps
    # the mean of 400 Binomial(1000, 0.05) has sd sqrt(47.5 / 400) = 0.34: allow 5 sd
    assert abs(sizes.mean().item() - n * q) < 5 * (n * q * (1 - q) / steps) ** 0.5
    assert abs(sizes.var().item() / (n * q * (1 - q)) - 1) < 0.25


def test_each_example_is_included_with_probability_q():
    n, q, steps = 20, 0.3, 3000
    counts = torch.zeros(n)
    for idx in dp.poisson_batches(n, q, steps, generator=torch.Generator().manual_seed(1)):
        assert idx.dtype == torch.int64
        assert torch.equal(idx, idx.unique())  # sorted, no repeats
        counts[idx] += 1
    # per example: Binomial(3000, 0.3), sd 25; allow 5 sd
    assert ((counts - steps * q).abs() < 5 * (steps * q * (1 - q)) ** 0.5).all()


def test_empty_batches_are_yielded_and_default_steps():
    batches = list(dp.poisson_batches(10, 0.05, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 20  # round(1 / q)
    assert any(b.numel() == 0 for b in batches)  # P(empty) = 0.95^10 = 0.6
    assert all(b.shape == (b.numel(),) for b in batches)
    assert list(dp.poisson_batches(10, 0.5, 0)) == []


def test_same_generator_seed_same_batches():
    a = list(dp.poisson_batches(50, 0.2, 5, generator=torch.Generator().manual_seed(3)))
    b = list(dp.poisson_batches(50, 0.2, 5, generator=torch.Generator().manual_seed(3)))
    c = list(dp.poisson_batches(50, 0.2, 5, generator=torch.Generator().manual_seed(4)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_full_rate_takes_everything():
    assert all(len(b) == 7 for b in dp.poisson_batches(7, 1.0, 3))


def test_batch_sampler_in_a_dataloader():
    sampler = dp.PoissonBatchSampler(100, 0.1, steps=30, generator=torch.Generator().manual_seed(0))
    assert len(sampler) == 30
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(100.0)), batch_sampler=sampler)
    sizes = [len(xb) for (xb,) in loader]
    assert len(sizes) == 30 and len(set(sizes)) > 1


def test_loader_empty_batches_have_shapes():
    x = torch.randn(10, 1, 4, 4)
    y = torch.arange(10)
    loader = dp.PoissonDataLoader(torch.utils.data.TensorDataset(x, y), 0.05, steps=40,
                                  generator=torch.Generator().manual_seed(0))
    assert len(loader) == 40
    seen_empty = seen_full = False
    for xb, yb in loader:
        assert xb.shape[1:] == (1, 4, 4) and xb.dtype == x.dtype and yb.dtype == y.dtype
        assert xb.shape[0] == yb.shape[0]
        seen_empty |= xb.shape[0] == 0
        seen_full |= xb.shape[0] > 0
    assert seen_empty and seen_full


Pair = namedtuple("Pair", ["image", "label"])


class DictData(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)), "name": f"ex{i}", "pair": Pair(torch.zeros(2, 2), i)}


def test_loader_empty_batch_of_nested_examples():
    loader = dp.PoissonDataLoader(DictData(), 0.01, steps=1, generator=torch.Generator().manual_seed(0))
    (batch,) = list(loader)  # P(empty) = 0.99^5
    assert batch["x"].shape == (0, 3)
    assert batch["name"] == []
    assert isinstance(batch["pair"], Pair)
    assert batch["pair"].image.shape == (0, 2, 2) and batch["pair"].label.shape == (0,)


def test_loader_custom_collate_and_workers_arguments():
    def collate(examples):
        return torch.stack([e[0] for e in examples]) * 2

    ds = torch.utils.data.TensorDataset(torch.ones(8, 3))
    loader = dp.PoissonDataLoader(ds, 0.5, steps=10, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    for xb in loader:
        assert xb.shape[1:] == (3,) and (xb == 2).all()


def test_sampling_errors():
    for bad_q in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="sample_rate"):
            next(dp.poisson_batches(10, bad_q, 1))
        with pytest.raises(ValueError, match="sample_rate"):
            dp.PoissonBatchSampler(10, bad_q)
    for bad_n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_examples"):
            next(dp.poisson_batches(bad_n, 0.5, 1))
    with pytest.raises(ValueError, match="steps"):
        next(dp.poisson_batches(10, 0.5, -1))
    with pytest.raises(ValueError, match="steps"):
        dp.PoissonBatchSampler(10, 0.5, steps=1.5)
    ds = torch.utils.data.TensorDataset(torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"\['batch_size', 'shuffle'\] cannot be set"):
        dp.PoissonDataLoader(ds, 0.5, batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match="dataset is empty"):
        dp.PoissonDataLoader(torch.utils.data.TensorDataset(torch.ones(0, 2)), 0.5)
    with pytest.raises(ValueError, match="map-style"):
        dp.PoissonDataLoader(iter([1, 2]), 0.5)


def test_loader_collate_without_batch_structure_raises_on_empty_batch():
    ds = torch.utils.data.TensorDataset(torch.ones(3, 2))
    loader = dp.PoissonDataLoader(ds, 0.001, steps=1, collate_fn=len, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cannot build an empty batch from a collated int"):
        list(loader)
