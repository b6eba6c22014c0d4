"""GroupNorm, InstanceNorm1d/2d/3d and RMSNorm shells: torch.nn's contract, grad_sample against
the float64 loop, expand_weights conversion, and fast-clipping DP-SGD on a GroupNorm CNN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.nn as pnn
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
MAX = 6


def _x(*shape):
    return lambda gen: torch.randn(shape, dtype=F64, generator=gen)


# name -> (shell factory, torch.nn factory, input maker for a batch of B=4)
LAYERS = {
    "groupnorm": (lambda: pnn.GroupNorm(2, 4, MAX, dtype=F64), lambda: nn.GroupNorm(2, 4, dtype=F64), _x(4, 4, 3, 5)),
    "groupnorm_flat_nobias": (lambda: pnn.GroupNorm(3, 6, MAX, 1e-3, dtype=F64, bias=False),
                              lambda: nn.GroupNorm(3, 6, 1e-3, dtype=F64, bias=False), _x(4, 6)),
    "groupnorm_noaffine": (lambda: pnn.GroupNorm(1, 4, MAX, affine=False, dtype=F64),
                           lambda: nn.GroupNorm(1, 4, affine=False, dtype=F64), _x(4, 4, 7)),
    "instancenorm1d": (lambda: pnn.InstanceNorm1d(3, MAX, affine=True, dtype=F64),
                       lambda: nn.InstanceNorm1d(3, affine=True, dtype=F64), _x(4, 3, 7)),
    "instancenorm2d_nobias": (lambda: pnn.InstanceNorm2d(3, MAX, 1e-3, affine=True, dtype=F64, bias=False),
                              lambda: nn.InstanceNorm2d(3, 1e-3, affine=True, dtype=F64, bias=False),
                              _x(4, 3, 4, 5)),
    "instancenorm3d": (lambda: pnn.InstanceNorm3d(2, MAX, affine=True, dtype=F64),
                       lambda: nn.InstanceNorm3d(2, affine=True, dtype=F64), _x(4, 2, 3, 2, 3)),
    "instancenorm2d_noaffine": (lambda: pnn.InstanceNorm2d(3, MAX, dtype=F64),
                                lambda: nn.InstanceNorm2d(3, dtype=F64), _x(4, 3, 4, 4)),
    "rmsnorm": (lambda: pnn.RMSNorm(5, MAX, dtype=F64), lambda: nn.RMSNorm(5, dtype=F64), _x(4, 3, 5)),
    "rmsnorm_2d_eps": (lambda: pnn.RMSNorm([2, 3], MAX, 1e-3, dtype=F64),
                       lambda: nn.RMSNorm([2, 3], 1e-3, dtype=F64), _x(4, 2, 3)),
    "rmsnorm_noaffine": (lambda: pnn.RMSNorm(5, MAX, elementwise_affine=False, dtype=F64),
                         lambda: nn.RMSNorm(5, elementwise_affine=False, dtype=F64), _x(4, 5)),
}
NAMES = list(LAYERS)


def build(name, seed=0):
    """(shell, nn module with the same perturbed weights, batch input)."""
    make_shell, make_nn, make_x = LAYERS[name]
    shell, ref = make_shell(), make_nn()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in shell.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype, generator=gen))
    ref.load_state_dict(shell.state_dict(), strict=True)
    return shell, ref, make_x(gen)


def loss_of(out):
    return torch.sin(out * 1.3).sum()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_nn_both_ways(name):
    shell, _, _ = build(name)
    fresh = LAYERS[name][1]()
    assert [(k, v.shape) for k, v in shell.state_dict().items()] == [
        (k, v.shape) for k, v in fresh.state_dict().items()
    ]
    for (k, a), (_, b) in zip(LAYERS[name][0]().state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k  # the same initialisation
    fresh.load_state_dict(shell.state_dict(), strict=True)
    other = LAYERS[name][0]()
    other.load_state_dict(fresh.state_dict(), strict=True)
    for (k, a), (_, b) in zip(other.state_dict().items(), shell.state_dict().items()):
        assert torch.equal(a, b), k
    assert isinstance(shell, type(fresh)) and all(type(p) is nn.Parameter for p in shell.parameters())
    assert repr(shell).endswith(f"max_batch_size={MAX})") and fresh.extra_repr() in shell.extra_repr()


@pytest.mark.parametrize("name", NAMES)
def test_output_grad_and_grad_sample(name):
    shell, ref, x = build(name)
    out = shell(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    params = dict(ref.named_parameters())
    if not params:
        return
    loss_of(out).backward()
    loss_of(ref(x)).backward()
    for (k, p), q in zip(shell.named_parameters(), params.values()):
        assert p.grad_sample.shape == (x.shape[0], *p.shape), k
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-12, atol=1e-12)

    def fn(p, xi):
        return loss_of(torch.func.functional_call(ref, p, (xi.unsqueeze(0),)))

    expected = per_example_grads(fn, {k: v.detach() for k, v in params.items()}, x)
    assert_tree_close({k: p.grad_sample for k, p in shell.named_parameters()}, expected)


@pytest.mark.parametrize("name", ["groupnorm", "instancenorm1d", "rmsnorm"])
def test_empty_batch_and_batch_limit(name):
    shell, ref, x = build(name)
    out = shell(x[:0])
    assert out.shape == x[:0].shape  # (torch.nn's InstanceNorm fails here with affine params)
    out.sum().backward()
    for p in shell.parameters():
        assert p.grad_sample.shape == (0, *p.shape) and p.grad.abs().max() == 0
    with pytest.raises(ValueError, match=r"8 examples.*max_batch_size=6"):
        shell(torch.cat([x, x]))


@pytest.mark.parametrize(
    "shell,x",
    [
        (pnn.GroupNorm(2, 4, MAX), torch.randn(4)),
        (pnn.InstanceNorm1d(3, MAX, affine=True), torch.randn(3, 7)),  # torch.nn's one example
        (pnn.InstanceNorm2d(3, MAX), torch.randn(3, 4, 4)),
        (pnn.InstanceNorm3d(3, MAX), torch.randn(3, 4, 4, 4)),
        (pnn.InstanceNorm1d(3, MAX), torch.randn(1, 2, 3, 7)),  # too many dims
        (pnn.RMSNorm((2, 5), MAX), torch.randn(2, 5)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(tuple(v.shape)),
)
def test_missing_batch_dim(shell, x):
    with pytest.raises(ValueError, match=r"batch dim.*unsqueeze\(0\)"):
        shell(x)


def test_constructor_errors_and_positional_signatures():
    for cls in (pnn.InstanceNorm1d, pnn.InstanceNorm2d, pnn.InstanceNorm3d):
        with pytest.raises(ValueError, match="track_running_stats=False"):
            cls(3, MAX, track_running_stats=True)
        shell = cls(3, MAX)
        shell.track_running_stats = True  # set after construction: refused at forward
        with pytest.raises(ValueError, match="track_running_stats=False"):
            shell(torch.randn(2, 3, *(4,) * shell._dim))
    for make in (lambda: pnn.GroupNorm(2, 4, 0), lambda: pnn.InstanceNorm2d(3, -1), lambda: pnn.RMSNorm(3, None)):
        with pytest.raises(ValueError, match="max_batch_size"):
            make()
    with pytest.raises(ValueError, match="divisible"):
        pnn.GroupNorm(3, 4, MAX)
    gn = pnn.GroupNorm(2, 4, 8, 1e-3, False)
    assert (gn.num_groups, gn.num_channels, gn.max_batch_size, gn.eps, gn.weight) == (2, 4, 8, 1e-3, None)
    inorm = pnn.InstanceNorm2d(3, 8, 1e-3, 0.2, True)
    assert (inorm.eps, inorm.momentum, inorm.affine, inorm.weight.shape) == (1e-3, 0.2, True, (3,))
    rms = pnn.RMSNorm([2, 3], 8, 1e-4, False)
    assert (rms.normalized_shape, rms.eps, rms.weight) == ((2, 3), 1e-4, None)


# ----------------------------------------------------------------------- conversion


def test_expand_weights_converts_the_norm_layers():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4), nn.Tanh(),
        nn.InstanceNorm2d(4, affine=True), nn.Tanh(), nn.InstanceNorm2d(4), nn.Flatten(2), nn.RMSNorm(9),
        nn.Flatten(), nn.Linear(36, 2),
    ).to(F64)
    ref = copy.deepcopy(model)
    norms = (1, 3, 5, 7)
    params = [model[i].weight for i in norms]
    pnn.expand_weights(model, 4)
    assert [type(model[i]) for i in norms] == [pnn.GroupNorm, pnn.InstanceNorm2d, pnn.InstanceNorm2d, pnn.RMSNorm]
    assert [model[i].weight for i in norms] == params  # the very same Parameter objects
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3, dtype=F64, generator=gen)
    loss_of(model(x)).backward()

    def fn(p, xi):
        return loss_of(torch.func.functional_call(ref, p, (xi.unsqueeze(0),)))

    expected = per_example_grads(fn, {k: v.detach() for k, v in ref.named_parameters()}, x)
    assert_tree_close({k: p.grad_sample for k, p in model.named_parameters()}, expected)


def test_instance_norm_with_running_stats_is_refused_by_expand_weights():
    model = nn.Sequential(nn.Linear(3, 3), nn.InstanceNorm1d(3, affine=True, track_running_stats=True))
    with pytest.raises(ValueError, match=r"1 \(InstanceNorm1d\).*track_running_stats=False"):
        pnn.expand_weights(model, 4)
    assert type(model[0]) is nn.Linear


def test_batchnorm_refusal_names_the_group_norm_route():
    with pytest.raises(ValueError, match=r"nn.GroupNorm.*psgfunc.nn.GroupNorm"):
        pnn.expand_weights(nn.Sequential(nn.BatchNorm2d(3)), 4)


# ------------------------------------------------------- DP-SGD on a GroupNorm CNN


def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    ).to(F64)
    with torch.no_grad():  # not the ones/zeros init: a swapped weight and bias would show
        model[1].weight.add_(0.3 * torch.randn(4, dtype=F64))
        model[1].bias.add_(0.3 * torch.randn(4, dtype=F64))
    return model


@pytest.mark.parametrize("fast", [True, False])
def test_group_norm_cnn_dp_step_equals_the_float64_loop(fast):
    """expand_weights + DPOptimizer (fast clipping and grad_sample) on conv + GroupNorm + relu
    + linear: the step and the norms are those of clipping the per-example loop's gradients."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 5, 5, dtype=F64, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    ref = cnn()
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def fn(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(ref, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = per_example_grads(fn, params, x, y)
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    c = float(norms.median())
    lr = 0.5
    clipped = {k: torch.einsum("b,b...->...", (c / norms).clamp(max=1.0), g) for k, g in grads.items()}
    expected = {k: params[k] - lr * clipped[k] for k in params}

    model = pnn.expand_weights(cnn(), 8)
    assert type(model[1]) is pnn.GroupNorm
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), max_norm=c, noise_multiplier=0.0,
                         expected_batch_size=1, fast_clipping=fast)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    if fast:
        assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    got_norms = opt.accumulate()
    opt.step()
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    assert_tree_close(dict(model.named_parameters()), expected)
