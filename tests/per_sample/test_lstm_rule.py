"""The expanded-weight rules for ``PF.lstm`` / ``PF.lstm_cell``, and the fused plain path.

Checked against the float64 per-example loop and ``method="vmap"`` (1e-10 relative), under
fast clipping against materialise-then-clip, and for the cost trap: the per-sample
``W_hh`` gradient is built once per layer and direction, not once per step. Unmasked layers
are checked both ways: the Python loop and torch's fused LSTM forward with a recomputing
backward (``_FusedLayer``; by default only used when no gradient is taken).
"""

from __future__ import annotations

import itertools
import sys
import warnings

import optree
import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc import per_sample_grads
from psgfunc.per_sample import _kinds, module_call
from psgfunc.per_sample.rules import lstm as lstm_rule
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
T, B, D, H = 5, 4, 3, 2
LSTM_MOD = sys.modules[PF.lstm.__module__]


def lstm_params(num_layers, bidirectional, bias=True, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return PF.init_lstm(D, H, num_layers, bias=bias, bidirectional=bidirectional, dtype=dtype,
                        generator=gen)


def check_both_methods(fn, params, *batch, dtype=F64):
    expected = per_example_grads(fn, params, *batch)
    expanded = per_sample_grads(fn, params, *batch, method="expanded")
    assert_tree_close(expanded, expected, dtype=dtype)
    assert_tree_close(expanded, per_sample_grads(fn, params, *batch, method="vmap"), dtype=dtype)
    return expanded


def sequence_loss(num_layers, bidirectional, batch_first=False):
    """Uses the output at every step, h_n and c_n (the example's lengths/state are optional)."""

    def fn(params, x, target, lengths=None, h0=None, c0=None):
        state = None if h0 is None else (h0, c0)
        out, (h_n, c_n) = PF.lstm(params, x, state, num_layers=num_layers,
                                  bidirectional=bidirectional, batch_first=batch_first,
                                  lengths=lengths)
        return ((out - target) ** 2).sum() + h_n.sin().sum() + (c_n * c_n).sum()

    return fn


def sequence_batch(num_layers, bidirectional, lengths, state, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    p = 2 if bidirectional else 1
    x = torch.randn(B, T, D, generator=gen, dtype=dtype)
    target = torch.randn(B, T, p * H, generator=gen, dtype=dtype)
    batch = [x, target]
    if lengths or state:
        batch.append(torch.tensor([5, 2, 0, 3]) if lengths else torch.full((B,), T))
    if state:
        batch += [torch.randn(B, num_layers * p, H, generator=gen, dtype=dtype) for _ in range(2)]
    return batch



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread. (On a loaded 2-core box, MKL's 2-thread
    float64 matmuls stall for milliseconds waiting for the second thread.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ----------------------------------------------------------------------- lstm: the oracle


GRID = list(itertools.product([1, 2], [False, True], [False, True], [False, True]))


@pytest.fixture
def recurrences(monkeypatch):
    """The layer/direction recurrences the rule runs, in order: ``"loop"`` for
    :class:`_Layer`, ``"fused"`` for :class:`_FusedLayer` (none: the fallback served)."""
    ran = []
    for cls, name in ((lstm_rule._Layer, "loop"), (lstm_rule._FusedLayer, "fused")):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", staticmethod(
            lambda *a, name=name, original=original: ran.append(name) or original(*a)
        ))
    return ran


@pytest.fixture(params=[False, True], ids=["loop", "fused"])
def fused(request, monkeypatch):
    """Whether unmasked layers run torch's fused LSTM (:class:`_FusedLayer`) also when a
    gradient is taken (the rule's default: only without one)."""
    monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", request.param)
    return request.param


@pytest.mark.parametrize(("num_layers", "bidirectional", "lengths", "state"), GRID)
def test_expanded_equals_vmap_and_oracle(num_layers, bidirectional, lengths, state, recurrences,
                                         fused):
    params = lstm_params(num_layers, bidirectional)
    fn = sequence_loss(num_layers, bidirectional)
    grads = check_both_methods(fn, params, *sequence_batch(num_layers, bidirectional, lengths, state))
    # the rule ran, each layer/direction once: the loop with lengths (the batch passes
    # lengths whenever it passes a state), else as the switch says
    masked = lengths or state
    expected = "fused" if fused and not masked else "loop"
    assert recurrences == [expected] * num_layers * (2 if bidirectional else 1)
    assert list(grads) == list(params)
    if lengths:  # the example of length 0 has no parameter gradient at all
        assert all(bool(torch.all(g[2] == 0)) for g in grads.values())


@pytest.mark.parametrize("lengths", [False, True])
def test_both_biases_share_one_sum_without_aliasing(lengths):
    """``b_ih`` and ``b_hh`` get the same per-sample gradient (the layer sums ``dz`` over
    steps once for both): equal to the oracle's, bitwise equal to each other, and two
    separate tensors (writing into one leaves the other alone)."""
    fn = sequence_loss(1, True)
    params = lstm_params(1, True)
    batch = sequence_batch(1, True, lengths, False)
    got = check_both_methods(fn, params, *batch)
    for sfx in ("_l0", "_l0_reverse"):
        g_ih, g_hh = got["bias_ih" + sfx], got["bias_hh" + sfx]
        assert torch.equal(g_ih, g_hh)
        g_ih.zero_()
        assert g_hh.abs().sum() > 0


@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_first_is_ignored_for_one_example(batch_first):
    params = lstm_params(2, True, bias=False)
    fn = sequence_loss(2, True, batch_first=batch_first)
    check_both_methods(fn, params, *sequence_batch(2, True, True, False))


def test_float32_matches_float64_oracle():
    params = lstm_params(2, True, dtype=torch.float32)
    fn = sequence_loss(2, True)
    batch = sequence_batch(2, True, True, True, dtype=torch.float32)
    grads = per_sample_grads(fn, params, *batch, method="expanded")
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert_tree_close(grads, per_example_grads(fn, params, *batch), dtype=torch.float32)


def test_constants_in_the_closure_int_lengths_and_shared_state():
    """A state that every example shares, and one int length: both reach the rule unbatched."""
    params = lstm_params(1, True)
    gen = torch.Generator().manual_seed(3)
    h0, c0 = (torch.randn(2, H, generator=gen, dtype=F64) for _ in range(2))

    def fn(p, x):
        out, (h_n, _) = PF.lstm(p, x, (h0, c0), bidirectional=True, lengths=3)
        return out.tanh().sum() + h_n.sum()

    check_both_methods(fn, params, torch.randn(B, T, D, generator=gen, dtype=F64))


def test_a_batch_inside_each_example_falls_back_to_vmap(recurrences):
    """Per-example input [T, B', D]: the rule declines and the generic vmap path serves it."""
    params = lstm_params(1, False)

    def fn(p, x):
        out, _ = PF.lstm(p, x)
        return out.pow(2).sum()

    check_both_methods(fn, params, torch.randn(B, T, 2, D, dtype=F64))
    assert not recurrences


def test_padding_values_do_not_change_any_gradient():
    """dz is exactly zero at padded steps, so the padding (finite) adds exactly nothing."""
    params = lstm_params(2, True)
    fn = sequence_loss(2, True)
    x, target, lengths = sequence_batch(2, True, True, False)
    other = x.clone()
    for b, n in enumerate(lengths.tolist()):
        other[b, n:] = 100 * torch.randn(T - n, D, dtype=F64)
    a = per_sample_grads(fn, params, x, target, lengths, method="expanded")
    b_ = per_sample_grads(fn, params, other, target, lengths, method="expanded")
    for k in params:
        assert torch.equal(a[k], b_[k]), k


def test_sequence_of_length_zero_steps():
    params = lstm_params(1, True)

    def fn(p, x):
        out, (h_n, c_n) = PF.lstm(p, x, bidirectional=True)
        return out.sum() + h_n.sum()

    grads = per_sample_grads(fn, params, torch.zeros(B, 0, D, dtype=F64), method="expanded")
    assert all(g.shape == (B, *params[k].shape) and not g.any() for k, g in grads.items())


def test_errors_are_the_plain_layers():
    params = lstm_params(1, False)

    def fn(p, x):
        return PF.lstm(p, x)[0].sum()

    for method in ("expanded", "vmap"):
        with pytest.raises(ValueError, match="features in its last dim"):
            per_sample_grads(fn, params, torch.zeros(B, T, D + 1, dtype=F64), method=method)
    for method in ("expanded", "vmap", "auto"):  # (vmap: the values beneath the transform)
        for bad in ([1, 2, 9, 0], [1, -1, 2, 0]):
            with pytest.raises(ValueError, match="lengths must lie in"):
                per_sample_grads(lambda p, x, n: PF.lstm(p, x, lengths=n)[0].sum(), params,
                                 torch.zeros(B, T, D, dtype=F64), torch.tensor(bad),
                                 method=method)


def test_gru_lengths_out_of_range_raise_under_vmap():
    params = PF.init_gru(D, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"gru: lengths must lie in \[0, T\]"):
        per_sample_grads(lambda p, x, n: PF.gru(p, x, lengths=n)[0].sum(), params,
                         torch.zeros(B, T, D, dtype=F64), torch.tensor([T + 1, 1, 1, 1]),
                         method="vmap")


# ------------------------------------------------------------------------------------ cell


@pytest.mark.parametrize("with_carry", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_in_a_scan_matches_oracle(with_carry, bias, recurrences):
    gen = torch.Generator().manual_seed(0)
    params = PF.init_lstm_cell(D, H, bias, dtype=F64, generator=gen)

    def fn(p, xs, h0, c0):
        carry = (h0, c0) if with_carry else None
        for x in xs:  # the cell called T times on one weight
            carry, h = PF.lstm_cell(p, carry, x)
        return h.pow(2).sum() + carry[1].sum()

    xs = torch.randn(B, 3, D, generator=gen, dtype=F64)
    check_both_methods(fn, params, xs, *(torch.randn(B, H, generator=gen, dtype=F64) for _ in range(2)))
    assert recurrences == ["loop"] * 3  # the cell rule ran at every call


# ------------------------------------------------------------------------------ the cost trap


def test_w_hh_gradient_is_built_once_per_layer_and_direction(monkeypatch, fused):
    calls = []
    original = _kinds.Outer.materialize

    def counting(self, g, x):
        calls.append((tuple(g.shape), tuple(x.shape)))
        return original(self, g, x)

    monkeypatch.setattr(_kinds.Outer, "materialize", counting)
    steps = 9
    params = lstm_params(2, True)

    def fn(p, x):
        return PF.lstm(p, x, num_layers=2, bidirectional=True)[0].pow(2).sum()

    per_sample_grads(fn, params, torch.randn(B, steps, D, dtype=F64), method="expanded")
    # W_ih (linear rule) and W_hh (recurrence) of 2 layers x 2 directions: 8 contractions,
    # each over all `steps` time steps at once
    assert len(calls) == 8
    assert sorted(calls) == sorted(
        [((B, steps, 4 * H), (B, steps, D))] * 2 + [((B, steps, 4 * H), (B, steps, 2 * H))] * 2
        + [((B, steps, 4 * H), (B, steps, H))] * 4
    )


# ----------------------------------------------------------------------------- fast clipping


def text_model():
    gen = torch.Generator().manual_seed(0)
    params = {
        "emb": PF.init_embedding(11, D, padding_idx=0, dtype=F64, generator=gen),
        "lstm": PF.init_lstm(D, H, 2, bidirectional=True, dtype=F64, generator=gen),
        "fc": PF.init_linear(2 * H, 3, dtype=F64, generator=gen),
    }

    def fn(p, ids, n, y):
        x = PF.embedding(p["emb"], ids, padding_idx=0)
        out, (h_n, _) = PF.lstm(p["lstm"], x, num_layers=2, bidirectional=True, lengths=n)
        logits = PF.linear(p["fc"], out.sum(0)) + h_n.sum()
        return F.cross_entropy(logits, y)

    ids = torch.randint(1, 11, (B, T), generator=gen)
    lengths = torch.tensor([5, 1, 3, 4])
    ids[torch.arange(T) >= lengths[:, None]] = 0
    return fn, params, (ids, lengths, torch.randint(0, 3, (B,), generator=gen))


@pytest.mark.parametrize("max_norm", ["median", 1e30])
def test_fast_clipping_equals_materialize_then_clip(max_norm):
    fn, params, batch = text_model()
    grads = per_example_grads(fn, params, *batch)
    norms = dp.per_sample_norms(grads)
    c = float(norms.median()) if max_norm == "median" else max_norm
    expected = optree.tree_map(lambda t: t.sum(0), dp.clip(grads, c))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter is served by a rule
        summed, got_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)


def test_compiled_fast_traces_lstm_with_lengths():
    """``lstm`` with ``lengths`` in the compiled route: its mask must trace (the eager range
    check read the values and broke the graph, so the step raised "could not trace"); its
    params are differentiated per example in the graph (with a warning), and two batch
    sizes match the float64 oracle."""
    fn, params, batch = text_model()
    grads = per_example_grads(fn, params, *batch)
    c = float(dp.per_sample_norms(grads).median())
    step = dp.compiled_clipped_grad_sum(fn, c, method="fast", backend="eager")
    for size in (B, 2):
        part = [t[:size] for t in batch]
        grads = per_example_grads(fn, params, *part)
        expected = optree.tree_map(lambda t: t.sum(0), dp.clip(grads, c))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the lstm's leaves are materialised: it warns
            summed, got_norms = step(params, *part)
        assert_tree_close(summed, expected)
        torch.testing.assert_close(got_norms, dp.per_sample_norms(grads), rtol=1e-10, atol=0)
    # a length out of range in an example the planning run did not see: the graph makes that
    # example NaN, and the eager rerun raises the layer's own error (not a clamped length)
    ids, lengths, y = batch
    for bad in (T + 2, -1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\]"):
                step(params, ids, torch.tensor([5, 1, bad, 4]), y)


def test_fast_clipping_records_one_piece_per_lstm_weight(monkeypatch):
    recorded = []
    original = _kinds.Outer.prefers_dense  # asked once per parameter, with all its pieces

    def spy(self, datas):
        recorded.append([tuple(d[0].shape) for d in datas])
        return original(self, datas)

    monkeypatch.setattr(_kinds.Outer, "prefers_dense", spy)
    fn, params, batch = text_model()
    dp.clipped_grad_sum(fn, params, *batch, max_norm=1.0, method="fast")
    lstm_pieces = [r for r in recorded if r[0][1] == T]
    assert len(lstm_pieces) == 8 and all(len(r) == 1 for r in lstm_pieces)


@pytest.mark.parametrize("method", ["vmap", "expanded"])
def test_dropout_follows_randomness(method):
    """Dropout between layers under per_sample_grads: "error" raises, "same" draws one mask
    for every example (identical examples get identical gradients), "different" draws each
    example's own mask."""
    params = lstm_params(2, False)
    x = torch.randn(1, T, D, dtype=F64).expand(4, T, D)  # four copies of one example

    def fn(p, xe):
        return PF.lstm(p, xe, num_layers=2, dropout=0.5, training=True)[0].pow(2).sum()

    with pytest.raises((ValueError, RuntimeError), match="randomness"):
        per_sample_grads(fn, params, x, method=method, randomness="error")
    torch.manual_seed(0)
    same = per_sample_grads(fn, params, x, method=method, randomness="same")
    torch.manual_seed(0)
    different = per_sample_grads(fn, params, x, method=method, randomness="different")
    for k in params:
        torch.testing.assert_close(same[k], same[k][:1].expand_as(same[k]), rtol=1e-12, atol=1e-12)
    assert any(not torch.allclose(different[k][0], different[k][1]) for k in params)


# ------------------------------------------------------------------------ batch mode (shells)


def test_batch_mode_dropout_draws_the_plain_layers_masks(fused):
    params = {k: v.requires_grad_(True) for k, v in lstm_params(3, True).items()}
    x = torch.randn(T, B, D, dtype=F64)
    torch.manual_seed(7)
    out, (h_n, _) = module_call(PF.lstm, params, B, x, num_layers=3, bidirectional=True,
                                dropout=0.4, training=True)
    (out.sum() + h_n.sum()).backward()
    got = {k: (v.grad.clone(), v.grad_sample) for k, v in params.items()}
    for v in params.values():
        v.grad = None
    torch.manual_seed(7)
    ref, (ref_h, _) = PF.lstm(params, x, num_layers=3, bidirectional=True, dropout=0.4,
                              training=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (ref.sum() + ref_h.sum()).backward()
    for k, v in params.items():
        torch.testing.assert_close(got[k][0], v.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[k][1].sum(0), v.grad, rtol=0, atol=1e-12)


# ------------------------------------------------------- torch's fused LSTM forward (_FusedLayer)


@pytest.fixture
def vf_calls(monkeypatch):
    """Counts calls of ``torch._VF.lstm`` (the fused forward _FusedLayer runs)."""
    calls = []
    original = torch._VF.lstm
    monkeypatch.setattr(torch._VF, "lstm", lambda *a: calls.append(1) or original(*a))
    return calls


def two_layer_loss(p, x, lengths=None):
    out, (h_n, c_n) = PF.lstm(p, x, num_layers=2, bidirectional=True, lengths=lengths)
    return out.pow(2).sum() + h_n.sum() + c_n.sin().sum()


@pytest.mark.parametrize("masked", [False, True])
def test_fused_layer_runs_for_unmasked_layers_only(masked, monkeypatch, recurrences, vf_calls):
    monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", True)
    params = lstm_params(2, True)
    x, _, lengths = sequence_batch(2, True, True, False)
    per_sample_grads(two_layer_loss, params, x, *([lengths] if masked else []), method="expanded")
    assert recurrences == ["loop" if masked else "fused"] * 4
    assert len(vf_calls) == (0 if masked else 4)


@pytest.mark.parametrize(("batch", "steps"), [(1, 1), (1, 2), (2, 1)])
def test_fused_layer_one_example_one_step(batch, steps, monkeypatch, recurrences):
    """B = T = 1: the g gate's slice of the [T, B, 4H] pre-activations is then contiguous,
    so a copy made by ``contiguous()`` would be the slice itself, and a tanh in place on it
    would turn the gates' sigmoid into sigmoid(tanh(z_g)) (per-sample gradients of W_ih and
    the biases were off by 46%)."""
    monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", True)
    params = lstm_params(1, False)
    x = torch.randn(batch, steps, D, dtype=F64, generator=torch.Generator().manual_seed(1))

    def fn(p, x):
        out, (_, c_n) = PF.lstm(p, x)
        return out.pow(2).sum() + c_n.sum()

    grads = per_sample_grads(fn, params, x, method="expanded")
    assert recurrences == ["fused"]
    assert_tree_close(grads, per_example_grads(fn, params, x))


def test_fused_layer_without_grad_by_default(recurrences, vf_calls):
    """By default the fused forward serves calls no backward follows (no_grad, inference
    through the shells); those that need gradients run the loop."""
    assert lstm_rule._FUSED_WITH_GRAD is False
    params = {k: v.requires_grad_(True) for k, v in lstm_params(2, True).items()}
    x = torch.randn(T, B, D, dtype=F64)
    h0, c0 = (torch.randn(4, B, H, dtype=F64) for _ in range(2))
    call = lambda: module_call(PF.lstm, params, B, x, (h0, c0), num_layers=2, bidirectional=True)
    with torch.no_grad():
        out, (h_n, c_n) = call()
    assert recurrences == ["fused"] * 4 and len(vf_calls) == 4
    ref, (ref_h, ref_c) = PF.lstm(params, x, (h0, c0), num_layers=2, bidirectional=True)
    for got, want in ((out, ref), (h_n, ref_h), (c_n, ref_c)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    recurrences.clear()
    call()
    assert recurrences == ["loop"] * 4


def bias_variant(params, bias):
    """``params`` with both biases, none, or only ``bias_ih`` / ``bias_hh``."""
    drop = {"both": (), "none": ("bias_ih", "bias_hh"), "ih": ("bias_hh",), "hh": ("bias_ih",)}
    return {k: v for k, v in params.items() if not k.startswith(drop[bias])}


def grads_both_ways(monkeypatch, fn, params, *batch, method="expanded"):
    got = {}
    for flag in (False, True):
        monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", flag)
        got[flag] = per_sample_grads(fn, params, *batch, method=method)
    return got[False], got[True]


@pytest.mark.parametrize(("num_layers", "bidirectional", "state", "bias"), [
    *itertools.product([1, 2], [False, True], [False, True], ["both"]),
    *itertools.product([1], [True], [True], ["none", "ih", "hh"]),
])
def test_fused_layer_equals_the_loop_in_float64(num_layers, bidirectional, state, bias,
                                                monkeypatch, recurrences):
    """Per-sample gradients of every weight, of the input and of h0/c0 (through a shared
    linear map of them): the fused forward with the recomputing backward vs the loop."""
    params = bias_variant(lstm_params(num_layers, bidirectional), bias)
    gen = torch.Generator().manual_seed(4)
    p = 2 if bidirectional else 1
    x = torch.randn(B, T, D, generator=gen, dtype=F64)
    s = torch.randn(B, num_layers * p, H, generator=gen, dtype=F64)
    params["mix"] = torch.randn(H, H, generator=gen, dtype=F64)
    params["emb"] = torch.randn(D, D, generator=gen, dtype=F64)

    def fn(q, xe, se):
        q = dict(q)
        mix, emb = q.pop("mix"), q.pop("emb")
        init = (se @ mix, (se @ mix.t()).cos()) if state else None
        out, (h_n, c_n) = PF.lstm(q, xe @ emb, init, num_layers=num_layers,
                                  bidirectional=bidirectional)
        return out.tanh().sum() + (out[-1] ** 2).sum() + h_n.sin().sum() + (c_n * c_n).sum()

    loop, fused = grads_both_ways(monkeypatch, fn, params, x, s)
    assert recurrences == ["loop"] * (num_layers * p) + ["fused"] * (num_layers * p)
    assert_tree_close(fused, loop, rtol=1e-10)


@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_layer_forward_equals_the_loop_in_float32(batch_first, monkeypatch):
    """Values in float32 (torch's fused LSTM takes oneDNN's kernel there) agree within
    rounding, and so do the per-sample gradients."""
    params = lstm_params(2, True, dtype=torch.float32)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    results = []
    for flag in (False, True):
        monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", flag)
        out, (h_n, c_n) = module_call(PF.lstm, params, B, x, num_layers=2, bidirectional=True,
                                      batch_first=batch_first)
        (out.pow(2).sum() + h_n.sum() + c_n.sum()).backward()
        results.append(((out, h_n, c_n), {k: v.grad_sample for k, v in params.items()}))
        for v in params.values():
            v.grad, v.grad_sample = None, None
    (loop_vals, loop_grads), (fused_vals, fused_grads) = results
    for got, want in zip(fused_vals, loop_vals):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_tree_close(fused_grads, loop_grads, dtype=torch.float32)


def emb_lstm_model():
    """Embedding -> LSTM(batch_first) -> Linear on the last step (the benchmarks' EmbLSTM;
    the per-example ``fn`` sees one sequence ``[T, D]``, for which batch_first is moot)."""
    gen = torch.Generator().manual_seed(2)
    params = {
        "emb": PF.init_embedding(11, D, dtype=F64, generator=gen),
        "lstm": PF.init_lstm(D, H, dtype=F64, generator=gen),
        "fc": PF.init_linear(H, 3, dtype=F64, generator=gen),
    }

    def fn(p, ids, y):
        x = PF.embedding(p["emb"], ids)
        out, _ = PF.lstm(p["lstm"], x, batch_first=True)
        return F.cross_entropy(PF.linear(p["fc"], out[-1]), y)

    ids = torch.randint(0, 11, (B, T), generator=gen)
    return fn, params, (ids, torch.randint(0, 3, (B,), generator=gen))


def test_fused_layer_fast_clipping_equals_materialize(monkeypatch, recurrences):
    monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", True)
    fn, params, batch = emb_lstm_model()
    norms = dp.per_sample_norms(per_example_grads(fn, params, *batch))
    c = float(norms.median())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter is served by a rule
        fast, fast_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
    dense, dense_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=c,
                                            method="materialize")
    assert recurrences == ["fused"] * 2
    assert_tree_close(fast, dense, rtol=1e-10)
    torch.testing.assert_close(fast_norms, dense_norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(fast_norms, norms, rtol=1e-10, atol=0)


# ----------------------------------------------------------------- the plain layer's fused path


def test_fused_plain_path_double_backward_and_gradcheck():
    """Outside torch.func the plain layer runs a hand-written backward per layer/direction;
    a double backward recomputes it as a differentiable scan."""
    params = {k: v.requires_grad_(True) for k, v in lstm_params(1, True).items()}
    x = torch.randn(3, 2, D, dtype=F64, requires_grad=True)
    lengths = torch.tensor([3, 1])

    def f(x, *leaves):
        p = dict(zip(params, leaves))
        out, (h_n, c_n) = PF.lstm(p, x, bidirectional=True, lengths=lengths)
        return out, h_n, c_n

    torch.autograd.gradcheck(f, (x, *params.values()))
    torch.autograd.gradgradcheck(f, (x, *params.values()))


def test_fused_and_scan_paths_agree():
    params = lstm_params(2, True)
    x = torch.randn(T, B, D, dtype=F64)
    lengths = torch.tensor([5, 2, 0, 3])
    fused = PF.lstm(params, x, num_layers=2, bidirectional=True, lengths=lengths)
    layer = lambda p, xx: PF.lstm(p, xx, num_layers=2, bidirectional=True, lengths=lengths)
    scanned = torch.func.vmap(layer, in_dims=(None, 0))(params, x.unsqueeze(0))
    assert LSTM_MOD._in_functorch() is False
    assert_tree_close(optree.tree_map(lambda t: t.unsqueeze(0), fused), scanned)


def test_rule_registration():
    from psgfunc import _rules

    assert _rules.rule_for(PF.lstm) is lstm_rule._lstm
    assert _rules.rule_for(PF.lstm_cell) is lstm_rule._lstm_cell


def test_batch_mode_with_per_example_params_falls_back_to_vmap():
    """Params that are not stride-0 copies (each example its own weights) still work."""
    from psgfunc import _rules

    per_example = [lstm_params(2, True, seed=s) for s in range(3)]
    stacked = {k: torch.stack([p[k] for p in per_example]) for k in per_example[0]}
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, 3, D, generator=gen, dtype=F64)
    h0, c0 = (torch.randn(4, 3, H, generator=gen, dtype=F64) for _ in range(2))
    lengths = torch.tensor([5, 2, 1])
    with _rules.expanded_mode("batch"):
        out, (h_n, _) = lstm_rule.LSTM.batched(stacked, x, (h0, c0), lengths, num_layers=2,
                                               bidirectional=True)
    for b, p in enumerate(per_example):
        ref, (ref_h, _) = PF.lstm(p, x[:, b], (h0[:, b], c0[:, b]), num_layers=2,
                                  bidirectional=True, lengths=int(lengths[b]))
        torch.testing.assert_close(out[:, b], ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(h_n[:, b], ref_h, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_small_states_match_an_nn_lstm_oracle(fused, monkeypatch):
    """Reproducer: zero biases and inputs of 1e-8, so every pre-activation and cell state is
    small: the loops' sigmoid identities for tanh (the forward's and ``_replay``'s) err by
    the roundoff of values near 1, and the per-sample gradients were off by 6e-8 of their
    size (the loop) or of a gate's rows (the fused layer's recomputation: 2e-8). The float64 oracle loop over ``PF.lstm`` runs the same loop and could not see it:
    here the oracle is ``torch.nn.LSTM``."""
    monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", fused)
    torch.manual_seed(0)
    m = torch.nn.LSTM(D, H, bidirectional=True, dtype=F64)
    params = {k: torch.zeros_like(v) if k.startswith("bias") else v.detach().clone()
              for k, v in m.named_parameters()}
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=F64) * 1e-8
    weights = torch.linspace(-1, 2, T * 2 * H, dtype=F64).view(T, 2 * H)

    def fn(p, x):
        return (PF.lstm(p, x, bidirectional=True)[0] * weights).sum()

    def reference(p, x):
        return (torch.func.functional_call(m, p, (x,))[0] * weights).sum()

    def gates(grads):  # each gate's rows on their own: the i and o rows are far smaller here
        return {(k, n): chunk for k, v in grads.items() for n, chunk in enumerate(v.chunk(4, dim=1))}

    expected = per_example_grads(reference, params, x)
    for method in ("expanded", "vmap"):
        assert_tree_close(gates(per_sample_grads(fn, params, x, method=method)), gates(expected))
    summed, norms = dp.clipped_grad_sum(fn, params, x, max_norm=1e-9, method="fast")
    exact = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in expected.values()))
    assert bool((norms >= exact).all()) and float((norms / exact).max()) < 1 + 1e-10
