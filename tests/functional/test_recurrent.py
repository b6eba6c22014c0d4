"""``PF.gru`` / ``PF.rnn`` / ``PF.gru_cell`` / ``PF.rnn_cell`` against torch.nn in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import psgfunc.functional as PF
from psgfunc.scan import scan

F64 = torch.float64
T, B, D, H = 4, 3, 3, 2
TOL = dict(rtol=1e-10, atol=1e-12)

KINDS = ["gru", "tanh", "relu"]


def make(kind, num_layers=1, bidirectional=False, bias=True, batch_first=False):
    torch.manual_seed(0)
    if kind == "gru":
        m = nn.GRU(D, H, num_layers, bias=bias, batch_first=batch_first,
                   bidirectional=bidirectional, dtype=F64)
    else:
        m = nn.RNN(D, H, num_layers, nonlinearity=kind, bias=bias, batch_first=batch_first,
                   bidirectional=bidirectional, dtype=F64)
    return m, dict(m.named_parameters())


def call(kind, params, x, h0=None, **kw):
    if kind == "gru":
        return PF.gru(params, x, h0, **kw)
    return PF.rnn(params, x, h0, nonlinearity=kind, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("num_layers", "bidirectional", "batch_first", "with_h0"),
                         [(1, False, False, False), (1, True, True, True), (2, False, True, False),
                          (2, True, False, True), (2, True, True, False)])
def test_layer_matches_torch(kind, num_layers, bidirectional, batch_first, with_h0):
    m, params = make(kind, num_layers, bidirectional, batch_first=batch_first)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, D) if batch_first else (T, B, D), generator=gen, dtype=F64)
    p = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * p, B, H, generator=gen, dtype=F64) if with_h0 else None
    out, h_n = call(kind, params, x, h0, num_layers=num_layers, bidirectional=bidirectional,
                    batch_first=batch_first)
    ref, ref_h = m(x, h0)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(h_n, ref_h, **TOL)
    # one example [T, D] (batch_first ignored), as nn.GRU/nn.RNN unbatched
    x1 = x[0] if batch_first else x[:, 0]
    out1, h1 = call(kind, params, x1, None if h0 is None else h0[:, 0], num_layers=num_layers,
                    bidirectional=bidirectional, batch_first=batch_first)
    ref1, ref_h1 = m(x1, None if h0 is None else h0[:, 0])
    torch.testing.assert_close(out1, ref1, **TOL)
    torch.testing.assert_close(h1, ref_h1, **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_are_packed_semantics_and_gradients_match(kind, bidirectional):
    m, params = make(kind, 2, bidirectional)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, D, generator=gen, dtype=F64, requires_grad=True)
    lengths = torch.tensor([2, 4, 1])
    h0 = torch.randn(2 * (2 if bidirectional else 1), B, H, generator=gen, dtype=F64)
    out, h_n = call(kind, params, x, h0, num_layers=2, bidirectional=bidirectional,
                    lengths=lengths)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    ref_p, ref_h = m(packed, h0)
    ref, _ = pad_packed_sequence(ref_p, total_length=T)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(h_n, ref_h, **TOL)
    leaves = [x, *params.values()]
    got = torch.autograd.grad(out.sin().sum() + h_n.pow(2).sum(), leaves)
    want = torch.autograd.grad(ref.sin().sum() + ref_h.pow(2).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_bias_false_and_length_zero():
    m, params = make("gru", 1, True, bias=False)
    assert list(params) == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse",
                            "weight_hh_l0_reverse"]
    x = torch.randn(T, B, D, dtype=F64)
    h0 = torch.randn(2, B, H, dtype=F64)
    out, h_n = PF.gru(params, x, h0, bidirectional=True, lengths=torch.tensor([0, 4, 2]))
    assert not out[:, 0].any()
    torch.testing.assert_close(h_n[:, 0], h0[:, 0], rtol=0, atol=0)
    ref, ref_h = m(x, h0)
    torch.testing.assert_close(out[:, 1], ref[:, 1], **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_draws_torchs_masks(kind):
    m, params = make(kind, 3, True)
    m.dropout = 0.4
    m.train()
    x = torch.randn(T, B, D, dtype=F64)
    torch.manual_seed(5)
    out, h_n = call(kind, params, x, num_layers=3, bidirectional=True, dropout=0.4, training=True)
    torch.manual_seed(5)
    ref, ref_h = m(x)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(h_n, ref_h, **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_cells_match_torch_and_scan(kind, bias):
    torch.manual_seed(3)
    if kind == "gru":
        cell = nn.GRUCell(D, H, bias=bias, dtype=F64)
        f = PF.gru_cell
    else:
        cell = nn.RNNCell(D, H, bias=bias, nonlinearity=kind, dtype=F64)
        f = lambda p, h, x: PF.rnn_cell(p, h, x, nonlinearity=kind)  # noqa: E731
    params = dict(cell.named_parameters())
    x = torch.randn(B, D, dtype=F64)
    h = torch.randn(B, H, dtype=F64)
    for hh, xx in ((h, x), (None, x), (h[0], x[0]), (None, x[0])):
        new, out = f(params, hh, xx)
        torch.testing.assert_close(new, cell(xx, hh), **TOL)
        assert out is new
    # scan of the cell == the layer
    xs = torch.randn(T, B, D, dtype=F64)
    h_n, outs = scan(lambda c, xt: f(params, c, xt), h, xs)
    layer = {k + "_l0": v for k, v in params.items()}
    ref, ref_h = (PF.gru(layer, xs, h[None]) if kind == "gru"
                  else PF.rnn(layer, xs, h[None], nonlinearity=kind))
    torch.testing.assert_close(outs, ref, **TOL)
    torch.testing.assert_close(h_n, ref_h[0], **TOL)


def test_init_equals_torch_under_one_seed():
    for build, init in (
        (lambda: nn.GRU(D, H, 2, bidirectional=True), lambda: PF.init_gru(D, H, 2, bidirectional=True)),
        (lambda: nn.RNN(D, H, 2, nonlinearity="relu", bias=False),
         lambda: PF.init_rnn(D, H, 2, "relu", bias=False)),
        (lambda: nn.GRUCell(D, H), lambda: PF.init_gru_cell(D, H)),
        (lambda: nn.RNNCell(D, H, nonlinearity="relu"), lambda: PF.init_rnn_cell(D, H, True, "relu")),
    ):
        torch.manual_seed(11)
        ref = dict(build().named_parameters())
        torch.manual_seed(11)
        got = init()
        assert list(got) == list(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k].detach(), rtol=0, atol=0)
    p = PF.init_gru(D, H, dtype=F64, generator=torch.Generator().manual_seed(0))
    bound = 1 / H ** 0.5
    assert all(v.dtype == F64 and v.abs().max() <= bound for v in p.values())


def test_errors():
    _, params = make("gru", 1, False)
    x = torch.randn(T, B, D, dtype=F64)
    with pytest.raises(ValueError, match="gru: x has 4 features"):
        PF.gru(params, torch.randn(T, B, D + 1, dtype=F64))
    with pytest.raises(ValueError, match=r"gru: x must be \[T, B, D\]"):
        PF.gru(params, torch.randn(D, dtype=F64))
    with pytest.raises(ValueError, match="gru: h0 must be"):
        PF.gru(params, x, torch.zeros(1, B + 1, H, dtype=F64))
    with pytest.raises(ValueError, match="gru: h0 has dtype"):
        PF.gru(params, x, torch.zeros(1, B, H))
    with pytest.raises(ValueError, match=r"gru: lengths must lie in \[0, T\]"):
        PF.gru(params, x, lengths=torch.tensor([1, 2, 9]))
    with pytest.raises(ValueError, match="gru: dropout must be"):
        PF.gru(params, x, dropout=1.0)
    with pytest.raises(ValueError, match="gru: num_layers must be"):
        PF.gru(params, x, num_layers=0)
    with pytest.raises(ValueError, match="params lack"):
        PF.gru(params, x, num_layers=2)
    with pytest.raises(ValueError, match="bidirectional=True"):
        PF.gru(make("gru", 1, True)[1], x)
    with pytest.raises(ValueError, match=r"weight_hh_l0 must be \[3H, H\]"):
        PF.gru(make("tanh")[1], x)  # RNN params given to gru
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        PF.rnn(make("tanh")[1], x, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="nonlinearity must be"):
        PF.rnn_cell(PF.init_rnn_cell(D, H), None, x[0], nonlinearity="gelu")
    cell = PF.init_gru_cell(D, H, dtype=F64)
    with pytest.raises(ValueError, match="gru_cell: h has shape"):
        PF.gru_cell(cell, torch.zeros(B, H + 1, dtype=F64), x[0])
    with pytest.raises(ValueError, match="gru_cell: x has 4 features"):
        PF.gru_cell(cell, None, torch.zeros(B, D + 1, dtype=F64))
    with pytest.raises(ValueError, match="gru_cell: x must be"):
        PF.gru_cell(cell, None, x)
    with pytest.raises(ValueError, match="init_gru: hidden_size must be"):
        PF.init_gru(D, 0)
    with pytest.raises(ValueError, match="init_rnn: nonlinearity"):
        PF.init_rnn(D, H, 1, "sigmoid")
