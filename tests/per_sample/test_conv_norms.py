"""Fast-clipping norms of convolution weights (issue 15): the Gram and direct forms, chunked
over the batch, against the materialised per-example gradients; what they keep alive."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc.per_sample import _kinds
from psgfunc.per_sample._clip import grad_pieces
from psgfunc.per_sample.rules import conv as conv_rule
from psgfunc.per_sample.rules.conv import ConvWeight, per_sample_conv_weight_grad

F64 = torch.float64


def assert_fast_equals_materialize(fn, params, batch, max_norm):
    """float64: fast clipping's norms and clipped sums equal the materialising route's
    (norms at 1e-10, every coordinate of every sum at 1e-10 relative, 1e-12 absolute)."""
    summed, norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=max_norm)
    expected, expected_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=max_norm, method="materialize")
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0)
    for k in summed:
        for name in summed[k]:
            torch.testing.assert_close(summed[k][name], expected[k][name], rtol=1e-10, atol=1e-12)


def assert_bound_is_the_dense_norm(kind, datas, dense):
    """float64, three examples: ``kind``'s bound of ``datas`` has the norms of the
    materialised ``dense [3, *weight_shape]`` (1e-10) and is above them, its weighted sum is
    ``sum_b c_b dense_b``, and the certified norms through a leaf are the exact ones."""
    exact = dense.flatten(1).square().sum(1)
    bound = kind.bound(datas)
    torch.testing.assert_close(bound.sq, exact, rtol=1e-10, atol=0)
    assert bool((bound.hi2 * bound.hi_scale >= exact).all())
    c = torch.tensor([0.5, -2.0, 1.5], dtype=F64)
    torch.testing.assert_close(kind.weighted_sum(datas, c), torch.einsum("b,b...->...", c, dense), rtol=1e-10, atol=1e-12)
    leaf = _kinds.LeafPieces([(kind, d) for d in datas], None, dense.shape[0], tuple(dense.shape[1:]))
    assert leaf.dense is None
    torch.testing.assert_close(_kinds.certified_norm([leaf]), exact.sqrt(), rtol=1e-10, atol=0)


def out_size(s, k, st, p, d):
    return (s + 2 * p - d * (k - 1) - 1) // st + 1


def conv_data(gen, size, rows, channels, weight_shape, spatial, conf, dtype=F64):
    """``(x [N, B, C, *S], g [N, B, O, *S'], conf)`` for one call."""
    stride, padding, dilation = conf
    out = [out_size(s, k, st, p, d) for s, k, st, p, d in zip(spatial, weight_shape[2:], stride, padding, dilation)]
    x = torch.randn(rows, size, channels, *spatial, dtype=F64, generator=gen).to(dtype)
    g = torch.randn(rows, size, weight_shape[0], *out, dtype=F64, generator=gen).to(dtype)
    return x, g, conf


# (weight shape, groups, input channels, spatial, confs of the calls, expected route)
LAYERS = {
    "2d-direct": ((6, 4, 3, 3), 1, 4, (9, 8), [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2))], "direct"),
    "2d-gram": ((32, 12, 3, 3), 1, 12, (4, 4), [((2, 2), (1, 1), (1, 1)), ((2, 2), (2, 2), (2, 2))], "gram"),
    "1d-gram": ((16, 12, 3), 1, 12, (5,), [((2,), (1,), (1,))], "gram"),
    "1d-direct": ((3, 2, 2), 1, 2, (11,), [((1,), (0,), (2,))], "direct"),
    "2d-grouped": ((6, 2, 3, 3), 2, 4, (6, 7), [((1, 2), (1, 0), (1, 1))], "direct"),
    "3d": ((4, 3, 2, 2, 2), 1, 3, (4, 5, 3), [((1, 2, 1), (1, 0, 1), (1, 1, 2))], "direct"),
}


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_chunked_norms_and_sums_equal_materialised(name, rows, monkeypatch):
    """Both forms, one example per chunk, several calls of one weight: the norms equal the
    materialised gradients' (float64, 1e-10), the certified bound is above them and the
    weighted sum is sum_b c_b dW_b."""
    monkeypatch.setattr(conv_rule, "_CHUNK", 1)
    monkeypatch.setattr(conv_rule, "_DIRECT_CHUNK", 1)
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    weight_shape, groups, channels, spatial, confs, route = LAYERS[name]
    gen = torch.Generator().manual_seed(1)
    size = 3
    datas = [conv_data(gen, size, rows, channels, weight_shape, spatial, conf) for conf in confs]
    kind = ConvWeight(weight_shape, groups)
    assert kind.uses_gram(datas) == (route == "gram")
    assert not kind.prefers_dense(datas)
    dense = sum(per_sample_conv_weight_grad(x, g, weight_shape, *conf, groups) for x, g, conf in datas)
    assert_bound_is_the_dense_norm(kind, datas, dense)


@pytest.mark.parametrize("route", ["gram", "xgram", "direct"])
def test_cancelling_examples_in_chunks_are_bounded(route, monkeypatch):
    """float32 examples whose outer products cancel (a nearly constant input, output
    gradients of alternating sign), split into chunks: every certified norm is at least the
    float64 norm of the float32 pieces, and the weighted sum of each example scaled by
    1 / certified norm has norm at most 1."""
    monkeypatch.setattr(conv_rule, "_CHUNK", 1)
    monkeypatch.setattr(conv_rule, "_DIRECT_CHUNK", 1)
    weight_shape = {"gram": (16, 12, 3, 3), "xgram": (64, 64, 3, 3), "direct": (2, 1, 3, 3)}[route]
    spatial = {"gram": (4, 4), "xgram": (8, 8), "direct": (10, 10)}[route]
    gen = torch.Generator().manual_seed(3)
    size, conf = 3, ((1, 1), (0, 0), (1, 1))
    channels = weight_shape[1]
    x = 1e3 * (1 + 1e-3 * torch.randn(1, size, channels, *spatial, generator=gen, dtype=F64))
    out = [s - 2 for s in spatial]
    sign = torch.ones(out[0] * out[1], dtype=F64)
    sign[1::2] = -1
    g = 30 * torch.randn(1, size, weight_shape[0], 1, generator=gen, dtype=F64) * sign
    g = (g * (1 + 1e-3 * torch.randn(g.shape, generator=gen, dtype=F64))).view(1, size, weight_shape[0], *out)
    x32, g32 = x.float(), g.float()
    datas = [(x32, g32, conf)]
    kind = ConvWeight(weight_shape, 1)
    assert kind._form(datas) == route
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    exact = per_sample_conv_weight_grad(x32.double(), g32.double(), weight_shape, *conf, 1).flatten(1).norm(dim=1)
    norms = _kinds.certified_norm([_kinds.LeafPieces([(kind, datas[0])], None, size, weight_shape)])
    assert bool((norms.double() >= exact).all())
    for b in range(size):
        c = torch.zeros(size)
        c[b] = 1 / float(norms[b])
        assert float(kind.weighted_sum(datas, c).double().norm()) <= 1 + 1e-5


# (weight shape, input spatial, conf): one call, one row per example, where the patches' Gram
# from the input's Gram is the cheapest form
XGRAM_LAYERS = {
    "same": ((64, 64, 3, 3), (8, 8), ((1, 1), (1, 1), (1, 1))),
    # forms that the cost model does not choose here, forced (their patches are cheaper)
    "dilated": ((64, 32, 3, 3), (7, 7), ((1, 1), (2, 2), (2, 2))),
    "uneven": ((64, 32, 3, 2), (6, 5), ((1, 1), (1, 0), (1, 1))),
    "strided": ((128, 64, 3, 3), (5, 5), ((2, 2), (1, 1), (1, 1))),
}


@pytest.mark.parametrize("name", sorted(XGRAM_LAYERS))
def test_patch_gram_is_the_gram_of_the_patches(name):
    """``_patch_gram`` (strided views of the input's Gram over its padded positions, summed
    over the kernel offsets) against the patches built explicitly, float64."""
    weight_shape, spatial, conf = XGRAM_LAYERS[name]
    x = torch.randn(3, weight_shape[1], *spatial, dtype=F64, generator=torch.Generator().manual_seed(0))
    got, k = conv_rule._patch_gram(x, weight_shape[2:], *conf)
    u = conv_rule._patches_channels_last(x.unsqueeze(0), weight_shape, *conf)
    torch.testing.assert_close(got, u @ u.transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert k == weight_shape[1] + math.prod(weight_shape[2:])


@pytest.mark.parametrize("name", sorted(XGRAM_LAYERS))
def test_xgram_norms_and_sums_equal_materialised(name, monkeypatch):
    """The input-Gram form, one example per chunk: norms equal the materialised gradients'
    (float64, 1e-10), the certified bound is above them, the weighted sum is sum_b c_b
    dW_b; with two rows per example (or two calls) the patches' Gram takes over."""
    monkeypatch.setattr(conv_rule, "_CHUNK", 1)
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    weight_shape, spatial, conf = XGRAM_LAYERS[name]
    gen = torch.Generator().manual_seed(2)
    size = 3
    datas = [conv_data(gen, size, 1, weight_shape[1], weight_shape, spatial, conf)]
    kind = ConvWeight(weight_shape, 1)
    assert kind._form([conv_data(gen, size, 2, weight_shape[1], weight_shape, spatial, conf)]) != "xgram"
    assert kind._form(datas * 2) != "xgram"
    if name != "same":
        assert kind._form(datas) != "xgram"
        monkeypatch.setattr(ConvWeight, "_form", lambda self, datas: "xgram")
    assert kind._form(datas) == "xgram"
    assert_bound_is_the_dense_norm(kind, datas, per_sample_conv_weight_grad(*datas[0][:2], weight_shape, *conf, 1))


def test_wrn_forms():
    """WRN-16-4 at B = 32: its first two groups' 3x3 layers build dW_b (direct), the last
    group's 256->256 on 8x8 takes the input's Gram (100 padded positions of 256 channels
    against patches of 64 x 2304), its strided 128->256 the patches' Gram."""
    def form(channels, out_channels, side, stride):
        x = torch.zeros(1, 32, channels, side, side)
        g = torch.zeros(1, 32, out_channels, side // stride, side // stride)
        return ConvWeight((out_channels, channels, 3, 3), 1)._form([(x, g, ((stride,) * 2, (1, 1), (1, 1)))])

    assert form(64, 64, 32, 1) == "direct"
    assert form(128, 128, 16, 1) == "direct"
    assert form(256, 256, 8, 1) == "xgram"
    assert form(128, 256, 16, 2) == "gram"


def test_gram_bound_keeps_no_patches(monkeypatch):
    """The Gram form's bound (and its refinement) keeps the Grams, not the patches: they are
    rebuilt only for examples the refinement recomputes."""
    made = []
    original = conv_rule._patches_channels_last

    def tracking(*args):
        u = original(*args)
        made.append(weakref.ref(u))
        return u

    monkeypatch.setattr(conv_rule, "_patches_channels_last", tracking)
    gen = torch.Generator().manual_seed(0)
    weight_shape = (16, 12, 3, 3)
    datas = [conv_data(gen, 4, 1, 12, weight_shape, (4, 4), ((1, 1), (0, 0), (1, 1)), torch.float32)]
    kind = ConvWeight(weight_shape, 1)
    assert kind.uses_gram(datas)
    bound = kind.bound(datas)
    gc.collect()
    assert made and all(r() is None for r in made)
    refined = bound.refine(torch.full((4,), 1e-30))  # every example uncertain: rebuilt rows
    assert bool((refined.hi2 >= refined.sq).all())


def test_fast_clipping_keeps_no_per_sample_conv_gradient(monkeypatch):
    """A convolution whose per-sample gradient is larger than _KEEP_DENSE (and, here, not
    taken in the backward pass): fast clipping keeps x and g for it, no [B, O, C, *k]
    tensor (a WRN-16-4 kept 4x the step's memory that way), and the clipped sum equals the
    materialising route's."""
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    monkeypatch.setattr(conv_rule, "_DENSE_PER_DATA", 0)
    gen = torch.Generator().manual_seed(0)
    params = {"conv": PF.init_conv(8, 8, (3, 3), dtype=F64, generator=gen), "fc": PF.init_linear(8, 2, dtype=F64, generator=gen)}

    def fn(p, x, y):
        h = torch.relu(PF.conv2d(p["conv"], x, padding=1)).mean((-2, -1))
        return torch.nn.functional.cross_entropy(PF.linear(p["fc"], h), y)

    x = torch.randn(5, 8, 12, 12, dtype=F64, generator=gen)
    y = torch.randint(0, 2, (5,), generator=gen)
    pieces = grad_pieces(fn, params, x, y)
    weight = pieces.leaves[1]  # optree order: conv.bias, conv.weight, fc.bias, fc.weight
    assert isinstance(weight.kind, ConvWeight) and weight.dense is None and not weight.kind.uses_gram(weight.datas)
    assert_fast_equals_materialize(fn, params, (x, y), 0.3)


@pytest.mark.parametrize("form", ["gram", "xgram", "direct"])
def test_underflowing_inputs_with_huge_output_gradients_are_bounded(form, monkeypatch):
    """Review reproducer: float32 inputs of about 3e-23, whose squares underflow (below
    float32's smallest subnormal, 1.4e-45), with output gradients of about 3e18 (squares
    near float32's largest): the input's Gram (or patches' Gram) lost most of itself to
    underflow, which the relative rounding bounds (gamma_k) do not cover, and the huge
    output-gradient Gram amplified it: certified norms fell 5% below the exact ones. Now
    the Grams' entries also carry the absolute error of their underflowing products, so
    the certified norms are above the exact ones (such examples get the float64 Grams)."""
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    monkeypatch.setattr(ConvWeight, "_form", lambda self, datas: form)
    gen = torch.Generator().manual_seed(0)
    weight_shape, conf, size = (16, 16, 3, 3), ((1, 1), (1, 1), (1, 1)), 3
    x = (3e-23 * torch.randn(1, size, 16, 8, 8, dtype=F64, generator=gen)).float()
    g = (3e18 * torch.randn(1, size, 16, 8, 8, dtype=F64, generator=gen)).float()
    x[0, 2] = 1e-20 * torch.randn(16, 8, 8, generator=gen)  # squares subnormal, not lost
    kind = ConvWeight(weight_shape, 1)
    data = (x, g, conf)
    exact = per_sample_conv_weight_grad(x.double(), g.double(), weight_shape, *conf, 1).flatten(1).norm(dim=1)
    norms = _kinds.certified_norm([_kinds.LeafPieces([(kind, data)], None, size, weight_shape)])
    assert bool((norms.double() >= exact).all()), norms.double() / exact
    assert bool((norms.double() <= exact * 1.01).all()), norms.double() / exact


@pytest.mark.parametrize("form", ["gram", "xgram", "direct"])
def test_examples_with_a_zero_factor_get_a_negligible_norm(form, monkeypatch):
    """With the bounds of underflow: an example whose output gradients or inputs are all
    zero (exact norm 0) gets a certified norm of at most about 1e-161 (float64) or 1e-22
    (float32) times the other factor, what underflow could have taken; the others keep
    their exact norms (float64, 1e-10), and no float64 Grams are recomputed for it."""
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    monkeypatch.setattr(ConvWeight, "_form", lambda self, datas: form)
    gen = torch.Generator().manual_seed(4)
    weight_shape, conf, size = (8, 8, 3, 3), ((1, 1), (1, 1), (1, 1)), 3
    x, g, _ = conv_data(gen, size, 1, 8, weight_shape, (6, 6), conf)
    g[0, 0], x[0, 1] = 0, 0
    kind = ConvWeight(weight_shape, 1)
    exact = per_sample_conv_weight_grad(x, g, weight_shape, *conf, 1).flatten(1).norm(dim=1)
    norms = _kinds.certified_norm([_kinds.LeafPieces([(kind, (x, g, conf))], None, size, weight_shape)])
    assert bool((norms[:2] >= 0).all()) and bool((norms[:2] < 1e-150).all()), norms
    torch.testing.assert_close(norms[2:], exact[2:], rtol=1e-10, atol=0)
    redone = []
    original = ConvWeight._pieces
    monkeypatch.setattr(ConvWeight, "_pieces", lambda self, *a: redone.append(a[-1]) or original(self, *a))
    leaf = _kinds.LeafPieces([(kind, (x.float(), g.float(), conf))], None, size, weight_shape)
    norms32 = _kinds.certified_norm([leaf]).double()
    assert bool((norms32[:2] < 1e-15).all()) and bool((norms32[2] >= exact[2]).all())
    assert all(idx is None for idx in redone)  # no example's Grams were recomputed
