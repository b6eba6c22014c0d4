"""Per-sample gradients of PF.multi_head_attention: expanded == vmap == the float64 loop, fast
clipping == materialise without materialising, the compiled route, dropout under vmap."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc import per_sample_grads
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
E, H, L, S, B = 8, 2, 4, 5, 3

# (init keywords, which inputs are the same tensor, forward keywords)
CASES = {
    "self": (dict(), "self", dict()),
    "self-masks-weights": (dict(), "self", dict(need_weights=True, causal_kpm=True)),
    "kv": (dict(), "kv", dict()),
    "cross": (dict(), "cross", dict()),
    "kdim-vdim": (dict(kdim=3, vdim=5), "cross", dict()),
    "bias-kv-zero-attn": (dict(add_bias_kv=True), "kv", dict(add_zero_attn=True)),
    "no-bias": (dict(bias=False, kdim=3, vdim=5), "cross", dict()),
    "kdim-vdim-bias-kv": (dict(kdim=3, vdim=5, add_bias_kv=True), "cross", dict(add_zero_attn=True)),
}


def _problem(name, dtype=F64, size=B, seed=0):
    init, mode, fwd = CASES[name]
    g = torch.Generator().manual_seed(seed)
    params = PF.init_multi_head_attention(E, H, dtype=dtype, generator=g, **init)
    params = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
    x = torch.randn(size, L, E, generator=g, dtype=dtype)
    k = torch.randn(size, S, init.get("kdim", E), generator=g, dtype=dtype)
    v = torch.randn(size, S, init.get("vdim", E), generator=g, dtype=dtype)
    target = torch.randn(size, L, E, generator=g, dtype=dtype)
    fwd = dict(fwd)
    kpm = torch.zeros(size, S, dtype=torch.bool)
    kpm[:, -1] = True
    use_kpm = fwd.pop("causal_kpm", False)

    def fn(p, xi, ki, vi, kpi, ti):
        if mode == "self":
            ki = vi = xi
        elif mode == "kv":
            vi = ki
        mask = kpi[:L] if use_kpm and mode == "self" else kpi if use_kpm else None
        out, w = PF.multi_head_attention(p, xi, ki, vi, H, key_padding_mask=mask, is_causal=use_kpm, **fwd)
        loss = ((out - ti) ** 2).sum()
        return loss if w is None else loss + w.square().sum()

    kpm_arg = kpm[:, :L] if use_kpm and mode == "self" else kpm
    return fn, params, (x, k, v, kpm_arg, target)


@pytest.mark.parametrize("name", list(CASES))
def test_expanded_equals_vmap_and_loop(name):
    fn, params, batch = _problem(name)
    want = per_example_grads(fn, params, *batch)
    for method in ("expanded", "vmap"):
        assert_tree_close(per_sample_grads(fn, params, *batch, method=method), want)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_clipping_equals_materialize_without_materialising(name):
    fn, params, batch = _problem(name)
    ref, ref_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=1.0, method="materialize")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "materialised" warning: every leaf has a rule
        got, norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=1.0, method="fast")
    assert_tree_close(got, ref)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)


def test_compiled_route_equals_eager():
    """Separate q/k/v weights, the packed bias (split_bias's taps), bias_k/bias_v's taps."""
    fn, params, batch = _problem("kdim-vdim-bias-kv")
    ref, ref_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=1.0, method="materialize")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf tapped: none differentiated in the graph
        step = dp.compiled_clipped_grad_sum(fn, 1.0, backend="eager")
        got, norms = step(params, *batch)
    assert_tree_close(got, ref)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)


def test_float32_batch_of_one_norms_match_float64():
    fn, params, batch = _problem("bias-kv-zero-attn", dtype=torch.float32, size=1)
    _, norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=1.0, method="fast")
    want = per_example_grads(fn, params, *batch)  # float64 loop
    true = torch.cat([g.reshape(1, -1) for g in want.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms.double(), true, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:psgfunc. .* has no per-sample rule:UserWarning")  # expected vmap fallback
def test_nn_multihead_attention_through_functional_call():
    """A torch.nn model (no psgfunc layers) gets the same gradients as the functional layer."""
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    x = torch.randn(B, L, E, dtype=F64)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def fn(p, xi):
        out, _ = torch.func.functional_call(m, p, (xi[None], xi[None], xi[None]), dict(need_weights=False))
        return out.square().sum()

    def ours(p, xi):
        return PF.multi_head_attention(p, xi, xi, xi, H)[0].square().sum()

    want = per_example_grads(fn, params, x)
    assert_tree_close(per_sample_grads(ours, params, x, method="expanded"), want)
    assert_tree_close(per_sample_grads(fn, params, x, method="expanded"), want)


def test_dropout_in_training_follows_vmap_randomness():
    fn_params = PF.init_multi_head_attention(E, H, dtype=F64)
    x = torch.randn(B, L, E, dtype=F64)

    def fn(p, xi):
        return PF.multi_head_attention(p, xi, xi, xi, H, dropout=0.5, training=True)[0].sum()

    for method in ("expanded", "vmap"):
        grads = per_sample_grads(fn, fn_params, x, method=method)
        assert grads["in_proj_weight"].shape == (B, 3 * E, E)
    with pytest.raises(RuntimeError, match="randomness"):
        per_sample_grads(fn, fn_params, x, method="expanded", randomness="error")
