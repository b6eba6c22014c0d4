"""DPMultiheadAttention: nn.MultiheadAttention's state_dict and outputs, grad_sample == the loop,
conversion by expand_weights (so nn.TransformerEncoderLayer converts), DPOptimizer fast."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psgfunc.dp as dp
import psgfunc.nn as pnn
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
E, H, L, S, B = 8, 2, 4, 5, 3


def _pair(**kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dtype=F64, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = pnn.DPMultiheadAttention(E, H, dtype=F64, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("kw", [dict(), dict(kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True),
                                dict(bias=False, batch_first=True)])
def test_state_dict_is_nn_multihead_attentions_both_ways(kw):
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(E, H, dtype=F64, **kw)
    torch.manual_seed(1)
    ours = pnn.DPMultiheadAttention(E, H, dtype=F64, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():  # same init draws under one seed
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kw", [dict(), dict(kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True)])
def test_outputs_and_grad_sample_equal_the_loop(kw, batch_first):
    ours, ref = _pair(batch_first=batch_first, **kw)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, L, E, generator=g, dtype=F64)
    k = torch.randn(B, S, kw.get("kdim", E), generator=g, dtype=F64)
    v = torch.randn(B, S, kw.get("vdim", E), generator=g, dtype=F64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -1] = True

    def lay(t):  # batch-first rows -> the module's layout
        return t if batch_first else t.transpose(0, 1)

    out, w = ours(lay(q), lay(k), lay(v), key_padding_mask=kpm)
    ref_out, ref_w = ref(lay(q), lay(k), lay(v), key_padding_mask=kpm)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()

    dim = 0 if batch_first else 1

    def fn(p, qi, ki, vi, kpi):
        o, _ = torch.func.functional_call(
            ref, p, (qi.unsqueeze(dim), ki.unsqueeze(dim), vi.unsqueeze(dim)),
            dict(key_padding_mask=kpi[None]))
        return o.square().sum()

    want = per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, q, k, v, kpm)
    assert_tree_close({n: p.grad_sample for n, p in ours.named_parameters()}, want)
    for p in ours.parameters():
        torch.testing.assert_close(p.grad, p.grad_sample.sum(0), rtol=1e-10, atol=1e-12)


def test_unbatched_example_is_a_batch_of_one():
    ours, ref = _pair()
    x = torch.randn(L, E, dtype=F64)
    out, w = ours(x, x, x, key_padding_mask=torch.tensor([False, False, False, True]))
    ref_out, ref_w = ref(x, x, x, key_padding_mask=torch.tensor([False, False, False, True]))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert ours.in_proj_weight.grad_sample.shape == (1, 3 * E, E)
    assert ours.out_proj.weight.grad_sample.shape == (1, E, E)


def test_errors():
    ours, _ = _pair()
    with pytest.raises(ValueError, match="query must be"):
        ours(torch.zeros(E, dtype=F64), torch.zeros(E, dtype=F64), torch.zeros(E, dtype=F64))
    with pytest.raises(ValueError, match="key holds 2 examples"):
        ours(torch.zeros(L, B, E, dtype=F64), torch.zeros(S, 2, E, dtype=F64), torch.zeros(S, 2, E, dtype=F64))
    small = pnn.DPMultiheadAttention(E, H, dtype=F64, max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        x = torch.zeros(L, B, E, dtype=F64)
        small(x, x, x)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, E)
        self.enc = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def test_transformer_encoder_layer_converts_and_trains_with_fast_clipping():
    torch.manual_seed(0)
    model = _Model().double()
    ref = _Model().double()
    ref.load_state_dict(model.state_dict())
    model = pnn.expand_weights(model, max_batch_size=8)
    assert isinstance(model.enc.self_attn, pnn.DPMultiheadAttention)
    assert model.enc.self_attn.out_proj is not None
    pnn.expand_weights(model, max_batch_size=8)  # a model holding the shell converts again
    assert list(model.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 11, (5, 6), generator=g), torch.randint(0, 3, (5,), generator=g)
    torch.testing.assert_close(model(ids), ref(ids), rtol=1e-10, atol=1e-12)
    model.eval(), ref.eval()
    with torch.no_grad():  # eval without grad may take torch's fused encoder path: same weights
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-10, atol=1e-12)
    model.train()

    c = 0.05
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=c,
                         noise_multiplier=0.0, expected_batch_size=5, fast_clipping=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(ids), y, reduction="sum").backward()
        norms = opt.accumulate()
        opt.step()

    params = {n: p.detach() for n, p in ref.named_parameters()}

    def fn(p, i, t):
        return F.cross_entropy(torch.func.functional_call(ref, p, (i[None],)), t[None], reduction="sum")

    loop = per_example_grads(fn, params, ids, y)
    true = torch.cat([gs.reshape(5, -1) for gs in loop.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms, true, rtol=1e-10, atol=0)
    factor = c / true.clamp_min(c)
    for (name, p), before in zip(model.named_parameters(), params.values()):
        step = (factor.reshape(-1, *[1] * (p.dim())) * loop[name]).sum(0) / 5
        torch.testing.assert_close(p.detach(), before - step, rtol=1e-10, atol=1e-12)


def test_transformer_decoder_layer_converts():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True, dtype=F64)
    ref = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True, dtype=F64)
    ref.load_state_dict(layer.state_dict())
    layer = pnn.expand_weights(layer, max_batch_size=4)
    assert isinstance(layer.multihead_attn, pnn.DPMultiheadAttention)
    x, mem = torch.randn(B, L, E, dtype=F64), torch.randn(B, S, E, dtype=F64)
    out = layer(x, mem, tgt_is_causal=False)
    torch.testing.assert_close(out, ref(x, mem), rtol=1e-10, atol=1e-12)
    out.square().sum().backward()

    def fn(p, xi, mi):
        return torch.func.functional_call(ref, p, (xi[None], mi[None])).square().sum()

    want = per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, x, mem)
    assert_tree_close({n: p.grad_sample for n, p in layer.named_parameters()}, want)


@pytest.mark.parametrize("length", [4, 3])
def test_time_major_encoder_layer_is_refused(length):
    """batch_first=False: the shell reads dim 1, the LayerNorm after it dim 0: refused, never
    silently mixed (also when L == B, where shapes cannot tell)."""
    layer = pnn.expand_weights(nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, dtype=F64), max_batch_size=8)
    with pytest.raises(ValueError, match="DPMultiheadAttention 'self_attn'.*time-major"):
        layer(torch.randn(length, 3, E, dtype=F64))


def test_dp_optimizer_fast_clipping_equals_grad_sample_path_with_every_parameter_kind():
    """Separate q/k/v weights, the packed bias and bias_k/bias_v through module_call's pieces."""
    def run(fast):
        ours, _ = _pair(kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=True)
        opt = dp.DPOptimizer(torch.optim.SGD(ours.parameters(), lr=0.5), max_norm=0.5,
                             noise_multiplier=0.0, expected_batch_size=B, fast_clipping=fast)
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(B, n, f, generator=g, dtype=F64) for n, f in ((L, E), (S, 3), (S, 5)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, w = ours(q, k, v)
            (out.square().sum() + w.square().sum()).backward()
            norms = opt.accumulate()
            opt.step()
        return [p.detach().clone() for p in ours.parameters()], norms

    (slow, slow_norms), (fast, fast_norms) = run(False), run(True)
    torch.testing.assert_close(fast_norms, slow_norms, rtol=1e-10, atol=0)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kw", [dict(), dict(kdim=3, vdim=5, add_bias_kv=True)])
def test_empty_batch(kw):
    """Poisson sampling draws empty batches: B = 0 gives [0, *shape] grad_samples."""
    ours, _ = _pair(batch_first=True, **kw)
    q = torch.zeros(0, L, E, dtype=F64)
    k, v = torch.zeros(0, S, kw.get("kdim", E), dtype=F64), torch.zeros(0, S, kw.get("vdim", E), dtype=F64)
    out, w = ours(q, k, v)
    (out.sum() + w.sum()).backward()
    assert all(p.grad_sample.shape == (0, *p.shape) for p in ours.parameters())
