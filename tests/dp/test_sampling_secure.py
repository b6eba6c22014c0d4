"""Sampling the accountant can rely on: secure=True is unpredictable, a generator reproducible,
neither consumes torch's global generator; distributed shards are cut from one Poisson sample.

(The multi-process checks of ``distributed=True`` are in tests/dp/test_distributed.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import psgfunc.dp as dp
from psgfunc.dp._sampling import _draw

N, Q, STEPS = 200, 0.1, 6
DATA = TensorDataset(torch.arange(float(N)), torch.arange(N))


def _batches(kind: str, **kw) -> list[torch.Tensor]:
    """The STEPS batches of indices drawn by one of the three samplers."""
    if kind == "poisson_batches":
        return list(dp.poisson_batches(N, Q, STEPS, **kw))
    if kind == "sampler":
        return [torch.tensor(b, dtype=torch.int64) for b in dp.PoissonBatchSampler(N, Q, steps=STEPS, **kw)]
    return [y for _, y in dp.PoissonDataLoader(DATA, Q, steps=STEPS, **kw)]


KINDS = ["poisson_batches", "sampler", "loader"]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_default_repeats_after_manual_seed_secure_does_not(kind):
    torch.manual_seed(0)
    plain1 = _batches(kind)
    torch.manual_seed(0)
    plain2 = _batches(kind)
    assert _same(plain1, plain2)  # the predictable default the accountant must not rely on
    torch.manual_seed(0)
    secure1 = _batches(kind, secure=True)
    torch.manual_seed(0)
    secure2 = _batches(kind, secure=True)
    assert not _same(secure1, secure2)
    assert not _same(secure1, plain1)


@pytest.mark.parametrize("kind", KINDS)
def test_generator_reproduces_the_batches(kind):
    a = _batches(kind, generator=torch.Generator().manual_seed(5))
    b = _batches(kind, generator=torch.Generator().manual_seed(5))
    c = _batches(kind, generator=torch.Generator().manual_seed(6))
    assert _same(a, b) and not _same(a, c)
    assert sum(len(x) for x in a) > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ["generator", "secure"])
def test_global_generator_is_not_consumed(kind, source):
    kw = {"generator": torch.Generator().manual_seed(1)} if source == "generator" else {"secure": True}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _batches(kind, **kw)
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_with_generator_keeps_the_old_batches():
    """The loader's own base seed comes from a private generator: the batches drawn from the
    user's generator are exactly those of poisson_batches with the same seed."""
    loader = [y for _, y in dp.PoissonDataLoader(DATA, Q, steps=STEPS, generator=torch.Generator().manual_seed(2))]
    direct = list(dp.poisson_batches(N, Q, STEPS, generator=torch.Generator().manual_seed(2)))
    assert _same(loader, direct)


def test_secure_batches_are_poisson():
    n, q, steps = 30, 0.3, 2000
    counts = torch.zeros(n)
    sizes = []
    for idx in dp.poisson_batches(n, q, steps, secure=True):
        assert torch.equal(idx, idx.unique())
        counts[idx] += 1
        sizes.append(len(idx))
    # per example Binomial(2000, 0.3), sd 20.5; allow 5 sd
    assert ((counts - steps * q).abs() < 5 * (steps * q * (1 - q)) ** 0.5).all()
    assert 0 < min(sizes) or max(sizes) <= n


def test_secure_and_generator_exclude_each_other():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="poisson_batches: generator and secure=True exclude each other"):
        dp.poisson_batches(N, Q, generator=g, secure=True)
    with pytest.raises(ValueError, match="PoissonBatchSampler: generator and secure=True"):
        dp.PoissonBatchSampler(N, Q, generator=g, secure=True)
    with pytest.raises(ValueError, match="PoissonBatchSampler: generator and secure=True"):
        dp.PoissonDataLoader(DATA, Q, generator=g, secure=True)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        dp.poisson_batches(N, Q, generator=0)


def test_distributed_without_a_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"torch\.distributed\.init_process_group"):
        dp.poisson_batches(N, Q, distributed=True)
    with pytest.raises(ValueError, match=r"PoissonBatchSampler: distributed=True but .*init_process_group"):
        dp.PoissonBatchSampler(N, Q, distributed=True)
    with pytest.raises(ValueError, match=r"init_process_group"):
        dp.PoissonDataLoader(DATA, Q, distributed=True)
    with pytest.raises(ValueError, match="distributed must be False, True"):
        dp.PoissonBatchSampler(N, Q, distributed="gloo")


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cut_one_sample(world):
    """Same stream on every rank: the shards are disjoint and their union is the sample."""
    for seed in range(5):
        whole = _draw(N, 0.3, torch.Generator().manual_seed(seed))
        shards = [_draw(N, 0.3, torch.Generator().manual_seed(seed), shard=(r, world)) for r in range(world)]
        assert all(bool((s % world == r).all()) for r, s in enumerate(shards))
        assert torch.equal(torch.cat(shards).sort().values, whole)
