"""Fast-clipping norms of a small convolution's weight, whose per-example gradient is built
in the backward pass, stay above the exact norm when the backward runs inside a caller's
``torch.autocast`` block (review h13: the im2col bmm ran in bfloat16 there, 2e-4 low)."""

from __future__ import annotations

import torch

import psgfunc.dp as dp
import psgfunc.functional as PF
from tests.oracles import per_example_grads


def test_built_conv_weight_norm_bounds_the_exact_norm_under_autocast():
    gen = torch.Generator().manual_seed(0)
    # bfloat16-exact data and a linear loss: the gradient autocast computes is the float64 one
    x = torch.randn(4, 3, 40, generator=gen).bfloat16().float()
    w = (torch.randn(4, 3, 5, generator=gen) * 0.3).bfloat16().float()
    v = torch.randn(4, 4, 40, generator=gen).bfloat16().float()

    def fn(p, xi, vi):
        return (PF.conv1d(p, xi, padding=2).float() * vi).sum()

    exact = per_example_grads(fn, {"weight": w}, x, v)["weight"].flatten(1).norm(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, norms = dp.clipped_grad_sum(fn, {"weight": w}, x, v, max_norm=1e-3, method="fast")
    assert bool((norms.double() >= exact).all()), (norms / exact).min()


def test_conv_bias_norm_bounds_the_exact_norm_under_autocast():
    """The bias's per-example gradient sums g over the positions: in float32, not in the
    bfloat16 autocast gives g (review h13: norms 1e-3 below the exact ones)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 40, generator=gen).bfloat16().float()
    w = (torch.randn(4, 3, 5, generator=gen) * 0.3).bfloat16().float()
    b = torch.randn(4, generator=gen).bfloat16().float()
    v = torch.randn(4, 4, 40, generator=gen).bfloat16().float()
    for conv, weight in ((PF.conv1d, w), (PF.conv_transpose1d, w.transpose(0, 1).contiguous())):

        def fn(p, xi, vi, conv=conv, weight=weight):
            return (conv({"weight": weight.to(xi.dtype), "bias": p["bias"]}, xi, padding=2).float() * vi).sum()

        exact = per_example_grads(fn, {"bias": b}, x, v)["bias"].norm(dim=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, norms = dp.clipped_grad_sum(fn, {"bias": b}, x, v, max_norm=1e-3, method="fast")
        assert bool((norms.double() >= exact).all()), (conv.__name__, (norms / exact).min())
