"""``grad_pieces`` (``psgfunc.per_sample._clip``): passes without the torch-function rules'
mode once a pass showed ``fn`` hands no parameter to a torch function, and passes done
again with the mode when a later one does."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import psgfunc.functional as PF
from psgfunc.dp import clipped_grad_sum
from psgfunc.per_sample import _clip, _torch_ops

F64 = torch.float64


def _params(gen):
    return {
        "a": {"weight": torch.randn(5, 4, dtype=F64, generator=gen), "bias": torch.randn(5, dtype=F64, generator=gen)},
        "b": {"weight": torch.randn(3, 5, dtype=F64, generator=gen), "bias": torch.randn(3, dtype=F64, generator=gen)},
    }


def _loop(fn, params, x, t, c):
    """Clipped sum and norms by a per-example loop (float64, torch.func.grad)."""
    from torch.func import grad

    leaves = []
    for i in range(x.shape[0]):
        g = grad(fn)(params, x[i], t[i])
        leaves.append(g)
    flat = [torch.cat([v.flatten() for a in g.values() for v in a.values()]) for g in leaves]
    norms = torch.stack([f.norm() for f in flat])
    factors = (c / norms.clamp_min(c))
    total = {k: {n: sum(f * g[k][n] for f, g in zip(factors, leaves)) for n in params[k]} for k in params}
    return total, norms


def _count_modes(monkeypatch):
    entered = []
    real = _torch_ops.active

    def counting(method, params=()):
        entered.append(method)
        return real(method, params)

    monkeypatch.setattr(_torch_ops, "active", counting)
    return entered


def test_second_pass_runs_without_the_mode_and_gives_the_same_step(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    params = _params(gen)
    x, t = torch.randn(6, 4, dtype=F64, generator=gen), torch.randn(6, 3, dtype=F64, generator=gen)

    def fn(p, xi, ti):
        return ((PF.linear(p["b"], torch.tanh(PF.linear(p["a"], xi))) - ti) ** 2).sum()

    _clip._OPS_UNUSED.pop(fn.__code__, None)
    entered = _count_modes(monkeypatch)
    first = clipped_grad_sum(fn, params, x, t, max_norm=0.5)
    assert entered == ["expanded"] and _clip._OPS_UNUSED[fn.__code__] is True
    second = clipped_grad_sum(fn, params, x, t, max_norm=0.5)
    assert entered == ["expanded"]  # (the second pass: no mode)
    for a, b in zip(first[0].values(), second[0].values()):
        for n in a:
            assert torch.equal(a[n], b[n])
    assert torch.equal(first[1], second[1])
    total, norms = _loop(fn, params, x, t, 0.5)
    torch.testing.assert_close(second[1], norms, rtol=1e-12, atol=0)
    for k in total:
        for n in total[k]:
            torch.testing.assert_close(second[0][k][n], total[k][n], rtol=1e-12, atol=1e-14)


def test_a_parameter_handed_to_a_torch_op_later_is_done_again_with_the_rules(monkeypatch):
    """Same code, a branch taken later hands a weight to ``F.linear`` (a torch function with a
    rule): the pass without the mode sees a gradient outside the rules, is discarded and done
    again with the mode (no materialisation, no warning), and the mode stays on."""
    gen = torch.Generator().manual_seed(1)
    params = _params(gen)
    x, t = torch.randn(5, 4, dtype=F64, generator=gen), torch.randn(5, 3, dtype=F64, generator=gen)
    torch_op = [False]

    def fn(p, xi, ti):
        h = torch.tanh(PF.linear(p["a"], xi))
        out = F.linear(h, p["b"]["weight"], p["b"]["bias"]) if torch_op[0] else PF.linear(p["b"], h)
        return ((out - ti) ** 2).sum()

    _clip._OPS_UNUSED.pop(fn.__code__, None)
    entered = _count_modes(monkeypatch)
    clipped_grad_sum(fn, params, x, t, max_norm=0.5)
    assert _clip._OPS_UNUSED[fn.__code__] is True
    torch_op[0] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "materialised" warning: the rules served F.linear
        got, norms = clipped_grad_sum(fn, params, x, t, max_norm=0.5)
    assert entered == ["expanded", "expanded"] and _clip._OPS_UNUSED[fn.__code__] is None
    total, want = _loop(fn, params, x, t, 0.5)
    torch.testing.assert_close(norms, want, rtol=1e-12, atol=0)
    for k in total:
        for n in total[k]:
            torch.testing.assert_close(got[k][n], total[k][n], rtol=1e-12, atol=1e-14)
    torch_op[0] = False
    clipped_grad_sum(fn, params, x, t, max_norm=0.5)
    assert entered == ["expanded"] * 3  # the mode stays on for this code


def test_a_pass_that_fails_without_the_mode_is_done_again_with_it():
    """A later branch hands a weight to a torch function and fails without the rules (as an
    op with no batching rule for a batched weight would): done again with the mode."""
    gen = torch.Generator().manual_seed(2)
    params = _params(gen)
    x, t = torch.randn(4, 4, dtype=F64, generator=gen), torch.randn(4, 3, dtype=F64, generator=gen)
    torch_op = [False]

    def fn(p, xi, ti):
        h = PF.linear(p["a"], xi)
        if torch_op[0]:
            if torch._C._len_torch_function_stack() == 0:
                raise RuntimeError("no batching rule for a batched weight")
            return ((F.linear(h, p["b"]["weight"], p["b"]["bias"]) - ti) ** 2).sum()
        return ((PF.linear(p["b"], h) - ti) ** 2).sum()

    _clip._OPS_UNUSED.pop(fn.__code__, None)
    expected = clipped_grad_sum(fn, params, x, t, max_norm=1.0)
    torch_op[0] = True
    got = clipped_grad_sum(fn, params, x, t, max_norm=1.0)
    assert _clip._OPS_UNUSED[fn.__code__] is None
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=0)


def test_fn_s_own_failure_in_a_pass_without_the_mode_is_raised():
    """Review reproducer: fn raised once (its own error, no parameter to any torch function)
    in a pass without the mode; the call retried it with the mode and returned a step, where
    the code before raised. The error is raised (the pass with the mode saw no parameter)."""
    gen = torch.Generator().manual_seed(4)
    params = _params(gen)
    x, t = torch.randn(4, 4, dtype=F64, generator=gen), torch.randn(4, 3, dtype=F64, generator=gen)
    fail = [0]

    def fn(p, xi, ti):
        if fail[0]:
            fail[0] -= 1
            raise ValueError("bad batch")
        return ((PF.linear(p["b"], PF.linear(p["a"], xi)) - ti) ** 2).sum()

    _clip._OPS_UNUSED.pop(fn.__code__, None)
    clipped_grad_sum(fn, params, x, t, max_norm=1.0)
    assert _clip._OPS_UNUSED[fn.__code__] is True
    fail[0] = 1
    with pytest.raises(ValueError, match="bad batch"):
        clipped_grad_sum(fn, params, x, t, max_norm=1.0)


def test_a_pass_whose_parameter_meets_an_op_without_a_rule_keeps_the_mode():
    """A parameter used by an op with no rule is materialised (with the warning) on every
    pass: the mode saw it, so passes of that code never run without it."""
    gen = torch.Generator().manual_seed(3)
    params = _params(gen)
    x, t = torch.randn(4, 4, dtype=F64, generator=gen), torch.randn(4, 3, dtype=F64, generator=gen)

    def fn(p, xi, ti):
        h = PF.linear(p["a"], xi) * torch.sigmoid(p["a"]["bias"])  # (sigmoid: no rule)
        return ((PF.linear(p["b"], h) - ti) ** 2).sum()

    _clip._OPS_UNUSED.pop(fn.__code__, None)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, norms = clipped_grad_sum(fn, params, x, t, max_norm=0.5)
        assert any("materialised" in str(w.message) for w in caught)
    assert fn.__code__ not in _clip._OPS_UNUSED
    total, want = _loop(fn, params, x, t, 0.5)
    torch.testing.assert_close(norms, want, rtol=1e-12, atol=0)


def test_linear_layers_in_the_fast_pass_skip_the_generic_entry_with_the_same_step(monkeypatch):
    """In eager fast clipping's own pass a linear layer goes straight to its tapped form
    (``call_collected``): the clipped sum and norms are bit for bit those of the generic
    rule entry, also for a batch stored time-major, sequences, layers without a bias and
    bfloat16 params; under ``per_sample_grads`` (views no collector tracks) it
    declines and the rule runs as before."""
    from psgfunc import per_sample_grads
    from psgfunc.per_sample import _expanded
    from psgfunc.per_sample.rules import linear as linear_rule

    gen = torch.Generator().manual_seed(11)
    params = _params(gen)
    del params["b"]["bias"]

    def fn(p, x, t):
        h = torch.tanh(PF.linear(p["a"], x))  # [T, 4] -> [T, 5]
        return (PF.linear(p["b"], h).sum(0) * t).sum()

    x = torch.randn(3, 6, 4, dtype=F64, generator=gen).transpose(0, 1)  # [B, T, 4], stored [T, B, 4]
    t = torch.randn(6, 3, dtype=F64, generator=gen)
    taken = []
    real = _expanded.call_collected
    monkeypatch.setattr(linear_rule, "call_collected", lambda *a: taken.append(1) or real(*a))
    for dtype in (F64, torch.bfloat16):
        p = {k: {n: v.to(dtype) for n, v in d.items()} for k, d in params.items()}
        fast = clipped_grad_sum(fn, p, x.to(dtype), t.to(dtype), max_norm=0.5, method="fast")
        monkeypatch.setattr(linear_rule, "call_collected", lambda *a: NotImplemented)
        generic = clipped_grad_sum(fn, p, x.to(dtype), t.to(dtype), max_norm=0.5, method="fast")
        monkeypatch.setattr(linear_rule, "call_collected", lambda *a: taken.append(1) or real(*a))
        assert torch.equal(fast[1], generic[1])
        for k in p:
            for n in p[k]:
                assert torch.equal(fast[0][k][n], generic[0][k][n])
    assert taken
    declined = []
    monkeypatch.setattr(linear_rule, "call_collected", lambda *a: declined.append(real(*a)) or declined[-1])
    per_sample_grads(fn, params, x, t, method="expanded")
    assert declined and all(d is NotImplemented for d in declined)
