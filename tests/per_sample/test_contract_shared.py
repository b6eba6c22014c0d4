"""Contractions with an index shared by the input, the parameter and the output (issue 13).

``bmm(x, W)`` with ``W [G, K, N]``, ``matmul`` with a parameter of 3 or more dims, per-head
``einsum("htd,hde->hte")``, ``baddbmm``, and ``addmm``/``addmv`` with ``alpha``/``beta``, and
``F.bilinear``: exact per-sample gradients under ``"expanded"`` and ``"auto"`` (float64
per-example loop, 1e-10), fast clipping equal to the materialising reference with nothing
materialised by vmap and no warning; the grouped kind's certified norm never under the exact
norm on crafted cancelling inputs (float32 and bfloat16, Gram and direct forms).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
from psgfunc.per_sample._clip import grad_pieces
from psgfunc.per_sample.rules.matmul import GroupedOuter, contract_plan
from tests.per_sample.test_torch_ops import B, check, rand


def test_plan_of_a_shared_index():
    plan = contract_plan("htd", "hde", "hte", (2, 4, 3))
    assert (plan.s, plan.n, plan.i, plan.o) == ("h", "t", "d", "e")
    assert plan.kind == GroupedOuter((2, 4, 3)) and plan.x_first
    plan = contract_plan("gin", "goi", "gon", (2, 3, 4))  # bmm(W, x): [G, O, I], g^T x per group
    assert plan.kind == GroupedOuter((2, 3, 4)) and not plan.x_first
    plan = contract_plan("htd", "ehd", "hte", (3, 2, 4))  # [S, I, O] permuted into W's order
    assert plan.kind == GroupedOuter((2, 4, 3), (2, 0, 1))
    assert contract_plan("hhd", "hde", "hte", (2, 4, 3)) is None  # a diagonal still has no form


def test_grouped_kind_against_dense():
    """materialize, norms and weighted sum of two pieces against the dense gradients."""
    torch.manual_seed(0)
    datas = [(rand(B, 6, n, 5), rand(B, 6, n, 8)) for n in (2, 3)]
    kind = GroupedOuter((2, 3, 5, 8))
    dense = sum(kind.materialize(*d) for d in datas)
    expected = torch.einsum("bsnp,bsnq->bspq", torch.cat([d[0] for d in datas], 2),
                            torch.cat([d[1] for d in datas], 2)).reshape(B, 2, 3, 5, 8)
    torch.testing.assert_close(dense, expected, rtol=1e-12, atol=0)
    bound = kind.bound(datas)
    torch.testing.assert_close(bound.sq, dense.square().sum((1, 2, 3, 4)), rtol=1e-12, atol=0)
    c = rand(B)
    torch.testing.assert_close(kind.weighted_sum(datas, c), torch.einsum("b,b...->...", c, dense),
                               rtol=1e-12, atol=1e-12)
    permuted = GroupedOuter((6, 5, 8), (2, 0, 1))
    torch.testing.assert_close(permuted.materialize(*datas[0]),
                               kind.materialize(*datas[0]).reshape(B, 6, 5, 8).permute(0, 3, 1, 2))
    torch.testing.assert_close(permuted.weighted_sum(datas, c),
                               torch.einsum("b,b...->...", c, dense.reshape(B, 6, 5, 8).permute(0, 3, 1, 2)))


# Small shapes: the dense kind; 16 x 16 blocks of 3 positions: the Gram form (GroupedOuter).
OPS = {
    "bmm": (lambda p, x: torch.bmm(x, p["w"]).sin().sum(), {"w": rand(2, 4, 3)}, rand(B, 2, 5, 4)),
    "Tensor.bmm gram": (lambda p, x: x.bmm(p["w"]).sin().sum(), {"w": rand(2, 16, 16)}, rand(B, 2, 3, 16)),
    "bmm(W, x) gram": (lambda p, x: torch.bmm(p["w"], x).sin().sum(), {"w": rand(2, 16, 16)}, rand(B, 2, 16, 3)),
    "matmul 3-d": (lambda p, x: torch.matmul(x, p["w"]).sin().sum(), {"w": rand(2, 16, 12)}, rand(B, 2, 3, 16)),
    "matmul broadcast": (lambda p, x: (x @ p["w"]).sin().sum(), {"w": rand(3, 2, 4, 3)}, rand(B, 1, 2, 5, 4)),
    "matmul x batch of 1": (lambda p, x: (x @ p["w"]).sin().sum(), {"w": rand(2, 4, 3)}, rand(B, 6, 1, 5, 4)),
    "matmul 1-d x": (lambda p, x: (x @ p["w"]).sin().sum(), {"w": rand(2, 4, 3)}, rand(B, 4)),
    "W@x 3-d": (lambda p, x: (p["w"] @ x).sin().sum(), {"w": rand(2, 12, 16)}, rand(B, 2, 16, 3)),
    "baddbmm": (lambda p, x: torch.baddbmm(p["b"], x, p["w"], beta=0.5, alpha=2.0).sin().sum(),
                {"w": rand(2, 16, 16), "b": rand(2, 1, 16)}, rand(B, 2, 3, 16)),
    "baddbmm beta 1": (lambda p, x: torch.baddbmm(p["b"], x, p["w"]).sin().sum(),
                       {"w": rand(2, 4, 3), "b": rand(2, 5, 3)}, rand(B, 2, 5, 4)),
    "Tensor.baddbmm": (lambda p, x: (x.sum(-1, keepdim=True) * 0).baddbmm(x, p["w"], beta=0).sin().sum(),
                       {"w": rand(2, 4, 4)}, rand(B, 2, 3, 4)),
    "einsum heads": (lambda p, x: torch.einsum("htd,hde->hte", x, p["w"]).sin().sum(),
                     {"w": rand(2, 16, 12)}, rand(B, 2, 3, 16)),
    "einsum ellipsis": (lambda p, x: torch.einsum("...hd,hde->...he", x, p["w"]).sin().sum(),
                        {"w": rand(2, 4, 3)}, rand(B, 5, 2, 4)),
    "einsum permuted": (lambda p, x: torch.einsum("bhtd,ehd->bhte", x, p["w"]).sin().sum(),
                        {"w": rand(12, 2, 16)}, rand(B, 1, 2, 3, 16)),
    "einsum two groups": (lambda p, x: torch.einsum("ghtd,hgde->thge", x, p["w"]).sin().sum(),
                          {"w": rand(3, 2, 4, 5)}, rand(B, 2, 3, 6, 4)),
    "addmm alpha beta": (lambda p, x: torch.addmm(p["b"], x, p["w"], beta=0.5, alpha=-1.5).sin().sum(),
                         {"w": rand(4, 3), "b": rand(3)}, rand(B, 5, 4)),
    "addmm alpha, bias in rule": (lambda p, x: torch.addmm(p["b"], x, p["w"], alpha=3).sin().sum(),
                                  {"w": rand(16, 16), "b": rand(16)}, rand(B, 3, 16)),
    "addmm(W, x)": (lambda p, x: (x.t() @ x).addmm(p["w"], x, beta=2, alpha=0.25).sin().sum(),
                    {"w": rand(4, 5)}, rand(B, 5, 4)),
    "addmv": (lambda p, x: torch.addmv(p["b"], p["w"], x, beta=2).sin().sum(), {"w": rand(3, 4), "b": rand(3)},
              rand(B, 4)),
    "addmv vec": (lambda p, x: torch.addmv(p["b"], x, p["w"], alpha=2).sin().sum(), {"w": rand(4), "b": rand(3)},
                  rand(B, 3, 4)),
    "bilinear": (lambda p, x: F.bilinear(x, x.cos(), p["w"], p["b"]).sin().sum(), {"w": rand(3, 4, 4), "b": rand(3)},
                 rand(B, 5, 4)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_op_exact_and_fast(name):
    fn, params, x = OPS[name]
    check(fn, params, x)


@pytest.mark.parametrize("name", ["Tensor.bmm gram", "bmm(W, x) gram", "einsum heads", "einsum permuted"])
def test_grouped_gram_form_is_used(name):
    fn, params, x = OPS[name]
    assert [type(leaf.kind) for leaf in grad_pieces(fn, params, x).leaves] == [GroupedOuter]


@pytest.mark.parametrize("name", ["bmm", "einsum heads", "baddbmm", "addmm alpha beta"])
def test_batch_of_one(name):
    fn, params, x = OPS[name]
    check(fn, params, x[:1])


def test_parameter_used_twice():
    """bmm and einsum on one [G, K, N] weight (one kind: the pieces add up, Gram form), then a
    third use in another layout (two kinds: added up densely, still exact)."""
    params = {"w": rand(2, 16, 16)}

    def fn(p, x):
        h = torch.tanh(torch.bmm(x, p["w"]))
        return torch.einsum("htd,hde->hte", h, p["w"]).pow(2).sum()

    x = rand(B, 2, 3, 16)
    check(fn, params, x)
    assert [type(leaf.kind) for leaf in grad_pieces(fn, params, x).leaves] == [GroupedOuter]

    def fn3(p, x):
        return fn(p, x) + torch.einsum("htd,hed->hte", x, p["w"]).sin().sum()

    check(fn3, params, x, fast=False)


# ----------------------------------------- float32/bfloat16, cancelling inputs, a batch of one


def cancelling(gen, dtype, positions, k, n):
    """``(einsum("htd,hde->hte", x, W) * a).sum()`` for ONE example whose per-head outer
    products nearly cancel: rows of x in nearly equal pairs, rows of a in opposite ones."""
    heads = 2
    first = 1e3 * torch.randn(heads, positions // 2, k, generator=gen)
    x = torch.stack([first, first + 0.1 * torch.randn(first.shape, generator=gen)], 2).flatten(1, 2)
    a0 = 1e2 * torch.randn(heads, positions // 2, n, generator=gen)
    a = torch.stack([a0, -a0 * (1 + 1e-3 * torch.randn(heads, positions // 2, 1, generator=gen))], 2).flatten(1, 2)
    w = 0.01 * torch.randn(heads, k, n, generator=gen)
    fn = lambda p, x, a: (torch.einsum("htd,hde->hte", x, p["w"]) * a).sum()  # noqa: E731
    return fn, {"w": w.to(dtype)}, (x.to(dtype)[None], a.to(dtype)[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions, k, n", [(4, 32, 32), (6, 4, 4)])  # Gram form; dense
def test_cancelling_example_never_under_estimated(dtype, positions, k, n):
    """The clipped contribution stays within C and the reported norm is never under the norm
    of what the sum adds; the Gram form's bound is of the EXACT gradient of the pieces (the
    dense route's, as for every kind, of the materialised one: what its sum adds)."""
    gram = k * n > positions * (k + n)
    for seed in range(3):
        fn, params, batch = cancelling(torch.Generator().manual_seed(seed), dtype, positions, k, n)
        leaf = grad_pieces(fn, params, *batch).leaves[0]
        assert isinstance(leaf.kind, GroupedOuter) == gram  # the path under test ran
        exact = dp.clipped_grad_sum(fn, {"w": params["w"].double()}, *(t.double() for t in batch),
                                    max_norm=1e30, method="materialize")[1]
        for c in (1e-3, float(exact[0]) * 0.5, 1e30):
            summed, got = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
            norm = math.sqrt(float(summed["w"].double().square().sum()))
            assert summed["w"].dtype == dtype and got.dtype == torch.float32
            assert norm <= c * (1 + 1e-5)
            if gram:
                assert float(got[0]) >= float(exact[0])
            if c == 1e30:
                assert float(got[0]) >= norm * (1 - 1e-6)
                if gram and dtype == torch.float32:  # cancelling blocks recomputed in float64: tight
                    assert float(got[0]) <= float(exact[0]) * 1.01
