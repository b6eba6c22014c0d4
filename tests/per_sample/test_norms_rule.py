"""Rules of group_norm, instance_norm and rms_norm: per-sample gradients, fast clipping and the
compiled (tapped) route against the float64 per-example loop at 1e-10."""

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
from psgfunc.per_sample.rules import norms
from tests.dp.test_fast_clipping import reference
from tests.oracles import assert_tree_close, per_example_grads
from tests.per_sample.test_tap import tapped_sum

F64 = torch.float64


def rand_params(params, gen):
    return {k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in params.items()}


def drop(params, affine):
    return {k: v for k, v in params.items() if affine in (k, "both")}


def case(layer, affine, rows, seed=0):
    """(fn of one example, params, batch of 4): an example holds ``rows`` rows [N, C, *S]
    (group/instance norm) or ``rows`` middle dims (rms_norm)."""
    gen = torch.Generator().manual_seed(seed)
    if layer == "group_norm":
        params = drop(rand_params(PF.init_group_norm(3, 6, dtype=F64), gen), affine)
        x = torch.randn(4, rows, 6, 5, dtype=F64, generator=gen)
        return (lambda p, xi: torch.sin(PF.group_norm(p, xi * 3, 3, eps=1e-3)).sum()), params, x
    if layer.startswith("instance_norm"):
        dim = int(layer[-2])
        params = drop(rand_params(PF.init_instance_norm(3, affine=True, dtype=F64), gen), affine)
        x = torch.randn(4, rows, 3, *(5, 4, 3)[:dim], dtype=F64, generator=gen)
        return (lambda p, xi: torch.sin(PF.instance_norm(p, xi * 3, eps=1e-3)).sum()), params, x
    params = drop(rand_params(PF.init_rms_norm((2, 3), dtype=F64), gen), affine)
    x = torch.randn(4, *(3, 2)[:rows], 2, 3, dtype=F64, generator=gen)
    return (lambda p, xi: torch.sin(PF.rms_norm(p, xi * 3, (2, 3), eps=1e-3)).sum()), params, x


CASES = [
    ("group_norm", "both", 1), ("group_norm", "weight", 2), ("group_norm", "bias", 1),
    ("instance_norm1d", "both", 1), ("instance_norm2d", "weight", 2), ("instance_norm3d", "bias", 1),
    ("rms_norm", "weight", 0), ("rms_norm", "weight", 2),
]


@pytest.fixture
def rule_calls(monkeypatch):
    """Counts the shared-weight rules' forwards (the affine step, or group_norm's fused one)."""
    calls = Counter()
    for fused in (norms._ScalePerSample, norms._GroupNormPerSample):
        original = fused.forward
        monkeypatch.setattr(fused, "forward", staticmethod(lambda *a, f=original: calls.update(["rule"]) or f(*a)))
    return calls


@pytest.mark.parametrize("layer,affine,rows", CASES)
def test_expanded_equals_loop_and_vmap(layer, affine, rows, rule_calls):
    fn, params, x = case(layer, affine, rows)
    expected = per_example_grads(fn, params, x)
    expanded = per_sample_grads(fn, params, x, method="expanded")
    assert rule_calls["rule"] == 1  # the shared-weight rule ran, not the vmap fallback
    assert_tree_close(expanded, expected, dtype=F64)
    assert_tree_close(per_sample_grads(fn, params, x, method="vmap"), expected, dtype=F64)


@pytest.mark.parametrize("layer", ["group_norm", "instance_norm2d", "rms_norm"])
def test_no_params_just_values(layer):
    fn, _, x = case(layer, "none", 1)
    _, params, _ = case(layer, "both" if layer != "rms_norm" else "weight", 1)
    params = {"other": torch.ones(1, dtype=F64)}

    def loss(p, xi):
        return fn({}, xi) * p["other"].sum()

    assert_tree_close(per_sample_grads(loss, params, x, method="expanded"), per_example_grads(loss, params, x), dtype=F64)


def test_batch_mode_non_shared_params_fall_back_exactly():
    """Per-example weights that are not one shared tensor (batch mode, as module_call never
    makes but a caller may): every example gets its own affine step."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 6, dtype=F64, generator=gen), torch.randn(4, 6, dtype=F64, generator=gen)
    x = torch.randn(4, 6, 5, dtype=F64, generator=gen)
    xr = torch.randn(4, 3, 6, dtype=F64, generator=gen)
    with _rules.expanded_mode("batch"):
        gn = PF.group_norm({"weight": w, "bias": b}, x, 2)
        inorm = PF.instance_norm({"weight": w, "bias": b}, x)
        rms = PF.rms_norm({"weight": w}, xr, 6)
    for i in range(4):
        p = {"weight": w[i], "bias": b[i]}
        torch.testing.assert_close(gn[i], F.group_norm(x[i : i + 1], 2, w[i], b[i])[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(inorm[i], PF.instance_norm(p, x[i : i + 1])[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rms[i], F.rms_norm(xr[i], (6,), w[i]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w: PF.group_norm({"weight": w}, torch.zeros(6), 2), r"\[B, C, \*S\]"),
        (lambda w: PF.group_norm({"weight": w}, torch.zeros(2, 6, 3), 2), "holds 3 examples, x 2"),
        (lambda w: PF.group_norm({"weight": w}, torch.zeros(3, 6, 3), 4), "num_groups=4 must divide"),
        (lambda w: PF.instance_norm({"weight": w}, torch.zeros(3, 6)), r"3 dims at least"),
        (lambda w: PF.instance_norm({"weight": w}, torch.zeros(3, 5, 4)), r"params\['weight'\] has shape \(6,\)"),
        (lambda w: PF.rms_norm({"weight": w}, torch.zeros(6), 6), "keep the batch dim first"),
        (lambda w: PF.rms_norm({"weight": w}, torch.zeros(2, 6), 6), "for 3 examples"),
    ],
)
def test_batch_mode_errors(call, match):
    w = torch.ones(6).expand(3, 6)
    with _rules.expanded_mode("batch"), pytest.raises(ValueError, match=match):
        call(w)


# --------------------------------------------------------------------- fast clipping


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 6 * 5 * 8])  # 1 example per chunk; 3 (then 1)
@pytest.mark.parametrize("rows", [1, 2])
def test_group_norm_weight_sums_in_chunks_of_examples(monkeypatch, chunk_bytes, rows, rule_calls):
    """The fused group_norm's weight gradient is summed chunk by chunk of examples
    (norms._CHUNK_BYTES): the same per-sample gradients and clipped sum as one chunk."""
    monkeypatch.setattr(norms, "_CHUNK_BYTES", chunk_bytes * rows)
    fn, params, x = case("group_norm", "both", rows)
    expected = per_example_grads(fn, params, x)
    assert_tree_close(per_sample_grads(fn, params, x, method="expanded"), expected, dtype=F64)
    assert rule_calls["rule"] == 1
    summed, _ = dp.clipped_grad_sum(lambda p, xi: fn(p, xi), params, x, max_norm=0.5, method="fast")
    mat, _ = dp.clipped_grad_sum(lambda p, xi: fn(p, xi), params, x, max_norm=0.5, method="materialize")
    assert_tree_close(summed, mat)


def model():
    """conv -> group_norm -> instance_norm -> rms_norm (weight used twice) -> linear."""
    g = torch.Generator().manual_seed(0)
    params = {
        "conv": PF.init_conv(2, 4, (3, 3), dtype=F64, generator=g),
        "gn": rand_params(PF.init_group_norm(2, 4, dtype=F64), g),
        "in": rand_params(PF.init_instance_norm(4, affine=True, dtype=F64), g),
        "rms": rand_params(PF.init_rms_norm(4, dtype=F64), g),
        "fc": PF.init_linear(4, 3, dtype=F64, generator=g),
    }

    def fn(p, x, y):
        h = torch.relu(PF.group_norm(p["gn"], PF.conv2d(p["conv"], x.unsqueeze(0), padding=1), 2))
        h = torch.tanh(PF.instance_norm(p["in"], h))[0]  # [4, 5, 5]
        h = PF.rms_norm(p["rms"], h.flatten(1).T, 4)  # [25, 4]
        h = PF.rms_norm(p["rms"], torch.tanh(h), 4, eps=1e-3).mean(0)
        return F.cross_entropy(PF.linear(p["fc"], h), y)

    x = torch.randn(5, 2, 5, 5, dtype=F64, generator=g)
    return fn, params, (x, torch.randint(0, 3, (5,), generator=g))


@pytest.mark.parametrize("max_norm", ["median", 1e30])
def test_fast_clipping_equals_materialize(max_norm):
    fn, params, batch = model()
    _, norms_ = reference(fn, params, batch, 1e30)
    c = float(norms_.median()) if max_norm == "median" else max_norm
    expected, expected_norms = reference(fn, params, batch, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter has a rule: nothing materialised
        summed, got = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
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


def test_compiled_fast_is_one_graph_and_exact():
    """The three taps under dynamo (eager backend, one full graph), float64 at 1e-10."""
    g = torch.Generator().manual_seed(1)
    params = {
        "gn": rand_params(PF.init_group_norm(2, 4, dtype=F64), g),
        "in": rand_params(PF.init_instance_norm(4, affine=True, dtype=F64), g),
        "rms": rand_params(PF.init_rms_norm(4, dtype=F64), g),
    }

    def fn(p, x):
        h = PF.instance_norm(p["in"], torch.tanh(PF.group_norm(p["gn"], x, 2)))
        return torch.sin(PF.rms_norm(p["rms"], h[0].T, 4)).sum()

    batch = (torch.randn(4, 1, 4, 3, dtype=F64, generator=g),)
    _, norms_ = reference(fn, params, batch, 1e30)
    c = float(norms_.median())
    expected, expected_norms = reference(fn, params, batch, c)
    step = dp.compiled_clipped_grad_sum(fn, c, method="fast", backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf is tapped
        summed, got = step(params, *batch)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)


def test_tapped_layers_keep_the_plain_layers_errors():
    x = torch.randn(3, 1, 4, 5, dtype=F64)
    with pytest.raises(ValueError, match="group_norm"):
        tapped_sum(lambda p, xi: PF.group_norm(p, xi, 2).sum(), {"weight": torch.ones(3, dtype=F64)}, (x,), 1.0)
    with pytest.raises(ValueError, match="num_groups=3"):
        tapped_sum(lambda p, xi: PF.group_norm(p, xi, 3).sum(), {"weight": torch.ones(4, dtype=F64)}, (x,), 1.0)
    with pytest.raises(ValueError, match="rms_norm"):
        tapped_sum(lambda p, xi: PF.rms_norm(p, xi, 5).sum(), {"weight": torch.ones(4, dtype=F64)}, (x,), 1.0)


# ----------------------------------------- float32, cancelling inputs, a batch of one


def cancelling(layer, gen, scale):
    """``(layer(x) * a).sum()`` on one example whose per-position terms of the weight and bias
    gradients nearly cancel: ``a`` alternates in sign over the positions, x_hat does not
    (group/instance norm), or x repeats its rows with opposite ``a`` (rms_norm)."""
    positions = 8
    sign = torch.ones(positions)
    sign[1::2] = -1
    if layer == "rms_norm":
        x = torch.randn(1, 16, generator=gen).repeat(positions, 1)
        a = scale * sign.view(-1, 1) * (1 + 1e-4 * torch.randn(positions, 16, generator=gen))
        params = {"weight": 1 + 0.1 * torch.randn(16, generator=gen)}
        return (lambda p, x, a: (PF.rms_norm(p, x, 16) * a).sum()), params, (x, a)
    x = torch.randn(1, 4, positions, generator=gen)
    x[..., 1::2] = x[..., 0::2] * (1 + 1e-3)  # pairs of nearly equal x_hat
    a = scale * sign * (1 + 1e-4 * torch.randn(1, 4, positions, generator=gen))
    params = {"weight": 1 + 0.1 * torch.randn(4, generator=gen), "bias": 0.1 * torch.randn(4, generator=gen)}
    if layer == "group_norm":
        return (lambda p, x, a: (PF.group_norm(p, x, 2) * a).sum()), params, (x, a)
    return (lambda p, x, a: (PF.instance_norm(p, x) * a).sum()), params, (x, a)


@pytest.mark.parametrize("layer", ["group_norm", "instance_norm", "rms_norm"])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_float32_cancelling_batch_of_one_stays_within_bound(layer, scale):
    """With one example the clipped sum IS its contribution: never above C; unclipped, the
    reported norm is never under the norm of what the sum adds (the [B, C] gradient the
    norm is computed from is the one summed), nor under the float64 norm (it carries the
    bound of its own sums' rounding, a few percent here where they cancel)."""
    for seed in range(3):
        fn, params, example = cancelling(layer, torch.Generator().manual_seed(seed), scale)
        batch = tuple(t.unsqueeze(0) for t in example)
        exact = dp.clipped_grad_sum(fn, {k: v.double() for k, v in params.items()},
                                    *(t.double() for t in batch), max_norm=1e30, method="materialize")[1]
        for c in (1e-3, float(exact[0]) * 0.5, 1e30):
            summed, got = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in summed.values()))
            assert got.dtype == torch.float32
            assert norm <= c * (1 + 1e-5)
            if c == 1e30:
                assert float(got[0]) >= norm * (1 - 1e-6)
                assert 1 - 1e-6 <= float(got[0]) / float(exact[0]) < 1.05


@pytest.mark.parametrize("method", ["expanded", "vmap"])
def test_example_without_its_row_dim_is_named(method):
    """torch's group_norm reads dim 0 as rows: an example [C, *S] must be x.unsqueeze(0)."""
    x = torch.randn(3, 4, 5, 6, dtype=F64)
    params = {"weight": torch.ones(4, dtype=F64)}
    with pytest.raises(ValueError, match=r"ONE example.*unsqueeze\(0\)"):
        per_sample_grads(lambda p, xi: PF.group_norm(p, xi, 2).sum(), params, x, method=method)
    grads = per_sample_grads(lambda p, xi: PF.group_norm(p, xi.unsqueeze(0), 2).pow(2).sum(), params, x, method=method)
    assert grads["weight"].shape == (3, 4)


def _saved_elements(run):
    """Elements of the tensors autograd saves while ``run()`` builds its graph (an expanded
    [B, C] param view counts B * C)."""
    total = Counter()

    def pack(t):
        total["n"] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total["n"]


@pytest.mark.parametrize("rows", [1, 2])
def test_group_norm_rule_saves_what_the_layer_saves(rows):
    """The per-sample group_norm keeps x and the [B, G] statistics for the backward, as the
    ordinary layer does, not the normalised x_hat as well (a WRN-16-4's GroupNorms kept 29 MB
    more at B = 16); its per-sample gradients are exact (test above) and fast clipping
    still equals the loop."""
    gen = torch.Generator().manual_seed(0)
    params = rand_params(PF.init_group_norm(2, 4, dtype=F64), gen)
    x = torch.randn(3, rows, 4, 5, 6, dtype=F64, generator=gen)  # examples [N, C, *S]

    def fn(p, xi):
        return torch.sin(PF.group_norm(p, xi, 2)).sum()

    w, b = (params[k].clone().requires_grad_(True) for k in ("weight", "bias"))
    ordinary = _saved_elements(lambda: torch.sin(F.group_norm(x.reshape(-1, 4, 5, 6), 2, w, b)).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing materialised under the hooks either
        rule = _saved_elements(lambda: dp.clipped_grad_sum(fn, params, x, max_norm=1.0))
    assert rule <= ordinary + x[0].numel()  # + sin's input (x-sized per example)
    expected, _ = reference(fn, params, (x,), 1.0)
    assert_tree_close(dp.clipped_grad_sum(fn, params, x, max_norm=1.0)[0], expected)


def test_group_norm_shell_takes_an_empty_batch():
    """B = 0 through the group_norm shell's fused rule (no chunk of examples to sum)."""
    import psgfunc.nn as pnn

    m = pnn.GroupNorm(2, 4, max_batch_size=4)
    m(torch.randn(0, 4, 3, 3)).sum().backward()
    assert [tuple(p.grad_sample.shape) for p in m.parameters()] == [(0, 4), (0, 4)]
    rows, bound = norms._weight_sums(torch.zeros(0, 4, 9), torch.zeros(0, 2), torch.zeros(0, 2),
                                     torch.zeros(0, 1, 4, 9), 2)
    assert tuple(rows.shape) == (0, 1, 4) and tuple(bound.shape) == (0,)
