"""DPOptimizer(fast_clipping=True) on psgfunc.nn shells equals the grad_sample path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.nn as pnn

DT = torch.float64


def cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        pnn.Conv2d(1, 3, 3, max_batch_size=8, padding=1, padding_mode="circular"),
        torch.nn.ReLU(),
        pnn.LayerNorm([3, 5, 5], max_batch_size=8),
        torch.nn.Flatten(),
        pnn.Linear(3 * 5 * 5, 4, max_batch_size=8),
    ).to(DT)


def run(fast, micro_batches, noise=0.0):
    model = cnn()
    opt = dp.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5),
        max_norm=0.05,
        noise_multiplier=noise,
        expected_batch_size=6,
        seed=3,
        fast_clipping=fast,
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 5, 5, dtype=DT, generator=gen)
    y = torch.randint(0, 4, (6,), generator=gen)
    norms = []
    for idx in micro_batches:
        F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
        if fast:
            assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
        norms.append(opt.accumulate())
    opt.step()
    return [p.detach().clone() for p in model.parameters()], torch.cat(norms)


@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("split", [[slice(0, 6)], [slice(0, 2), slice(2, 6)]])
def test_fast_clipping_equals_grad_sample_path(noise, split):
    slow, slow_norms = run(False, split, noise)
    fast, fast_norms = run(True, split, noise)
    torch.testing.assert_close(fast_norms, slow_norms, rtol=1e-10, atol=0)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_fast_clipping_zero_grad_and_empty_batch():
    model = cnn()
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0,
                         noise_multiplier=0.0, expected_batch_size=4, fast_clipping=True)
    model(torch.randn(2, 1, 5, 5, dtype=DT)).sum().backward()
    opt.zero_grad()  # drops the recorded pieces
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # empty logical batch, zero noise: nothing moves
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_fast_clipping_batch_size_change_in_one_step_is_an_error():
    model = cnn()
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0,  # noqa: F841
                         noise_multiplier=0.0, expected_batch_size=4, fast_clipping=True)
    model(torch.randn(2, 1, 5, 5, dtype=DT)).sum().backward()
    with pytest.raises(ValueError, match="batches of 2 and 3 examples"):
        model(torch.randn(3, 1, 5, 5, dtype=DT))


def test_fast_clipping_empty_batch_through_the_model():
    """A Poisson batch of 0 examples goes through forward/backward; the step is pure noise."""
    model = cnn()
    emb = pnn.Embedding(10, 3, max_batch_size=8).to(DT)
    params = list(model.parameters()) + list(emb.parameters())
    opt = dp.DPOptimizer(torch.optim.SGD(params, lr=1.0), max_norm=1.0, noise_multiplier=1.0,
                         expected_batch_size=4, seed=0, fast_clipping=True)
    before = [p.detach().clone() for p in params]
    out = model(torch.zeros(0, 1, 5, 5, dtype=DT)).sum() + emb(torch.zeros(0, 2, dtype=torch.long)).sum()
    out.backward()
    assert opt.accumulate().shape == (0,)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(params, before))  # noise moved every param


@pytest.mark.parametrize("fast", [False, True])
def test_mean_loss_reduction_equals_sum(fast):
    """loss_reduction="mean" undoes the 1/B of a mean loss: same step as a summed loss."""
    results = []
    for reduction in ["sum", "mean"]:
        model = cnn()
        opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=0.05,
                             noise_multiplier=0.0, expected_batch_size=6,
                             loss_reduction=reduction, fast_clipping=fast)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(6, 1, 5, 5, dtype=DT, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        norms = opt.accumulate()
        opt.step()
        results.append(([p.detach().clone() for p in model.parameters()], norms))
    (ps, ns), (pm, nm) = results
    torch.testing.assert_close(nm, ns, rtol=1e-10, atol=0)
    for a, b in zip(pm, ps):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="loss_reduction"):
        dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=1.0,
                       noise_multiplier=0.0, expected_batch_size=6, loss_reduction="avg")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fast_clipping_clips_gradients_whose_squares_overflow(reduction):
    """Finite float32 per-example gradients of ~3e20 (their squares overflow float32): the
    fast path's norms are not finite, so it clips densely, as the grad_sample path does,
    instead of raising a false 'NaN or Inf' error (review h12), with norms raised a few
    1e-6 to cover their own and the sum's rounding (fast clipping's promise: each
    contribution at most C as computed)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen)
    y = torch.randn(3, 2, generator=gen) * 1e20
    y[1] *= 1e-20  # an ordinary example next to them
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        lin = pnn.Linear(5, 2, max_batch_size=4)
        opt = dp.DPOptimizer(torch.optim.SGD(lin.parameters(), lr=1.0), max_norm=1.0, noise_multiplier=0.0,
                             expected_batch_size=3, fast_clipping=fast, loss_reduction=reduction)
        loss = (lin(x) * y).sum()
        (loss / 3 if reduction == "mean" else loss).backward()
        norms = opt.accumulate()
        opt.step()
        results.append((norms, [p.detach().clone() for p in lin.parameters()]))
    (slow_norms, slow), (fast_norms, fast) = results
    assert bool(torch.isfinite(fast_norms).all()) and float(fast_norms[0]) > 1e20
    assert bool((fast_norms >= slow_norms).all())
    torch.testing.assert_close(fast_norms, slow_norms, rtol=1e-5, atol=0)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fast_clipping_still_raises_on_nan():
    torch.manual_seed(0)
    lin = pnn.Linear(5, 2, max_batch_size=4)
    opt = dp.DPOptimizer(torch.optim.SGD(lin.parameters(), lr=1.0), max_norm=1.0, noise_multiplier=0.0,
                         expected_batch_size=3, fast_clipping=True)
    y = torch.ones(3, 2)
    y[2, 0] = float("nan")
    (lin(torch.randn(3, 5)) * y).sum().backward()
    with pytest.raises(ValueError, match=r"1 of 3 examples have NaN or Inf.*indices 2"):
        opt.accumulate()


@pytest.mark.parametrize("fast", [False, True])
def test_max_norm_too_small_for_float16_params_is_refused(fast):
    """Float16 sums round by up to 2^-25 per coordinate below float16's smallest normal
    number: a max_norm under twice sqrt(size) * 2^-25 (here about 1.9e-6) is
    refused by either path, naming max_norm, rather than clipped past C."""
    torch.manual_seed(0)
    lin = pnn.Linear(1024, 1, max_batch_size=4).to(torch.float16)
    opt = dp.DPOptimizer(torch.optim.SGD(lin.parameters(), lr=1.0), max_norm=1e-6, noise_multiplier=0.0,
                         expected_batch_size=2, fast_clipping=fast)
    lin(torch.ones(2, 1024, dtype=torch.float16)).sum().backward()
    with pytest.raises(ValueError, match="max_norm 1e-06 is too small for half-precision"):
        opt.accumulate()
