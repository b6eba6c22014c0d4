"""The DP-LSTM shells: nn.LSTM's numbers and state_dict, per-sample gradients, Opacus's defects.

Every shell against its torch.nn counterpart (values and ordinary gradients: float64 1e-12,
float32 1e-5, absolute) and its ``grad_sample`` against the float64 per-example loop; then
one test per Opacus 1.6 defect that must not appear here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import psgfunc.dp as dp
import psgfunc.nn as pnn
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}
T, B, D, H = 5, 4, 3, 2
pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout after all but last")


def pair(num_layers=1, bidirectional=False, batch_first=False, bias=True, dtype=F64, seed=0):
    """(DPLSTM, nn.LSTM), built from the same seed: equal weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(D, H, num_layers, bias, batch_first, bidirectional=bidirectional, dtype=dtype)
    torch.manual_seed(seed)
    ours = pnn.DPLSTM(D, H, num_layers, bias, batch_first, bidirectional=bidirectional,
                      dtype=dtype)
    return ours, ref


def close(actual, expected, dtype):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == dtype
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= ATOL[dtype], f"max abs error {err:.3e} > {ATOL[dtype]:.0e}"


def data(x):
    return x.data if isinstance(x, PackedSequence) else x



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread. (On a loaded 2-core box, MKL's 2-thread
    float64 matmuls stall for milliseconds waiting for the second thread.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ----------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize(("num_layers", "bidirectional", "bias"),
                         [(1, False, True), (2, True, True), (3, True, False)])
def test_state_dict_is_nn_lstms_and_loads_both_ways(num_layers, bidirectional, bias):
    ours, ref = pair(num_layers, bidirectional, bias=bias)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)  # keys AND order (Opacus 1.6 orders them differently)
    assert all(mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)
    fresh = nn.LSTM(D, H, num_layers, bias, bidirectional=bidirectional, dtype=F64)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(fresh.state_dict(), strict=True)


def test_other_state_dicts():
    torch.manual_seed(0)
    cell = pnn.DPLSTMCell(D, H)
    torch.manual_seed(0)
    ref = nn.LSTMCell(D, H)
    assert list(cell.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(cell.parameters(), ref.parameters()))
    ref.load_state_dict(cell.state_dict(), strict=True)
    lin = pnn.LSTMLinear(D, H, bias=False)
    assert list(lin.state_dict()) == ["weight"]
    nn.Linear(D, H, bias=False).load_state_dict(lin.state_dict(), strict=True)
    torch.manual_seed(0)
    layer = pnn.DPLSTMLayer(D, H, True, 0.0, reverse=True)
    torch.manual_seed(0)
    one = nn.LSTM(D, H, 1)
    assert list(layer.state_dict()) == list(one.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), one.parameters()))
    torch.manual_seed(0)
    bi = pnn.BidirectionalDPLSTMLayer(D, H, True, 0.0)
    torch.manual_seed(0)
    both = nn.LSTM(D, H, 1, bidirectional=True)
    assert list(bi.state_dict()) == list(both.state_dict())
    both.load_state_dict(bi.state_dict(), strict=True)


# ------------------------------------------------------------------- numbers: nn.LSTM grid


GRID = list(itertools.product([1, 2, 3], [False, True], [False, True],
                              ["none", "sorted", "unsorted"], [False, True]))


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("num_layers", "bidirectional", "batch_first", "packed", "state"), GRID)
def test_matches_nn_lstm(num_layers, bidirectional, batch_first, packed, state, dtype):
    ours, ref = pair(num_layers, bidirectional, batch_first, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    p = 2 if bidirectional else 1
    x = torch.randn((B, T, D) if batch_first else (T, B, D), generator=gen, dtype=dtype)
    x.requires_grad_(True)
    lengths = torch.tensor([5, 4, 2, 1] if packed == "sorted" else [2, 5, 1, 4])
    def inp():  # one per model: a backward frees its own packing graph
        return x if packed == "none" else pack_padded_sequence(
            x, lengths, batch_first=batch_first, enforce_sorted=packed == "sorted")

    hc = None
    if state:
        hc = tuple(torch.randn(num_layers * p, B, H, generator=gen, dtype=dtype)
                   .requires_grad_(True) for _ in range(2))
    out, (h_n, c_n) = ours(inp(), hc)
    ref_out, (ref_h, ref_c) = ref(inp(), hc)
    if packed != "none":
        assert isinstance(out, PackedSequence)
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(out, name), getattr(ref_out, name)
            assert (a is None and b is None) or torch.equal(a, b), name
    for a, e in zip((data(out), h_n, c_n), (data(ref_out), ref_h, ref_c)):
        close(a, e, dtype)

    weights = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in (data(out), h_n, c_n)]
    leaves = [x, *(hc or ())]
    loss = sum((t * w).sum() for t, w in zip((data(out), h_n, c_n), weights))
    grads = torch.autograd.grad(loss, leaves, retain_graph=True)
    loss.backward()
    ref_loss = sum((t * w).sum() for t, w in zip((data(ref_out), ref_h, ref_c), weights))
    ref_grads = torch.autograd.grad(ref_loss, leaves + list(ref.parameters()))
    for a, e in zip(grads, ref_grads):
        close(a, e, dtype)
    for prm, e in zip(ours.parameters(), ref_grads[len(leaves):]):
        close(prm.grad, e, dtype)
        assert prm.grad_sample.shape == (B, *prm.shape) and prm.grad_sample.dtype == dtype
        close(prm.grad_sample.sum(0), prm.grad, dtype)


def test_no_bias_and_eval_mode():
    ours, ref = pair(2, True, bias=False)
    ours.eval()
    x = torch.randn(T, B, D, dtype=F64)
    close(ours(x)[0], ref(x)[0], F64)


# --------------------------------------------------------- per-sample gradients: the oracle


def lstm_oracle_fn(ref, batch_first):
    """Example b's loss through nn.LSTM on its own (truncated) sequence."""

    def fn(params, x, n, w_out, w_h, w_c, h0, c0):
        steps = int(n)
        xb = x[:steps].unsqueeze(0 if batch_first else 1)
        out, (h_n, c_n) = functional_call(ref, params, (xb, (h0.unsqueeze(1), c0.unsqueeze(1))))
        out = out.squeeze(0 if batch_first else 1)
        return (out * w_out[:steps]).sum() + (h_n.squeeze(1) * w_h).sum() + (c_n.squeeze(1) * w_c).sum()

    return fn


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("packed", ["none", "unsorted"])
def test_dplstm_grad_sample_equals_per_example_oracle(packed, batch_first):
    ours, ref = pair(2, True, batch_first)
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(B, T, D, generator=gen, dtype=F64)  # example-major for the oracle
    lengths = torch.tensor([2, 5, 1, 4]) if packed != "none" else torch.full((B,), T)
    w_out = torch.randn(B, T, 2 * H, generator=gen, dtype=F64)
    w_h, w_c, h0, c0 = (torch.randn(B, 4, H, generator=gen, dtype=F64) for _ in range(4))
    x = xs if batch_first else xs.transpose(0, 1)
    inp = x if packed == "none" else pack_padded_sequence(x, lengths, batch_first, False)
    out, (h_n, c_n) = ours(inp, (h0.transpose(0, 1), c0.transpose(0, 1)))
    if packed != "none":
        from torch.nn.utils.rnn import pad_packed_sequence

        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    out_b = out if batch_first else out.transpose(0, 1)
    loss = (out_b * w_out).sum() + (h_n.transpose(0, 1) * w_h).sum() + (c_n.transpose(0, 1) * w_c).sum()
    loss.backward()
    got = {k: p.grad_sample for k, p in ours.named_parameters()}
    params = {k: v.detach() for k, v in ref.named_parameters()}
    expected = per_example_grads(lstm_oracle_fn(ref, batch_first), params, xs, lengths, w_out,
                                 w_h, w_c, h0, c0)
    assert_tree_close(got, expected, dtype=F64)


def test_layers_grad_sample_and_reverse_equal_nn_lstm():
    """DPLSTMLayer (both directions) and BidirectionalDPLSTMLayer on packed data."""
    torch.manual_seed(0)
    ref = nn.LSTM(D, H, 1, bidirectional=True, dtype=F64)
    fwd = pnn.DPLSTMLayer(D, H, True, 0.0, dtype=F64)
    rev = pnn.DPLSTMLayer(D, H, True, 0.0, reverse=True, dtype=F64)
    bi = pnn.BidirectionalDPLSTMLayer(D, H, True, 0.0, dtype=F64)
    bi.load_state_dict(ref.state_dict())
    sd = ref.state_dict()
    fwd.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_reverse")})
    rev.load_state_dict({k.removesuffix("_reverse"): v for k, v in sd.items() if k.endswith("_reverse")})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, D, generator=gen, dtype=F64)
    packed = pack_padded_sequence(x, torch.tensor([5, 4, 2, 1]))
    ref_out, (ref_h, ref_c) = ref(packed)
    steps = packed.data.split(packed.batch_sizes.tolist())
    out_f, (h_f, c_f) = fwd(steps, None, packed.batch_sizes)  # split form in, split form out
    assert isinstance(out_f, tuple) and len(out_f) == T
    out_r, (h_r, c_r) = rev(packed.data, None, packed.batch_sizes)  # data form
    out_b, (h_b, c_b) = bi(packed.data, None, packed.batch_sizes)
    close(torch.cat([torch.cat(out_f), out_r], -1), ref_out.data, F64)
    close(out_b, ref_out.data, F64)
    close(torch.stack([h_f, h_r]), ref_h, F64)
    close(torch.stack([c_f, c_r]), ref_c, F64)
    close(h_b, ref_h, F64)
    # padded tensors and an initial state, per-sample grads against the oracle
    h0, c0 = (torch.randn(B, H, generator=gen, dtype=F64) for _ in range(2))
    out, (h_n, _) = rev(x, (h0, c0))
    (out.pow(2).sum() + h_n.sum()).backward()
    params = {k: v.detach() for k, v in rev.named_parameters()}

    def fn(p, xb, h, c):
        o, (hn, _) = functional_call(rev, p, (xb.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0))))
        return o.pow(2).sum() + hn.sum()

    expected = per_example_grads(fn, params, x.transpose(0, 1), h0, c0)
    assert_tree_close({k: v.grad_sample for k, v in rev.named_parameters()}, expected)


def test_cell_over_a_packed_sequence_accumulates_top_aligned():
    """DPLSTMCell stepped with batch_size_t: one grad_sample [B, ...], equal to the oracle."""
    torch.manual_seed(0)
    cell = pnn.DPLSTMCell(D, H, True, dtype=F64)
    ref = nn.LSTMCell(D, H, dtype=F64)
    ref.load_state_dict(cell.state_dict())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, B, D, generator=gen, dtype=F64)
    lengths = torch.tensor([5, 4, 2, 1])
    packed = pack_padded_sequence(x, lengths)
    h = c = torch.zeros(B, H, dtype=F64)
    loss = 0
    for x_t, n in zip(packed.data.split(packed.batch_sizes.tolist()), packed.batch_sizes.tolist()):
        h, c = cell(x_t, h, c, batch_size_t=n)
        loss = loss + h.pow(2).sum() + c.sum()
    loss.backward()
    got = {k: p.grad_sample for k, p in cell.named_parameters()}
    assert all(g.shape[0] == B for g in got.values())

    def fn(p, xb, n):
        hx = None
        total = 0
        for t in range(int(n)):
            hx = functional_call(ref, p, (xb[t].unsqueeze(0), hx))
            total = total + hx[0].pow(2).sum() + hx[1].sum()
        return total

    params = {k: v.detach() for k, v in ref.named_parameters()}
    assert_tree_close(got, per_example_grads(fn, params, x.transpose(0, 1), lengths))


def test_cell_accepts_nn_lstm_cell_calls_and_unbatched():
    torch.manual_seed(0)
    cell = pnn.DPLSTMCell(D, H, dtype=F64)
    ref = nn.LSTMCell(D, H, dtype=F64)
    ref.load_state_dict(cell.state_dict())
    x, h, c = torch.randn(B, D, dtype=F64), torch.randn(B, H, dtype=F64), torch.randn(B, H, dtype=F64)
    for got, exp in [(cell(x, (h, c)), ref(x, (h, c))), (cell(x), ref(x)), (cell(x[0]), ref(x[0])),
                     (cell(x, h, c), ref(x, (h, c)))]:
        for a, e in zip(got, exp):
            close(a, e, F64)
    cell.zero_grad()
    sum(t.sum() for t in cell(x[0], h[0], c[0])).backward()
    assert cell.weight_hh.grad_sample.shape == (1, 4 * H, H)


def test_lstm_linear_sums_over_calls():
    lin = pnn.LSTMLinear(D, H, dtype=F64)
    xs = torch.randn(3, B, D, dtype=F64)
    sum(lin(x_t).pow(2).sum() for x_t in xs).backward()

    def fn(p, x):
        return sum(F.linear(x_t, p["weight"], p["bias"]).pow(2).sum() for x_t in x)

    params = {k: v.detach() for k, v in lin.named_parameters()}
    assert_tree_close({k: v.grad_sample for k, v in lin.named_parameters()},
                      per_example_grads(fn, params, xs.transpose(0, 1)))
    assert lin.weight.grad_sample.shape == (B, H, D)


# ----------------------------------------------------------------- Opacus 1.6's defects


@pytest.mark.parametrize("num_layers", [1, 3])
def test_dropout_only_between_layers_equals_nn_lstm_in_training(num_layers):
    """Opacus applies dropout at every time step and after the last layer; we equal nn.LSTM."""
    ours, ref = pair(num_layers, True)
    ours.dropout = ref.dropout = 0.5
    ours.train()
    ref.train()
    x = torch.randn(T, B, D, dtype=F64)
    torch.manual_seed(5)
    out, (h_n, _) = ours(x)
    (out.sum() + h_n.sum()).backward()
    torch.manual_seed(5)
    ref_out, (ref_h, _) = ref(x)
    (ref_out.sum() + ref_h.sum()).backward()
    close(out, ref_out, F64)
    close(h_n, ref_h, F64)
    for a, b in zip(ours.parameters(), ref.parameters()):
        close(a.grad, b.grad, F64)
    if num_layers == 1:  # nothing to drop: training output == eval output, deterministic
        ours.eval()
        close(ours(x)[0], out.detach(), F64)


def test_float64_packed_input_keeps_float64_everywhere():
    ours, _ = pair(2, True)
    packed = pack_padded_sequence(torch.randn(T, B, D, dtype=F64), torch.tensor([2, 5, 1, 4]),
                                  enforce_sorted=False)
    out, (h_n, c_n) = ours(packed)
    assert out.data.dtype == h_n.dtype == c_n.dtype == F64


@pytest.mark.parametrize(("num_layers", "bidirectional", "state"),
                         [(1, False, False), (2, True, True)])
def test_unbatched_input_is_one_sequence_as_in_nn_lstm(num_layers, bidirectional, state):
    """Opacus reads [T, D] as [T, B]; we follow nn.LSTM (shapes, values), with B = 1."""
    ours, ref = pair(num_layers, bidirectional, batch_first=True)  # ignored for [T, D]
    p = 2 if bidirectional else 1
    x = torch.randn(T, D, dtype=F64)
    hc = tuple(torch.randn(num_layers * p, H, dtype=F64) for _ in range(2)) if state else None
    out, (h_n, c_n) = ours(x, hc)
    ref_out, (ref_h, ref_c) = ref(x, hc)
    assert out.shape == (T, p * H) and h_n.shape == (num_layers * p, H)
    for a, e in zip((out, h_n, c_n), (ref_out, ref_h, ref_c)):
        close(a, e, F64)
    (out.sum() + c_n.sum()).backward()
    (ref_out.sum() + ref_c.sum()).backward()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert a.grad_sample.shape == (1, *a.shape)
        close(a.grad_sample[0], b.grad, F64)


def test_no_max_batch_size_by_default_and_an_optional_one():
    ours, _ = pair(1, False)
    out, _ = ours(torch.randn(2, 300, D, dtype=F64))
    assert out.shape == (2, 300, H)
    limited = pnn.DPLSTM(D, H, max_batch_size=3, dtype=F64)
    assert "max_batch_size=3" in repr(limited)
    with pytest.raises(ValueError, match="max_batch_size=3"):
        limited(torch.randn(T, 4, D, dtype=F64))


def test_errors():
    ours, _ = pair(1, False)
    for bad in (torch.zeros(D, dtype=F64), torch.zeros(1, T, B, D, dtype=F64)):
        with pytest.raises(ValueError, match="DPLSTM: x must be"):
            ours(bad)
    with pytest.raises(ValueError, match="features in its last dim"):
        ours(torch.zeros(T, B, D + 1, dtype=F64))
    with pytest.raises(ValueError, match="state h0 must be"):
        ours(torch.zeros(T, B, D, dtype=F64), (torch.zeros(1, B + 1, H, dtype=F64),) * 2)
    with pytest.raises(ValueError, match="DPLSTMCell: x must be"):
        pnn.DPLSTMCell(D, H)(torch.zeros(1, B, D))
    with pytest.raises(ValueError, match="LSTMLinear: x must be"):
        pnn.LSTMLinear(D, H)(torch.zeros(D))
    with pytest.raises(ValueError, match="DPLSTMLayer: x must be"):
        pnn.DPLSTMLayer(D, H, True, 0.0)(torch.zeros(B, D), None)
    with pytest.raises(ValueError, match="dropout must be"):
        pnn.DPLSTMLayer(D, H, True, 1.0)


def test_hx_keyword_and_zero_grad():
    ours, ref = pair(1, False)
    hc = tuple(torch.randn(1, B, H, dtype=F64) for _ in range(2))
    x = torch.randn(T, B, D, dtype=F64)
    close(ours(x, hx=hc)[0], ref(x, hx=hc)[0], F64)
    ours(x)[0].sum().backward()
    assert ours.weight_hh_l0.grad_sample is not None
    pnn.zero_grad(ours)
    assert all(p.grad is None and p.grad_sample is None for p in ours.parameters())


# ------------------------------------------------------------------------- expand_weights


class TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, D, dtype=F64)
        self.lstm = nn.LSTM(D, H, 2, batch_first=True, bidirectional=True, dtype=F64)
        self.fc = nn.Linear(2 * H, 3, dtype=F64)

    def forward(self, ids):
        out, _ = self.lstm(self.emb(ids))
        return self.fc(out[:, -1])


def test_expand_weights_converts_nn_lstm_and_cell():
    torch.manual_seed(0)
    model = TextModel()
    ids = torch.randint(0, 11, (B, T))
    before = model(ids)
    params = list(model.parameters())
    pnn.expand_weights(model, max_batch_size=B)
    assert type(model.lstm) is pnn.DPLSTM and model.lstm.max_batch_size == B
    assert all(a is b for a, b in zip(model.parameters(), params))  # same Parameter objects
    close(model(ids), before, F64)
    F.cross_entropy(model(ids), torch.zeros(B, dtype=torch.long)).backward()
    assert all(p.grad_sample.shape == (B, *p.shape) for p in model.parameters())
    with pytest.raises(ValueError, match="max_batch_size"):
        model(torch.randint(0, 11, (B + 1, T)))
    cell = pnn.expand_weights(nn.LSTMCell(D, H), max_batch_size=2)
    assert type(cell) is pnn.DPLSTMCell


def test_expand_weights_refuses_proj_size():
    with pytest.raises(ValueError, match="proj_size=1"):
        pnn.expand_weights(nn.Sequential(nn.LSTM(D, H, proj_size=1)), max_batch_size=4)


# --------------------------------------------------------------------- DP optimizer, fast


def test_dp_optimizer_fast_clipping_equals_grad_sample_path():
    def run(fast):
        torch.manual_seed(0)
        model = pnn.expand_weights(TextModel(), max_batch_size=B)
        opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=0.05,
                             noise_multiplier=0.0, expected_batch_size=B, fast_clipping=fast)
        gen = torch.Generator().manual_seed(1)
        ids, y = torch.randint(0, 11, (B, T), generator=gen), torch.randint(0, 3, (B,), generator=gen)
        F.cross_entropy(model(ids), y, reduction="sum").backward()
        norms = opt.accumulate()
        opt.step()
        return [p.detach().clone() for p in model.parameters()], norms

    (slow, slow_norms), (fast, fast_norms) = run(False), run(True)
    torch.testing.assert_close(fast_norms, slow_norms, rtol=1e-10, atol=0)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_empty_batch_as_nn_lstm():
    """Poisson sampling draws empty batches: B = 0 gives nn.LSTM's shapes and [0, *shape]."""
    ours, ref = pair(2, True, batch_first=True)
    out, (h_n, _) = ours(torch.zeros(0, T, D, dtype=F64))
    ref_out, (ref_h, _) = ref(torch.zeros(0, T, D, dtype=F64))
    assert out.shape == ref_out.shape and h_n.shape == ref_h.shape
    (out.sum() + h_n.sum()).backward()
    assert all(p.grad_sample.shape == (0, *p.shape) for p in ours.parameters())
    cell = pnn.DPLSTMCell(D, H, dtype=F64)
    sum(t.sum() for t in cell(torch.zeros(0, D, dtype=F64))).backward()
    assert cell.weight_hh.grad_sample.shape == (0, 4 * H, H)
