"""PF.multi_head_attention against torch.nn.MultiheadAttention in float64, every option."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import psgfunc.functional as PF

F64 = torch.float64
E, H, L, S, B = 8, 2, 4, 5, 3


def _module(seed=0, **kw):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, dtype=F64, **kw)
    if m.in_proj_bias is not None:  # torch zeroes them: make them matter
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m


def _inputs(mode, unbatched, batch_first, kdim=E, vdim=E, seed=1):
    g = torch.Generator().manual_seed(seed)

    def make(n, f):
        shape = (n, f) if unbatched else (B, n, f) if batch_first else (n, B, f)
        return torch.randn(shape, generator=g, dtype=F64)

    q = make(L, E)
    if mode == "self":
        return q, q, q
    k = make(S, kdim)
    return (q, k, k) if mode == "kv" else (q, k, make(S, vdim))


def _masks(kpm, am, unbatched, s, seed=2):
    g = torch.Generator().manual_seed(seed)
    kp = None
    shape = (s,) if unbatched else (B, s)
    if kpm == "bool":
        kp = torch.zeros(shape, dtype=torch.bool)
        kp[..., -1] = True
    elif kpm == "float":
        kp = torch.randn(shape, generator=g, dtype=F64)
    a = None
    if am == "bool":
        a = torch.rand(L, s, generator=g) < 0.3
        a[:, 0] = False
    elif am == "float":
        a = torch.randn(L, s, generator=g, dtype=F64)
    elif am == "3d":
        a = torch.randn((H, L, s) if unbatched else (B * H, L, s), generator=g, dtype=F64)
    return kp, a


CASES = [
    dict(),
    dict(bias=False),
    dict(mode="kv"),
    dict(mode="cross"),
    dict(mode="cross", kdim=5, vdim=6),
    dict(mode="cross", kdim=5, vdim=6, bias=False, kpm="bool"),
    dict(batch_first=True),
    dict(batch_first=True, mode="cross", need_weights=True),
    dict(unbatched=True),
    dict(unbatched=True, mode="cross", kdim=3, vdim=7, kpm="bool", am="3d"),
    dict(kpm="bool", am="bool"),
    dict(kpm="float", am="float"),
    dict(am="3d", need_weights=True, average=False),
    dict(causal=True),
    dict(causal=True, kpm="bool"),
    dict(causal=True, need_weights=True),
    dict(need_weights=True, kpm="bool"),
    dict(add_bias_kv=True, kpm="bool", am="float"),
    dict(add_zero_attn=True, kpm="bool", am="bool", need_weights=True),
    dict(add_bias_kv=True, add_zero_attn=True, causal=True, unbatched=True),
    dict(add_bias_kv=True, mode="cross", kdim=5, vdim=6, batch_first=True, kpm="float"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_nn_multihead_attention(case):
    c = dict(mode="self", unbatched=False, batch_first=False, kdim=None, vdim=None, kpm=None, am=None,
             causal=False, need_weights=False, average=True, bias=True, add_bias_kv=False,
             add_zero_attn=False)
    c.update(case)
    m = _module(bias=c["bias"], add_bias_kv=c["add_bias_kv"], add_zero_attn=c["add_zero_attn"],
                kdim=c["kdim"], vdim=c["vdim"], batch_first=c["batch_first"])
    q, k, v = _inputs(c["mode"], c["unbatched"], c["batch_first"], c["kdim"] or E, c["vdim"] or E)
    s = k.shape[1] if (c["batch_first"] and not c["unbatched"]) else k.shape[0]
    kp, a = _masks(c["kpm"], c["am"], c["unbatched"], s)
    if c["causal"]:
        a = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)[:, :s]  # torch needs it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: mismatched mask dtypes are deprecated
        ref_out, ref_w = m(q, k, v, key_padding_mask=kp, attn_mask=a, need_weights=c["need_weights"],
                           average_attn_weights=c["average"], is_causal=c["causal"])
    out, w = PF.multi_head_attention(
        dict(m.named_parameters()), q, k, v, H, key_padding_mask=kp, attn_mask=a,
        is_causal=c["causal"], need_weights=c["need_weights"], batch_first=c["batch_first"],
        average_attn_weights=c["average"], add_zero_attn=c["add_zero_attn"],
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    if c["need_weights"]:
        torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    else:
        assert w is None


def test_causal_without_a_mask_builds_it():
    """torch needs the mask with is_causal; here it is built (also with need_weights)."""
    m = _module()
    q, _, _ = _inputs("self", False, False)
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    ref, ref_w = m(q, q, q, attn_mask=mask, is_causal=True)
    p = dict(m.named_parameters())
    out, _ = PF.multi_head_attention(p, q, q, q, H, is_causal=True)
    out_w, w = PF.multi_head_attention(p, q, q, q, H, is_causal=True, need_weights=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_w, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)


def test_dropout_follows_training_flag():
    m = _module()
    q, _, _ = _inputs("self", False, True)
    p = dict(m.named_parameters())
    ref, _ = PF.multi_head_attention(p, q, q, q, H, batch_first=True)
    same, _ = PF.multi_head_attention(p, q, q, q, H, batch_first=True, dropout=0.5, training=False)
    torch.testing.assert_close(same, ref, rtol=0, atol=0)
    torch.manual_seed(0)
    dropped, w = PF.multi_head_attention(p, q, q, q, H, batch_first=True, dropout=0.5, training=True,
                                         need_weights=True, average_attn_weights=False)
    assert (w == 0).any()  # the returned weights are the dropped ones, as torch's


@pytest.mark.parametrize("kw", [dict(), dict(kdim=3, vdim=5, add_bias_kv=True), dict(bias=False)])
def test_init_draws_torch_values(kw):
    torch.manual_seed(7)
    ref = nn.MultiheadAttention(E, H, dtype=F64, **kw)
    torch.manual_seed(7)
    p = PF.init_multi_head_attention(E, H, dtype=F64, **kw)
    want = dict(ref.named_parameters())
    assert list(p) == list(want)
    for name, t in want.items():
        torch.testing.assert_close(p[name], t.detach(), rtol=1e-12, atol=1e-15)  # same draws
    gen = torch.Generator().manual_seed(3)
    again = PF.init_multi_head_attention(E, H, dtype=F64, generator=gen, **kw)
    gen.manual_seed(3)
    for name, t in PF.init_multi_head_attention(E, H, dtype=F64, generator=gen, **kw).items():
        torch.testing.assert_close(again[name], t, rtol=0, atol=0)


def test_init_errors():
    with pytest.raises(ValueError, match="num_heads=3 must divide embed_dim=8"):
        PF.init_multi_head_attention(8, 3)
    with pytest.raises(ValueError, match="embed_dim=0 must be a positive int"):
        PF.init_multi_head_attention(0, 1)


def test_errors_name_the_argument():
    p = PF.init_multi_head_attention(E, H, dtype=F64)
    x = torch.randn(L, B, E, dtype=F64)
    with pytest.raises(ValueError, match="num_heads=3 must be a positive int dividing"):
        PF.multi_head_attention(p, x, x, x, 3)
    with pytest.raises(ValueError, match="must all be"):
        PF.multi_head_attention(p, x, x[0], x[0], H)
    with pytest.raises(ValueError, match="key has 5 features"):
        k = torch.randn(S, B, 5, dtype=F64)
        PF.multi_head_attention(p, x, k, k, H)
    with pytest.raises(ValueError, match="same sequence"):
        PF.multi_head_attention(p, x, x, x[:2], H)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        PF.multi_head_attention(p, x, x, x, H, key_padding_mask=torch.zeros(L, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be"):
        PF.multi_head_attention(p, x, x, x, H, attn_mask=torch.zeros(L, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        PF.multi_head_attention(p, x, x, x, H, attn_mask=torch.zeros(L, L, dtype=torch.long))
    with pytest.raises(ValueError, match="missing"):
        PF.multi_head_attention({k: v for k, v in p.items() if k != "in_proj_weight"}, x, x, x, H)
    with pytest.raises(ValueError, match="both bias_k and bias_v"):
        PF.multi_head_attention({**p, "bias_k": torch.zeros(1, 1, E, dtype=F64)}, x, x, x, H)
    with pytest.raises(ValueError, match="query must be a tensor"):
        PF.multi_head_attention(p, None, x, x, H)
