"""``PF.lstm_cell`` / ``PF.lstm`` against ``nn.LSTMCell`` / ``nn.LSTM`` and the float64 oracle."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import psgfunc.functional as PF
from psgfunc.scan import scan
from tests.oracles import assert_tree_close, per_example_grads

ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}
T, B, D, H = 5, 3, 4, 3


def assert_close(actual, expected, dtype):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype == dtype
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= ATOL[dtype], f"max abs error {err:.3e} > {ATOL[dtype]:.0e}"


def detached(module):
    return {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}


def make_lstm(num_layers, bidirectional, batch_first=False, dtype=torch.float64, bias=True,
              seed=0, input_size=D):
    torch.manual_seed(seed)
    return nn.LSTM(input_size, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                   bidirectional=bidirectional, dtype=dtype)


def random_like_outputs(out, h_n, c_n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (out, h_n, c_n)]


def weighted_loss(out, h_n, c_n, weights):
    return sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights))


# ------------------------------------------------------------------------ nn.LSTM, full grid

GRID = list(itertools.product([1, 2, 3], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("num_layers", "bidirectional", "batch_first", "with_state"), GRID)
def test_matches_nn_lstm(num_layers, bidirectional, batch_first, with_state, dtype):
    m = make_lstm(num_layers, bidirectional, batch_first, dtype)
    params = detached(m)
    p = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(2)
    x = torch.randn((B, T, D) if batch_first else (T, B, D), generator=g, dtype=dtype)
    x.requires_grad_(True)
    leaves = [x]
    state = None
    if with_state:
        state = tuple(torch.randn(num_layers * p, B, H, generator=g, dtype=dtype)
                      .requires_grad_(True) for _ in range(2))
        leaves += list(state)

    out, (h_n, c_n) = PF.lstm(params, x, state, num_layers=num_layers,
                              bidirectional=bidirectional, batch_first=batch_first)
    ref_out, (ref_h, ref_c) = m(x, state)
    for a, e in zip((out, h_n, c_n), (ref_out, ref_h, ref_c)):
        assert_close(a, e, dtype)

    weights = random_like_outputs(ref_out, ref_h, ref_c)
    grads = torch.autograd.grad(weighted_loss(out, h_n, c_n, weights),
                                leaves + list(params.values()))
    ref_grads = torch.autograd.grad(weighted_loss(ref_out, ref_h, ref_c, weights),
                                    leaves + list(m.parameters()))
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_no_bias_matches_nn_lstm(bidirectional):
    m = make_lstm(2, bidirectional, bias=False)
    params = detached(m)
    assert not any(k.startswith("bias") for k in params)
    x = torch.randn(T, B, D, dtype=torch.float64)
    out, (h_n, c_n) = PF.lstm(params, x, num_layers=2, bidirectional=bidirectional)
    ref_out, (ref_h, ref_c) = m(x)
    for a, e in zip((out, h_n, c_n), (ref_out, ref_h, ref_c)):
        assert_close(a, e, torch.float64)


# ------------------------------------------------------------------------ one example [T, D]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_unbatched_equals_batch_of_one(bidirectional, with_state):
    m = make_lstm(2, bidirectional)
    params = detached(m)
    p = 2 if bidirectional else 1
    x = torch.randn(T, D, dtype=torch.float64)
    state = tuple(torch.randn(2 * p, H, dtype=torch.float64) for _ in range(2)) if with_state \
        else None
    kw = dict(num_layers=2, bidirectional=bidirectional)
    out, (h_n, c_n) = PF.lstm(params, x, state, **kw)
    assert out.shape == (T, p * H) and h_n.shape == c_n.shape == (2 * p, H)
    state1 = tuple(s.unsqueeze(1) for s in state) if with_state else None
    out1, (h1, c1) = PF.lstm(params, x.unsqueeze(1), state1, **kw)
    assert torch.equal(out, out1.squeeze(1))
    assert torch.equal(h_n, h1.squeeze(1)) and torch.equal(c_n, c1.squeeze(1))
    # batch_first is ignored for one example, as in torch
    assert torch.equal(PF.lstm(params, x, state, batch_first=True, **kw)[0], out)
    ref_out, (ref_h, ref_c) = m(x, state)
    for a, e in zip((out, h_n, c_n), (ref_out, ref_h, ref_c)):
        assert_close(a, e, torch.float64)


def test_unbatched_with_lengths_equals_batch_of_one():
    params = detached(make_lstm(1, True))
    x = torch.randn(T, D, dtype=torch.float64)
    for length in (3, torch.tensor(3)):
        out, (h, c) = PF.lstm(params, x, bidirectional=True, lengths=length)
        out1, (h1, c1) = PF.lstm(params, x[:, None], bidirectional=True, lengths=torch.tensor([3]))
        assert torch.equal(out, out1[:, 0]) and torch.equal(h, h1[:, 0])
        assert torch.all(out[3:] == 0)


# ------------------------------------------------------------------- lengths vs packed nn.LSTM


def run_packed(m, x, lengths, state, batch_first):
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, (h_n, c_n) = m(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[int(batch_first)])
    return out, h_n, c_n


LENGTHS = {"sorted": [5, 4, 2, 1], "unsorted": [2, 5, 1, 3], "short": [3, 1, 2, 3]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize(("num_layers", "bidirectional", "batch_first", "with_state"), [
    (1, False, False, False), (1, True, True, True), (2, True, False, True),
    (3, True, True, False), (2, False, True, True),
])
def test_lengths_match_packed_nn_lstm(num_layers, bidirectional, batch_first, with_state,
                                      lengths, dtype):
    m = make_lstm(num_layers, bidirectional, batch_first, dtype)
    params = detached(m)
    lengths = torch.tensor(LENGTHS[lengths])
    nb, p = len(lengths), 2 if bidirectional else 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn((nb, T, D) if batch_first else (T, nb, D), generator=g, dtype=dtype)
    x.requires_grad_(True)
    leaves = [x]
    state = None
    if with_state:
        state = tuple(torch.randn(num_layers * p, nb, H, generator=g, dtype=dtype)
                      .requires_grad_(True) for _ in range(2))
        leaves += list(state)

    out, (h_n, c_n) = PF.lstm(params, x, state, num_layers=num_layers,
                              bidirectional=bidirectional, batch_first=batch_first,
                              lengths=lengths)
    ref_out, ref_h, ref_c = run_packed(m, x, lengths, state, batch_first)
    for a, e in zip((out, h_n, c_n), (ref_out, ref_h, ref_c)):
        assert_close(a, e, dtype)

    weights = random_like_outputs(ref_out, ref_h, ref_c)
    grads = torch.autograd.grad(weighted_loss(out, h_n, c_n, weights),
                                leaves + list(params.values()))
    ref_grads = torch.autograd.grad(weighted_loss(ref_out, ref_h, ref_c, weights),
                                    leaves + list(m.parameters()))
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype)
    # padding gets exactly zero gradient
    pad = torch.arange(T)[:, None] >= lengths[None, :]  # [T, B]
    gx = grads[0].transpose(0, 1) if batch_first else grads[0]
    assert torch.all(gx[pad] == 0)


def test_padding_values_do_not_matter_and_outputs_are_zero():
    params = detached(make_lstm(2, True))
    lengths = torch.tensor([2, 5, 0])
    x = torch.randn(T, 3, D, dtype=torch.float64)
    pad = torch.arange(T)[:, None] >= lengths[None, :]
    noisy = x.clone()
    noisy[pad] = 1e6
    a = PF.lstm(params, x, num_layers=2, bidirectional=True, lengths=lengths)
    b = PF.lstm(params, noisy, num_layers=2, bidirectional=True, lengths=lengths)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    assert torch.all(a[0][pad] == 0)
    # a length of 0 leaves the initial (zero) state untouched
    assert torch.all(a[1][0][:, 2] == 0) and torch.all(a[1][1][:, 2] == 0)


def test_full_lengths_equal_no_lengths():
    params = detached(make_lstm(2, True))
    x = torch.randn(T, B, D, dtype=torch.float64)
    a = PF.lstm(params, x, num_layers=2, bidirectional=True)
    b = PF.lstm(params, x, num_layers=2, bidirectional=True, lengths=[T] * B)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])


# ----------------------------------------------------------------------------------- dropout


def test_dropout_not_training_equals_eval_nn_lstm():
    m = make_lstm(3, True)
    m.dropout = 0.5
    m.eval()
    x = torch.randn(T, B, D, dtype=torch.float64)
    out, (h_n, _) = PF.lstm(detached(m), x, num_layers=3, bidirectional=True, dropout=0.5)
    ref_out, (ref_h, _) = m(x)
    assert_close(out, ref_out, torch.float64)
    assert_close(h_n, ref_h, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("num_layers", "bidirectional", "batch_first"), [
    (2, False, False), (2, True, True), (3, True, False),
])
def test_dropout_training_matches_nn_lstm_train_same_seed(num_layers, bidirectional,
                                                          batch_first, dtype):
    # On CPU both draw their masks with one bernoulli per inter-layer output, in layer order,
    # on a contiguous [T, B, P*H] tensor, so the random streams coincide.
    m = make_lstm(num_layers, bidirectional, batch_first, dtype)
    m.dropout = 0.4
    m.train()
    params = detached(m)
    x = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=dtype, requires_grad=True)
    torch.manual_seed(123)
    out, (h_n, c_n) = PF.lstm(params, x, num_layers=num_layers, bidirectional=bidirectional,
                              batch_first=batch_first, dropout=0.4, training=True)
    torch.manual_seed(123)
    ref_out, (ref_h, ref_c) = m(x)
    for a, e in zip((out, h_n, c_n), (ref_out, ref_h, ref_c)):
        assert_close(a, e, dtype)
    weights = random_like_outputs(ref_out, ref_h, ref_c)
    grads = torch.autograd.grad(weighted_loss(out, h_n, c_n, weights), [x, *params.values()])
    ref_grads = torch.autograd.grad(weighted_loss(ref_out, ref_h, ref_c, weights),
                                    [x, *m.parameters()])
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype)


def test_dropout_never_after_the_last_layer():
    params = detached(make_lstm(1, True))
    x = torch.randn(T, B, D, dtype=torch.float64)
    plain = PF.lstm(params, x, bidirectional=True)
    state = torch.get_rng_state()
    dropped = PF.lstm(params, x, bidirectional=True, dropout=0.9, training=True)
    assert torch.equal(torch.get_rng_state(), state)  # no random number was even drawn
    assert torch.equal(plain[0], dropped[0]) and torch.equal(plain[1][1], dropped[1][1])


def test_dropout_only_between_layers():
    """Layer by layer by hand: lstm(l0) -> dropout mask -> lstm(l1); nothing else is dropped."""
    m = make_lstm(2, True)
    params = detached(m)
    x = torch.randn(T, B, D, dtype=torch.float64)
    torch.manual_seed(7)
    out, (h_n, c_n) = PF.lstm(params, x, num_layers=2, bidirectional=True, dropout=0.5,
                              training=True)
    layer0 = {k: v for k, v in params.items() if "_l0" in k}
    layer1 = {k.replace("_l1", "_l0"): v for k, v in params.items() if "_l1" in k}
    mid, (h0, c0) = PF.lstm(layer0, x, bidirectional=True)
    torch.manual_seed(7)
    mid = F.dropout(mid, 0.5, training=True)
    assert (mid == 0).any()
    last, (h1, c1) = PF.lstm(layer1, mid, bidirectional=True)
    assert torch.equal(out, last)
    assert torch.equal(h_n, torch.cat([h0, h1])) and torch.equal(c_n, torch.cat([c0, c1]))
    assert not (out == 0).any()


def test_dropout_under_vmap_needs_randomness_flag():
    params = PF.init_lstm(D, H, 2)
    fn = functools.partial(PF.lstm, params, num_layers=2, dropout=0.5, training=True)
    x = torch.randn(B, T, D)
    out, (h_n, _) = torch.func.vmap(fn, randomness="different")(x)
    assert out.shape == (B, T, H) and h_n.shape == (B, 2, H)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(fn)(x)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.5", True])
def test_error_dropout_range(dropout):
    with pytest.raises(ValueError, match="dropout"):
        PF.lstm(PF.init_lstm(D, H), torch.zeros(T, D), dropout=dropout)


# ---------------------------------------------------------------------- per-sample gradients


def example_loss(num_layers, bidirectional):
    def loss(params, x, target, *length):
        out, (h_n, c_n) = PF.lstm(params, x, num_layers=num_layers, bidirectional=bidirectional,
                                  lengths=length[0] if length else None)
        return ((out - target) ** 2).sum() + h_n.sin().sum() + c_n.sum()

    return loss


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize(("num_layers", "bidirectional"), [(1, False), (2, True)])
def test_vmap_grad_matches_per_example_oracle(num_layers, bidirectional, with_lengths):
    params = {k: v.detach() for k, v in PF.init_lstm(
        D, H, num_layers, bidirectional=bidirectional, dtype=torch.float64,
        generator=torch.Generator().manual_seed(0)).items()}
    p = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, T, D, generator=g, dtype=torch.float64)
    target = torch.randn(4, T, p * H, generator=g, dtype=torch.float64)
    batch = (x, target) + ((torch.tensor([5, 2, 0, 3]),) if with_lengths else ())
    loss = example_loss(num_layers, bidirectional)
    in_dims = (None,) + (0,) * len(batch)
    got = torch.func.vmap(torch.func.grad(loss), in_dims=in_dims)(params, *batch)
    expected = per_example_grads(loss, params, *batch)
    assert list(got) == list(params)
    assert_tree_close(got, expected, dtype=torch.float64)
    if with_lengths:  # the empty example has zero gradient
        assert all(torch.all(v[2] == 0) for v in got.values())


def test_vmap_grad_float32_matches_float64_oracle():
    params = PF.init_lstm(D, H, 2, bidirectional=True, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, T, D)
    target = torch.randn(3, T, 2 * H)
    lengths = torch.tensor([4, 5, 1])
    loss = example_loss(2, True)
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(params, x, target,
                                                                        lengths)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_tree_close(got, per_example_grads(loss, params, x, target, lengths),
                      dtype=torch.float32)


# ------------------------------------------------------------------------------------- cell


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_carry", [True, False])
def test_cell_matches_nn_lstm_cell(dtype, bias, batched, with_carry):
    torch.manual_seed(0)
    m = nn.LSTMCell(D, H, bias=bias, dtype=dtype)
    params = detached(m)
    lead = (B,) if batched else ()
    x = torch.randn(*lead, D, dtype=dtype, requires_grad=True)
    carry = tuple(torch.randn(*lead, H, dtype=dtype, requires_grad=True) for _ in range(2)) \
        if with_carry else None
    (h, c), y = PF.lstm_cell(params, carry, x)
    assert y is h and h.shape == (*lead, H)
    ref_h, ref_c = m(x, carry)
    assert_close(h, ref_h, dtype)
    assert_close(c, ref_c, dtype)
    weights = random_like_outputs(h, c, c)[:2]
    leaves = [x, *(carry or ())]
    grads = torch.autograd.grad((h * weights[0]).sum() + (c * weights[1]).sum(),
                                leaves + list(params.values()))
    ref_grads = torch.autograd.grad((ref_h * weights[0]).sum() + (ref_c * weights[1]).sum(),
                                    leaves + list(m.parameters()))
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype)


def test_scan_of_cell_is_one_layer_lstm():
    params = PF.init_lstm(D, H, dtype=torch.float64)
    cell_params = {k.removesuffix("_l0"): v for k, v in params.items()}
    x = torch.randn(T, B, D, dtype=torch.float64)
    init = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
    (h, c), ys = scan(functools.partial(PF.lstm_cell, cell_params), init, x)
    out, (h_n, c_n) = PF.lstm(params, x, (init[0][None], init[1][None]))
    assert_close(ys, out, torch.float64)
    assert_close(h, h_n[0], torch.float64)
    assert_close(c, c_n[0], torch.float64)


def test_cell_errors():
    params = PF.init_lstm_cell(D, H)
    with pytest.raises(ValueError, match=r"\[D\].*\[B, D\]"):
        PF.lstm_cell(params, None, torch.zeros(2, 3, D))
    with pytest.raises(ValueError, match="features"):
        PF.lstm_cell(params, None, torch.zeros(B, D + 1))
    with pytest.raises(ValueError, match="carry c"):
        PF.lstm_cell(params, (torch.zeros(B, H), torch.zeros(B, H + 1)), torch.zeros(B, D))
    with pytest.raises(ValueError, match="pair"):
        PF.lstm_cell(params, torch.zeros(B, H), torch.zeros(B, D))
    with pytest.raises(ValueError, match=r"weight_ih must be \[4H, D\]"):
        PF.lstm_cell({**params, "weight_ih": torch.zeros(H, D)}, None, torch.zeros(D))
    with pytest.raises(ValueError, match="weight_hh must be"):
        PF.lstm_cell({**params, "weight_hh": torch.zeros(4 * H, H + 1)}, None, torch.zeros(D))


# ------------------------------------------------------------------------------------- init


@pytest.mark.parametrize(("num_layers", "bias", "bidirectional"), [
    (1, True, False), (2, False, True), (3, True, True),
])
def test_init_lstm_equals_nn_lstm(num_layers, bias, bidirectional):
    torch.manual_seed(11)
    params = PF.init_lstm(D, H, num_layers, bias, bidirectional)
    torch.manual_seed(11)
    m = nn.LSTM(D, H, num_layers, bias, bidirectional=bidirectional)
    assert list(params) == [k for k, _ in m.named_parameters()]
    for k, v in m.named_parameters():
        assert torch.equal(params[k], v.detach()), k
    m.load_state_dict(params, strict=True)


def test_init_lstm_cell_equals_nn_lstm_cell():
    torch.manual_seed(5)
    params = PF.init_lstm_cell(D, H)
    torch.manual_seed(5)
    m = nn.LSTMCell(D, H)
    assert list(params) == [k for k, _ in m.named_parameters()]
    assert all(torch.equal(params[k], v.detach()) for k, v in m.named_parameters())
    assert list(PF.init_lstm_cell(D, H, bias=False)) == ["weight_ih", "weight_hh"]


def test_init_dtype_generator_and_bounds():
    a = PF.init_lstm(D, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = PF.init_lstm(D, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert all(v.dtype == torch.float64 and torch.equal(v, b[k]) for k, v in a.items())
    assert all(v.abs().max() <= 0.25 for v in a.values())
    assert a["weight_ih_l1"].shape == (64, 16)
    with pytest.raises(ValueError, match="hidden_size"):
        PF.init_lstm(D, 0)
    with pytest.raises(ValueError, match="num_layers"):
        PF.init_lstm(D, H, 0)


def test_layers_are_dispatchable():
    assert hasattr(PF.lstm, "plain") and hasattr(PF.lstm_cell, "plain")


# ----------------------------------------------------------------------------------- errors


def test_error_x_dims_and_features():
    params = PF.init_lstm(D, H)
    with pytest.raises(ValueError, match=r"\[T, B, D\]"):
        PF.lstm(params, torch.zeros(D))
    with pytest.raises(ValueError, match=r"\[T, B, D\]"):
        PF.lstm(params, torch.zeros(1, T, B, D))
    with pytest.raises(ValueError, match="got list"):
        PF.lstm(params, [[0.0] * D] * T)
    with pytest.raises(ValueError, match="input_size D=4"):
        PF.lstm(params, torch.zeros(T, B, D + 1))


def test_error_state_shape_and_dtype():
    params = PF.init_lstm(D, H, 2, bidirectional=True)
    kw = dict(num_layers=2, bidirectional=True)
    good = torch.zeros(4, B, H)
    with pytest.raises(ValueError, match=r"h0 must be \[L\*P, B, H\] = \(4, 3, 3\)"):
        PF.lstm(params, torch.zeros(T, B, D), (torch.zeros(2, B, H), good), **kw)
    with pytest.raises(ValueError, match="c0"):
        PF.lstm(params, torch.zeros(T, B, D), (good, torch.zeros(4, B + 1, H)), **kw)
    with pytest.raises(ValueError, match="one example"):
        PF.lstm(params, torch.zeros(T, D), (good, good), **kw)
    with pytest.raises(ValueError, match="dtype"):
        PF.lstm(params, torch.zeros(T, B, D), (good, good.double()), **kw)
    with pytest.raises(ValueError, match="pair"):
        PF.lstm(params, torch.zeros(T, B, D), good, **kw)


@pytest.mark.parametrize(("lengths", "match"), [
    (torch.tensor([1, 2, 6]), r"\[0, T\] = \[0, 5\]"),
    (torch.tensor([1, -1, 2]), r"\[0, T\]"),
    (torch.tensor([1, 2]), r"\[B\] = \[3\]"),
    (torch.tensor([[1, 2, 3]]), r"\[B\]"),
    (3, r"\[B\]"),
    (torch.tensor([1.0, 2.0, 3.0]), "integer dtype"),
    (True, "integers"),
    ("abc", "integer"),
])
def test_error_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        PF.lstm(PF.init_lstm(D, H), torch.zeros(T, B, D), lengths=lengths)


def test_error_lengths_for_one_example():
    with pytest.raises(ValueError, match="one example"):
        PF.lstm(PF.init_lstm(D, H), torch.zeros(T, D), lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[0, T\]"):
        PF.lstm(PF.init_lstm(D, H), torch.zeros(T, D), lengths=T + 1)


def test_error_params_do_not_match_options():
    x = torch.zeros(T, B, D)
    with pytest.raises(ValueError, match="bidirectional=True"):
        PF.lstm(PF.init_lstm(D, H, bidirectional=True), x)
    with pytest.raises(ValueError, match="more than num_layers=1"):
        PF.lstm(PF.init_lstm(D, H, 2), x)
    with pytest.raises(ValueError, match="lack"):
        PF.lstm(PF.init_lstm(D, H, 1), x, num_layers=2)
    with pytest.raises(ValueError, match="proj_size"):
        PF.lstm(dict(nn.LSTM(D, H + 1, proj_size=H).named_parameters()), x)
    with pytest.raises(ValueError, match="weight_ih_l1"):
        PF.lstm({**PF.init_lstm(D, H, 2), "weight_ih_l1": torch.zeros(4 * H, H + 1)}, x,
                num_layers=2)
    with pytest.raises(ValueError, match="bias_hh_l0"):
        PF.lstm({**PF.init_lstm(D, H), "bias_hh_l0": torch.zeros(H)}, x)
    with pytest.raises(ValueError, match="num_layers must be"):
        PF.lstm(PF.init_lstm(D, H), x, num_layers=0)


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_bfloat16_recurrence_as_accurate_as_its_dtype(with_lengths, bidirectional):
    """In half precision the loop computes tanh itself (the float32 loop's sigmoid identities
    err by the roundoff of values near 1, which in bfloat16 would double the error of small
    cell states): outputs and gradients within bfloat16's own error of the float64 layer."""
    torch.manual_seed(0)
    d = h = 32
    p64 = {k: v.double() for k, v in PF.init_lstm(d, h, bidirectional=bidirectional,
                                                  generator=torch.Generator().manual_seed(0)).items()}
    x64 = torch.randn(4, 20, d, dtype=torch.float64) * 0.3
    lengths = torch.tensor([20, 13, 7, 1]) if with_lengths else None

    def run(params, x):
        params = {k: v.clone().requires_grad_() for k, v in params.items()}
        out, _ = PF.lstm(params, x, batch_first=True, bidirectional=bidirectional, lengths=lengths)
        out.double().pow(2).sum().backward()
        return out.double(), {k: v.grad.double() for k, v in params.items()}

    ref, ref_g = run(p64, x64)
    out, grads = run({k: v.bfloat16() for k, v in p64.items()}, x64.bfloat16())
    assert (out - ref).abs().mean() < 4e-4  # the sigmoid identities gave 9e-4 here
    for k in ref_g:
        assert (grads[k] - ref_g[k]).norm() < 1.5e-2 * ref_g[k].norm(), k



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_small_cell_states_are_as_accurate_as_nn_lstm(dtype, with_lengths, bidirectional):
    """Reproducer: zero biases and inputs of 1e-8 (float64) or 1e-4 (float32): every gate
    pre-activation and cell state is small. The loop's sigmoid identities for tanh
    (``2 sigma(2 z) - 1``, ``1 - 2 sigma(-2 c)``) err by the roundoff of values near 1,
    not relatively to ``tanh``, so outputs and gradients were off by 3e-8 (float64) and 1e-3
    (float32) of their size, where nn.LSTM errs by 1e-16 and 1e-7."""
    scale, rtol = (1e-8, 1e-12) if dtype == torch.float64 else (1e-4, 2e-6)
    m = make_lstm(1, bidirectional, batch_first=True)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("bias"):
                p.zero_()
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale
    lengths = torch.tensor([T, 2, 4]) if with_lengths else None

    def layer(params, x):
        return PF.lstm(params, x, batch_first=True, bidirectional=bidirectional, lengths=lengths)[0]

    def reference(params, x):
        if lengths is None:
            return m(x)[0]
        out, _ = m(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(out, batch_first=True, total_length=T)[0]

    def run(f, params, x):
        x = x.clone().requires_grad_(True)
        out = f(params, x)
        weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)
        return [out, *torch.autograd.grad((out * weights).sum(), [x, *params.values()])]

    expected = run(reference, dict(m.named_parameters()), x)
    params = {k: v.detach().to(dtype).requires_grad_(True) for k, v in m.named_parameters()}
    for got, ref in zip(run(layer, params, x.to(dtype)), expected):
        err = float((got.double() - ref).abs().max() / ref.abs().max())
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"
