"""What runs under ``psgfunc._dispatch.no_autograd`` (inference mode) leaves nothing behind that
a user cannot change in place or differentiate: the LSTM loops' outputs and gradients, fast
clipping's sums and norms, DPOptimizer's norms and sums."""

from __future__ import annotations

import pytest
import torch

import psgfunc.dp as dp
import psgfunc.functional as PF
import psgfunc.nn as pnn
from psgfunc import per_sample_grads
from psgfunc._dispatch import grads_of, no_autograd


def test_no_autograd_is_inference_mode_outside_compile():
    with no_autograd():
        made = torch.ones(2) * 2
    assert made.is_inference()
    before = torch.zeros(2)
    version = before._version
    with no_autograd():
        before.add_(1)  # an ordinary tensor changed inside still counts its version
    assert before._version > version and not before.is_inference()


def lstm_params(gen):
    return PF.init_lstm(3, 4, generator=gen)


def test_grads_of_is_autograd_grad():
    """The direct engine call gives torch.autograd.grad's gradients (None for an input the
    loss does not reach), and a loss without history gets autograd's own error."""
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    loss = (a.sin() * b).sum()
    expected = torch.autograd.grad(loss, [a, b, unused], allow_unused=True, retain_graph=True)
    got = grads_of(loss, [a, b, unused])
    assert got[2] is None and expected[2] is None
    for g, e in zip(got[:2], expected[:2]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not require grad"):
        grads_of(torch.ones(()), [a])



@pytest.mark.parametrize("route", ["vmap", "expanded", "auto", "fast", "materialize"])
def test_a_loss_without_the_params_has_zero_gradients_on_every_route(route):
    """As torch.func.grad (and the vmap route) give: zeros, not autograd's error for a loss
    without history (the expanded and fast routes raised it)."""
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    x = torch.randn(4, 3)

    def fn(p, xi):
        return xi.sin().sum()

    if route in ("fast", "materialize"):
        summed, norms = dp.clipped_grad_sum(fn, params, x, max_norm=1.0, method=route)
        # (fast clipping's certified norms carry an absolute floor of about 1e-22)
        assert all(not t.any() for t in summed.values()) and float(norms.max()) < 1e-20
    else:
        grads = per_sample_grads(fn, params, x, method=route)
        assert {k: tuple(v.shape) for k, v in grads.items()} == {"w": (4, 3, 2), "b": (4, 2)}
        assert all(not t.any() for t in grads.values())


def test_lstm_outputs_and_gradients_are_ordinary_tensors():
    gen = torch.Generator().manual_seed(0)
    params = {k: v.requires_grad_() for k, v in lstm_params(gen).items()}
    x = torch.randn(5, 2, 3, generator=gen, requires_grad=True)
    out, (h, c) = PF.lstm(params, x)
    assert not any(t.is_inference() for t in (out, h, c))
    (out.sum() + h.sum() + c.sum()).backward()
    for t in (x, *params.values()):
        assert not t.grad.is_inference()
        t.grad.add_(1)  # usable in place, as any gradient


def test_lstm_input_changed_in_place_before_backward_still_raises():
    """The per-sample layer saves its input; a change to it between forward and backward is
    still seen (the loops run in inference mode, the saved tensors' versions still count)."""
    torch.manual_seed(0)
    layer = pnn.DPLSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    out, _ = layer(x)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_per_sample_lstm_gradients_are_ordinary_tensors():
    gen = torch.Generator().manual_seed(0)
    params = lstm_params(gen)

    def fn(p, xi):
        return PF.lstm(p, xi)[0].square().sum()

    grads = per_sample_grads(fn, params, torch.randn(3, 5, 3, generator=gen), method="expanded")
    assert not any(g.is_inference() for g in grads.values())


def mlp_loss(p, x, y):
    h = torch.relu(PF.linear(p["fc1"], x))
    return torch.nn.functional.cross_entropy(PF.linear(p["fc2"], h)[None], y[None])


@pytest.mark.parametrize("max_norm", [0.5, {"fc1": 0.3, "fc2": 0.4}])
def test_clipped_grad_sum_results_are_ordinary_tensors(max_norm):
    gen = torch.Generator().manual_seed(0)
    params = {"fc1": PF.init_linear(4, 6, generator=gen), "fc2": PF.init_linear(6, 3, generator=gen)}
    x, y = torch.randn(5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    sums, norms = dp.clipped_grad_sum(mlp_loss, params, x, y, max_norm=max_norm, method="fast")
    leaves = [norms, *(t for layer in sums.values() for t in layer.values())]
    assert not any(t.is_inference() for t in leaves)
    for t in leaves:
        t.add_(1)  # e.g. noise added in place


def test_dp_optimizer_fast_clipping_norms_and_update_are_ordinary_tensors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(pnn.Linear(4, 6, 5), torch.nn.ReLU(), pnn.Linear(6, 3, 5))
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), max_norm=1.0,
                         noise_multiplier=0.0, expected_batch_size=5, fast_clipping=True)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
        norms = opt.accumulate()
        assert not norms.is_inference()
        norms.add_(1)
        opt.step()
        assert not any(p.is_inference() or p.grad.is_inference() for p in model.parameters())
        opt.zero_grad()


def test_grad_pieces_sq_norms_are_exact_ordinary_tensors():
    """GradPieces.sq_norms: each leaf's per-example squared norms (float64 loop), as ordinary
    tensors (the pieces' own are inference tensors: a caller could not use them in autograd)."""
    from psgfunc.per_sample._clip import grad_pieces
    from tests.oracles import per_example_grads

    gen = torch.Generator().manual_seed(0)
    params = {"weight": torch.randn(4, 3, generator=gen, dtype=torch.float64),
              "bias": torch.randn(4, generator=gen, dtype=torch.float64)}
    x = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)

    def fn(p, xi):
        return PF.linear(p, xi).tanh().sum()

    pieces = grad_pieces(fn, params, x)
    want = per_example_grads(fn, params, x)
    for got, key in zip(pieces.sq_norms, sorted(params)):
        assert not got.is_inference()
        torch.testing.assert_close(got, want[key].flatten(1).square().sum(1), rtol=1e-12, atol=0)
    leaf = torch.ones(5, dtype=torch.float64, requires_grad=True)
    (pieces.sq_norms[0] * leaf).sum().backward()  # usable in autograd
