"""The compiled clipped sum is never computed from a stale plan, and no step poisons another.

``fn`` reads Python state (a closure cell, a module global) that changes what it does between
calls: a params leaf starts feeding a plain torch op, or ``fn`` makes more layer calls. The
compiler retraces on that state, the traced pass reports how it differs from its plan, and the
step plans again: every sum and norm equals the float64 per-example oracle at 1e-10. A step
whose trace fails raises ``fn``'s own error and leaves later steps (the same one, fresh ones)
working. Each step and batch size compiles a graph of its own (the compiler's recompile limit,
lowered here to keep the test short, is per graph), and where the limit is hit the step says
so. All graphs use dynamo's eager backend (tracing without Inductor) on tiny models.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc.dp import _compiled
from tests.dp.test_fast_clipping import DT, gen, reference
from tests.oracles import assert_tree_close

PLAIN = False
"""A module global that fn reads (the compiler guards on it)."""

MODE = 0
"""A module global that scales the loss (one more guard value per distinct MODE)."""


def tiny():
    g = gen()
    params = {"a": PF.init_linear(3, 4, dtype=DT, generator=g)}
    x, y = torch.randn(5, 3, dtype=DT, generator=g), torch.randn(5, 4, dtype=DT, generator=g)
    return params, x, y


def check(step, fn, params, x, y, c):
    expected, expected_norms = reference(fn, params, (x, y), c)
    summed, norms = step(params, x, y)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0)


def closure_flag_fn(change):
    """fn and a setter of the closure cell it reads; ``change``: what the flag turns on."""
    flag = False

    def fn(p, xi, yi):
        h = torch.tanh(PF.linear(p["a"], xi))
        if flag and change == "plain-use":
            h = h + 0.5 * (xi @ torch.sin(p["a"]["weight"]).T)  # a tapped leaf now also feeds a plain op
        if flag and change == "more-calls":
            h = torch.tanh(PF.linear(p["a"], h[:3]))  # a third layer call, planned for two
        return (h - yi).pow(2).sum()

    def set_flag(value):
        nonlocal flag
        flag = value

    return fn, set_flag


def global_flag_fn(p, xi, yi):
    h = torch.tanh(PF.linear(p["a"], xi))
    if PLAIN:
        h = h + 0.5 * (xi @ torch.sin(p["a"]["weight"]).T)  # sin: no per-sample rule
    return (h - yi).pow(2).sum()


@pytest.mark.parametrize("method", ["fast", "materialize"])
def test_closure_flag_that_makes_a_plain_op_use_a_tapped_leaf(method):
    """A closure cell flips after the first (planned, compiled) call: exact (before: the sum
    17% and the norms 50% off, without a word)."""
    params, x, y = tiny()
    fn, set_flag = closure_flag_fn("plain-use")
    step = dp.compiled_clipped_grad_sum(fn, 0.3, method=method, backend="eager")
    check(step, fn, params, x, y, 0.3)
    set_flag(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new plan's materialisation notice
        check(step, fn, params, x, y, 0.3)
    assert step.stats["eager_runs"] == 0
    assert step.stats["plans"] == (2 if method == "fast" else 0)


def test_closure_flag_that_adds_a_layer_call_and_back():
    """One more layer call than planned, then the planned calls again: each call exact, and
    going back reuses the first plan and its graph (before: ``TypeError: unhashable type``,
    then every later compiled step in the process failed)."""
    params, x, y = tiny()
    fn, set_flag = closure_flag_fn("more-calls")
    step = dp.compiled_clipped_grad_sum(fn, 0.3, backend="eager")
    for flag in (False, True, False):
        set_flag(flag)
        check(step, fn, params, x, y, 0.3)
    assert step.stats["plans"] == 3 and step.stats["eager_runs"] == 0


def test_global_flag_that_makes_a_plain_op_use_a_tapped_leaf(monkeypatch):
    params, x, y = tiny()
    step = dp.compiled_clipped_grad_sum(global_flag_fn, 0.3, backend="eager")
    check(step, global_flag_fn, params, x, y, 0.3)
    monkeypatch.setattr(sys.modules[__name__], "PLAIN", True)
    with pytest.warns(UserWarning, match="materialised"):  # the new plan materialises a.*
        check(step, global_flag_fn, params, x, y, 0.3)


def test_a_plain_use_is_caught_in_the_graph_even_when_planning_missed_it(monkeypatch):
    """The traced pass itself reports a tapped leaf that a plain op reached (the first
    planning run is made blind to the plain op here): the step plans again, with that leaf
    materialised, and the sum is exact."""
    params, x, y = tiny()
    module = sys.modules[__name__]
    honest = _compiled.discover

    def blind_first(prep, excluded=()):
        if excluded:
            return honest(prep, excluded)
        module.PLAIN = False  # plan as if fn used a.weight in its layer only
        try:
            return honest(prep)
        finally:
            module.PLAIN = True

    monkeypatch.setattr(module, "PLAIN", True)
    monkeypatch.setattr(_compiled, "discover", blind_first)
    step = dp.compiled_clipped_grad_sum(global_flag_fn, 0.3, backend="eager")
    with pytest.warns(UserWarning, match="materialised"):
        check(step, global_flag_fn, params, x, y, 0.3)
    assert step.stats["plans"] == 2


def test_a_pass_that_keeps_differing_from_fresh_plans_raises(monkeypatch):
    """A planner that never matches the traced pass (as for an fn whose layer calls change on
    every call) ends in the documented ValueError, never in a sum."""
    params, x, y = tiny()
    honest = _compiled.discover
    monkeypatch.setattr(_compiled, "discover",
                        lambda prep, excluded=(), **kw: honest(prep, **kw)._replace(calls=[]))
    fn, _ = closure_flag_fn("plain-use")
    step = dp.compiled_clipped_grad_sum(fn, 0.3, backend="eager")
    with pytest.raises(ValueError, match="still differs from its plan"):
        step(params, x, y)


def failing_fn():
    """fn that raises in its trace while ``bad`` is set."""
    bad = False

    def fn(p, xi, yi):
        h = torch.tanh(PF.linear(p["a"], xi))
        if bad:
            h = PF.layer_norm({"weight": p["a"]["bias"][:1], "bias": None}, h, (4,))  # mis-shaped
        return (h - yi).pow(2).sum()

    def set_bad(value):
        nonlocal bad
        bad = value

    return fn, set_bad


@pytest.mark.parametrize("method", ["fast", "materialize"])
def test_a_failed_step_breaks_nothing(method):
    """The failing trace raises fn's own error (not the compiler's); afterwards the same step
    and fresh steps, on the same fn and another, are exact (before: every later step in the
    process failed with ``TypeError: unhashable type: 'list'``)."""
    params, x, y = tiny()
    fn, set_bad = failing_fn()
    step = dp.compiled_clipped_grad_sum(fn, 0.3, method=method, backend="eager")
    set_bad(True)
    with pytest.raises(ValueError, match="layer_norm"):
        step(params, x, y)
    set_bad(False)
    check(step, fn, params, x, y, 0.3)  # the same step
    fresh = dp.compiled_clipped_grad_sum(fn, 0.3, method=method, backend="eager")
    check(fresh, fn, params, x, y, 0.3)


@pytest.fixture
def limit_one(monkeypatch):
    """The compiler's recompile limit lowered from 8 to 1 (two graphs on one code object show
    what nine would)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)


def test_every_step_and_batch_size_compiles_a_graph_of_its_own(limit_one):
    """Two steps (bounds the compiler's guards tell apart) and a second batch size each
    compile a graph; with one code object shared by all, all but the first ran eagerly
    without a word."""
    params, x, y = tiny()
    fn, _ = closure_flag_fn("plain-use")
    before = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = dp.compiled_clipped_grad_sum(fn, 0.2, backend="eager")
        check(first, fn, params, x, y, 0.2)
        step = dp.compiled_clipped_grad_sum(fn, 0.3, backend="eager")
        for n in (5, 3):
            check(step, fn, params, x[:n], y[:n], 0.3)
    assert counters["stats"]["unique_graphs"] - before == 3
    assert first.stats == {"compiles": 1, "plans": 1, "eager_runs": 0}
    assert step.stats == {"compiles": 2, "plans": 1, "eager_runs": 0}
    assert set(step.compile_seconds) == {5, 3} and min(step.compile_seconds.values()) > 0


def test_every_materialize_step_compiles_a_graph_of_its_own(limit_one):
    params, x, y = tiny()
    fn, _ = closure_flag_fn("plain-use")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for c in (0.2, 0.3):
            step = dp.compiled_clipped_grad_sum(fn, c, method="materialize", backend="eager")
            check(step, fn, params, x, y, c)
            assert step.stats["compiles"] == 1 and step.stats["eager_runs"] == 0


def test_hitting_the_recompile_limit_warns_and_stays_exact(limit_one, monkeypatch):
    """fn reads a global that takes a second value: the compiler runs the step eagerly (exact),
    the step warns, and the next call compiles a fresh graph."""
    params, x, y = tiny()

    def fn(p, xi, yi):
        return (1.0 + MODE) * (torch.tanh(PF.linear(p["a"], xi)) - yi).pow(2).sum()

    step = dp.compiled_clipped_grad_sum(fn, 0.3, backend="eager")
    check(step, fn, params, x, y, 0.3)
    monkeypatch.setattr(sys.modules[__name__], "MODE", 1)
    with pytest.warns(UserWarning, match="recompile limit"):
        check(step, fn, params, x, y, 0.3)
    assert step.stats["eager_runs"] == 1 and step.stats["compiles"] == 1
    check(step, fn, params, x, y, 0.3)  # a fresh graph
    assert step.stats["compiles"] == 2


def test_a_graph_break_in_fn_is_a_clear_error():
    """fn that the compiler cannot trace into one graph gets a ValueError naming the fix
    (before: an AssertionError from deep inside the compiler)."""
    params, x, y = tiny()

    def fn(p, xi, yi):
        torch._dynamo.graph_break()
        return (torch.tanh(PF.linear(p["a"], xi)) - yi).pow(2).sum()

    step = dp.compiled_clipped_grad_sum(fn, 0.3, backend="eager")
    with pytest.raises(ValueError, match="could not trace"):
        step(params, x, y)


@pytest.mark.parametrize("method", ["fast", "materialize"])
def test_gradients_too_large_to_square_in_float32_are_clipped_eagerly(method):
    """Finite float32 gradients with entries near 1e20 overflow the graph's squared norms
    (Inf): the call is run again by the eager clipped_grad_sum, whose result it returns
    (with a warning, once), not a NaN/Inf error about gradients that are finite."""
    g = torch.Generator().manual_seed(3)
    params = {"a": PF.init_linear(16, 8, generator=g)}
    x, y = torch.randn(4, 3, 16, generator=g) * 1e19, torch.randn(4, 3, 8, generator=g)

    def fn(p, xi, yi):
        return (PF.linear(p["a"], xi) * yi).sum()

    step = dp.compiled_clipped_grad_sum(fn, 1.0, method=method, backend="eager")
    with pytest.warns(UserWarning, match="ran again eagerly"):
        summed, norms = step(params, x, y)
    eager, eager_norms = dp.clipped_grad_sum(fn, params, x, y, max_norm=1.0, method=method)
    assert bool(torch.isfinite(norms).all()) and float(norms.min()) > 1e19
    torch.testing.assert_close(norms, eager_norms, rtol=0, atol=0)
    assert_tree_close(summed, eager, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per step
        step(params, x, y)
    with pytest.raises(ValueError, match="NaN or Inf"):  # a NaN gradient still raises
        step(params, x * float("nan"), y)


def test_dynamic_shapes_are_not_used_where_the_plan_materialises():
    """Review h17: with dynamic=True, the graph of a plan that materialises a leaf (an op
    without a per-sample rule, sin here) computed norms [0, 0, 0] for [10.44, 1.83, 0.097]
    and raised flags no leaf could have raised; the step's checks, which come from the same
    graph, ended in a misleading error. Such graphs now compile with static shapes (one per
    signature and batch size, as they are anyway), with a warning, and are exact."""
    g = gen()
    params = {"w": torch.randn(2, 3, dtype=DT, generator=g), "a": PF.init_linear(3, 2, dtype=DT, generator=g)}

    def fn(p, xi, yi):
        return ((torch.sin(p["w"]) @ xi + PF.linear(p["a"], xi)) * yi).pow(2).sum()

    step = dp.compiled_clipped_grad_sum(fn, 0.3, method="fast", backend="eager", dynamic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in (3, 1, 3):
            x, y = torch.randn(b, 3, dtype=DT, generator=g), torch.randn(b, 2, dtype=DT, generator=g)
            check(step, fn, params, x, y, 0.3)
    assert sum("dynamic=True is not used" in str(w.message) for w in caught) == 1  # once per step
