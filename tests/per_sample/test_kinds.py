"""Gradient kinds (``psgfunc.per_sample._kinds``): what parameters of one pass share."""

from __future__ import annotations

import torch

from psgfunc.per_sample._kinds import LeafPieces, Outer, RowSum, leaf_pieces

F64 = torch.float64


def _lstm_like_pieces(batch=3, steps=3, gates=16, inputs=6, hidden=5):
    """An LSTM layer's pieces: W_ih (dz, x), W_hh (dz, h_prev), b_ih and b_hh (dz): one dz."""
    gen = torch.Generator().manual_seed(0)
    dz = torch.randn(steps, batch, gates, dtype=F64, generator=gen).transpose(0, 1)  # time-major
    x = torch.randn(batch, steps, inputs, dtype=F64, generator=gen)
    h_prev = torch.randn(batch, steps, hidden, dtype=F64, generator=gen)
    records = [[(Outer(), (dz, x))], [(Outer(), (dz, h_prev))], [(RowSum(), (dz,))], [(RowSum(), (dz,))]]
    shapes = [(gates, inputs), (gates, hidden), (gates,), (gates,)]
    dense = [
        torch.einsum("btg,bti->bgi", dz, x),
        torch.einsum("btg,bth->bgh", dz, h_prev),
        dz.sum(1),
        dz.sum(1),
    ]
    return records, shapes, dense, batch


def test_leaf_pieces_share_what_parameters_have_in_common(monkeypatch):
    records, shapes, dense, batch = _lstm_like_pieces()
    # N (O + I) < O I for both weights: Gram norms, whose dz Gram is computed once
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape) or bmm(a, b))
    shared = leaf_pieces(records, [None] * 4, batch, shapes)
    assert len(calls) == 3  # Gram of dz, of x, of h_prev
    calls.clear()
    alone = [LeafPieces(r, None, batch, s) for r, s in zip(records, shapes)]
    assert len(calls) == 4
    c = torch.rand(batch, dtype=F64)
    for leaf, own, expected in zip(shared, alone, dense):
        torch.testing.assert_close(leaf.sq_norm, expected.flatten(1).pow(2).sum(1), rtol=1e-10, atol=0)
        torch.testing.assert_close(own.sq_norm, leaf.sq_norm, rtol=1e-10, atol=0)
        torch.testing.assert_close(leaf.weighted_sum(c), torch.einsum("b,b...->...", c, expected),
                                   rtol=1e-10, atol=1e-12)
    # the two biases' norms come from one [B, 4H] gradient between them
    assert shared[2].sq_norm is shared[3].sq_norm


def test_linear_bias_reuses_the_output_gradient_norm():
    gen = torch.Generator().manual_seed(1)
    g, x = torch.randn(4, 1, 3, dtype=F64, generator=gen), torch.randn(4, 1, 5, dtype=F64, generator=gen)
    weight, bias = leaf_pieces([[(Outer(), (g, x))], [(RowSum(), (g,))]], [None, None], 4, [(3, 5), (3,)])
    torch.testing.assert_close(bias.sq_norm, g[:, 0].pow(2).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(weight.sq_norm, bias.sq_norm * x[:, 0].pow(2).sum(1), rtol=1e-12, atol=0)
    c = torch.rand(4, dtype=F64, generator=gen)
    torch.testing.assert_close(bias.weighted_sum(c), c @ g[:, 0], rtol=1e-12, atol=0)


def test_leaf_pieces_do_not_share_different_tensors():
    records, shapes, dense, batch = _lstm_like_pieces()
    other = records[0][0][1][0].clone()  # equal values, another tensor: computed on its own
    records[1] = [(Outer(), (other, records[1][0][1][1]))]
    records[3] = [(RowSum(), (other * 2,))]
    dense[3] = dense[3] * 2
    leaves = leaf_pieces(records, [None] * 4, batch, shapes)
    assert leaves[2].sq_norm is not leaves[3].sq_norm
    for leaf, expected in zip(leaves, dense):
        torch.testing.assert_close(leaf.sq_norm, expected.flatten(1).pow(2).sum(1), rtol=1e-10, atol=0)


def test_one_row_outer_norm_of_underflowing_inputs_is_bounded():
    """Review reproducer: a linear layer's one-row norm ``||g|| ||x||`` with float32 inputs
    whose squares underflow (about 3e-23) and output gradients near float32's largest
    squares (3e18): ||x||^2 came out 0 or subnormal, far below what gamma_k covers, and the
    product with ||g||^2 amplified it; the bound is now above the exact norm."""
    from psgfunc.per_sample._kinds import certified_norm

    gen = torch.Generator().manual_seed(0)
    g = (3e18 * torch.randn(4, 1, 8, dtype=torch.float64, generator=gen)).float()
    x = (3e-23 * torch.randn(4, 1, 600, dtype=torch.float64, generator=gen)).float()
    x[3] = 0  # (an underflowed input's norm may be 0 too: a small bound remains)
    x[2], g[2] = torch.randn(1, 600, generator=gen), 1.0  # ordinary rows: as tight as before
    leaf = LeafPieces([(Outer(), (g, x))], None, 4, (8, 600))
    norms = certified_norm([leaf]).double()
    exact = torch.linalg.vector_norm(g.double().transpose(1, 2) @ x.double(), dim=(1, 2))
    assert bool((norms >= exact).all()), norms / exact
    assert float(norms[2]) <= float(exact[2]) * (1 + 1e-5)
    assert 0 < float(norms[3]) < 0.02


def test_one_position_norms_computed_together_match_each_alone():
    """``leaf_pieces`` computes the row norms of all one-position pieces (a linear layer on
    vectors: its input and output gradient) in one stacked pass: the same squares as
    :func:`sq_norms` of each, with the group's largest underflow term, which covers each
    one's own (float32, float64 and bfloat16 pieces; rows of different lengths)."""
    from psgfunc.per_sample._kinds import sq_norms

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, F64, torch.bfloat16):
        gs = [torch.randn(5, 1, k, generator=gen).to(dtype) for k in (3, 7)]
        xs = [torch.randn(5, 1, k, generator=gen).to(dtype) for k in (11, 512)]
        records = [[(Outer(), (gs[0], xs[0]))], [(RowSum(), (gs[0],))], [(Outer(), (gs[1], xs[1]))]]
        leaves = leaf_pieces(records, [None] * 3, 5, [(3, 11), (3,), (7, 512)])
        alone = [LeafPieces(r, None, 5, s) for r, s in zip(records, [(3, 11), (3,), (7, 512)])]
        for leaf, own in zip(leaves, alone):
            assert bool((leaf.sq_norm >= own.sq_norm).all())
            torch.testing.assert_close(leaf.sq_norm, own.sq_norm, rtol=0, atol=1e-30)
        torch.testing.assert_close(leaves[1].sq_norm, sq_norms(gs[0]), rtol=0, atol=1e-30)


def test_one_position_norms_together_of_underflowing_inputs_are_bounded():
    """The stacked one-position norms keep the underflow bound: float32 inputs whose squares
    underflow (3e-23) under output gradients near float32's largest squares (3e18), rows of
    several lengths in one group, certified above the exact norm."""
    from psgfunc.per_sample._kinds import certified_norm

    gen = torch.Generator().manual_seed(4)
    g1 = (3e18 * torch.randn(4, 1, 8, dtype=F64, generator=gen)).float()
    x1 = (3e-23 * torch.randn(4, 1, 500, dtype=F64, generator=gen)).float()
    g2 = (3e18 * torch.randn(4, 1, 3, dtype=F64, generator=gen)).float()
    x2 = (3e-23 * torch.randn(4, 1, 20, dtype=F64, generator=gen)).float()
    x1[3] = 0
    leaves = leaf_pieces([[(Outer(), (g1, x1))], [(Outer(), (g2, x2))]], [None, None], 4, [(8, 500), (3, 20)])
    norms = certified_norm(leaves).double()
    exact = sum(torch.linalg.vector_norm(g.double().transpose(1, 2) @ x.double(), dim=(1, 2)).square()
                for g, x in ((g1, x1), (g2, x2))).sqrt()
    assert bool((norms >= exact).all()), norms / exact


def test_weight_and_bias_sums_share_the_scaled_rows_only_for_the_same_tensors():
    """A linear layer's weight and bias sums start from the same scaled output-gradient rows
    (made once, kept for the next sum): in either order, with the same factors or others,
    and never for another gradient with equal values (each sum against its own reference)."""
    from psgfunc.per_sample._clip import weighted_sums

    gen = torch.Generator().manual_seed(5)
    g = torch.randn(6, 1, 4, dtype=F64, generator=gen)
    x = torch.randn(6, 1, 9, dtype=F64, generator=gen)
    twin = g.clone()  # equal values, another tensor
    c1, c2 = torch.rand(6, dtype=F64, generator=gen), torch.rand(6, dtype=F64, generator=gen)
    records = [[(RowSum(), (g,))], [(Outer(), (g, x))], [(Outer(), (twin * 2, x))], [(RowSum(), (twin * 2,))],
               [(RowSum(), (g,))]]
    shapes = [(4,), (4, 9), (4, 9), (4,), (4,)]
    for factors in ([c1] * 5, [c1, c2, c1, c2, c2], [c2, c1, c1, c1, c1]):
        leaves = leaf_pieces(records, [None] * 5, 6, shapes)
        sums = weighted_sums(leaves, factors, release=True)
        expected = [factors[0] @ g[:, 0], torch.einsum("b,bo,bi->oi", factors[1], g[:, 0], x[:, 0]),
                    torch.einsum("b,bo,bi->oi", factors[2], 2 * g[:, 0], x[:, 0]), factors[3] @ (2 * g[:, 0]),
                    factors[4] @ g[:, 0]]
        for got, want in zip(sums, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _linear_stack_records(dtype, batch=5, widths=(7, 4, 6, 3), gen=None):
    """Pieces of linear layers on vectors (each layer: weight, then bias on all but the
    second): ``(records, shapes, [(g, x, bias?)])``, one output gradient per layer."""
    gen = gen or torch.Generator().manual_seed(6)
    records, shapes, layers = [], [], []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        g = torch.randn(batch, 1, b, dtype=F64, generator=gen).to(dtype)
        x = torch.randn(batch, 1, a, dtype=F64, generator=gen).to(dtype)
        records.append([(Outer(), (g, x))])
        shapes.append((b, a))
        if i != 1:
            records.append([(RowSum(), (g,))])
            shapes.append((b,))
        layers.append((g, x, i != 1))
    return records, shapes, layers


def _per_leaf(records, size, shapes):
    """The leaves as the per-leaf route builds them (the one-position norms computed
    together, as :func:`leaf_pieces` does outside the lane)."""
    from psgfunc.per_sample._kinds import _prefetch_sq1

    cache = {}
    _prefetch_sq1(cache, [t for r in records for t in r[0][0].one_position([r[0][1]])])
    return [LeafPieces(r, None, size, s, cache) for r, s in zip(records, shapes)]


def test_linear_stack_norms_in_one_lane_are_the_per_leaf_ones():
    """A pass of linear layers on vectors only (an MLP) gets its norms in one lane: the
    certified norm and every leaf's bound bit for bit those of the per-leaf route, above the
    exact norm of the pieces; a subset of the leaves (per-layer clipping) and a leaf after
    its pieces are released still get their own bounds."""
    from psgfunc.per_sample._kinds import certified_norm

    for dtype in (torch.float32, F64):
        records, shapes, layers = _linear_stack_records(dtype)
        leaves = leaf_pieces(records, [None] * len(records), 5, shapes)
        assert all(leaf._lane is not None for leaf in leaves)
        alone = _per_leaf(records, 5, shapes)
        assert torch.equal(certified_norm(leaves), certified_norm(alone))
        for leaf, own in zip(leaves, alone):
            assert torch.equal(leaf.sq_norm, own.sq_norm)
            assert leaf.bound[3:] == own.bound[3:] and leaf.dtype == own.dtype
        assert torch.equal(certified_norm(leaves[:3]), certified_norm(alone[:3]))
        exact = sum(torch.linalg.vector_norm(g.double().transpose(1, 2) @ x.double(), dim=(1, 2)).square()
                    + (g.double().square().sum((1, 2)) if bias else 0) for g, x, bias in layers).sqrt()
        assert bool((certified_norm(leaves).double() >= exact).all())
        fresh = leaf_pieces(records, [None] * len(records), 5, shapes)
        fresh[0].release()
        assert torch.equal(fresh[0].sq_norm, alone[0].sq_norm)


def test_linear_stack_lane_is_not_taken_where_a_leaf_differs():
    """Only all-linear-on-vectors passes of one full-precision dtype take the lane: half
    precision, a sequence (several positions), a dense part, mixed dtypes and rows longer
    than one reduction take the per-leaf route."""
    from psgfunc.per_sample._kinds import SummedRows, certified_norm

    gen = torch.Generator().manual_seed(7)
    records, shapes, _ = _linear_stack_records(torch.float32, gen=gen)
    g, x = records[0][0][1]
    cases = {
        "bfloat16": _linear_stack_records(torch.bfloat16, gen=gen)[0],
        "sequence": [[(Outer(), (g.expand(5, 2, g.shape[2]), x.expand(5, 2, x.shape[2])))]] + records[1:],
        "mixed": [[(Outer(), (g.double(), x.double()))]] + records[1:],
        "long rows": [[(Outer(), (g, torch.randn(5, 1, 513, generator=gen)))]] + records[1:],
        "summed rows": records[:1] + [[(SummedRows(), (g, torch.zeros(5)))]] + records[2:],
    }
    for name, recs in cases.items():
        shp = [(1,)] * len(recs)
        leaves = leaf_pieces(recs, [None] * len(recs), 5, shp)
        assert all(leaf._lane is None for leaf in leaves), name
    dense = [None] * len(records)
    dense[2] = torch.randn(5, *shapes[2], generator=gen)
    leaves = leaf_pieces(records, dense, 5, shapes)
    assert all(leaf._lane is None for leaf in leaves)
    assert bool((certified_norm(leaves) > 0).all())


def test_a_bound_set_on_a_lane_leaf_is_the_one_certified():
    """A bound assigned to a leaf of the lane (as certified_norm's refinement does for Gram
    bounds) takes that leaf out of the lane: the certified norm reads it."""
    from psgfunc.per_sample._kinds import certified_norm

    records, shapes, _ = _linear_stack_records(F64)
    leaves = leaf_pieces(records, [None] * len(records), 5, shapes)
    before = certified_norm(leaves)
    leaves[1].bound = leaves[1].bound._replace(sq=leaves[1].sq_norm * 100)
    assert leaves[1]._lane is None
    assert bool((certified_norm(leaves) > before).all())


def test_one_position_weight_norm_whose_product_underflows_still_clips():
    """Review reproducer: a linear weight on vectors with inputs of 1e-25 under output
    gradients of 1e-5 (float32; 1e-170 and 1e-5 in float64): each squared row norm is
    raised by its underflow term, but their product fell below the smallest subnormal
    number and rounded to 0, so with ``C = 1e-33`` the example was not clipped at all (the
    clipped sum came out 2,400 times ``B C``). Both the lane and the per-leaf route certify
    a norm above the exact one, and every contribution stays within ``C``."""
    import math

    import psgfunc.functional as PF
    from psgfunc.dp import clipped_grad_sum
    from psgfunc.per_sample._kinds import certified_norm

    for dtype, tiny, c in ((torch.float32, 1e-25, 1e-33), (F64, 1e-170, 1e-200)):
        g = torch.full((2, 1, 3), 1e-5, dtype=dtype)
        x = torch.full((2, 1, 2), tiny, dtype=dtype)
        exact = math.sqrt(6) * 1e-5 * tiny
        records = [[(Outer(), (g, x))], [(RowSum(), (g * 1e-30,))]]
        lane = leaf_pieces(records, [None, None], 2, [(3, 2), (3,)])
        assert lane[0]._lane is not None
        for leaves in (lane, _per_leaf(records, 2, [(3, 2), (3,)]), [LeafPieces(records[0], None, 2, (3, 2))]):
            assert bool((certified_norm(leaves).double() >= exact).all())
        params = {"l": {"weight": torch.full((3, 2), 1e-5, dtype=dtype)}}
        xs, ys = torch.full((2, 2), tiny, dtype=dtype), torch.full((2, 3), 1e-5, dtype=dtype)
        sums, norms = clipped_grad_sum(lambda p, xi, yi: (PF.linear(p["l"], xi) * yi).sum(), params, xs, ys,
                                       max_norm=c, method="fast")
        assert bool((norms.double() >= exact).all())
        assert float(sums["l"]["weight"].double().norm()) <= 2 * c * (1 + 1e-5)
