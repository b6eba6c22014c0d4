"""The expanded-weight rules for ``PF.gru`` / ``PF.rnn`` and their cells.

Against the float64 per-example loop and ``method="vmap"`` (1e-10 relative); under fast
clipping against materialise-then-clip (no fallback warning); the tapped (compiled) route's
pieces; the GRU's ``n`` gate, whose hidden part gets ``r * dn``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.functional as PF
from psgfunc import _rules, per_sample_grads
from psgfunc.per_sample import _kinds, module_call
from psgfunc.per_sample.rules import recurrent as rec_rule
from tests.oracles import assert_tree_close, per_example_grads
from tests.per_sample.test_tap import tapped_sum

F64 = torch.float64
T, B, D, H = 5, 4, 3, 2
KINDS = ["gru", "tanh", "relu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recurrences(monkeypatch):
    """The kinds of the recurrences the rule ran, in order (none: a fallback served)."""
    ran = []
    original = rec_rule._Recurrence.forward
    monkeypatch.setattr(rec_rule._Recurrence, "forward", staticmethod(
        lambda ctx, kind, *a: ran.append(kind) or original(ctx, kind, *a)
    ))
    return ran


def init(kind, num_layers=1, bidirectional=False, bias=True, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "gru":
        return PF.init_gru(D, H, num_layers, bias, bidirectional=bidirectional, dtype=dtype,
                           generator=gen)
    return PF.init_rnn(D, H, num_layers, kind, bias, bidirectional=bidirectional, dtype=dtype,
                       generator=gen)


def layer(kind, p, x, h0=None, **kw):
    if kind == "gru":
        return PF.gru(p, x, h0, **kw)
    return PF.rnn(p, x, h0, nonlinearity=kind, **kw)


def check_both_methods(fn, params, *batch):
    expected = per_example_grads(fn, params, *batch)
    expanded = per_sample_grads(fn, params, *batch, method="expanded")
    assert_tree_close(expanded, expected)
    assert_tree_close(per_sample_grads(fn, params, *batch, method="vmap"), expected)
    return expanded


GRID = [(1, False, False, False), (1, True, True, False), (2, False, False, True),
        (2, True, True, True)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("num_layers", "bidirectional", "lengths", "state"), GRID)
def test_expanded_equals_vmap_and_oracle(kind, num_layers, bidirectional, lengths, state,
                                         recurrences):
    params = init(kind, num_layers, bidirectional)
    p = 2 if bidirectional else 1

    def fn(q, x, target, n=None, h0=None):
        out, h_n = layer(kind, q, x, h0, num_layers=num_layers, bidirectional=bidirectional,
                         lengths=n)
        return ((out - target) ** 2).sum() + h_n.sin().sum()

    gen = torch.Generator().manual_seed(1)
    batch = [torch.randn(B, T, D, generator=gen, dtype=F64),
             torch.randn(B, T, p * H, generator=gen, dtype=F64)]
    if lengths or state:
        batch.append(torch.tensor([5, 2, 0, 3]) if lengths else torch.full((B,), T))
    if state:
        batch.append(torch.randn(B, num_layers * p, H, generator=gen, dtype=F64))
    grads = check_both_methods(fn, params, *batch)
    assert recurrences == [kind] * (num_layers * p)  # the rule ran, once per layer/direction
    if lengths:  # the example of length 0 has no parameter gradient
        assert all(bool(torch.all(g[2] == 0)) for g in grads.values())


def test_float32_matches_float64_oracle():
    params = init("gru", 2, True, dtype=torch.float32)

    def fn(p, x, n):
        out, h_n = PF.gru(p, x, num_layers=2, bidirectional=True, lengths=n)
        return out.tanh().sum() + h_n.pow(2).sum()

    batch = (torch.randn(B, T, D), torch.tensor([5, 2, 1, 3]))
    grads = per_sample_grads(fn, params, *batch, method="expanded")
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert_tree_close(grads, per_example_grads(fn, params, *batch), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["gru", "tanh"])
def test_sequence_of_zero_steps_and_empty_batch(kind):
    params = init(kind, 1, True)

    def fn(p, x):
        out, h_n = layer(kind, p, x, bidirectional=True)
        return out.sum() + h_n.sum()

    grads = per_sample_grads(fn, params, torch.zeros(B, 0, D, dtype=F64), method="expanded")
    assert all(g.shape == (B, *params[k].shape) and not g.any() for k, g in grads.items())
    grads = per_sample_grads(fn, params, torch.zeros(0, T, D, dtype=F64), method="expanded")
    assert all(g.shape == (0, *params[k].shape) for k, g in grads.items())


def test_gru_hidden_part_of_n_gets_r_times_dn():
    """b_ih and b_hh enter r and z identically but n differently (b_hn sits inside r * ...):
    their per-sample gradients agree on the r, z rows and differ on the n rows."""
    params = init("gru")

    def fn(q, x):
        return PF.gru(q, x)[0].pow(2).sum()

    grads = check_both_methods(fn, params, torch.randn(B, T, D, dtype=F64))
    b_ih, b_hh = grads["bias_ih_l0"], grads["bias_hh_l0"]
    torch.testing.assert_close(b_ih[:, : 2 * H], b_hh[:, : 2 * H], rtol=1e-12, atol=1e-14)
    assert (b_ih[:, 2 * H:] - b_hh[:, 2 * H:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_in_a_loop(kind, bias, recurrences):
    gen = torch.Generator().manual_seed(0)
    if kind == "gru":
        params = PF.init_gru_cell(D, H, bias, dtype=F64, generator=gen)
        cell = PF.gru_cell
    else:
        params = PF.init_rnn_cell(D, H, bias, kind, dtype=F64, generator=gen)
        cell = lambda p, h, x: PF.rnn_cell(p, h, x, nonlinearity=kind)  # noqa: E731

    def fn(p, xs, h0):
        h = h0 if bias else None
        for x in xs:  # the cell called 3 times on one weight
            h, out = cell(p, h, x)
        return out.pow(2).sum() + h.sin().sum()

    xs = torch.randn(B, 3, D, generator=gen, dtype=F64)
    check_both_methods(fn, params, xs, torch.randn(B, H, generator=gen, dtype=F64))
    assert recurrences == [kind] * 3


def test_w_hh_gradient_is_built_once_per_layer_and_direction(monkeypatch):
    calls = []
    original = _kinds.Outer.materialize
    monkeypatch.setattr(_kinds.Outer, "materialize",
                        lambda self, g, x: calls.append(tuple(g.shape)) or original(self, g, x))
    params = init("gru", 2, True)
    per_sample_grads(lambda p, x: PF.gru(p, x, num_layers=2, bidirectional=True)[0].sum(), params,
                     torch.randn(B, 9, D, dtype=F64), method="expanded")
    assert calls == [(B, 9, 3 * H)] * 8  # W_ih and W_hh of 2 layers x 2 directions


# ----------------------------------------------------------------------------- fast clipping


def text_model(kind, lengths=True, h0=False):
    """Embedding -> 2-layer bidirectional GRU/RNN (with lengths; h0 a function of the
    embedding) -> Linear."""
    gen = torch.Generator().manual_seed(0)
    params = {
        "emb": PF.init_embedding(11, D, dtype=F64, generator=gen),
        "rnn": init(kind, 2, True, seed=1),
        "fc": PF.init_linear(2 * H, 3, dtype=F64, generator=gen),
    }

    def fn(p, ids, n, y):
        x = PF.embedding(p["emb"], ids)
        state = torch.tanh(x[:1, :H]).expand(4, H) if h0 else None
        out, h_n = layer(kind, p["rnn"], x, state, num_layers=2, bidirectional=True,
                         lengths=n if lengths else None)
        return F.cross_entropy(PF.linear(p["fc"], out.sum(0)) + h_n.sum(), y)

    ids = torch.randint(0, 11, (B, T), generator=gen)
    return fn, params, (ids, torch.tensor([5, 1, 3, 4]), torch.randint(0, 3, (B,), generator=gen))


def reference(fn, params, batch, c):
    grads = per_example_grads(fn, params, *batch)
    clipped = dp.clip(grads, c)
    return {k: {n: t.sum(0) for n, t in v.items()} for k, v in clipped.items()}, \
        dp.per_sample_norms(grads)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_clipping_equals_materialize(kind):
    fn, params, batch = text_model(kind)
    _, norms = reference(fn, params, batch, 1e30)
    c = float(norms.median())
    expected, _ = reference(fn, params, batch, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter is served by a rule
        summed, got_norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="fast")
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    dense, _ = dp.clipped_grad_sum(fn, params, *batch, max_norm=c, method="materialize")
    assert_tree_close(summed, dense)


@pytest.mark.parametrize("kind", ["gru", "relu"])
@pytest.mark.parametrize("lengths", [False, True])
def test_tapped_route_pieces_equal_the_oracle(kind, lengths):
    """The compiled route's taps, eagerly: exact sums and norms, and no leaf differentiated
    per example (with lengths too: the reverse direction starts from h0 at its last step)."""
    fn, params, batch = text_model(kind, lengths=lengths, h0=True)
    _, norms = reference(fn, params, batch, 1e30)
    c = float(norms.median())
    expected, expected_norms = reference(fn, params, batch, c)
    summed, got_norms, plan = tapped_sum(fn, params, batch, c)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got_norms, expected_norms, rtol=1e-10, atol=0)
    assert plan.materialized == []


def test_compiled_fast_is_one_graph_and_exact():
    """A small bidirectional GRU with lengths through torch.compile (dynamo's eager backend,
    one full graph): every leaf tapped, the float64 oracle's sums and norms."""
    gen = torch.Generator().manual_seed(0)
    params = {"gru": init("gru", 1, True), "fc": PF.init_linear(2 * H, 2, dtype=F64, generator=gen)}

    def fn(p, x, n, y):
        out, h_n = PF.gru(p["gru"], x, torch.tanh(x[:2, :H]), bidirectional=True, lengths=n)
        return F.cross_entropy(PF.linear(p["fc"], out.sum(0)) + h_n.sum(), y)

    batch = (torch.randn(B, 3, D, generator=gen, dtype=F64), torch.tensor([3, 1, 2, 0]),
             torch.randint(0, 2, (B,), generator=gen))
    _, norms = reference(fn, params, batch, 1e30)
    c = float(norms.median())
    expected, expected_norms = reference(fn, params, batch, c)
    step = dp.compiled_clipped_grad_sum(fn, c, method="fast", backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf is tapped: no materialisation warning
        summed, got = step(params, *batch)
    assert_tree_close(summed, expected)
    torch.testing.assert_close(got, expected_norms, rtol=1e-10, atol=0)
    # a length out of range where the planning run did not look: NaN in the graph, then
    # the eager rerun's ValueError (a graph cannot raise on values; never a clamped length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"gru: lengths must lie in \[0, T\]"):
            step(params, batch[0], torch.tensor([3, 1, 4, 0]), batch[2])


# ------------------------------------------------------------------------ batch mode, errors


@pytest.mark.parametrize("kind", KINDS)
def test_batch_mode_equals_plain_layer_with_dropout(kind):
    params = {k: v.requires_grad_(True) for k, v in init(kind, 3, True).items()}
    x = torch.randn(T, B, D, dtype=F64)
    opts = dict(num_layers=3, bidirectional=True, dropout=0.4, training=True)
    if kind != "gru":
        opts["nonlinearity"] = kind
    fn = PF.gru if kind == "gru" else PF.rnn
    torch.manual_seed(7)
    out, h_n = module_call(fn, params, B, x, **opts)
    (out.sum() + h_n.sum()).backward()
    got = {k: (v.grad.clone(), v.grad_sample) for k, v in params.items()}
    for v in params.values():
        v.grad = None
    torch.manual_seed(7)
    ref, ref_h = fn(params, x, **opts)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (ref.sum() + ref_h.sum()).backward()
    for k, v in params.items():
        torch.testing.assert_close(got[k][1].sum(0), v.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[k][0], v.grad, rtol=0, atol=1e-12)


def test_per_example_params_fall_back_to_vmap():
    per_example = [init("gru", 2, True, seed=s) for s in range(3)]
    stacked = {k: torch.stack([p[k] for p in per_example]) for k in per_example[0]}
    x = torch.randn(T, 3, D, dtype=F64)
    h0 = torch.randn(4, 3, H, dtype=F64)
    lengths = torch.tensor([5, 2, 1])
    with _rules.expanded_mode("batch"):
        out, h_n = rec_rule.GRU.batched(stacked, x, h0, lengths, num_layers=2, bidirectional=True)
    for b, p in enumerate(per_example):
        ref, ref_h = PF.gru(p, x[:, b], h0[:, b], num_layers=2, bidirectional=True,
                            lengths=int(lengths[b]))
        torch.testing.assert_close(out[:, b], ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(h_n[:, b], ref_h, rtol=0, atol=1e-12)


def test_errors():
    params = init("gru")
    with pytest.raises(ValueError, match="gru: x has 4 features"):
        per_sample_grads(lambda p, x: PF.gru(p, x)[0].sum(), params,
                         torch.zeros(B, T, D + 1, dtype=F64), method="expanded")
    with pytest.raises(ValueError, match="gru: x holds 2 examples"):
        module_call(PF.gru, {k: v.requires_grad_(True) for k, v in params.items()}, 3,
                    torch.zeros(T, 2, D, dtype=F64))
    two = init("relu", 2)
    with pytest.raises(ValueError, match="rnn: dropout between layers"):
        per_sample_grads(lambda p, x: PF.rnn(p, x, nonlinearity="relu", num_layers=2, dropout=0.5,
                                             training=True)[0].sum(),
                         two, torch.zeros(B, T, D, dtype=F64), method="expanded",
                         randomness="error")
    cell = PF.init_gru_cell(D, H, dtype=F64)
    with pytest.raises(ValueError, match="gru_cell: x holds 2 examples"):
        module_call(PF.gru_cell, {k: v.requires_grad_(True) for k, v in cell.items()}, 3, None,
                    torch.zeros(2, D, dtype=F64))


def test_rule_registration():
    assert _rules.rule_for(PF.gru) is rec_rule._gru
    assert _rules.rule_for(PF.rnn) is rec_rule._rnn
    assert _rules.rule_for(PF.gru_cell) is rec_rule._gru_cell
    assert _rules.rule_for(PF.rnn_cell) is rec_rule._rnn_cell
