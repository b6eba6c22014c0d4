"""Gradients a rule sums over positions itself (conv and conv-transpose biases, layer/group/
instance/RMS norm scales and biases, attention's packed bias) carry the bound of that sum's
rounding (``SummedRows``): where the output gradients cancel, the float32 sum can be far from
the exact one (here 1e8 + 1 - 1e8 sums to 0), and the certified norm must still be at least
the exact norm of the example's gradient. Review h13's reproducer: before, a conv bias's
certified norm was 0 for an exact norm of 1."""

from __future__ import annotations

import pytest
import torch

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc.per_sample import _kinds
from tests.oracles import per_example_grads

F64 = torch.float64
CANCEL = torch.tensor([1e8, 1.0, -1e8])  # exact sum 1; float32 sums it to 0 or 2


def _problem(layer):
    """``(fn, params, x, v)``: a float32 layer whose output gradient (``v``) cancels over
    the positions the rule sums; example 0 cancels, example 1 is ordinary."""
    gen = torch.Generator().manual_seed(0)
    v = torch.stack([CANCEL, torch.tensor([3.0, 1.0, -2.0])])  # [B, 3 positions]
    if layer in ("conv1d", "conv_transpose1d"):
        params = {"weight": torch.ones(1, 1, 1), "bias": torch.zeros(1)}
        x = torch.zeros(2, 1, 3)  # (the weight's gradient is 0: the bias's alone is measured)
        layer_fn = getattr(PF, layer)

        def fn(p, xi, vi):
            return (layer_fn(p, xi) * vi).sum()

        return fn, params, x, v.unsqueeze(1)
    params = {"weight": torch.ones(2), "bias": torch.zeros(2)}
    x = torch.randn(2, 3, 2, generator=gen)  # [B, positions, channels]
    vv = torch.stack([v, v], -1)  # both channels cancel
    if layer in ("mul", "add"):  # a plain torch op with a parameter operand (its torch-function rule)
        params = {"p": torch.ones(2)}
        op = torch.mul if layer == "mul" else torch.add

        def fn(p, xi, vi):
            return (op(torch.ones_like(xi), p["p"]) * vi).sum()

        return fn, params, x, vv
    if layer == "layer_norm":
        def fn(p, xi, vi):
            return (PF.layer_norm(p, xi, 2) * vi).sum()
    elif layer == "rms_norm":
        params = {"weight": torch.ones(2)}

        def fn(p, xi, vi):
            return (PF.rms_norm(p, xi, 2) * vi).sum()
    elif layer == "group_norm":
        def fn(p, xi, vi):  # channels first: [1, C, positions]
            return (PF.group_norm(p, xi.T[None], 1)[0] * vi.T).sum()
    else:  # instance_norm
        def fn(p, xi, vi):
            return (PF.instance_norm(p, xi.T[None])[0] * vi.T).sum()
    return fn, params, x, vv


LAYERS = ["conv1d", "conv_transpose1d", "layer_norm", "rms_norm", "group_norm", "instance_norm", "mul", "add"]


CASES = [(layer, "eager") for layer in LAYERS] + [(layer, "compiled") for layer in ("conv1d", "layer_norm", "group_norm", "mul")]


@pytest.mark.parametrize(("layer", "route"), CASES)
def test_cancelling_sums_over_positions_are_bounded(layer, route):
    fn, params, x, v = _problem(layer)
    exact_tree = per_example_grads(fn, params, x, v)  # float64 loop on the same float32 data
    exact = torch.cat([t.reshape(2, -1) for t in exact_tree.values()], 1).norm(dim=1)
    for c in (0.5, 1e30):
        if route == "compiled":  # the tapped pass's pieces (dynamo's eager backend)
            summed, norms = dp.compiled_clipped_grad_sum(fn, c, backend="eager")(params, x, v)
        else:
            summed, norms = dp.clipped_grad_sum(fn, params, x, v, max_norm=c, method="fast")
        assert bool((norms.double() >= exact).all()), (norms, exact)
        assert float(norms[1]) <= float(exact[1]) * (1 + 1e-4)  # ordinary: as tight as before
    # one example at a time: its contribution as computed stays within C
    for b in range(2):
        summed, _ = dp.clipped_grad_sum(fn, params, x[b:b + 1], v[b:b + 1], max_norm=0.5, method="fast")
        assert sum(float(t.double().square().sum()) for t in summed.values()) ** 0.5 <= 0.5


def test_presum_bounds_the_rounding_of_its_sums():
    """``presum``'s ``a`` is at least the distance of its float32 sums from the exact ones."""
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(4, 50, 6, generator=gen) * torch.logspace(-8, 8, 50).reshape(1, 50, 1)
    s, a = _kinds.presum(t, (1,))
    exact = t.double().sum(1)
    assert bool(((s.double() - exact).norm(dim=1) <= a.double()).all())
    s3, a3 = _kinds.presum(t.reshape(2, 2, 50, 6), (2,), lead=2)
    assert tuple(s3.shape) == (2, 2, 6) and tuple(a3.shape) == (2, 2)
    torch.testing.assert_close(a3.reshape(4), a)
