"""Fast clipping of convolutions whose per-example weight gradient is smaller than the
layer's input and output gradient (issue 15): the backward pass records ``dW_b`` itself
(:meth:`ConvWeight.dense_in_backward`) with the size of its terms (``BuiltConvWeight``),
whose norm bounds the exact gradient's and whose sum is ``c @ dW``."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc import per_sample_grads
from psgfunc.per_sample import _kinds
from psgfunc.per_sample._clip import grad_pieces
from psgfunc.per_sample.rules import conv as conv_rule
from psgfunc.per_sample.rules.conv import BuiltConvWeight, ConvWeight
from tests.per_sample.test_conv_norms import assert_fast_equals_materialize

F64 = torch.float64


def make(dtype=F64, seed=0, mixed=False):
    """A conv (4->4, 3x3: 144 weights per example against 2 * 4 * 10 * 10 in x and g) used
    twice (the second time with stride 2; ``mixed``: on a 2x2 input, where x and g are
    smaller than dW_b and the Gram form is taken), then a Linear."""
    gen = torch.Generator().manual_seed(seed)
    params = {"conv": PF.init_conv(4, 4, (3, 3), dtype=F64, generator=gen),
              "fc": PF.init_linear(4, 3, dtype=F64, generator=gen)}
    params = {k: {n: t.to(dtype) for n, t in v.items()} for k, v in params.items()}

    def fn(p, x, y):
        h = torch.relu(PF.conv2d(p["conv"], x, padding=1))
        if mixed:
            h = torch.nn.functional.adaptive_avg_pool2d(h, 2)
        h = PF.conv2d(p["conv"], h, stride=1 if mixed else 2, padding=1).mean((-2, -1))
        return torch.nn.functional.cross_entropy(PF.linear(p["fc"], h), y)

    return params, fn


def batch(size, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, 10, 10, dtype=F64, generator=gen).to(dtype)
    return x, torch.randint(0, 3, (size,), generator=gen)


def recorded_kinds(fn, params, x, y):
    """The kinds the conv weight's backward calls record."""
    kinds = []
    original = _kinds.Collector.track

    def track(self, target):
        i = original(self, target)
        record = target._psg_record
        target._psg_record = lambda kind, data: (kinds.append((i, type(kind).__name__)), record(kind, data))[1]
        return i

    _kinds.Collector.track = track
    try:
        grad_pieces(fn, params, x, y)
    finally:
        _kinds.Collector.track = original
    return kinds


@pytest.mark.parametrize("size,mixed", [(1, False), (5, False), (5, True)])
def test_dense_in_backward_equals_materialise(size, mixed, monkeypatch):
    """float64: the conv weight's pieces are its built per-example gradients (both calls;
    ``mixed``: one call recorded built, the other as x and g, built when the pieces are
    combined), not x and g; the norms and the clipped sum equal the materialising route's
    at 1e-10, and no materialisation warning is given (the leaf has a rule)."""
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)  # not kept dense at the end of the pass
    params, fn = make(mixed=mixed)
    x, y = batch(size)
    kind = ConvWeight((4, 4, 3, 3), 1)
    xs, gs = torch.zeros(1, size, 4, 10, 10, dtype=F64), torch.zeros(1, size, 4, 10, 10, dtype=F64)
    assert kind.dense_in_backward((xs, gs, ((1, 1), (1, 1), (1, 1))))
    pieces = grad_pieces(fn, params, x, y)
    weight = pieces.leaves[1]  # optree order: conv.bias, conv.weight, fc.bias, fc.weight
    assert isinstance(weight.kind, BuiltConvWeight) and weight.dense is None and not pieces.materialized
    assert [tuple(d[0].shape) for d in weight.datas] == [(size, 4, 4, 3, 3)] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "materialised" warning: the leaf has a rule)
        assert_fast_equals_materialize(fn, params, (x, y), 0.05)


def test_dense_in_backward_records_no_layer_data():
    """The path is taken in the backward pass: the conv weight records BuiltConvWeight
    pieces (one per call), never ConvWeight (x, g); with the threshold at 0, the old pieces."""
    params, fn = make()
    x, y = batch(3)
    kinds = recorded_kinds(fn, params, x, y)
    assert [k for i, k in kinds if i == 1] == ["BuiltConvWeight", "BuiltConvWeight"]
    mixed, fn_mixed = make(mixed=True)
    kinds = recorded_kinds(fn_mixed, mixed, x, y)  # backward order: the 2x2 call first
    assert [k for i, k in kinds if i == 1] == ["ConvWeight", "BuiltConvWeight"]
    mp = pytest.MonkeyPatch()
    mp.setattr(conv_rule, "_DENSE_PER_DATA", 0)
    try:
        kinds = recorded_kinds(fn, params, x, y)
    finally:
        mp.undo()
    assert [k for i, k in kinds if i == 1] == ["ConvWeight", "ConvWeight"]


def test_dense_in_backward_is_freed_with_its_sum(monkeypatch):
    """The dense gradient lives until its weighted sum is taken, not beyond: after
    clipped_grad_sum nothing holds it."""
    made = []
    original = ConvWeight.materialize

    def tracking(self, *data):
        out = original(self, *data)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(ConvWeight, "materialize", tracking)
    params, fn = make(torch.float32)
    x, y = batch(4, torch.float32)
    summed, _ = dp.clipped_grad_sum(fn, params, x, y, max_norm=0.1)
    gc.collect()
    assert len(made) == 2 and all(r() is None for r in made)
    assert summed["conv"]["weight"].shape == (4, 4, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_in_backward_cancelling_examples(dtype, monkeypatch):
    """Inputs nearly constant, so that the output gradients' signs cancel the sums of
    products: each example's clipped contribution to the sum, as computed, has norm at
    most C (up to the sum's own rounding in dtype), and its certified norm is at least the
    float64 norm of the computed dense gradient. bfloat16 params: sums in float32."""
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    gen = torch.Generator().manual_seed(3)
    params = {"conv": {"weight": (torch.randn(4, 4, 3, 3, generator=gen, dtype=F64) * 0.1).to(dtype)}}
    size = 3
    x = (1e2 * (1 + 1e-3 * torch.randn(size, 4, 8, 8, generator=gen, dtype=F64))).to(dtype)
    sign = torch.ones(8, 8, dtype=F64)
    sign[::2, :] = -1
    target = (sign * 50).to(dtype)

    def fn(p, x):
        out = PF.conv2d(p["conv"], x.unsqueeze(0), padding=1)[0]
        return (out * target).sum()

    pieces = grad_pieces(fn, params, x)
    leaf = pieces.leaves[0]
    assert isinstance(leaf.kind, BuiltConvWeight)
    norms = _kinds.certified_norm(pieces.leaves)
    dense = leaf.datas[0][0].double().flatten(1)
    assert bool((norms.double() >= dense.norm(dim=1)).all())
    exact = per_sample_grads(fn, {"conv": {"weight": params["conv"]["weight"].double()}}, x.double())
    assert bool((norms.double() >= exact["conv"]["weight"].flatten(1).norm(dim=1)).all())
    for b in range(size):
        c = torch.zeros(size)
        c[b] = 1 / float(norms[b])
        out = leaf.weighted_sum(c).double().norm()
        assert float(out) <= 1 + (1e-5 if dtype == torch.float32 else 2**-7)


@pytest.mark.parametrize("seed", [1, 3, 4])
@pytest.mark.parametrize("where", ["backward", "kept"])
def test_built_gradient_norms_bound_the_exact_ones_under_cancellation(seed, where):
    """Reproducer (review): inputs of 100 + 1e-4 noise and output gradients of zero mean over
    the positions, so each example's weight gradient nearly cancels. The norm of the
    gradient as built (float32) fell 0.6% below the exact one; with the size of its terms
    (``a_b``) the certified norm is above it (clipping such an example a little harder).
    ``where``: built in the backward pass (8->8 on 16x16), or recorded as x and g and built
    at the end as a small kept gradient (a grouped 8->8 on 4x4, dW_b larger than x and g)."""
    torch.manual_seed(seed)
    groups, side = (1, 16) if where == "backward" else (2, 4)
    params = {"weight": PF.init_conv(8, 8, (3, 3), groups=groups)["weight"]}
    x = 100 + 1e-4 * torch.randn(4, 8, side, side)
    g = torch.randn(4, 8, side - 2, side - 2)
    g = g - g.mean((2, 3), keepdim=True)

    def fn(p, xi, gi):
        return (PF.conv2d(p, xi.unsqueeze(0), groups=groups)[0] * gi).sum()

    kinds = recorded_kinds(lambda p, xi, gi: fn(p["conv"], xi, gi), {"conv": params}, x, g)
    assert [k for _, k in kinds] == ["BuiltConvWeight" if where == "backward" else "ConvWeight"]
    if where == "kept":
        leaf = grad_pieces(fn, params, x, g).leaves[0]
        assert isinstance(leaf.kind, BuiltConvWeight)
    _, norms = dp.clipped_grad_sum(fn, params, x, g, max_norm=1.0, method="fast")
    exact = per_sample_grads(fn, {"weight": params["weight"].double()}, x.double(), g.double())["weight"]
    assert bool((norms.double() >= exact.flatten(1).norm(dim=1)).all())


@pytest.mark.parametrize("kernel,stride,padding,dilation,spatial", [
    ((3, 3), (1, 1), (1, 1), (1, 1), (6, 7)),
    ((3, 2), (2, 1), (0, 1), (1, 1), (7, 5)),  # stride, uneven kernel
    ((3, 3), (2, 2), (1, 1), (1, 1), (8, 8)),  # stride 2
    ((3, 3), (1, 1), (2, 2), (1, 1), (5, 5)),  # padding above half the kernel
    ((3, 3), (1, 2), (1, 0), (2, 1), (7, 6)),  # dilation
    ((3, 3), (2, 2), (0, 0), (2, 2), (9, 9)),  # stride and dilation 2: odd inputs unread
    ((2, 2, 2), (1, 1, 1), (1, 0, 0), (1, 1, 1), (1, 5, 5)),  # kernel deeper than the input
    ((3, 3, 1), (1, 2, 1), (1, 1, 0), (1, 1, 1), (4, 5, 3)),  # 3-d
    ((5,), (3,), (2,), (1,), (11,)),  # 1-d
])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_term_sizes_bound_the_sizes_of_the_terms(kernel, stride, padding, dilation, spatial, dtype):
    """``_term_sizes`` is ``sum_t ||g_bt|| ||u_bt||`` with the patches built explicitly (zero
    padding included), rounded up: at most 1e-4 above it in float32, 1e-12 in float64, never
    below, for every example."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, *spatial, dtype=F64, generator=gen)  # [N, B, C, *S]
    padded = torch.nn.functional.pad(x, [p for q in reversed(padding) for p in (q, q)])
    windows = padded
    for d, (k, st, dl) in enumerate(zip(kernel, stride, dilation)):
        windows = windows.unfold(3 + d, dl * (k - 1) + 1, st)  # [N, B, C, *S', *window]
    windows = windows[(..., *(slice(None, None, dl) for dl in dilation))]
    u = windows.square().sum(dim=(2, *range(-len(kernel), 0))).sqrt()  # [N, B, *S']
    g = torch.randn(2, 3, 5, *u.shape[2:], dtype=F64, generator=gen)
    g[:, 2] = u[:, 2].unsqueeze(1) * torch.rand(5, *([1] * len(kernel)), dtype=F64, generator=gen)
    exact = (g.square().sum(2).sqrt() * u).flatten(2).sum(2).sum(0)  # [B]
    got = conv_rule._term_sizes(x.to(dtype), g.to(dtype), kernel, (stride, padding, dilation), dtype)
    assert got.dtype == dtype
    assert bool((got.double() >= exact).all()), (got, exact)
    assert bool((got.double() <= exact * (1 + (1e-4 if dtype == torch.float32 else 1e-12))).all()), (got, exact)


def test_built_term_sizes_are_not_rounded_to_a_half_precision_parameter():
    """bfloat16 params: the built gradient is recorded in bfloat16 like every piece, but its
    term sizes (a bound) stay float32: rounded to bfloat16 they could fall below what they
    bound."""
    params, fn = make(torch.bfloat16)
    x, y = batch(3, torch.bfloat16)
    leaf = grad_pieces(fn, params, x, y).leaves[1]
    assert isinstance(leaf.kind, BuiltConvWeight)
    assert {d[0].dtype for d in leaf.datas} == {torch.bfloat16}
    assert {d[1].a.dtype for d in leaf.datas} == {torch.float32}


def test_term_sizes_of_huge_float32_inputs_do_not_overflow():
    """Reproducer (review): inputs of 1e19 and a loss scaled by 1e-19 have finite
    gradients, but their float32 squares overflow; the term sizes are then taken in
    float64, and the fast DPOptimizer clips instead of calling the gradients NaN/Inf."""
    import psgfunc.nn as pnn

    torch.manual_seed(0)
    m = pnn.Conv2d(4, 4, 3, padding=1, max_batch_size=8, bias=False)
    opt = dp.DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=1.0, noise_multiplier=0.0,
                         expected_batch_size=3, fast_clipping=True)
    x = 1e19 * torch.randn(3, 4, 12, 12)
    (m(x).sum() * 1e-19).backward()
    norms = opt.accumulate()
    fn = lambda p, xi: PF.conv2d(p, xi.unsqueeze(0), padding=1).sum() * 1e-19  # noqa: E731
    exact = per_sample_grads(fn, {"weight": m.weight.detach().double()}, x.double())["weight"]
    assert bool(torch.isfinite(norms).all())
    assert bool((norms.double() >= exact.flatten(1).norm(dim=1)).all())


@pytest.mark.parametrize("built", [False, True])
def test_term_sizes_of_underflowing_inputs_bound_the_exact_norm(built, monkeypatch):
    """Review reproducer: float32 inputs of about 2e-23 (their squares below float32's
    smallest subnormal: ``||x_b||`` came out 0) and output gradients of about 3e17 with
    zero mean (the terms cancel): the size of the terms was 0 and the certified norm of
    the gradient as built fell 1.5% below the exact one. The input and output-gradient
    norms now carry what underflow may take from them."""
    monkeypatch.setattr(conv_rule, "_KEEP_DENSE", 0)
    monkeypatch.setattr(ConvWeight, "_form", lambda self, datas: "direct")
    weight_shape, conf, size = (4, 4, 3, 3), ((1, 1), (0, 0), (1, 1)), 4
    worst = math.inf
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = (2e-25 * (100 + 1e-4 * torch.randn(1, size, 4, 16, 16, dtype=F64, generator=gen))).float()
        g = torch.randn(1, size, 4, 14, 14, dtype=F64, generator=gen)
        g = (3e17 * (g - g.mean((3, 4), keepdim=True))).float()
        kind = ConvWeight(weight_shape, 1)
        records = conv_rule._built([(kind, (x, g, conf))]) if built else [(kind, (x, g, conf))]
        norms = _kinds.certified_norm([_kinds.LeafPieces(records, None, size, weight_shape)]).double()
        exact = exact_weight_norms(x, g, weight_shape, conf)
        worst = min(worst, float((norms / exact).min()))
    assert worst >= 1, worst


def exact_weight_norms(x, g, weight_shape, conf):
    """The exact (float64) per-example weight gradient norms of float32 pieces."""
    dense = conv_rule.per_sample_conv_weight_grad(x.double(), g.double(), weight_shape, *conf, 1)
    return dense.flatten(1).norm(dim=1)


def test_term_sizes_skip_the_inputs_no_window_reads():
    """Review reproducer: a 1x1 stride-2 conv reads a quarter of its input; a Cauchy-Schwarz
    bound of the size of its terms by the norm of the whole input, rows it never reads held
    1e8, made the float32 certified norm 2200x the exact one and the float64 norms differ
    from the materialising route's by 3e-6. The exact size counts what the windows read."""
    gen = torch.Generator().manual_seed(0)
    params = {"c": PF.init_conv(4, 8, (1, 1), dtype=F64, generator=gen)}
    target = torch.linspace(-1, 1, 8 * 8 * 8, dtype=F64).view(1, 8, 8, 8)

    def fn(p, xb):
        return (PF.conv2d(p["c"], xb.unsqueeze(0), stride=2) * target).sum()

    x = torch.randn(3, 4, 16, 16, dtype=F64, generator=gen)
    x[:, :, 1::2, :] = 1e8  # rows no window reads
    x[2, :, ::2, ::2] = 0  # every input example 2 reads is 0
    assert_fast_equals_materialize(fn, params, (x,), 1.0)
    p32 = {"c": {k: v.float() for k, v in params["c"].items()}}
    _, norms = dp.clipped_grad_sum(fn, p32, x.float(), max_norm=1.0)
    exact = per_sample_grads(fn, params, x)
    exact = (exact["c"]["weight"].flatten(1).square().sum(1) + exact["c"]["bias"].square().sum(1)).sqrt()
    assert bool((norms.double() >= exact).all()) and bool((norms.double() <= exact * 1.001).all())


def test_term_sizes_of_inputs_large_where_the_output_gradients_are_small():
    """Review reproducer: output gradients at one position, whose window reads inputs of
    about 1, inputs of 1e4 everywhere else. A Cauchy-Schwarz bound of the size of the terms
    (``||g_b|| ||x_b||``) made the float32 certified norm 34x the exact one and float64 norms
    differ from the materialising route's by 6e-8: the exact size keeps both tight."""
    gen = torch.Generator().manual_seed(0)
    params = {"c": {"weight": PF.init_conv(4, 4, (3, 3), dtype=F64, generator=gen)["weight"]}}
    target = torch.zeros(1, 4, 30, 30, dtype=F64)
    target[0, :, 3, 3] = 1.0

    def fn(p, xb):
        return (PF.conv2d(p["c"], xb.unsqueeze(0)) * target).sum()

    x = 1e4 * torch.randn(3, 4, 32, 32, dtype=F64, generator=gen)
    x[:, :, 2:7, 2:7] = torch.randn(3, 4, 5, 5, dtype=F64, generator=gen)
    assert_fast_equals_materialize(fn, params, (x,), 1.0)
    p32 = {"c": {"weight": params["c"]["weight"].float()}}
    _, norms = dp.clipped_grad_sum(fn, p32, x.float(), max_norm=1.0)
    exact = per_sample_grads(fn, params, x)["c"]["weight"].flatten(1).norm(dim=1)
    assert bool((norms.double() >= exact).all()) and bool((norms.double() <= exact * 1.001).all())
