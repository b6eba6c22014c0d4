"""Mixed precision: ``torch.autocast("cpu", dtype=torch.bfloat16)`` on every route.

Per-sample gradients (expanded and vmap methods, the shells' ``grad_sample``), clipped sums
(fast and materialised, eager and compiled) and a whole DPOptimizer step, for each layer
family and models mixing them, against the float64 per-example loop: autocast leaves float64
alone, so the loop of the same ``fn`` is an exact reference. Results must be float32 (the
parameters' dtype), whatever ran in bfloat16.
"""

from __future__ import annotations

import copy

import optree
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import psgfunc as pf
import psgfunc.dp as dp
import psgfunc.functional as PF
import psgfunc.nn as pnn
from psgfunc.per_sample._clip import grad_pieces
from tests.oracles import assert_tree_close, per_example_grads, to_float64

BF16_RTOL = 2e-2
"""Relative error allowed under bfloat16 autocast, ``||actual - exact|| / ||exact||`` per
leaf (all examples together). bfloat16 keeps 8 significant bits (unit roundoff 2^-9, about
2e-3); the inputs and weights of every matmul are rounded to it, and so are the activations
and output gradients between layers, so a few layers deep the gradients carry relative errors
of a few 1e-3, each rounding adding at most one unit. 2e-2 leaves room for about ten such
roundings in a row; a dtype mistake (a gradient that skipped a layer's cast, a piece in the
wrong dtype, float16 overflow) is far outside it."""


def amp():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def assert_bf16_close(actual, expected, what="", scale=None):
    """Leaves of ``actual`` are float32 and within :data:`BF16_RTOL` of ``expected``,
    relative to the norm of ``expected``'s leaf or of ``scale``'s (for sums, whose terms'
    rounding does not shrink when they cancel: the norm of the terms)."""
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    s_leaves = e_leaves if scale is None else optree.tree_leaves(scale)
    assert a_spec == e_spec, f"{what}: structures differ"
    for i, (a, e, s) in enumerate(zip(a_leaves, e_leaves, s_leaves)):
        assert a.dtype == torch.float32, f"{what} leaf {i}: dtype {a.dtype}, expected float32"
        assert a.shape == e.shape, f"{what} leaf {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        err = float(torch.linalg.vector_norm(a.double() - e.double()))
        ref = float(torch.linalg.vector_norm(s.double()))
        assert err <= BF16_RTOL * ref, f"{what} leaf {i}: relative error {err / ref:.3g} > {BF16_RTOL}"


def oracle_clipped(exact, max_norm):
    """``(sum_b min(1, C / ||g_b||) g_b, norms, the clipped terms [B, *shape])`` from float64
    per-sample gradients."""
    leaves = optree.tree_leaves(exact)
    norms = sum(leaf.flatten(1).square().sum(1) for leaf in leaves).sqrt()
    factor = max_norm / norms.clamp_min(max_norm)
    terms = optree.tree_map(lambda g: factor.reshape(-1, *[1] * (g.dim() - 1)) * g, exact)
    return optree.tree_map(lambda t: t.sum(0), terms), norms, terms


# --------------------------------------------------------------- the functional layers

def _gen():
    return torch.Generator().manual_seed(0)


def _head(g, d):
    return PF.init_linear(d, 3, generator=g)


def case_linear_seq():
    g = _gen()
    params = {"a": PF.init_linear(8, 16, generator=g), "b": _head(g, 16)}

    def fn(p, x, y):  # x [T, 8]: a sequence per example
        with amp():
            out = PF.linear(p["b"], torch.tanh(PF.linear(p["a"], x)))
        return F.cross_entropy(out.float(), y, reduction="sum")

    return fn, params, (torch.randn(5, 4, 8, generator=g), torch.randint(0, 3, (5, 4), generator=g))


def case_contract():
    """Plain ``einsum`` and ``addmm`` on parameters (GPT-2's ``Conv1D``): the contraction rule."""
    g = _gen()
    params = {"w": torch.randn(8, 16, generator=g) / 3, "bias": torch.randn(16, generator=g) / 3,
              "h": torch.randn(16, 3, generator=g) / 4}

    def fn(p, x, y):  # x [T, 8]
        with amp():
            h = torch.tanh(torch.addmm(p["bias"], x, p["w"]))
            out = torch.einsum("ti,io->to", h, p["h"])
        return F.cross_entropy(out.float(), y, reduction="sum")

    return fn, params, (torch.randn(5, 4, 8, generator=g), torch.randint(0, 3, (5, 4), generator=g))


def case_conv1d():
    g = _gen()
    params = {"c": PF.init_conv(4, 6, (3,), generator=g), "b": _head(g, 6 * 8)}

    def fn(p, x, y):  # x [C, L]
        with amp():
            h = torch.relu(PF.conv1d(p["c"], x, padding=1))
            out = PF.linear(p["b"], h.flatten())
        return F.cross_entropy(out.float(), y)

    return fn, params, (torch.randn(5, 4, 8, generator=g), torch.randint(0, 3, (5,), generator=g))


def case_conv2d():
    g = _gen()
    params = {"c": PF.init_conv(4, 6, (3, 3), groups=2, generator=g), "b": _head(g, 6 * 9)}

    def fn(p, x, y):  # x [C, H, W]
        with amp():
            h = torch.tanh(PF.conv2d(p["c"], x, stride=2, padding=1, groups=2))
            out = PF.linear(p["b"], h.flatten())
        return F.cross_entropy(out.float(), y)

    return fn, params, (torch.randn(5, 4, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g))


def case_embedding():
    g = _gen()
    params = {"e": PF.init_embedding(20, 8, generator=g), "b": _head(g, 8)}

    def fn(p, idx, y):  # idx [T]; embedding runs in the table's dtype under autocast
        with amp():
            out = PF.linear(p["b"], PF.embedding(p["e"], idx, padding_idx=0).mean(0))
        return F.cross_entropy(out.float(), y)

    idx = torch.randint(0, 20, (5, 6), generator=g)
    idx[0, :2] = 0  # padding rows get no gradient
    idx[1, 1] = idx[1, 0]  # an index used twice in one example
    return fn, params, (idx, torch.randint(0, 3, (5,), generator=g))


def case_layer_norm():
    g = _gen()
    params = {"a": PF.init_linear(8, 8, generator=g), "n": PF.init_layer_norm(8), "b": _head(g, 8)}
    params["n"] = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in params["n"].items()}

    def fn(p, x, y):  # x [T, 8]; layer_norm runs in float32 under autocast
        with amp():
            h = PF.layer_norm(p["n"], PF.linear(p["a"], x), 8)
            out = PF.linear(p["b"], h.mean(0))
        return F.cross_entropy(out.float(), y)

    return fn, params, (torch.randn(5, 4, 8, generator=g), torch.randint(0, 3, (5,), generator=g))


def case_lstm():
    g = _gen()
    params = {"r": PF.init_lstm(6, 8, num_layers=2, bidirectional=True, generator=g), "b": _head(g, 16)}

    def fn(p, x, y):  # x [T, 6]
        with amp():
            out, _ = PF.lstm(p["r"], x, num_layers=2, bidirectional=True)
            logits = PF.linear(p["b"], out[-1])
        return F.cross_entropy(logits.float(), y)

    return fn, params, (torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4,), generator=g))


def case_lstm_cell():
    g = _gen()
    params = {"c": PF.init_lstm_cell(6, 8, generator=g), "b": _head(g, 8)}

    def fn(p, x, y):  # x [T, 6]: the cell in a loop, its carry stays float32
        carry = None
        with amp():
            for t in range(x.shape[0]):
                carry, h = PF.lstm_cell(p["c"], carry, x[t])
            assert carry[1].dtype == x.dtype
            logits = PF.linear(p["b"], h)
        return F.cross_entropy(logits.float(), y)

    return fn, params, (torch.randn(4, 3, 6, generator=g), torch.randint(0, 3, (4,), generator=g))


def case_lstm_lengths():
    g = _gen()
    params = {"r": PF.init_lstm(6, 8, generator=g)}

    def fn(p, x, n, h0, c0):  # padded steps and a float32 initial state
        with amp():
            _, (h, c) = PF.lstm(p["r"], x, (h0, c0), lengths=n)
        return h.float().square().sum() + c.float().sum()

    x = torch.randn(4, 5, 6, generator=g)
    return fn, params, (x, torch.tensor([5, 3, 1, 4]), torch.randn(4, 1, 8, generator=g), torch.randn(4, 1, 8, generator=g))


def case_conv3d():
    g = _gen()
    params = {"a": PF.init_conv(2, 3, (3, 3), generator=g), "b": PF.init_conv(3, 2, (2, 2, 2), generator=g)}

    def fn(p, x):  # x [C, H, W]; "same" reflect padding, then a 3-d conv over the channels
        with amp():
            h = torch.tanh(PF.conv2d(p["a"], x, padding="same", padding_mode="reflect"))
            out = PF.conv3d(p["b"], h.unsqueeze(1), padding=1)
        return out.float().square().sum()

    return fn, params, (torch.randn(3, 2, 5, 5, generator=g),)


def case_tied():
    g = _gen()
    params = {"e": PF.init_embedding(10, 8, generator=g), "a": PF.init_linear(8, 8, generator=g)}

    def fn(p, idx, y):  # a linear applied twice, the embedding table as the output head
        with amp():
            h = PF.embedding(p["e"], idx).mean(0)
            h = torch.tanh(PF.linear(p["a"], PF.linear(p["a"], h)))
            logits = PF.linear({"weight": p["e"]["weight"]}, h)
        return F.cross_entropy(logits.float(), y)

    return fn, params, (torch.randint(0, 10, (4, 3), generator=g), torch.randint(0, 10, (4,), generator=g))


def case_mixed():
    g = _gen()
    params = {
        "e": PF.init_embedding(30, 8, generator=g),
        "c": PF.init_conv(8, 8, (3,), generator=g),
        "r": PF.init_lstm(8, 8, generator=g),
        "n": PF.init_layer_norm(8),
        "b": _head(g, 8),
    }

    def fn(p, idx, y):  # idx [T]
        with amp():
            h = PF.embedding(p["e"], idx)  # [T, 8]
            h = torch.tanh(PF.conv1d(p["c"], h.t(), padding=1)).t()  # over time
            out, _ = PF.lstm(p["r"], h)
            logits = PF.linear(p["b"], PF.layer_norm(p["n"], out, 8).mean(0))
        return F.cross_entropy(logits.float(), y)

    return fn, params, (torch.randint(0, 30, (5, 6), generator=g), torch.randint(0, 3, (5,), generator=g))


CASES = {
    f.__name__[5:]: f
    for f in (case_linear_seq, case_contract, case_conv1d, case_conv2d, case_conv3d, case_embedding, case_layer_norm,
              case_lstm, case_lstm_lengths, case_lstm_cell, case_tied, case_mixed)
}


@pytest.mark.parametrize("name", list(CASES))
def test_functional_routes_match_float64_loop(name):
    fn, params, batch = CASES[name]()
    exact = per_example_grads(fn, params, *batch)
    for method in ("expanded", "vmap"):
        got = pf.per_sample_grads(fn, params, *batch, method=method)
        assert_bf16_close(got, exact, f"{name} {method}")
    max_norm = 0.5 * float(oracle_clipped(exact, 1.0)[1].median())  # most examples are clipped
    sums_exact, norms_exact, terms = oracle_clipped(exact, max_norm)
    results = {}
    for method in ("fast", "materialize"):
        summed, norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=max_norm, method=method)
        assert norms.dtype == torch.float32, f"{name} {method}: norms in {norms.dtype}"
        assert_bf16_close(norms, norms_exact, f"{name} {method} norms")
        assert_bf16_close(summed, sums_exact, f"{name} {method} sum", terms)
        results[method] = summed
    assert_bf16_close(results["fast"], results["materialize"], f"{name} fast vs materialize", terms)


@pytest.mark.parametrize("size", [0, 1])
def test_small_batches(size):
    fn, params, batch = case_mixed()
    batch = tuple(b[:size] for b in batch)
    exact = per_example_grads(fn, params, *batch)
    for method in ("expanded", "vmap"):
        got = pf.per_sample_grads(fn, params, *batch, method=method)
        assert_bf16_close(got, exact, f"B={size} {method}")
    summed, norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=0.3)
    assert norms.dtype == torch.float32 and norms.shape == (size,)
    assert_bf16_close(summed, oracle_clipped(exact, 0.3)[0], f"B={size} sum")


def test_float64_params_are_left_alone():
    """Autocast does not touch float64: the rules compute exactly as without it."""
    fn, params, batch = case_mixed()
    exact = per_example_grads(fn, params, *batch)
    for method in ("expanded", "vmap"):
        got = pf.per_sample_grads(fn, to_float64(params), *to_float64(batch), method=method)
        assert_tree_close(got, exact)


def test_clipping_inside_an_autocast_block():
    """The whole call inside the caller's autocast block: the forward runs in bfloat16, but
    norms and clipped sums are not computed in it (float32 results, same accuracy)."""
    g = _gen()
    params = {"a": PF.init_linear(8, 16, generator=g), "b": _head(g, 16)}

    def fn(p, x, y):  # no autocast of its own
        return F.cross_entropy(PF.linear(p["b"], torch.tanh(PF.linear(p["a"], x))).float(), y, reduction="sum")

    batch = (torch.randn(5, 4, 8, generator=g), torch.randint(0, 3, (5, 4), generator=g))
    exact = per_example_grads(fn, params, *batch)
    sums_exact, norms_exact, terms = oracle_clipped(exact, 0.3)
    for method in ("fast", "materialize"):
        with amp():
            summed, norms = dp.clipped_grad_sum(fn, params, *batch, max_norm=0.3, method=method)
        assert_bf16_close(norms, norms_exact, f"{method} norms")
        assert_bf16_close(summed, sums_exact, f"{method} sum", terms)


def test_recorded_pieces_are_float32_and_shared():
    """Fast clipping records the bfloat16 pieces in the parameters' dtype, one cast per tensor:
    a linear layer's weight and bias share their output-gradient piece, as without autocast."""
    fn, params, batch = case_linear_seq()
    pieces = grad_pieces(fn, params, *batch)
    bias, weight = pieces.leaves[0], pieces.leaves[1]  # params["a"], in optree order
    assert weight.kind is not None and bias.kind is not None  # norms from pieces, nothing built
    g_bias, g_weight = bias.datas[0][0], weight.datas[0][0]
    assert g_weight is g_bias and g_weight.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:psgfunc fast clipping")  # lengths, lstm_cell: no tap
@pytest.mark.parametrize("name", list(CASES))
def test_tapped_route_under_autocast(name):
    """compiled_clipped_grad_sum's route (layer outputs tapped, pieces from one vmap(grad)),
    run eagerly here (compile disabled); the compiled graph is checked once below."""
    fn, params, batch = CASES[name]()
    exact = per_example_grads(fn, params, *batch)
    sums_exact, norms_exact, terms = oracle_clipped(exact, 0.3)
    summed, norms = dp.compiled_clipped_grad_sum(fn, 0.3, disable=True)(params, *batch)
    assert norms.dtype == torch.float32
    assert_bf16_close(norms, norms_exact, f"{name} tapped norms")
    assert_bf16_close(summed, sums_exact, f"{name} tapped sum", terms)


def test_compiled_clipped_sum_under_autocast():
    fn, params, batch = case_linear_seq()
    exact = per_example_grads(fn, params, *batch)
    sums_exact, norms_exact, terms = oracle_clipped(exact, 0.3)
    summed, norms = dp.compiled_clipped_grad_sum(fn, 0.3, backend="eager")(params, *batch)
    assert norms.dtype == torch.float32
    assert_bf16_close(norms, norms_exact, "compiled norms")
    assert_bf16_close(summed, sums_exact, "compiled sum", terms)


# --------------------------------------------------------------------- the module path

class Mixed(nn.Module):
    """Embedding, Conv1d over time, LSTM, LayerNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):  # [B, T]
        h = torch.relu(self.conv(self.emb(idx).transpose(1, 2))).transpose(1, 2)
        out, _ = self.lstm(h)
        return self.head(self.norm(out).mean(1))


class CNN(nn.Module):
    """Conv2d, then a Conv3d over the channels as depth, then LayerNorm and Linear."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(2, 4, 3, padding=1)
        self.c3 = nn.Conv3d(1, 2, (2, 3, 3))
        self.norm = nn.LayerNorm(2 * 3 * 4 * 4)
        self.head = nn.Linear(2 * 3 * 4 * 4, 3)

    def forward(self, x):  # [B, 2, 6, 6]
        h = torch.tanh(self.c2(x)).unsqueeze(1)  # [B, 1, 4, 6, 6]
        return self.head(self.norm(torch.relu(self.c3(h)).flatten(1)))


class Contract(nn.Module):
    """GPT-2's ``Conv1D`` (``addmm`` with a ``[I, O]`` weight) and an ``einsum`` head: plain
    ops on parameters, served by the contraction rule."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) / 3)
        self.bias = nn.Parameter(torch.randn(16) / 3)
        self.head = nn.Parameter(torch.randn(16, 3) / 4)

    def forward(self, x):  # [B, T, 8]
        h = torch.addmm(self.bias, x.reshape(-1, 8), self.weight).view(*x.shape[:-1], 16)
        return torch.einsum("bti,io->bto", torch.tanh(h), self.head)


MODELS = {
    "contract": (Contract, lambda g: torch.randn(4, 5, 8, generator=g), lambda g: torch.randint(0, 3, (4, 5), generator=g)),
    "mlp_seq": (lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)),
                lambda g: torch.randn(4, 5, 8, generator=g), lambda g: torch.randint(0, 3, (4, 5), generator=g)),
    "cnn": (CNN, lambda g: torch.randn(4, 2, 6, 6, generator=g), lambda g: torch.randint(0, 3, (4,), generator=g)),
    "mixed": (Mixed, lambda g: torch.randint(0, 30, (4, 6), generator=g),
              lambda g: torch.randint(0, 3, (4,), generator=g)),
}


def _loss(out, y):
    return F.cross_entropy(out.float().reshape(-1, 3), y.reshape(-1), reduction="sum")


def _model(name):
    torch.manual_seed(0)
    make, make_x, make_y = MODELS[name]
    g = _gen()
    model = make()
    exact_model = copy.deepcopy(model).double()
    x, y = make_x(g), make_y(g)

    def fn(p, xe, ye):
        return _loss(torch.func.functional_call(exact_model, p, (xe.unsqueeze(0),)), ye.unsqueeze(0))

    params = {k: v.detach().double() for k, v in model.named_parameters()}
    exact = per_example_grads(fn, params, x, y)
    return pnn.expand_weights(model, 8), x, y, exact


@pytest.mark.parametrize("name", list(MODELS))
def test_module_grad_sample_and_dp_steps(name):
    model, x, y, exact = _model(name)
    with amp():
        out = model(x)
    _loss(out, y).backward()
    got = {k: p.grad_sample for k, p in model.named_parameters()}
    assert_bf16_close(got, exact, f"{name} grad_sample")
    pnn.zero_grad(model)

    max_norm = 0.5 * float(oracle_clipped(exact, 1.0)[1].median())
    sums_exact, _, terms = oracle_clipped(exact, max_norm)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    for fast in (False, True):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(start[k])
        opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=max_norm,
                             noise_multiplier=0.0, expected_batch_size=len(x), fast_clipping=fast)
        with amp():  # the whole step inside the block (torch advises the forward only)
            _loss(model(x), y).backward()
            norms = opt.accumulate()
            opt.step()
        assert norms.dtype == torch.float32
        opt.zero_grad()
        steps = {k: (start[k] - p.detach()) * len(x) for k, p in model.named_parameters()}
        assert_bf16_close(steps, sums_exact, f"{name} DPOptimizer fast_clipping={fast}", terms)
        for p in model.parameters():
            p.__dict__.pop("_psg_pieces", None)
        assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("fast", [False, True])
def test_dp_optimizer_step_inside_an_autocast_block(fast):
    """accumulate() inside the block computes exactly what it computes outside it."""
    model, x, y, _ = _model("mlp_seq")
    results = []
    for inside in (False, True):
        opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=0.1,
                             noise_multiplier=0.0, expected_batch_size=len(x), fast_clipping=fast)
        with amp():
            _loss(model(x), y).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            norms = opt.accumulate()
        results.append((norms, [s.clone() for s in opt._summed]))
        opt.zero_grad()
        opt._summed = None
    (n0, s0), (n1, s1) = results
    torch.testing.assert_close(n1, n0, rtol=1e-6, atol=0)
    for a, b in zip(s1, s0):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_dplstm_shell_under_autocast():
    torch.manual_seed(0)
    lstm = pnn.DPLSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True, max_batch_size=4)
    ref = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True).double()
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 5, 6)

    def fn(p, xe):
        out, _ = torch.func.functional_call(ref, p, (xe.unsqueeze(0),))
        return out[:, -1].sum()

    exact = per_example_grads(fn, {k: v.detach().double() for k, v in ref.named_parameters()}, x)
    with amp():
        out, (h, c) = lstm(x)
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16  # as nn.LSTM under CPU autocast
    out[:, -1].float().sum().backward()
    assert_bf16_close({k: p.grad_sample for k, p in lstm.named_parameters()}, exact, "DPLSTM")
