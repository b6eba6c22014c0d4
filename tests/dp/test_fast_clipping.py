"""Fast clipping (norms from activations and output gradients) equals materialise-then-clip.

Every psgfunc layer, with sequence dims, several uses of one weight, and a parameter that no
rule serves; float64 at 1e-10 relative (ARCHITECTURE.md rule 8).
"""

from __future__ import annotations

import math
import warnings

import optree
import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc.per_sample import _kinds
from psgfunc.per_sample.rules.conv import ConvWeight
from psgfunc.per_sample.rules.embedding import EmbeddingRows
from tests.oracles import assert_tree_close, per_example_grads

DT = torch.float64


def gen():
    return torch.Generator().manual_seed(0)


def mlp():
    g = gen()
    params = {"a": PF.init_linear(6, 8, dtype=DT, generator=g), "b": PF.init_linear(8, 3, dtype=DT, generator=g)}

    def fn(p, x, y):
        return F.cross_entropy(PF.linear(p["b"], torch.tanh(PF.linear(p["a"], x))), y)

    return fn, params, (torch.randn(5, 6, dtype=DT, generator=g), torch.randint(0, 3, (5,), generator=g))


def sequence_linear(n):
    """Linear over a sequence of n positions: Gram form for short, materialised for long."""
    g = gen()
    params = {"a": PF.init_linear(4, 5, dtype=DT, generator=g)}

    def fn(p, x):
        return torch.tanh(PF.linear(p["a"], x)).pow(2).sum()

    return fn, params, (torch.randn(4, n, 4, dtype=DT, generator=g),)


def tied():
    """One weight used three times (as in an RNN unrolled by hand, or tied layers)."""
    g = gen()
    params = {"w": PF.init_linear(16, 16, dtype=DT, generator=g)}  # 6 uses: Gram is cheaper

    def fn(p, x):
        h = x
        for _ in range(3):
            h = torch.tanh(PF.linear(p["w"], h))
        return h.pow(2).sum()

    return fn, params, (torch.randn(4, 2, 16, dtype=DT, generator=g),)


def cnn(dim):
    g = gen()
    k = (3,) * dim
    params = {
        "conv": PF.init_conv(2, 3, k, dtype=DT, generator=g),
        "conv2": PF.init_conv(3, 4, k, groups=1, dtype=DT, generator=g),
        "fc": PF.init_linear(4, 2, dtype=DT, generator=g),
    }
    conv = {1: PF.conv1d, 2: PF.conv2d, 3: PF.conv3d}[dim]

    def fn(p, x, y):
        h = torch.relu(conv(p["conv"], x, padding=1, padding_mode="reflect"))
        h = torch.relu(conv(p["conv2"], h, stride=2, dilation=1))
        h = h.flatten(1).mean(1)
        return F.cross_entropy(PF.linear(p["fc"], h), y)

    shape = (3, 2) + (7,) * dim
    return fn, params, (torch.randn(*shape, dtype=DT, generator=g), torch.randint(0, 2, (3,), generator=g))


def conv_ghost(dim, rows):
    """An ungrouped conv, used twice, whose output positions are few (``T^2 (I + O) < (T + 2)
    O I``, ``I = C K``): its norms take the Gram (ghost) form; ``rows``: examples shaped
    [N, C, *S]."""
    g = gen()
    params = {"conv": PF.init_conv(32, 32, (3,) * dim, dtype=DT, generator=g), "fc": PF.init_linear(32, 2, dtype=DT, generator=g)}
    conv = {1: PF.conv1d, 2: PF.conv2d}[dim]

    def fn(p, x, y):
        h = torch.tanh(conv(p["conv"], x, stride=2, padding=1))
        h = torch.tanh(conv(p["conv"], h, padding=2, dilation=2))  # the same weight again
        h = h.movedim(-1 - dim, -1).reshape(-1, 32).mean(0)
        return F.cross_entropy(PF.linear(p["fc"], h), y)

    shape = (3, *((rows,) if rows else ()), 32) + (4,) * dim
    return fn, params, (torch.randn(*shape, dtype=DT, generator=g), torch.randint(0, 2, (3,), generator=g))


def text(seq):
    """Embedding (padding_idx) -> layer_norm -> linear; short and long sequences."""
    g = gen()
    params = {
        "emb": PF.init_embedding(11, 4, padding_idx=0, dtype=DT, generator=g),
        "ln": {"weight": 1 + 0.1 * torch.randn(4, dtype=DT, generator=g), "bias": 0.1 * torch.randn(4, dtype=DT, generator=g)},
        "fc": PF.init_linear(4, 3, dtype=DT, generator=g),
    }

    def fn(p, ids, y):
        h = PF.layer_norm(p["ln"], PF.embedding(p["emb"], ids, padding_idx=0), (4,))
        return F.cross_entropy(PF.linear(p["fc"], h.mean(0)), y)

    ids = torch.randint(0, 11, (4, seq), generator=g)
    ids[0, :2] = 0
    return fn, params, (ids, torch.randint(0, 3, (4,), generator=g))


MODELS = {
    "mlp": mlp,
    "seq-short": lambda: sequence_linear(2),
    "seq-long": lambda: sequence_linear(30),
    "tied": tied,
    "conv1d": lambda: cnn(1),
    "conv2d": lambda: cnn(2),
    "conv3d": lambda: cnn(3),
    "conv1d-ghost": lambda: conv_ghost(1, None),
    "conv2d-ghost": lambda: conv_ghost(2, None),
    "conv2d-ghost-rows": lambda: conv_ghost(2, 2),
    "text-short": lambda: text(3),
    "text-long": lambda: text(12),
}


NEVER_MATERIALISED = ["mlp", "seq-short", "tied", "text-short", "text-long", "conv1d-ghost", "conv2d-ghost",
                      "conv2d-ghost-rows"]
"""Models whose layers all take the Gram / norm-product forms (nothing ``[B, *shape]``)."""


def forbid_materialising(m):
    """Make every weight kind fail if asked to materialise a per-sample gradient (``m``: a
    ``monkeypatch.context()``)."""

    def refuse(self, *data):
        raise AssertionError(f"{type(self).__name__} materialised a per-sample gradient")

    for kind in (_kinds.Outer, EmbeddingRows, ConvWeight):
        m.setattr(kind, "materialize", refuse)


def reference(fn, params, batch, max_norm):
    grads = per_example_grads(fn, params, *batch)
    clipped = dp.clip(grads, max_norm)
    return optree.tree_map(lambda t: t.sum(0), clipped), dp.per_sample_norms(grads)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("max_norm", ["median", 1e30])
def test_fast_equals_materialize(name, max_norm):
    fn, params, batch = MODELS[name]()
    _, norms = reference(fn, params, batch, 1e30)
    c = float(norms.median()) if max_norm == "median" else max_norm
    expected, expected_norms = reference(fn, params, batch, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter here has a rule: no fallback warning
        summed, got_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got_norms, expected_norms, rtol=1e-10, atol=0)
    mat, _ = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="materialize")
    assert_tree_close(summed, mat)


def test_dense_layers_never_materialise(monkeypatch):
    """Linear layers without long sequences, embeddings and convs with few output positions
    build no [B, O, I] / [B, V, D] / [B, O, C, *k].

    (Bias gradients [B, O] are built: they are the size of one activation.)
    """

    for name in NEVER_MATERIALISED:
        fn, params, batch = MODELS[name]()
        expected, _ = reference(fn, params, batch, 0.5)
        with monkeypatch.context() as m:
            forbid_materialising(m)
            summed, _ = dp.clipped_grad_sum(fn, params, *batch, max_norm=0.5)
        assert_tree_close(summed, expected)


def test_parameter_without_a_rule_is_materialised_with_a_warning():
    fn0, params, batch = mlp()
    params = dict(params, scale=torch.tensor(1.5, dtype=DT))

    def fn(p, x, y):  # exp of a parameter: no per-sample rule (x * p["scale"] has one)
        return fn0(p, x * p["scale"].exp(), y)

    expected, _ = reference(fn, params, batch, 0.5)
    with pytest.warns(UserWarning) as caught:  # also the op's own once-per-process fallback warning
        summed, _ = dp.clipped_grad_sum(fn, params, *batch, max_norm=0.5)
    assert any("1 of 5 parameter leaves" in str(w.message) for w in caught)
    assert_tree_close(summed, expected)


def test_per_layer_clipping_fast():
    fn, params, batch = mlp()
    max_norm = {"a": 0.2, "b": 0.3}
    expected, _ = reference(fn, params, batch, max_norm)
    summed, _ = dp.clipped_grad_sum(fn, params, *batch, max_norm=max_norm, method="fast")
    assert_tree_close(summed, expected)


@pytest.mark.parametrize("layer", ["linear", "sequence-gram", "sequence-direct", "conv-gram", "conv-xgram", "conv-direct"])
def test_float64_inputs_whose_squares_underflow_are_still_clipped(layer, monkeypatch):
    """A crafted float64 example: inputs of 1e-163 (their squares, 1e-326, underflow to 0)
    and a target that makes its output gradients about 1e150 (squares still finite), so its
    gradient's norm is about 1e-11. The norms from ||g|| ||x|| or from Grams came out 0
    (or a third low) and, with C = 1e-13, the example went into the sum unclipped; now
    every norm carries what underflow may take (float64 too), so each certified norm is at
    least the exact one and the example adds at most C."""
    from psgfunc.per_sample.rules import conv as conv_rule

    g = gen()
    c = 1e-13
    if layer.startswith("conv"):
        monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
        monkeypatch.setattr(ConvWeight, "_form", lambda self, datas: layer.split("-")[1])
        params = {"weight": torch.randn(6, 4, 3, 3, dtype=DT, generator=g)}
        x = torch.randn(3, 4, 7, 7, dtype=DT, generator=g)
        y = torch.randn(3, 6, 5, 5, dtype=DT, generator=g)

        def fn(p, xi, yi):
            return (PF.conv2d(p, xi) * yi).sum()
    else:
        steps = 1 if layer == "linear" else (3 if layer == "sequence-gram" else 40)
        params = {"weight": torch.randn(8, 64, dtype=DT, generator=g)}  # gram: N (O + I) < O I
        x = torch.randn(3, steps, 64, dtype=DT, generator=g)
        y = torch.randn(3, steps, 8, dtype=DT, generator=g)

        def fn(p, xi, yi):
            return (PF.linear(p, xi) * yi).sum()

    x[1], y[1] = x[1] * 1e-163, y[1] * 1e150  # (the others: ordinary examples)
    # the exact gradients: the same products with both factors scaled by 2^500 (exact)
    exact = per_example_grads(fn, params, x * 2.0**500, y * 2.0**-500)["weight"].flatten(1).norm(dim=1)
    assert 1e-12 < float(exact[1]) < 1e-9
    summed, norms = dp.clipped_grad_sum(fn, params, x, y, max_norm=c, method="fast")
    assert bool((norms >= exact * (1 - 1e-13)).all()), norms / exact  # (the oracle's own rounding)
    torch.testing.assert_close(norms[[0, 2]], exact[[0, 2]], rtol=1e-10, atol=0)
    assert float(norms[1]) < 1e3 * float(exact[1])  # (what underflow may take: over-clipped)
    expected = per_example_grads(fn, params, x * 2.0**500, y * 2.0**-500)["weight"]
    factors = (c / norms.clamp_min(c)).reshape(-1, *[1] * (expected.dim() - 1))
    assert float((expected * factors).flatten(1).norm(dim=1).max()) <= c
    expected = (expected * factors).sum(0)
    torch.testing.assert_close(summed["weight"], expected, rtol=1e-10, atol=1e-25)


def tiny_gradient_layers():
    """``name -> (fn, params, batch)``: layers whose norms came from squares of the
    gradients' coordinates (a bias's row sum, a materialised linear or conv weight, an
    embedding's Gram or rows, a norm layer's summed rows) rather than from ||g|| ||x||."""
    g = gen()
    emb = PF.init_embedding(50, 4, dtype=DT, generator=g)
    return {
        "linear-direct": (lambda p, x, a: (PF.linear(p, x) * a).sum(), PF.init_linear(3, 2, dtype=DT, generator=g),
                          (torch.randn(2, 30, 3, dtype=DT, generator=g), torch.randn(2, 30, 2, dtype=DT, generator=g))),
        "conv_transpose": (lambda p, x: torch.tanh(PF.conv_transpose2d(p, x, stride=2)).sum(),
                           PF.init_conv_transpose(3, 4, (3, 3), dtype=DT, generator=g), (torch.randn(2, 3, 4, 4, dtype=DT, generator=g),)),
        "embedding-gram": (lambda p, i, a: (PF.embedding(p, i) * a).sum(), emb,
                           (torch.randint(0, 50, (2, 5), generator=g), torch.randn(2, 5, 4, dtype=DT, generator=g))),
        "embedding-rows": (lambda p, i, a: (PF.embedding(p, i) * a).sum(), emb,
                           (torch.randint(0, 50, (2, 30), generator=g), torch.randn(2, 30, 4, dtype=DT, generator=g))),
        "embedding_bag": (lambda p, i, a: (PF.embedding_bag(p, i, mode="sum") * a).sum(), PF.init_embedding_bag(10, 4, dtype=DT, generator=g),
                          (torch.randint(0, 10, (2, 2, 5), generator=g), torch.randn(2, 2, 4, dtype=DT, generator=g))),
        "rms_norm": (lambda p, x, a: (PF.rms_norm(p, x, (4,)) * a).sum(), {"weight": 1 + torch.rand(4, dtype=DT, generator=g)},
                     (torch.randn(2, 3, 4, dtype=DT, generator=g), torch.randn(2, 3, 4, dtype=DT, generator=g))),
        "lstm": (lambda p, x, a: (PF.lstm(p, x)[0] * a).sum(), PF.init_lstm(3, 4, dtype=DT, generator=g),
                 (torch.randn(2, 4, 3, dtype=DT, generator=g), torch.randn(2, 4, 4, dtype=DT, generator=g))),
    }


@pytest.mark.parametrize("dtype, scale, c", [(torch.float32, 1e-30, 1e-32), (torch.float64, 1e-300, 1e-302)])
@pytest.mark.parametrize("layer", sorted(tiny_gradient_layers()))
def test_gradients_whose_squares_underflow_are_still_clipped(layer, dtype, scale, c):
    """A loss scaled by 1e-30 (float32) or 1e-300 (float64): every coordinate of the
    gradients is below the square root of the smallest subnormal number, so their squares
    are 0. The norms of these layers came out exactly 0, and with C = scale / 100 each
    example went into the sum unclipped (a float32 embedding: norm 0 for an exact 3.4e-30,
    a contribution of 4.7e-30 with C = 1e-31). Each certified norm is now at least the exact
    one, and each contribution within C."""
    fn, params, batch = tiny_gradient_layers()[layer]
    params = optree.tree_map(lambda t: t.to(dtype), params)
    batch = optree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, batch)

    def scaled(p, *example):
        return fn(p, *example) * scale

    grads = per_example_grads(fn, params, *batch)  # float64, unscaled: exact up to the scale
    flat = torch.cat([t.flatten(1) for t in optree.tree_leaves(grads)], 1)
    exact = flat.norm(dim=1) * scale
    assert float(exact.min()) > 10 * c
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (every layer here has a rule: nothing materialised)
        summed, norms = dp.clipped_grad_sum(scaled, params, *batch, max_norm=c, method="fast")
    assert bool((norms.double() >= exact * (1 - 1e-12)).all()), (norms, exact)
    # (what underflow may take, about 1e-22 in float32 and 1e-161 in float64: over-clipped)
    assert float(norms.max()) < (1e-20 if dtype == torch.float32 else 1e-159)
    for b in range(flat.shape[0]):  # one example's clipped sum is its contribution
        one = tuple(t[b:b + 1] for t in batch)
        summed, _ = dp.clipped_grad_sum(scaled, params, *one, max_norm=c, method="fast")
        norm = math.sqrt(sum(float(t.double().square().sum()) for t in optree.tree_leaves(
            optree.tree_map(lambda t: t / scale, summed)))) * scale
        assert norm <= c * (1 + 1e-5), (b, norm)


def _huge_rms_model(seed: int):
    """A float32 linear + RMSNorm on one example whose loss is scaled by 1e25: its gradient
    entries (about 1e25) overflow float32 squares, so fast clipping's norms are not finite
    and the step falls back to materialised gradients."""
    g = torch.Generator().manual_seed(seed)
    d = 8 + seed % 5
    params = {"l": PF.init_linear(d, d, generator=g), "n": {"weight": torch.rand(d, generator=g) + 0.5}}
    x, t = torch.randn(1, 3, d, generator=g), torch.randn(1, 3, d, generator=g)

    def fn(p, xi, ti):
        return (PF.rms_norm(p["n"], PF.linear(p["l"], xi), (d,)) * ti).sum() * 1e25

    return fn, params, x, t


def _f64_norm(tree) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in optree.tree_leaves(tree)))


@pytest.mark.parametrize("seed", range(12))
def test_overflow_fallback_keeps_each_contribution_within_c(seed):
    """Where squares overflow, fast clipping falls back to materialised gradients; its
    norms now carry the rounding of their own computation and of the clipped sum, as fast
    clipping's do, so one example's contribution as computed is at most C. Before, 105 of
    180 such float32 steps came out above C (by up to 1.9e-7 relatively: the dense route's
    documented C (1 + 1e-5), not fast clipping's promise)."""
    fn, params, x, t = _huge_rms_model(seed)
    for c in (0.5, 1.0, 3.0):
        summed, norms = dp.clipped_grad_sum(fn, params, x, t, max_norm=c, method="fast")
        assert bool(torch.isfinite(norms).all()) and float(norms[0]) > 1e20
        assert _f64_norm(summed) <= c


def test_overflow_fallback_of_dp_optimizer_keeps_each_contribution_within_c():
    """DPOptimizer(fast_clipping=True) falls back the same way, with the same guarantee."""
    from torch import nn

    import psgfunc.nn as pnn

    over = 0
    for seed in range(12):
        torch.manual_seed(seed)
        model = pnn.expand_weights(nn.Sequential(nn.Linear(9, 9), nn.RMSNorm(9)), 4)
        opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=0.5, noise_multiplier=0.0,
                             expected_batch_size=1, fast_clipping=True)
        (model(torch.randn(1, 3, 9)) * torch.randn(1, 3, 9)).sum().mul(1e25).backward()
        assert float(opt.accumulate()[0]) > 1e20
        opt.step()  # (it leaves the update, the clipped sum over expected_batch_size = 1, in .grad)
        over += _f64_norm([p.grad for p in model.parameters()]) > 0.5
    assert over == 0


def test_per_layer_global_norms_of_huge_gradients_are_finite():
    """Per-layer clipping returns the global norms (the group norms' root sum of squares):
    for group norms above about 1.8e19 their float32 squares overflowed and the returned
    norms were Inf, while the clipping itself was right."""
    fn, params, x, t = _huge_rms_model(0)
    summed, norms = dp.clipped_grad_sum(fn, params, x, t, max_norm={"l": 1.0, "n": 1.0}, method="fast")
    assert bool(torch.isfinite(norms).all()) and float(norms[0]) > 1e20
    exact = per_example_grads(fn, optree.tree_map(lambda v: v.double(), params), x.double(), t.double())
    assert float(norms[0]) == pytest.approx(_f64_norm(exact), rel=1e-4)
