"""A DP-SGD step two ways: dp_sgd_transform and DPOptimizer give identical numbers."""

from __future__ import annotations

import pytest
import torch

import psgfunc as pf
import psgfunc.dp as dp
from tests.oracles import assert_tree_close, per_example_grads

D_IN, D_OUT = 4, 3


def loss_fn(params, x, y):
    """Cross-entropy of a tanh-linear model on ONE example: x [D_IN], y [] -> []."""
    w, b = params
    logits = torch.tanh(x @ w.T + b)
    return torch.nn.functional.cross_entropy(logits[None], y[None])


def make(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64),
        torch.randn(D_OUT, generator=gen, dtype=torch.float64),
    ]
    x = 3 * torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, D_OUT, (n,), generator=gen)
    return params, x, y


def dp_opt_for(params, lr=0.5, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = dp.DPOptimizer(torch.optim.SGD(ps, lr=lr), **kw)
    return ps, opt


def test_huge_clip_zero_noise_is_plain_mean_gradient():
    params, x, y = make(8)
    grads = pf.per_sample_grads(loss_fn, params, x, y)
    t = dp.dp_sgd_transform(torch.finfo(torch.float32).max, 0.0, expected_batch_size=8, seed=0)
    update, _ = t.update(grads, t.init(params))
    ps = [p.clone().requires_grad_(True) for p in params]
    mean_loss = torch.stack([loss_fn(ps, x[i], y[i]) for i in range(8)]).mean()
    expected = torch.autograd.grad(mean_loss, ps)
    assert_tree_close(update, list(expected), rtol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_transform_and_optimizer_agree(sigma):
    params, x, y = make(6)
    grads = per_example_grads(loss_fn, params, x, y)
    t = dp.dp_sgd_transform(0.8, sigma, expected_batch_size=5, seed=11)
    state = t.init(params)
    ps, opt = dp_opt_for(params, max_norm=0.8, noise_multiplier=sigma, expected_batch_size=5, seed=11)
    for _ in range(3):
        update, state = t.update(grads, state)
        expected = [p - 0.5 * u for p, u in zip(params, update)]
        for p, g in zip(ps, grads):
            p.grad_sample = g
        opt.step()
        assert_tree_close([p.detach() for p in ps], expected, rtol=1e-12)
        assert all(p.grad_sample is None for p in ps)
        params = expected
    assert opt.dp_state.step == state.step == 3


def test_optimizer_with_adam_and_set_grad_sample():
    params, x, y = make(6)
    names = {"weight": torch.nn.Parameter(params[0].clone()), "bias": torch.nn.Parameter(params[1].clone())}
    opt = dp.DPOptimizer(torch.optim.Adam(list(names.values()), lr=0.1), max_norm=1.0,
                         noise_multiplier=0.5, expected_batch_size=6, seed=2)

    def fn(p, xb, yb):
        return loss_fn([p["weight"], p["bias"]], xb, yb)

    grads = pf.per_sample_grads(fn, {k: v.detach() for k, v in names.items()}, x, y)
    opt.set_grad_sample(names, grads)
    assert names["weight"].grad_sample.shape == (6, D_OUT, D_IN)
    # reference: the transform on the list in the optimizer's order, then plain Adam
    t = dp.dp_sgd_transform(1.0, 0.5, expected_batch_size=6, seed=2)
    update, _ = t.update([grads["weight"], grads["bias"]], t.init(params))
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    for p, u in zip(ref, update):
        p.grad = u
    ref_opt = torch.optim.Adam(ref, lr=0.1)
    ref_opt.step()
    opt.step()
    assert_tree_close([names["weight"].detach(), names["bias"].detach()], [p.detach() for p in ref], rtol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.9])
def test_accumulating_two_halves_equals_one_full_batch(sigma):
    params, x, y = make(10)
    grads = per_example_grads(loss_fn, params, x, y)
    kw = dict(max_norm=0.5, noise_multiplier=sigma, expected_batch_size=10, seed=4)
    full, opt_full = dp_opt_for(params, **kw)
    for p, g in zip(full, grads):
        p.grad_sample = g
    opt_full.step()
    half, opt_half = dp_opt_for(params, **kw)
    for part in (slice(0, 4), slice(4, 10)):
        opt_half.zero_grad()  # between micro-batches: keeps the running clipped sum
        for p, g in zip(half, grads):
            p.grad_sample = g[part]
        norms = opt_half.accumulate()
        assert norms.shape == (part.stop - part.start,)
    assert opt_half.accumulated_examples == 10
    opt_half.step()
    assert_tree_close([p.detach() for p in half], [p.detach() for p in full], rtol=1e-12)
    assert opt_half.dp_state.step == 1  # noise was added once


def test_step_finishes_the_last_micro_batch():
    params, x, y = make(6)
    grads = per_example_grads(loss_fn, params, x, y)
    kw = dict(max_norm=0.5, noise_multiplier=0.0, expected_batch_size=6, seed=0)
    full, opt_full = dp_opt_for(params, **kw)
    for p, g in zip(full, grads):
        p.grad_sample = g
    opt_full.step()
    split, opt_split = dp_opt_for(params, **kw)
    for p, g in zip(split, grads):
        p.grad_sample = g[:2]
    opt_split.accumulate()
    for p, g in zip(split, grads):
        p.grad_sample = g[2:]
    opt_split.step()  # accumulates the remaining 4 itself
    assert_tree_close([p.detach() for p in split], [p.detach() for p in full], rtol=1e-12)


@pytest.mark.parametrize("how", ["no grad_sample", "leading zero"])
def test_empty_poisson_batch_is_a_pure_noise_step(how):
    params, _, _ = make(1)
    ps, opt = dp_opt_for(params, lr=1.0, max_norm=2.0, noise_multiplier=1.0, expected_batch_size=3, seed=5)
    if how == "leading zero":
        for p in ps:
            p.grad_sample = p.new_zeros((0, *p.shape))
    opt.step()
    t = dp.dp_sgd_transform(2.0, 1.0, expected_batch_size=3, seed=5)
    noise, _ = t.update([p.new_zeros((0, *p.shape)) for p in params], t.init(params))
    assert_tree_close([p.detach() for p in ps], [p - n for p, n in zip(params, noise)], rtol=1e-12)
    assert all((p.detach() != q).all() for p, q in zip(ps, params))


def test_zero_grad_clears_grad_and_grad_sample():
    params, _, _ = make(1)
    ps, opt = dp_opt_for(params, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, seed=0)
    for p in ps:
        p.grad = torch.ones_like(p)
        p.grad_sample = torch.ones(2, *p.shape, dtype=p.dtype)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad_sample is None and not p.grad.any() for p in ps)
    opt.zero_grad()
    assert all(p.grad is None and p.grad_sample is None for p in ps)


def test_backward_grad_is_replaced_not_used():
    params, x, y = make(4)
    grads = per_example_grads(loss_fn, params, x, y)
    kw = dict(max_norm=1.0, noise_multiplier=0.0, expected_batch_size=4, seed=0)
    a, opt_a = dp_opt_for(params, **kw)
    b, opt_b = dp_opt_for(params, **kw)
    for pa, pb, g in zip(a, b, grads):
        pa.grad_sample, pb.grad_sample = g, g
        pb.grad = torch.full_like(pb, 1e6)  # a non-private gradient left by backward
    opt_a.step()
    opt_b.step()
    assert_tree_close([p.detach() for p in a], [p.detach() for p in b], rtol=0)


def test_frozen_parameters_are_skipped():
    params, x, y = make(4)
    grads = per_example_grads(loss_fn, params, x, y)
    ps, opt = dp_opt_for(params, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, seed=0)
    ps[1].requires_grad_(False)
    ps[0].grad_sample = grads[0]
    opt.step()
    assert torch.equal(ps[1].detach(), params[1])
    assert not torch.equal(ps[0].detach(), params[0])


def test_lr_scheduler_accepts_the_wrapper():
    params, _, _ = make(1)
    ps, opt = dp_opt_for(params, lr=1.0, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=2, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == opt.optimizer.param_groups[0]["lr"] == 0.5
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.5


def test_closure_is_called_and_returned():
    params, x, y = make(3)
    ps, opt = dp_opt_for(params, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=3, seed=0)

    def closure():
        g = per_example_grads(loss_fn, [p.detach() for p in ps], x, y)
        for p, gi in zip(ps, g):
            p.grad_sample = gi
        return torch.tensor(1.5)

    assert opt.step(closure).item() == 1.5
    assert not torch.equal(ps[0].detach(), params[0])


def test_end_to_end_with_poisson_loader_and_empty_batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, D_OUT, (12,), generator=gen)
    loader = dp.PoissonDataLoader(torch.utils.data.TensorDataset(x, y), 0.1, steps=20,
                                  generator=torch.Generator().manual_seed(1))
    params, _, _ = make(1)
    names = {"w": torch.nn.Parameter(params[0].clone()), "b": torch.nn.Parameter(params[1].clone())}
    opt = dp.DPOptimizer(torch.optim.SGD(list(names.values()), lr=0.1), max_norm=1.0,
                         noise_multiplier=1.0, expected_batch_size=1.2, seed=0)
    sizes = []
    for xb, yb in loader:
        sizes.append(len(xb))
        grads = pf.per_sample_grads(lambda p, xi, yi: loss_fn([p["w"], p["b"]], xi, yi),
                                    {k: v.detach() for k, v in names.items()}, xb, yb)
        opt.set_grad_sample(names, grads)
        opt.step()
        opt.zero_grad()
    assert 0 in sizes and max(sizes) > 0 and opt.dp_state.step == 20
    assert all(torch.isfinite(p).all() for p in names.values())


def test_optimizer_errors():
    params, x, y = make(4)
    grads = per_example_grads(loss_fn, params, x, y)
    ps, opt = dp_opt_for(params, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, seed=0)
    ps[0].grad_sample = grads[0]
    with pytest.raises(ValueError, match=r"#1 shape \(3,\).*have no grad_sample while others do"):
        opt.step()
    ps[1].grad_sample = grads[1][:, :2]
    with pytest.raises(ValueError, match=r"grad_sample has shape \(4, 2\), expected \[B, 3\]"):
        opt.step()
    ps[1].grad_sample = grads[1][:3]
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        opt.step()
    bad = grads[1].clone()
    bad[2, 0] = float("nan")
    ps[1].grad_sample = bad
    with pytest.raises(ValueError, match="1 of 4 examples have NaN or Inf"):
        opt.step()
    with pytest.raises(ValueError, match="must be one float"):
        dp.DPOptimizer(torch.optim.SGD(ps, lr=1.0), max_norm={"a": 1.0}, noise_multiplier=1.0,
                       expected_batch_size=2)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        dp.DPOptimizer(ps, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2)
    with pytest.raises(ValueError, match="max_norm"):
        dp.DPOptimizer(torch.optim.SGD(ps, lr=1.0), max_norm=-1.0, noise_multiplier=1.0,
                       expected_batch_size=2)
    with pytest.raises(ValueError, match="seed and secure"):
        dp.DPOptimizer(torch.optim.SGD(ps, lr=1.0), max_norm=1.0, noise_multiplier=1.0,
                       expected_batch_size=2, seed=0, secure=True)
    with pytest.raises(ValueError, match="structure"):
        opt.set_grad_sample(ps, grads[:1])
    with pytest.raises(ValueError, match="not a parameter of the wrapped optimizer"):
        opt.set_grad_sample([torch.zeros(3, 4), ps[1]], grads)
    with pytest.raises(ValueError, match=r"expected \[B, 3, 4\]"):
        opt.set_grad_sample(ps, [grads[0][:, :2], grads[1]])


def test_add_param_group_during_accumulation_raises():
    params, x, y = make(4)
    grads = per_example_grads(loss_fn, params, x, y)
    ps, opt = dp_opt_for(params, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=4, seed=0)
    for p, g in zip(ps, grads):
        p.grad_sample = g
    opt.accumulate()
    with pytest.raises(ValueError, match="call step\\(\\) first"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    opt.step()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_state_dict_resumes_the_noise_stream():
    """A run saved after two steps and resumed in a fresh optimizer draws the same noise as
    the uninterrupted run; with secure=True the generator is not saved; a half-accumulated
    logical batch refuses to be saved."""
    params, x, y = make(4)
    grads = per_example_grads(loss_fn, params, x, y)
    kw = dict(max_norm=0.5, noise_multiplier=1.0, expected_batch_size=4)

    def step(ps, opt):
        for p, g in zip(ps, grads):
            p.grad_sample = g
        opt.step()

    ps, opt = dp_opt_for(params, seed=3, **kw)
    step(ps, opt)
    step(ps, opt)
    saved = {"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()}
    step(ps, opt)
    assert saved["opt"]["psgfunc_dp"]["step"] == 2

    resumed, opt2 = dp_opt_for(saved["params"], seed=99, **kw)  # another seed: restored below
    opt2.load_state_dict(saved["opt"])
    assert opt2.dp_state.step == 2
    step(resumed, opt2)
    assert_tree_close([p.detach() for p in resumed], [p.detach() for p in ps], rtol=1e-12)

    plain = dp_opt_for(params, seed=3, **kw)[1]
    plain.load_state_dict(opt.optimizer.state_dict())  # a plain torch state dict still loads
    secure = dp_opt_for(params, secure=True, **kw)[1]
    assert "generator" not in secure.state_dict()["psgfunc_dp"]

    for p, g in zip(ps, grads):
        p.grad_sample = g[:2]
    opt.accumulate()
    with pytest.raises(ValueError, match="half accumulated"):
        opt.state_dict()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fast", [False, True])
def test_half_precision_micro_batches_round_the_sum_once(dtype, fast):
    """64 micro-batches of one example: the running clipped sum of half-precision params is
    kept in float32, so the update is the float64 clipped sum rounded once (before: each
    micro-batch's addition rounded it again, up to tens of roundings off)."""
    import psgfunc.nn as pnn

    gen = torch.Generator().manual_seed(0)
    layer = pnn.Linear(4, 3, max_batch_size=1).to(dtype)
    opt = dp.DPOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), max_norm=1e3,
                         noise_multiplier=0.0, expected_batch_size=1, fast_clipping=fast)
    xs = (1 + torch.rand(64, 1, 4, generator=gen)).to(dtype)
    want = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in layer.named_parameters()}
    for x in xs:
        layer(x).sum().backward()
        opt.accumulate()
        opt.zero_grad()
        want["weight"] += x.double().expand(3, 4)  # d/dW of sum(W x + b): rows of x (no clipping)
        want["bias"] += 1.0
    opt.step()
    for name, p in layer.named_parameters():
        # one rounding of the exact sum to the param's dtype (noise 0, lr 0: p.grad holds it)
        assert torch.equal(p.grad, want[name].to(dtype)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_an_empty_batch_sums_in_the_dtype_of_a_full_one(dtype, monkeypatch):
    """The sum handed to the transform (which ranks all-reduce) has one dtype per parameter,
    empty logical batch or not: float32 for half precision."""
    import psgfunc.nn as pnn

    layer = pnn.Linear(4, 3, max_batch_size=2).to(dtype)
    opt = dp.DPOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), max_norm=1.0,
                         noise_multiplier=0.0, expected_batch_size=2)
    seen = []
    original = opt.transform.update_from_sum

    def spy(summed, state):
        seen.append([t.dtype for t in summed])
        return original(summed, state)

    monkeypatch.setattr(opt.transform, "update_from_sum", spy)
    layer(torch.randn(2, 4).to(dtype)).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.step()  # an empty batch
    want = torch.float32 if dtype != torch.float32 else dtype
    assert seen == [[want, want], [want, want]]
    assert all(p.grad.dtype == dtype for p in layer.parameters())
