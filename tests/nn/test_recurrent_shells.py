"""DPGRU / DPRNN / DPGRUCell / DPRNNCell: torch.nn's numbers and state_dicts, grad_sample
against the float64 per-example loop, conversion, and DPOptimizer's fast clipping."""

from __future__ import annotations

import warnings

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import psgfunc.dp as dp
import psgfunc.nn as pnn
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
T, B, D, H = 4, 3, 3, 2
pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout after all but last")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair(kind, num_layers=1, bidirectional=False, batch_first=False, bias=True, seed=0):
    """(shell, torch.nn layer) built from one seed: equal weights."""
    torch.manual_seed(seed)
    if kind == "gru":
        ref = nn.GRU(D, H, num_layers, bias, batch_first, bidirectional=bidirectional, dtype=F64)
        torch.manual_seed(seed)
        ours = pnn.DPGRU(D, H, num_layers, bias, batch_first, bidirectional=bidirectional,
                         dtype=F64)
    else:
        ref = nn.RNN(D, H, num_layers, kind, bias, batch_first, bidirectional=bidirectional,
                     dtype=F64)
        torch.manual_seed(seed)
        ours = pnn.DPRNN(D, H, num_layers, bias, batch_first, bidirectional=bidirectional,
                         nonlinearity=kind, dtype=F64)
    return ours, ref


@pytest.mark.parametrize("kind", ["gru", "relu"])
@pytest.mark.parametrize(("num_layers", "bidirectional", "bias"), [(1, False, True), (2, True, False)])
def test_state_dict_equals_torch_both_ways(kind, num_layers, bidirectional, bias):
    ours, ref = pair(kind, num_layers, bidirectional, bias=bias)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same initialisation under one seed
    other = pair(kind, num_layers, bidirectional, bias=bias, seed=1)[1]
    ours.load_state_dict(other.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in ref.state_dict().items())
    for cell, ref_cell in ((pnn.DPGRUCell(D, H, dtype=F64), nn.GRUCell(D, H, dtype=F64)),
                           (pnn.DPRNNCell(D, H, False, "relu"), nn.RNNCell(D, H, False, "relu"))):
        assert list(cell.state_dict()) == list(ref_cell.state_dict())
        cell.load_state_dict(ref_cell.state_dict(), strict=True)
        ref_cell.load_state_dict(cell.state_dict(), strict=True)


def oracle_fn(ref, batch_first):
    """Per-example loss of the torch.nn layer on one sequence of its own length."""

    def fn(params, x, n, w_out, w_h, h0):
        steps = int(n)
        bdim = 0 if batch_first else 1
        out, h_n = functional_call(ref, params, (x[:steps].unsqueeze(bdim), h0.unsqueeze(1)))
        return (out.squeeze(bdim) * w_out[:steps]).sum() + (h_n.squeeze(1) * w_h).sum()

    return fn


@pytest.mark.parametrize(("kind", "packed", "batch_first"),
                         [("gru", False, True), ("gru", True, False), ("tanh", True, True),
                          ("relu", False, False)])
def test_grad_sample_equals_per_example_oracle(kind, packed, batch_first):
    ours, ref = pair(kind, 2, True, batch_first)
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(B, T, D, generator=gen, dtype=F64)
    lengths = torch.tensor([2, 4, 1]) if packed else torch.full((B,), T)
    w_out = torch.randn(B, T, 2 * H, generator=gen, dtype=F64)
    w_h, h0 = (torch.randn(B, 4, H, generator=gen, dtype=F64) for _ in range(2))
    x = xs if batch_first else xs.transpose(0, 1)
    inp = pack_padded_sequence(x, lengths, batch_first, False) if packed else x
    out, h_n = ours(inp, h0.transpose(0, 1))
    ref_out, ref_h = ref(inp, h0.transpose(0, 1))
    if packed:
        torch.testing.assert_close(out.data, ref_out.data, rtol=0, atol=1e-12)
        assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    else:
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n, ref_h, rtol=0, atol=1e-12)
    out_b = out if batch_first else out.transpose(0, 1)
    ((out_b * w_out).sum() + (h_n.transpose(0, 1) * w_h).sum()).backward()
    got = {k: p.grad_sample for k, p in ours.named_parameters()}
    params = {k: v.detach() for k, v in ref.named_parameters()}
    expected = per_example_grads(oracle_fn(ref, batch_first), params, xs, lengths, w_out, w_h, h0)
    assert_tree_close(got, expected, dtype=F64)
    for p in ours.parameters():
        torch.testing.assert_close(p.grad, p.grad_sample.sum(0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["gru", "relu"])
def test_cells_over_a_packed_sequence(kind):
    """The cell in a loop over a packed sequence's steps (batch_size_t): grad_sample adds up
    with rows aligned at the top and equals the per-example loop; unbatched calls work."""
    torch.manual_seed(0)
    if kind == "gru":
        ref = nn.GRUCell(D, H, dtype=F64)
        ours = pnn.DPGRUCell.from_gru_cell(nn.GRUCell(D, H, dtype=F64))
    else:
        ref = nn.RNNCell(D, H, nonlinearity="relu", dtype=F64)
        ours = pnn.DPRNNCell.from_rnn_cell(nn.RNNCell(D, H, nonlinearity="relu", dtype=F64))
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(B, T, D, generator=gen, dtype=F64)
    lengths = [4, 2, 1]  # sorted, as a packed sequence's
    h = torch.randn(B, H, generator=gen, dtype=F64)
    outs = []
    for t in range(T):
        n = sum(1 for m in lengths if m > t)
        h_new = ours(xs[:n, t], h, batch_size_t=n)
        h = torch.cat([h_new, h[n:]])
        outs.append(h_new.pow(2).sum())
    sum(outs).backward()

    def fn(params, x, n, h0):
        hh = h0
        total = 0
        for t in range(int(n)):
            hh = functional_call(ref, params, (x[t], hh))
            total = total + hh.pow(2).sum()
        return total

    gen = torch.Generator().manual_seed(1)
    xs2 = torch.randn(B, T, D, generator=gen, dtype=F64)
    h0 = torch.randn(B, H, generator=gen, dtype=F64)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    expected = per_example_grads(fn, params, xs2, torch.tensor(lengths), h0)
    assert_tree_close({k: p.grad_sample for k, p in ours.named_parameters()}, expected)
    torch.testing.assert_close(ours(xs[0, 0]), ref(xs[0, 0]), rtol=0, atol=1e-12)


def test_unbatched_sequence_and_errors():
    ours, ref = pair("gru", 2, True)
    x = torch.randn(T, D, dtype=F64)
    out, h_n = ours(x)
    ref_out, ref_h = ref(x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n, ref_h, rtol=0, atol=1e-12)
    (out.sum() + h_n.sum()).backward()
    assert all(p.grad_sample.shape == (1, *p.shape) for p in ours.parameters())
    for shell in (ours, pnn.DPRNN(D, H, batch_first=True, dtype=F64)):  # an empty batch
        out, h_n = shell(torch.zeros(0, T, D, dtype=F64) if shell.batch_first
                         else torch.zeros(T, 0, D, dtype=F64))
        shell.zero_grad()
        (out.sum() + h_n.sum()).backward()
        assert all(p.grad_sample.shape == (0, *p.shape) for p in shell.parameters())
    with pytest.raises(ValueError, match="DPGRU: x must be"):
        ours(torch.zeros(D, dtype=F64))
    with pytest.raises(ValueError, match="not both"):
        ours(x, torch.zeros(4, H, dtype=F64), hx=torch.zeros(4, H, dtype=F64))
    with pytest.raises(ValueError, match="proj_size"):
        pnn.DPGRU(D, H, proj_size=1)
    with pytest.raises(ValueError, match="nonlinearity"):
        pnn.DPRNN(D, H, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="nonlinearity"):
        pnn.DPRNNCell(D, H, True, "gelu")
    with pytest.raises(ValueError, match="max_batch_size=2"):
        pnn.DPRNN(D, H, max_batch_size=2, dtype=F64)(torch.zeros(T, 3, D, dtype=F64))
    with pytest.raises(ValueError, match="DPGRUCell: x must be"):
        pnn.DPGRUCell(D, H)(torch.zeros(2, 2, D))


class Classifier(nn.Module):
    """Embedding -> GRU (batch_first, 2 layers, bidirectional) -> Linear on the last step."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, D, dtype=F64)
        self.gru = nn.GRU(D, H, 2, batch_first=True, bidirectional=True, dtype=F64)
        self.fc = nn.Linear(2 * H, 3, dtype=F64)

    def forward(self, ids):
        out, h_n = self.gru(self.emb(ids))
        return self.fc(out[:, -1]) + h_n.sum(0).sum(-1, keepdim=True)


def test_expand_weights_converts_every_class():
    model = nn.Sequential(nn.GRU(D, H), nn.RNN(D, H, nonlinearity="relu"), nn.GRUCell(D, H),
                          nn.RNNCell(D, H, bias=False))
    params = [list(m.parameters()) for m in model]
    converted = pnn.expand_weights(model, max_batch_size=4)
    kinds = [pnn.DPGRU, pnn.DPRNN, pnn.DPGRUCell, pnn.DPRNNCell]
    for m, cls, ps in zip(converted, kinds, params):
        assert type(m) is cls and all(a is b for a, b in zip(m.parameters(), ps))
    assert converted[1].nonlinearity == "relu"


def test_classifier_dp_optimizer_fast_clipping_equals_float64_loop():
    torch.manual_seed(0)
    model = Classifier()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (B, T), generator=gen)
    y = torch.randint(0, 3, (B,), generator=gen)

    def fn(params, i, t):
        return F.cross_entropy(functional_call(model, params, (i.unsqueeze(0),)), t.unsqueeze(0),
                               reduction="sum")

    grads = per_example_grads(fn, before, ids, y)
    norms = dp.per_sample_norms(grads)
    c = float(norms.median())
    clipped_sum = optree.tree_map(lambda g: g.sum(0), dp.clip(grads, c))

    model = pnn.expand_weights(model, max_batch_size=B)
    assert type(model.gru) is pnn.DPGRU
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=c,
                         noise_multiplier=0.0, expected_batch_size=B, fast_clipping=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "materialised" fallback
        F.cross_entropy(model(ids), y, reduction="sum").backward()
        got_norms = opt.accumulate()
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    opt.step()
    for k, p in model.named_parameters():
        want = before[k] - 0.5 * clipped_sum[k] / B
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-14)
