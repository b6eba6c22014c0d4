"""Fast clipping's output taps (``Collector.output``): a linear layer whose params
``grad_pieces`` tracks runs as plain ``addmm`` and its pieces come from the gradient of a
leaf in its output, with no ``autograd.Function``. Checked against the per-example loop in
float64 and against adversarial uses: in-place ops on the layer's output and input, an
output that never reaches the loss, a weight used twice or also outside a rule, no bias,
sequence inputs, batches of one."""

from __future__ import annotations

import optree
import pytest
import torch

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc.per_sample import _clip, _kinds
from tests.oracles import assert_tree_close, per_example_grads


def _params(gen, *shapes, bias=True):
    out = {}
    for k, (o, i) in enumerate(shapes):
        p = {"weight": torch.randn(o, i, generator=gen, dtype=torch.float64) / i**0.5}
        if bias:
            p["bias"] = torch.randn(o, generator=gen, dtype=torch.float64)
        out[f"l{k}"] = p
    return out


def _reference(fn, params, batch, c):
    grads = per_example_grads(fn, params, *batch)
    norms = dp.per_sample_norms(grads)
    return optree.tree_map(lambda t: t.sum(0), dp.clip(grads, c)), norms


def _check(fn, params, batch, *, taps):
    """Fast equals the loop at a bound that clips about half the examples, and the pass
    made ``taps`` output taps (so that the route under test is the one taken)."""
    made = []
    real = _kinds.Collector.finish

    def spy(self, grads):
        made.append(len(self.inputs))
        return real(self, grads)

    _, norms = _reference(fn, params, batch, 1e30)
    c = float(norms.median())
    expected, expected_norms = _reference(fn, params, batch, c)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_kinds.Collector, "finish", spy)
        got, got_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
    assert made == [taps]
    assert_tree_close(got, expected)
    assert bool((got_norms >= expected_norms * (1 - 1e-12)).all())
    torch.testing.assert_close(got_norms, expected_norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("size", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp(size, bias):
    gen = torch.Generator().manual_seed(0)
    params = _params(gen, (7, 4), (3, 7), bias=bias)
    x = torch.randn(size, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(size, 3, generator=gen, dtype=torch.float64)

    def fn(p, xi, yi):
        return ((PF.linear(p["l1"], torch.tanh(PF.linear(p["l0"], xi))) - yi) ** 2).sum()

    _check(fn, params, (x, y), taps=2)


def test_sequence_input():
    gen = torch.Generator().manual_seed(1)
    params = _params(gen, (6, 5), (2, 6))
    x = torch.randn(4, 3, 2, 5, generator=gen, dtype=torch.float64)

    def fn(p, xi):
        return PF.linear(p["l1"], torch.sin(PF.linear(p["l0"], xi))).square().sum()

    _check(fn, params, (x,), taps=2)


def test_in_place_ops_on_the_output():
    """``relu_`` and ``mul_`` on a layer's output: the output gradient is the one before
    them (the tap's leaf is an operand of the layer's own op, not the output)."""
    gen = torch.Generator().manual_seed(2)
    params = _params(gen, (6, 4), (6, 6), (2, 6))
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)

    def fn(p, xi):
        h = PF.linear(p["l0"], xi)
        h.relu_()
        h2 = PF.linear(p["l1"], h)
        h2.mul_(h2.detach().sign() + 2)  # a data-dependent in-place scale
        return PF.linear(p["l2"], h2).sin().sum()

    _check(fn, params, (x,), taps=3)


def test_in_place_op_on_a_saved_input_raises():
    """The input a layer's pieces need, changed in place afterwards: an error (the old
    route's saved tensor raised too), never norms of the changed values."""
    gen = torch.Generator().manual_seed(3)
    params = _params(gen, (5, 4), (2, 5))
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    def data(p, xi):  # an input without history: only the tap knows it was needed
        h = xi * 2
        out = PF.linear(p["l0"], h)
        h.mul_(3)  # after l0 read it
        return PF.linear(p["l1"], out).sum()

    def hidden(p, xi):  # an input whose own backward does not need it
        h = PF.linear(p["l0"], xi) + 1
        out = PF.linear(p["l1"], h)
        h.mul_(3)
        return out.sum()

    for fn in (data, hidden):
        with pytest.raises(RuntimeError, match="modified in place"):
            dp.clipped_grad_sum(fn, params, x, max_norm=1.0, method="fast")


def test_output_that_never_reaches_the_loss():
    gen = torch.Generator().manual_seed(4)
    params = _params(gen, (5, 4), (2, 5), (3, 4))
    x = torch.randn(4, 4, generator=gen, dtype=torch.float64)

    def fn(p, xi):
        PF.linear(p["l2"], xi)  # computed, unused: its params get zero gradients
        return PF.linear(p["l1"], torch.tanh(PF.linear(p["l0"], xi))).square().sum()

    _check(fn, params, (x,), taps=3)
    summed, _ = dp.clipped_grad_sum(fn, params, x, max_norm=1.0, method="fast")
    assert not summed["l2"]["weight"].any() and not summed["l2"]["bias"].any()


def test_weight_used_twice_and_outside_a_rule():
    """One weight in two linear calls (two pieces of one parameter, combined before the
    norm) and in a plain op (that part materialised, added to the pieces)."""
    gen = torch.Generator().manual_seed(5)
    params = _params(gen, (4, 4), (2, 4))
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)

    def twice(p, xi):
        h = torch.tanh(PF.linear(p["l0"], xi))
        h = torch.tanh(PF.linear(p["l0"], h))
        return PF.linear(p["l1"], h).square().sum()

    _check(twice, params, (x,), taps=3)

    def plain_too(p, xi):
        h = torch.tanh(PF.linear(p["l0"], xi)) + (p["l0"]["weight"] ** 2).sum()
        return PF.linear(p["l1"], h).square().sum()

    with pytest.warns(UserWarning, match="materialised"):
        _check(plain_too, params, (x,), taps=2)


def test_other_callers_keep_the_function():
    """``per_sample_grads(method="expanded")`` and ``grad_pieces`` on a bfloat16 autocast
    block do not tap: the taps are fast clipping's own backward only."""
    gen = torch.Generator().manual_seed(6)
    params = _params(gen, (3, 4))
    x = torch.randn(2, 4, generator=gen, dtype=torch.float64)

    def fn(p, xi):
        return PF.linear(p["l0"], xi).square().sum()

    from psgfunc import per_sample_grads

    grads = per_sample_grads(fn, params, x, method="expanded")
    assert_tree_close(grads, per_example_grads(fn, params, x))
    p32 = optree.tree_map(lambda t: t.float(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pieces = _clip.grad_pieces(fn, p32, x.float())
    assert pieces.leaves[0].dtype == torch.float32


def test_in_place_ops_on_a_sequence_output():
    """A ``[T, O]`` output per example is a view of the layer's ``addmm``: in-place ops on
    it rebase that product's history, and the tap's leaf still gets the output gradient
    from before them."""
    gen = torch.Generator().manual_seed(7)
    params = _params(gen, (5, 3), (2, 5))
    x = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)

    def fn(p, xi):
        h = PF.linear(p["l0"], xi)
        h.mul_(2)
        h[0].add_(1)  # one position of the view
        return PF.linear(p["l1"], torch.relu(h)).tanh().sum()

    _check(fn, params, (x,), taps=2)


def test_inference_tensor_input_gets_autograds_error():
    """Data made under ``torch.inference_mode`` cannot be saved for a backward: autograd's
    own message, as the rules' ``autograd.Function`` gives it (no tap for it)."""
    gen = torch.Generator().manual_seed(8)
    params = _params(gen, (2, 3))
    with torch.inference_mode():
        x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        dp.clipped_grad_sum(lambda p, xi: PF.linear(p["l0"], xi).sum(), params, x, max_norm=1.0, method="fast")
