"""Rules of conv_transpose1d/2d/3d: per-sample gradients, fast clipping and the compiled (tapped)
route against the float64 per-example loop at 1e-10."""

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
from psgfunc.per_sample.rules import conv_transpose as ct
from tests.dp.test_fast_clipping import reference
from tests.oracles import assert_tree_close, per_example_grads
from tests.per_sample.test_tap import tapped_sum

F64 = torch.float64
LAYERS = {1: PF.conv_transpose1d, 2: PF.conv_transpose2d, 3: PF.conv_transpose3d}
SPATIAL = {1: (5,), 2: (4, 3), 3: (3, 2, 2)}

# (dim, groups, stride, padding, output_padding, dilation, bias)
OPTIONS = [
    (1, 1, 2, 1, 1, 1, True),
    (1, 2, 1, 1, 1, 2, False),  # output_padding >= stride: unfold finds extra windows
    (2, 1, (2, 1), (1, 0), (1, 0), (1, 2), True),
    (2, 2, 2, 0, 1, 1, True),
    (3, 1, (2, 1, 1), 1, (1, 0, 0), 1, True),
]


def case(opts, rows, seed=0):
    dim, groups, stride, padding, output_padding, dilation, bias = opts
    gen = torch.Generator().manual_seed(seed)
    params = PF.init_conv_transpose(4, 6, (3, 2, 2)[:dim], stride, padding, output_padding, groups, bias, dilation,
                                    dtype=F64, generator=gen)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    x = torch.randn(3, *((2,) if rows else ()), 4, *SPATIAL[dim], dtype=F64, generator=gen)
    layer = LAYERS[dim]
    return (lambda p, xi: torch.sin(layer(p, xi * 2, **kwargs)).sum()), params, x


@pytest.fixture
def rule_calls(monkeypatch):
    calls = Counter()
    original = ct._ConvTransposePerSample.forward
    monkeypatch.setattr(ct._ConvTransposePerSample, "forward",
                        staticmethod(lambda *a: calls.update(["rule"]) or original(*a)))
    return calls


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("rows", [0, 1])
def test_expanded_equals_loop_and_vmap(opts, rows, rule_calls):
    fn, params, x = case(opts, rows)
    expected = per_example_grads(fn, params, x)
    assert_tree_close(per_sample_grads(fn, params, x, method="expanded"), expected, dtype=F64)
    assert rule_calls["rule"] == 1  # the shared-weight rule ran, not the vmap fallback
    assert_tree_close(per_sample_grads(fn, params, x, method="vmap"), expected, dtype=F64)


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[2]], ids=str)
def test_unfold_and_grouped_weight_grads_agree(opts, monkeypatch):
    """The two materialisations (unfolded patches + bmm, grouped transposed gradient)."""
    dim, groups, stride, padding, output_padding, dilation, _ = opts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, *SPATIAL[dim], dtype=F64, generator=gen)  # [N, B, C_in, *S]
    w = torch.randn(4, 6, *(3, 2, 2)[:dim], dtype=F64, generator=gen)
    s, p, op, d = ct._conf(dim, "t", stride, padding, output_padding, dilation)
    y = torch.convolution(x.flatten(0, 1), w, None, s, p, d, True, op, 1)
    g = torch.randn(y.shape, dtype=F64, generator=gen).view(2, 3, *y.shape[1:])
    a = ct.per_sample_conv_transpose_weight_grad(x, g, tuple(w.shape), s, p, d, 1)
    monkeypatch.setattr(ct, "_UNFOLD_MAX", 0)
    b = ct.per_sample_conv_transpose_weight_grad(x, g, tuple(w.shape), s, p, d, 1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batch_mode_non_shared_weights_fall_back_and_errors():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 6, 3, dtype=F64, generator=gen)
    x = torch.randn(3, 4, 5, dtype=F64, generator=gen)
    with _rules.expanded_mode("batch"):
        out = PF.conv_transpose1d({"weight": w}, x, stride=2)
        for i in range(3):
            torch.testing.assert_close(out[i], F.conv_transpose1d(x[i : i + 1], w[i], stride=2)[0])
        with pytest.raises(ValueError, match=r"needs x shaped \[B, C_in, L\] with B = 3.*unsqueeze"):
            PF.conv_transpose1d({"weight": w}, x[0])
        with pytest.raises(ValueError, match="x has 3 channels"):
            PF.conv_transpose1d({"weight": w[:1].expand(3, 4, 6, 3)}, x[:, :3])


# --------------------------------------------------------------------- fast clipping


def model():
    """conv_transpose2d (Gram norms) -> conv_transpose1d groups=2 (dense kind) -> conv_transpose3d
    -> linear; the 2-d weight is used twice."""
    g = torch.Generator().manual_seed(0)
    params = {
        "t2": PF.init_conv_transpose(2, 8, (3, 3), stride=2, padding=1, dtype=F64, generator=g),
        "t1": PF.init_conv_transpose(8, 4, 2, groups=2, dim=1, dtype=F64, generator=g),
        "t3": PF.init_conv_transpose(1, 2, (2, 1, 2), dtype=F64, generator=g),
        "fc": PF.init_linear(4, 3, dtype=F64, generator=g),
    }

    def fn(p, x, y):
        h = torch.tanh(PF.conv_transpose2d(p["t2"], x, stride=2, padding=1, output_padding=1))  # [8, 4, 4]
        h = torch.tanh(PF.conv_transpose2d(p["t2"], h[:2, :2, :2], stride=2, padding=1)) + h[:, :3, :3]
        h = torch.tanh(PF.conv_transpose1d(p["t1"], h.flatten(1), stride=2, groups=2))  # [4, 19]
        h3 = PF.conv_transpose3d(p["t3"], h[:1, :8].reshape(1, 2, 2, 2))  # [2, 3, 3, 3]
        return F.cross_entropy(PF.linear(p["fc"], h.mean(1) + h3.mean()), y)

    x = torch.randn(5, 2, 2, 2, dtype=F64, generator=g)
    return fn, params, (x, torch.randint(0, 3, (5,), generator=g))


@pytest.mark.parametrize("max_norm", ["median", 1e30])
def test_fast_clipping_equals_materialize(max_norm, monkeypatch):
    fn, params, batch = model()
    _, norms_ = reference(fn, params, batch, 1e30)
    c = float(norms_.median()) if max_norm == "median" else max_norm
    expected, expected_norms = reference(fn, params, batch, c)
    gram = Counter()
    original = ct.ConvTransposeWeight.prefers_dense
    monkeypatch.setattr(ct.ConvTransposeWeight, "prefers_dense",
                        lambda self, d: gram.update([original(self, d)]) or original(self, d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter has a rule: nothing materialised
        summed, got = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
    assert gram[False] >= 1 and gram[True] >= 1  # the Gram form and the dense kind both ran
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)
    mat, _ = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="materialize")
    assert_tree_close(summed, mat)


def test_tapped_equals_loop():
    fn, params, batch = model()
    _, norms_ = reference(fn, params, batch, 1e30)
    c = float(norms_.median())
    expected, expected_norms = reference(fn, params, batch, c)
    summed, got, plan = tapped_sum(fn, params, batch, c)
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
    """The taps under dynamo (eager backend, one full graph), float64 at 1e-10."""
    g = torch.Generator().manual_seed(1)
    params = {
        "t2": PF.init_conv_transpose(2, 3, (2, 2), stride=2, dtype=F64, generator=g),
        "t1": PF.init_conv_transpose(3, 2, 3, dilation=2, dim=1, dtype=F64, generator=g),
    }

    def fn(p, x):
        h = torch.tanh(PF.conv_transpose2d(p["t2"], x, stride=2))
        return torch.sin(PF.conv_transpose1d(p["t1"], h.flatten(1), dilation=2)).sum()

    batch = (torch.randn(4, 2, 2, 3, dtype=F64, generator=g),)
    _, norms_ = reference(fn, params, batch, 1e30)
    c = float(norms_.median())
    expected, expected_norms = reference(fn, params, batch, c)
    step = dp.compiled_clipped_grad_sum(fn, c, method="fast", backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf is tapped
        summed, got = step(params, *batch)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)


def test_tapped_layer_keeps_the_plain_layers_errors():
    x = torch.randn(3, 3, 5, dtype=F64)
    with pytest.raises(ValueError, match="x has 3 channels"):
        tapped_sum(lambda p, xi: PF.conv_transpose1d(p, xi).sum(), PF.init_conv_transpose(4, 2, 3, dim=1, dtype=F64),
                   (x,), 1.0)


# ----------------------------------------- float32, cancelling inputs, a batch of one


@pytest.mark.parametrize("dense", [False, True])
def test_float32_cancelling_batch_of_one_stays_within_bound(dense, monkeypatch):
    """Two input positions whose weight-gradient terms nearly cancel (x repeats, opposite
    output gradients): with one example the clipped sum must stay within C and the reported
    norm is never under the norm of what the sum adds, both with the Gram form (rounding
    made it 0 here before its margin) and with the materialised gradient."""
    if dense:
        monkeypatch.setattr(ct, "_UNFOLD_MAX", 0)
    used = Counter()
    original = ct.ConvTransposeWeight.prefers_dense
    monkeypatch.setattr(ct.ConvTransposeWeight, "prefers_dense",
                        lambda self, d: used.update([original(self, d)]) or original(self, d))

    def fn(p, x, a):
        return (PF.conv_transpose1d(p, x) * a).sum()

    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 8, 1, generator=gen).repeat(1, 1, 2)  # [1, C_in, 2]: equal positions
        params = {"weight": torch.randn(8, 8, 1, generator=gen)}
        a = 1e3 * torch.tensor([1.0, -1.0]) * (1 + 1e-6 * torch.randn(1, 8, 2, generator=gen))
        exact = dp.clipped_grad_sum(fn, {"weight": params["weight"].double()}, x.double(), a.double(),
                                    max_norm=1e30, method="materialize")[1]
        for c in (1e-3, float(exact[0]) * 0.5, 1e30):
            summed, got = dp.clipped_grad_sum(fn, params, x, a, max_norm=c, method="fast")
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in summed.values()))
            assert got.dtype == torch.float32
            assert norm <= c * (1 + 1e-5)
            if c == 1e30:
                assert float(got[0]) >= norm * (1 - 1e-6)
    assert set(used) == {dense}  # the path under test ran
