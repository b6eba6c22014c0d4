"""Rule of embedding_bag: per-sample gradients, fast clipping and the compiled (tapped) route
against the float64 per-example loop at 1e-10."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc import _rules, per_sample_grads
from psgfunc.per_sample.rules import embedding_bag as eb
from tests.dp.test_fast_clipping import reference
from tests.oracles import assert_tree_close, per_example_grads
from tests.per_sample.test_tap import tapped_sum

F64 = torch.float64
OFFSETS = torch.tensor([0, 2, 2, 5])
LAST = torch.tensor([0, 2, 2, 5, 9])


def table(seed=0):
    return {"weight": torch.randn(7, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))}


def batch(layout, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if layout == "2d":
        return torch.randint(0, 7, (4, 3, 5), generator=gen)
    return torch.randint(0, 7, (4, 9), generator=gen)


@pytest.fixture
def rule_calls(monkeypatch):
    calls = Counter()
    original = eb._BagPerSample.forward
    monkeypatch.setattr(eb._BagPerSample, "forward", staticmethod(lambda *a: calls.update(["rule"]) or original(*a)))
    return calls


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["2d", "offsets", "last_offset"])
def test_expanded_equals_loop_and_vmap(mode, layout, rule_calls):
    params, idx = table(), batch(layout)
    offsets = {"2d": None, "offsets": OFFSETS, "last_offset": LAST}[layout]
    padding_idx = 2 if layout != "offsets" else None
    idx[0, 0] = 2  # a padding entry (or an ordinary one) in the first bag

    def fn(p, i):
        return torch.sin(1.3 * PF.embedding_bag(p, i, offsets, mode=mode, padding_idx=padding_idx,
                                                include_last_offset=layout == "last_offset")).sum()

    expected = per_example_grads(fn, params, idx)
    assert_tree_close(per_sample_grads(fn, params, idx, method="expanded"), expected, dtype=F64)
    assert rule_calls["rule"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: no batching rule for embedding_bag (a loop)
        assert_tree_close(per_sample_grads(fn, params, idx, method="vmap"), expected, dtype=F64)


@pytest.mark.parametrize("layout", ["2d", "offsets"])
def test_per_sample_weights_batched_and_as_a_parameter(layout, rule_calls):
    """Weights per example (a batched input) and a shared weight parameter, which gets its own
    per-sample gradient ``G_bag . w[idx]``."""
    params, idx = table(), batch(layout)
    gen = torch.Generator().manual_seed(2)
    psw = torch.randn(idx.shape, dtype=F64, generator=gen)
    offsets = None if layout == "2d" else OFFSETS

    def fn(p, i, s):
        return torch.sin(PF.embedding_bag(p, i, offsets, mode="sum", per_sample_weights=s, padding_idx=3)).sum()

    expected = per_example_grads(fn, params, idx, psw)
    assert_tree_close(per_sample_grads(fn, params, idx, psw, method="expanded"), expected, dtype=F64)
    params = {**params, "psw": psw[0].clone()}

    def fn2(p, i):
        return torch.sin(PF.embedding_bag({"weight": p["weight"]}, i, offsets, mode="sum",
                                          per_sample_weights=p["psw"] * 1.5)).sum()

    expected = per_example_grads(fn2, params, idx)
    assert_tree_close(per_sample_grads(fn2, params, idx, method="expanded"), expected, dtype=F64)
    assert rule_calls["rule"] == 2


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_batch_mode_one_bag_per_example(mode):
    """The shells' conventions: rows [B, n] and [T] with offsets [B] are B one-bag examples;
    per-example (non-shared) tables fall back exactly."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 7, 3, dtype=F64, generator=gen)
    rows = torch.randint(0, 7, (3, 4), generator=gen)
    flat, offsets = torch.randint(0, 7, (6,), generator=gen), torch.tensor([0, 1, 1])
    with _rules.expanded_mode("batch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's vmap of embedding_bag (the fallback) is a loop
        shared = w[:1].expand(3, 7, 3)
        for weights in (shared, w):
            got = PF.embedding_bag({"weight": weights}, rows, mode=mode, padding_idx=1)
            got_flat = PF.embedding_bag({"weight": weights}, flat, offsets, mode=mode)
            for b in range(3):
                torch.testing.assert_close(got[b], F.embedding_bag(rows[b : b + 1], weights[b], mode=mode, padding_idx=1)[0])
                ref = F.embedding_bag(flat, weights[b], offsets, mode=mode)[b]  # bag 1 is empty
                torch.testing.assert_close(got_flat[b], ref)
        with pytest.raises(ValueError, match="params hold 3 examples but the input 2"):
            PF.embedding_bag({"weight": shared}, rows[:2])
        with pytest.raises(ValueError, match=r"needs idx \[B, bags, n\]"):
            PF.embedding_bag({"weight": shared}, rows, offsets)


# --------------------------------------------------------------------- fast clipping


def model():
    """A max bag of rows (2-D) and a mean bag with offsets and padding on one table, a sum bag
    with per_sample_weights on another -> linear."""
    g = torch.Generator().manual_seed(0)
    params = {"a": table(3), "b": {"weight": torch.randn(5, 3, dtype=F64, generator=g)},
              "fc": PF.init_linear(3, 2, dtype=F64, generator=g)}

    def fn(p, i, j, s, y):
        h = PF.embedding_bag(p["a"], i, mode="max").sum(0)
        h = h + PF.embedding_bag(p["a"], i.flatten(), OFFSETS, mode="mean", padding_idx=0).mean(0)
        h = h + PF.embedding_bag(p["b"], j, mode="sum", per_sample_weights=s).mean(0)
        return F.cross_entropy(PF.linear(p["fc"], torch.tanh(h)), y)

    return fn, params, (torch.randint(0, 7, (5, 3, 3), generator=g), torch.randint(0, 5, (5, 2, 4), generator=g),
                        torch.randn(5, 2, 4, dtype=F64, generator=g), torch.randint(0, 2, (5,), generator=g))


@pytest.mark.parametrize("max_norm", ["median", 1e30])
def test_fast_clipping_equals_materialize(max_norm):
    fn, params, data = model()
    _, norms_ = reference(fn, params, data, 1e30)
    c = float(norms_.median()) if max_norm == "median" else max_norm
    expected, expected_norms = reference(fn, params, data, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter has a rule: nothing materialised
        summed, got = dp.clipped_grad_sum(fn, params, *data, max_norm=c, method="fast")
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)
    mat, _ = dp.clipped_grad_sum(fn, params, *data, max_norm=c, method="materialize")
    assert_tree_close(summed, mat)


def test_tapped_equals_loop():
    fn, params, data = model()
    _, norms_ = reference(fn, params, data, 1e30)
    c = float(norms_.median())
    expected, expected_norms = reference(fn, params, data, c)
    summed, got, plan = tapped_sum(fn, params, data, c)
    assert plan.materialized == []
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's recompile budget (8 per code object) is shared by the whole test session and
    every compiled step compiles the same inner code: start from and leave a clean cache, so
    that these tests neither fail after others nor make later ones fail."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_fast_is_exact(fresh_dynamo):
    params = {"a": table(4)}

    def fn(p, i):
        h = PF.embedding_bag(p["a"], i, mode="max") + PF.embedding_bag(p["a"], i, mode="mean", padding_idx=1)
        return torch.sin(h).sum()

    data = (torch.randint(0, 7, (4, 2, 3), generator=torch.Generator().manual_seed(0)),)
    _, norms_ = reference(fn, params, data, 1e30)
    c = float(norms_.median())
    expected, expected_norms = reference(fn, params, data, c)
    step = dp.compiled_clipped_grad_sum(fn, c, method="fast", backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf is tapped
        summed, got = step(params, *data)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)


# ----------------------------------------- float32, cancelling inputs, a batch of one


@pytest.mark.parametrize("method", ["fast", "tapped"])
def test_float32_cancelling_batch_of_one_stays_within_bound(method):
    """One row twice in a bag with nearly opposite weights (and once more in another bag):
    the index-match norm of the unmerged rows rounded to 0 here; merged, the clipped sum of
    one example stays within C and the norm is never under the norm of what it adds."""

    def fn(p, i, s):
        return torch.sin(PF.embedding_bag(p, i, mode="sum", per_sample_weights=s)).sum()

    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        params = {"weight": torch.randn(50, 8, generator=gen)}
        idx = torch.tensor([[[3, 3, 5], [7, 3, 3]]])
        psw = torch.tensor([[[1e3, -1e3 * (1 + 1e-6 * float(torch.randn(1, generator=gen))), 1e-3],
                             [1.0, 1e3, -1e3]]])
        exact = dp.clipped_grad_sum(fn, {"weight": params["weight"].double()}, idx, psw.double(),
                                    max_norm=1e30, method="materialize")[1]
        for c in (1e-3, float(exact[0]) * 0.5, 1e30):
            if method == "fast":
                summed, got = dp.clipped_grad_sum(fn, params, idx, psw, max_norm=c, method="fast")
            else:
                summed, got, _ = tapped_sum(fn, params, (idx, psw), c)
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in summed.values()))
            assert norm <= c * (1 + 1e-5)
            if c == 1e30:
                assert float(got[0]) >= norm * (1 - 1e-6)


# ------------------------------------------------- torch.nn.EmbeddingBag, no rewriting


@pytest.mark.parametrize("layout", ["rows", "offsets"])
def test_nn_embedding_bag_through_functional_call_takes_the_rule(layout, rule_calls):
    """F.embedding_bag on the expanded params (a torch.nn model under per_sample_grads and
    clipped_grad_sum) runs this rule: exact, and fast clipping materialises nothing."""
    torch.manual_seed(0)
    model = torch.nn.EmbeddingBag(7, 3, mode="mean", padding_idx=2).to(F64)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 7, (4, 5), generator=gen)
    y = torch.randint(0, 2, (4,), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, i, yi):
        args = (i[None],) if layout == "rows" else (i, torch.tensor([0]))
        return F.cross_entropy(torch.func.functional_call(model, p, args)[:, :2], yi[None])

    expected = per_example_grads(fn, params, idx, y)
    assert_tree_close(per_sample_grads(fn, params, idx, y, method="expanded"), expected, dtype=F64)
    assert rule_calls["rule"] == 1
    _, norms_ = reference(fn, params, (idx, y), 1e30)
    c = float(norms_.median())
    want, want_norms = reference(fn, params, (idx, y), c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summed, got = dp.clipped_grad_sum(fn, params, idx, y, max_norm=c, method="fast")
    assert_tree_close(summed, want)
    torch.testing.assert_close(got, want_norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("edit", ["idx", "offsets"])
def test_indices_changed_in_place_before_the_backward_raise(edit):
    """Plain torch raises when the indices change between forward and backward; the rule
    keeps them by reference (not saved), so it checks their versions itself (before: the
    gradient silently went to the new rows)."""
    import psgfunc.nn as pnn

    torch.manual_seed(0)
    bag = pnn.EmbeddingBag(10, 4, mode="sum", max_batch_size=8).double()
    if edit == "idx":
        idx, offsets = torch.randint(0, 8, (3, 4)), None
    else:
        idx, offsets = torch.randint(0, 8, (6,)), torch.tensor([0, 2, 3])
    out = bag(idx, offsets)
    (idx if edit == "idx" else offsets).add_(1 if edit == "idx" else 0).clamp_(max=5)
    with pytest.raises(RuntimeError, match="embedding_bag: an index or offsets tensor .* modified in place"):
        out.sum().backward()
    params = {"weight": bag.weight.detach()}  # the functional route, under fast clipping too
    idx = torch.randint(0, 8, (3, 2, 4))

    def fn(p, i):
        out = PF.embedding_bag(p, i, mode="sum")
        i.add_(1)
        return out.square().sum()

    for method in ("expanded", "fast"):
        with pytest.raises(RuntimeError, match="modified in place"):
            if method == "fast":
                dp.clipped_grad_sum(fn, params, idx.clone(), max_norm=1.0, method="fast")
            else:
                per_sample_grads(fn, params, idx.clone(), method="expanded")
