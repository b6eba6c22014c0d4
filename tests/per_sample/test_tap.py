"""Tapped layer outputs (the compiled fast-clipping route) give the eager fast path's pieces.

``tap_pieces`` run eagerly (no compiler) on every model of the fast-clipping tests, in
float64 at 1e-10 against the per-example autograd loop: norms and clipped sums. The same
through ``torch.compile`` (dynamo's eager backend, one full graph) for a few models; the
Inductor build is in ``tests/dp/test_compiled.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc.per_sample._api import _prepare
from psgfunc.per_sample._tap import discover, tap_pieces
from tests.dp.test_fast_clipping import (
    DT,
    MODELS,
    NEVER_MATERIALISED,
    forbid_materialising,
    gen,
    mlp,
    reference,
)
from tests.oracles import assert_tree_close


def tapped_sum(fn, params, batch, c):
    """Clipped sum and norms from the tapped pass, eagerly."""
    prep = _prepare(fn, params, batch, None, "different")
    plan = discover(prep)
    leaves = tap_pieces(prep, plan, prep.p_leaves, prep.b_leaves)
    norms = sum(leaf.sq_norm for leaf in leaves).sqrt()
    factor = c / norms.clamp_min(c)
    return prep.unflatten([leaf.weighted_sum(factor) for leaf in leaves]), norms, plan


def lstm_model():
    g = gen()
    params = {"lstm": PF.init_lstm(3, 4, dtype=DT, generator=g), "fc": PF.init_linear(4, 2, dtype=DT, generator=g)}

    def fn(p, x, y):
        h = PF.lstm(p["lstm"], x)[0]
        return F.cross_entropy(PF.linear(p["fc"], h[-1]), y)

    return fn, params, (torch.randn(3, 5, 3, dtype=DT, generator=g), torch.randint(0, 2, (3,), generator=g))


def deep_lstm(lengths):
    """Two bidirectional layers with an initial state; with ``lengths`` (padding) the LSTM
    is not tapped and its parameters are materialised."""
    g = gen()
    params = {"lstm": PF.init_lstm(3, 4, num_layers=2, bidirectional=True, dtype=DT, generator=g),
              "fc": PF.init_linear(8, 2, dtype=DT, generator=g)}
    h0 = 0.1 * torch.randn(3, 4, 4, dtype=DT, generator=g)

    def fn(p, x, h, n, y):
        out = PF.lstm(p["lstm"], x, (h, torch.tanh(h)), num_layers=2, bidirectional=True,
                      lengths=n if lengths else None)[0]
        return F.cross_entropy(PF.linear(p["fc"], out.mean(0)), y)

    n = torch.tensor([5, 3, 4])
    return fn, params, (torch.randn(3, 5, 3, dtype=DT, generator=g), h0, n, torch.randint(0, 2, (3,), generator=g))


def shared_with_plain_op():
    """``a.weight`` feeds a linear layer AND a plain op (``a`` materialised); ``scale`` only
    a ``mul``, which is tapped."""
    fn0, params, batch = mlp()
    params = dict(params, scale=torch.tensor(1.5, dtype=DT))

    def fn(p, x, y):
        reg = p["a"]["weight"].pow(2).sum() * 1e-2
        return fn0(p, x * p["scale"], y) + reg * x.sum()

    return fn, params, batch


def computed_weight():
    """A weight the fn computes from a leaf: its layer runs plainly (its bias materialised);
    the leaf ``b.weight`` reaches it through a tapped ``mul`` (its piece: the product's
    per-example gradient)."""
    fn0, params, batch = mlp()

    def fn(p, x, y):
        b = {"weight": p["b"]["weight"] * 2.0, "bias": p["b"]["bias"]}
        return fn0({"a": p["a"], "b": b}, x, y)

    return fn, params, batch


EXTRA = {
    "lstm": lstm_model,
    "lstm-deep": lambda: deep_lstm(False),
    "lstm-lengths": lambda: deep_lstm(True),
    "shared-with-plain-op": shared_with_plain_op,
    "computed-weight": computed_weight,
}
MATERIALISED = {"lstm-lengths": 16, "shared-with-plain-op": 2, "computed-weight": 1}
"""Leaves each extra model must materialise (the others none)."""


@pytest.mark.parametrize("name", sorted(MODELS) + sorted(EXTRA))
def test_tapped_equals_materialize(name):
    fn, params, batch = (MODELS.get(name) or EXTRA[name])()
    _, norms = reference(fn, params, batch, 1e30)
    c = float(norms.median())
    expected, expected_norms = reference(fn, params, batch, c)
    summed, got_norms, plan = tapped_sum(fn, params, batch, c)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got_norms, expected_norms, rtol=1e-10, atol=0)
    assert len(plan.materialized) == MATERIALISED.get(name, 0)


def test_tapped_layers_never_materialise(monkeypatch):
    for name in NEVER_MATERIALISED:
        fn, params, batch = MODELS[name]()
        expected, _ = reference(fn, params, batch, 0.5)
        with monkeypatch.context() as m:
            forbid_materialising(m)
            summed, _, plan = tapped_sum(fn, params, batch, 0.5)
        assert_tree_close(summed, expected)
        assert plan.materialized == []


@pytest.mark.parametrize("name", ["mlp", "conv2d-ghost-rows", "text-long", "tied", "lstm"])
def test_compiled_fast_is_one_graph_and_exact(name):
    """Dynamo traces the whole step (fullgraph) and, run by its eager backend, the float64
    result is the oracle's at 1e-10."""
    fn, params, batch = (MODELS.get(name) or EXTRA[name])()
    _, norms = reference(fn, params, batch, 1e30)
    c = float(norms.median())
    expected, expected_norms = reference(fn, params, batch, c)
    step = dp.compiled_clipped_grad_sum(fn, c, method="fast", backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf is tapped: no materialisation warning
        summed, got = step(params, *batch)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)
    again, _ = step(params, *batch)  # the cached graph
    assert_tree_close(again, expected)


def test_compiled_fast_warns_and_materialises_leaves_without_a_tap():
    fn, params, batch = shared_with_plain_op()
    expected, _ = reference(fn, params, batch, 0.5)
    step = dp.compiled_clipped_grad_sum(fn, 0.5, backend="eager")
    with pytest.warns(UserWarning, match="2 of 5 parameter leaves"):
        summed, _ = step(params, *batch)
    assert_tree_close(summed, expected)


def test_compiled_fast_plans_once_for_every_batch_size(monkeypatch):
    """Batch sizes vary under Poisson sampling: one plan serves them all (each size gets a
    compiled graph of its own), and every size gets its exact sum."""
    from psgfunc.dp import _compiled

    calls = []
    monkeypatch.setattr(_compiled, "discover", lambda prep: calls.append(prep.size) or discover(prep))
    fn, params, (x, y) = mlp()
    step = dp.compiled_clipped_grad_sum(fn, 0.5, backend="eager")
    for n in (5, 3, 4):
        expected, _ = reference(fn, params, (x[:n], y[:n]), 0.5)
        summed, norms = step(params, x[:n], y[:n])
        assert norms.shape == (n,)
        assert_tree_close(summed, expected)
    assert calls == [5]


def test_compiled_fast_refuses_bad_input():
    fn, params, (x, y) = mlp()
    step = dp.compiled_clipped_grad_sum(fn, 0.5, backend="eager")
    with pytest.raises(ValueError, match="NaN or Inf"):
        step(params, x * float("nan"), y)
    with pytest.raises(ValueError, match="empty"):
        step(params, x[:0], y[:0])
    with pytest.raises(ValueError, match="leading"):
        step(params, x, y[:2])
    with pytest.raises(ValueError, match="unknown method"):
        dp.compiled_clipped_grad_sum(fn, 0.5, method="ghost")


def test_a_pass_that_does_not_follow_its_plan_is_refused():
    """A traced pass whose layer calls differ from the planning run's (fewer, more, other
    shapes) raises a ValueError, never a sum over mismatched pieces."""
    g = gen()
    params = {"a": PF.init_linear(3, 3, dtype=DT, generator=g)}

    def fn(p, x):
        return PF.linear(p["a"], torch.tanh(PF.linear(p["a"], x))).sum()

    prep = _prepare(fn, params, (torch.randn(4, 3, dtype=DT, generator=g),), None, "different")
    plan = discover(prep)
    assert len(plan.calls) == 2
    with pytest.raises(ValueError, match="the same layers"):
        tap_pieces(prep, plan._replace(calls=plan.calls[:1]), prep.p_leaves, prep.b_leaves)
    with pytest.raises(ValueError, match="the same layers"):
        tap_pieces(prep, plan._replace(calls=plan.calls + plan.calls[:1]), prep.p_leaves, prep.b_leaves)
    wrong = plan._replace(calls=[((5,), DT)] + plan.calls[1:])
    with pytest.raises(ValueError, match="the same layers"):
        tap_pieces(prep, wrong, prep.p_leaves, prep.b_leaves)


def test_compiled_embedding_refuses_out_of_range_indices():
    """Under the compiler the embedding's own range check is off (it would split the graph);
    the compiled lookup must still refuse an index outside the table."""
    fn, params, (ids, y) = MODELS["text-short"]()
    step = dp.compiled_clipped_grad_sum(fn, 0.5)
    step(params, ids, y)
    bad = ids.clone()
    bad[1, 1] = 11
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        step(params, bad, y)


def test_compiled_fast_follows_a_changed_fn_of_the_same_shapes():
    """fn reads a flag that swaps two same-shaped layers between calls: the compiler retraces
    (its guards see the flag) and the pieces follow the leaves of the traced pass, not those
    of the planning run (which would credit each layer's gradient to the other weight)."""
    g = gen()
    params = {n: PF.init_linear(4, 4, dtype=DT, generator=g) for n in ("a", "b")}
    x, y = torch.randn(5, 4, dtype=DT, generator=g), torch.randn(5, 4, dtype=DT, generator=g)
    flag = {"swap": False}

    def fn(p, xi, yi):
        first, second = (p["b"], p["a"]) if flag["swap"] else (p["a"], p["b"])
        return (PF.linear(second, torch.tanh(PF.linear(first, xi))) - yi).pow(2).sum()

    step = dp.compiled_clipped_grad_sum(fn, 0.5, backend="eager")
    for swap in (False, True):
        flag["swap"] = swap
        expected, _ = reference(fn, params, (x, y), 0.5)
        summed, _ = step(params, x, y)
        assert_tree_close(summed, expected)


def test_tapped_layers_keep_the_plain_layers_errors():
    """A tapped call validates as the plain layer does (a mis-shaped LayerNorm weight would
    otherwise broadcast silently)."""
    x = torch.randn(3, 2, 4, dtype=DT)
    bad = {"weight": torch.ones(1, dtype=DT), "bias": torch.zeros(4, dtype=DT)}

    def fn(p, xi):
        return PF.layer_norm(p, xi, (4,)).pow(2).sum()

    with pytest.raises(ValueError, match="layer_norm"):
        tapped_sum(fn, bad, (x,), 1.0)
