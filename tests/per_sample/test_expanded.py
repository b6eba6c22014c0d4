"""The expanded-weight rules for conv, embedding and layer_norm.

Checked against the float64 per-example loop and against ``method="vmap"``, and for the two
defects of BastionLab's implementation: a non-"zeros" padding mode must not run the
convolution twice, and embedding copies are offset by the table size (not the batch size).
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import psgfunc.functional as PF
import psgfunc.nn as pnn
from psgfunc import _rules, per_sample_grads
from psgfunc.dp import clipped_grad_sum
from psgfunc.per_sample.rules import conv as conv_rule
from psgfunc.per_sample.rules import embedding as embedding_rule
from psgfunc.per_sample.rules.conv import ConvWeight, per_sample_conv_weight_grad
from psgfunc.per_sample.rules.embedding import EmbeddingRows, per_sample_embedding_grad
from tests.oracles import assert_tree_close, per_example_grads

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
F64 = torch.float64
CONV = {1: PF.conv1d, 2: PF.conv2d, 3: PF.conv3d}
MODES = ["zeros", "reflect", "replicate", "circular"]


class OpCounter(TorchDispatchMode):
    """Counts aten ops and records every forward convolution's groups and weight shape."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.convs: list[tuple[int, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        if func is torch.ops.aten.convolution.default:
            self.convs.append((args[8], tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def check_both_methods(fn, params, *batch):
    """expanded == oracle == vmap, at float64 tolerance."""
    expected = per_example_grads(fn, params, *batch)
    expanded = per_sample_grads(fn, params, *batch, method="expanded")
    assert_tree_close(expanded, expected, dtype=F64)
    assert_tree_close(expanded, per_sample_grads(fn, params, *batch, method="vmap"), dtype=F64)
    return expanded


def conv_params(dim, cin, cout, kernel, groups=1, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return PF.init_conv(cin, cout, kernel[:dim], groups=groups, bias=bias, dtype=F64, generator=gen)


# ----------------------------------------------------------------------------------- conv

CONV_CASES = [
    {},
    {"stride": 2, "padding": 1},
    {"stride": (2, 1, 3), "padding": (1, 0, 2), "dilation": (1, 2, 1)},
    {"groups": 2, "padding": "same", "dilation": 2},
    {"groups": 4, "padding": "valid"},
    *[{"padding_mode": m, "padding": p} for m in MODES[1:] for p in (1, "same", (2, 1, 0))],
    {"padding_mode": "reflect", "padding": "same", "groups": 2, "dilation": (2, 1, 1)},
]


def cut(opts, dim):
    return {k: (v[:dim] if isinstance(v, tuple) else v) for k, v in opts.items()}


@pytest.fixture(params=["unfold", "grouped"])
def wgrad(request, monkeypatch):
    """Either per-sample weight-gradient contraction (unfold applies to 1-d/2-d, groups=1)."""
    monkeypatch.setattr(conv_rule, "_UNFOLD_MAX", 1 << 40 if request.param == "unfold" else 0)
    return request.param


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("conf", [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 2)), ((1, 3), (2, 0), (2, 1))], ids=str)
@pytest.mark.parametrize("rows", [1, 2])
def test_channels_last_patches_have_the_patch_gram(dim, conf, rows):
    """The ghost norm's patches: features in another order, the same Gram as F.unfold's."""
    stride, padding, dilation = (tuple(c[:dim]) for c in conf)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 3, 4, *(9, 7)[:dim], dtype=F64, generator=gen)  # [N, B, C, *S]
    weight_shape = (5, 4, *(3, 2)[:dim])
    u = conv_rule._patches(x, weight_shape, stride, padding, dilation)
    v = conv_rule._patches_channels_last(x, weight_shape, stride, padding, dilation)
    assert u.shape == v.shape
    torch.testing.assert_close(v @ v.transpose(1, 2), u @ u.transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("opts", CONV_CASES, ids=str)
@pytest.mark.parametrize("rows", [None, 2], ids=["example_CS", "example_NCS"])
def test_conv_rule_matches_oracle_and_vmap(dim, opts, rows, wgrad):
    """Examples shaped [C, *S] and [N, C, *S] (N rows summed into one gradient)."""
    opts = cut(opts, dim)
    params = conv_params(dim, 4, 4, (3, 2, 4), groups=opts.get("groups", 1))
    gen = torch.Generator().manual_seed(1)
    shape = (3, *(() if rows is None else (rows,)), 4, *(7, 6, 5)[:dim])
    x = torch.randn(shape, dtype=F64, generator=gen)
    fn = lambda p, xi: torch.tanh(CONV[dim](p, xi, **opts)).pow(2).sum()  # noqa: E731
    check_both_methods(fn, params, x)


@st.composite
def conv_configs(draw):
    dim = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = draw(st.one_of(st.sampled_from(["same", "valid"]), st.integers(0, 2),
                             st.tuples(*[st.integers(0, 2)] * dim)))
    stride = 1 if padding == "same" else draw(st.tuples(*[st.integers(1, 3)] * dim))
    spatial = tuple(draw(st.integers(max(3, d * (k - 1) + 1), max(3, d * (k - 1) + 1) + 2))
                    for k, d in zip(kernel, dilation))
    return dict(
        dim=dim, groups=groups, kernel=kernel, spatial=spatial,
        cin=groups * draw(st.integers(1, 2)), cout=groups * draw(st.integers(1, 2)),
        bias=draw(st.booleans()), batch=draw(st.integers(1, 4)),
        rows=draw(st.sampled_from([None, 1, 2])),
        kwargs=dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=draw(st.sampled_from(MODES))),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=30, deadline=None)
@given(cfg=conv_configs())
def test_conv_rule_property_grid(cfg):
    dim, kwargs = cfg["dim"], cfg["kwargs"]
    params = conv_params(dim, cfg["cin"], cfg["cout"], cfg["kernel"], groups=cfg["groups"],
                         bias=cfg["bias"], seed=cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    rows = () if cfg["rows"] is None else (cfg["rows"],)
    x = torch.randn(cfg["batch"], *rows, cfg["cin"], *cfg["spatial"], dtype=F64, generator=gen)
    fn = lambda p, xi: torch.sin(CONV[dim](p, xi, **kwargs)).sum()  # noqa: E731
    check_both_methods(fn, params, x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_runs_once_with_the_shared_weight(mode, dim):
    """One convolution per call, padded once, with the [O, C/G, *k] weight and G groups:
    no second convolution for padding modes and no batch-grouped convolution in the forward."""
    params = conv_params(dim, 4, 6, (3, 3, 3), groups=2)
    x = torch.randn(5, 4, *(8, 7, 6)[:dim], dtype=F64)
    opts = dict(padding=1, padding_mode=mode, groups=2)
    fn = lambda p, xi: CONV[dim](p, xi, **opts).sum()  # noqa: E731
    with OpCounter() as counter:
        per_sample_grads(fn, params, x, method="expanded")
    assert counter.convs == [(2, tuple(params["weight"].shape))]
    pads = sum(n for op, n in counter.ops.items() if "pad" in op and "backward" not in op)
    assert pads == (1 if mode in ("reflect", "replicate") else 0)  # circular pads by copies
    # backward: one call for the per-sample weight gradient (x needs no gradient here)
    assert counter.ops["convolution_backward"] == 1

    shell = {1: pnn.Conv1d, 2: pnn.Conv2d, 3: pnn.Conv3d}[dim](
        4, 6, 3, 8, padding=1, padding_mode=mode, groups=2, dtype=F64)
    xs = x.clone().requires_grad_(True)
    with OpCounter() as counter:
        out = shell(xs)
    assert counter.convs == [(2, tuple(shell.weight.shape))]
    with OpCounter() as counter:
        out.sum().backward()
    assert counter.ops["convolution_backward"] == 2  # input grad + per-sample weight grad
    assert counter.ops["convolution"] == 0


def test_per_sample_conv_weight_grad_sums_rows():
    """[N, B, ...] data: the N rows of each example are summed (conv batch = N)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 9, dtype=F64, generator=gen)  # N=3, B=2, C=4
    g = torch.randn(3, 2, 6, 4, dtype=F64, generator=gen)  # O=6, L'=4 (k=3, stride 2)
    gw = per_sample_conv_weight_grad(x, g, (6, 2, 3), (2,), (0,), (1,), 2)
    for b in range(2):
        expected = torch.nn.grad.conv1d_weight(x[:, b], (6, 2, 3), g[:, b], stride=2, groups=2)
        torch.testing.assert_close(gw[b], expected, rtol=1e-12, atol=1e-12)
    kind = ConvWeight((6, 2, 3), 2)
    c = torch.tensor([0.5, -2.0], dtype=F64)
    data = (x, g, ((2,), (0,), (1,)))
    torch.testing.assert_close(kind.materialize(*data), gw)
    torch.testing.assert_close(kind.weighted_sum([data], c), torch.einsum("b,b...->...", c, gw))


@pytest.mark.parametrize("dim", [1, 2])
def test_unfold_and_grouped_weight_grads_agree(dim, monkeypatch):
    """The two contractions of per_sample_conv_weight_grad on ungrouped layers, with rows,
    stride, padding and dilation, against torch's conv weight gradient per example."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, *(11, 9)[:dim], dtype=F64, generator=gen)  # N=3, B=2, C=4
    conf = ((2, 1)[:dim], (1, 0)[:dim], (1, 2)[:dim])  # stride, padding, dilation
    wshape = (5, 4, *(3, 2)[:dim])
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, st, p, d, k in zip(x.shape[3:], *conf, wshape[2:])]
    g = torch.randn(3, 2, 5, *out, dtype=F64, generator=gen)
    results = {}
    for name, limit in (("unfold", 1 << 40), ("grouped", 0)):
        monkeypatch.setattr(conv_rule, "_UNFOLD_MAX", limit)
        results[name] = per_sample_conv_weight_grad(x, g, wshape, *conf, 1)
    weight_grad = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}[dim]
    for b in range(2):
        expected = weight_grad(x[:, b], wshape, g[:, b], stride=conf[0], padding=conf[1], dilation=conf[2])
        for got in results.values():
            torch.testing.assert_close(got[b], expected, rtol=1e-12, atol=1e-12)


def test_conv_fallback_for_params_computed_in_fn(monkeypatch):
    """A weight that fn computes from the params is not a stride-0 view: the generic vmap
    fallback runs (not the rule's shared-weight op) and the result is still exact."""
    calls = Counter()
    original = conv_rule._ConvPerSample.forward

    def counting(*args):
        calls["rule"] += 1
        return original(*args)

    monkeypatch.setattr(conv_rule._ConvPerSample, "forward", staticmethod(counting))
    params = conv_params(2, 3, 4, (3, 3))
    x = torch.randn(4, 3, 6, 6, dtype=F64)

    def fn(p, xi):
        scaled = {"weight": p["weight"] * 1.5, "bias": p["bias"]}
        return torch.tanh(PF.conv2d(scaled, xi, padding=1, padding_mode="circular")).sum()

    check_both_methods(fn, params, x)
    assert calls["rule"] == 0
    check_both_methods(lambda p, xi: torch.tanh(PF.conv2d(p, xi)).sum(), params, x)
    assert calls["rule"] == 1


def test_rules_reach_the_batch_without_the_generic_function_route(monkeypatch):
    """Shared params under our vmap take the direct route (unwrap, rule, wrap); a layer under
    a second vmap inside fn (params batched at the outer level only) takes the generic
    autograd.Function route. Both are exact."""
    from psgfunc.per_sample import _expanded

    calls = Counter()
    original = _expanded._VmapDispatch.vmap
    monkeypatch.setattr(_expanded._VmapDispatch, "vmap",
                        staticmethod(lambda *a: calls.update(["generic"]) or original(*a)))
    gen = torch.Generator().manual_seed(0)
    params = {"weight": torch.randn(3, 4, dtype=F64, generator=gen), "bias": torch.randn(3, dtype=F64, generator=gen)}
    x = torch.randn(5, 6, 4, dtype=F64, generator=gen)  # B = 5 examples of 6 rows
    check_both_methods(lambda p, xi: torch.tanh(PF.linear(p, xi)).sum(), params, x)
    assert calls["generic"] == 0
    check_both_methods(lambda p, xi: torch.func.vmap(lambda r: torch.tanh(PF.linear(p, r)))(xi).sum(), params, x)
    assert calls["generic"] > 0


def test_batch_mode_fallback_with_per_example_params():
    """rule.batched with params that really differ per example (not expanded)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 2, 3, 3, dtype=F64, generator=gen)  # B=3, O=4, C=2
    x = torch.randn(3, 2, 6, 5, dtype=F64, generator=gen)
    with _rules.expanded_mode("batch"):
        out = PF.conv2d({"weight": w}, x, stride=2, padding="valid")
    for b in range(3):
        torch.testing.assert_close(out[b], torch.nn.functional.conv2d(x[b : b + 1], w[b], stride=2)[0])


def test_batch_mode_conv_needs_batch_dim():
    w = torch.zeros(4, 2, 3).expand(5, 4, 2, 3)  # [B, O, C, k], B = 5
    with _rules.expanded_mode("batch"), pytest.raises(ValueError, match="batch dim"):
        PF.conv1d({"weight": w}, torch.zeros(2, 6))
    with _rules.expanded_mode("batch"), pytest.raises(ValueError, match="B = 5"):
        PF.conv1d({"weight": w}, torch.zeros(4, 2, 6))


# ------------------------------------------------------------------------------ embedding


@pytest.mark.parametrize("padding_idx", [None, 0, 3, -1])
@pytest.mark.parametrize("example_shape", [(), (6,), (2, 3)], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_embedding_rule_matches_oracle_and_vmap(padding_idx, example_shape, index_dtype):
    gen = torch.Generator().manual_seed(0)
    params = {"weight": torch.randn(11, 4, dtype=F64, generator=gen)}
    idx = torch.randint(0, 11, (5, *example_shape), generator=gen, dtype=index_dtype)
    idx[0].view(-1)[0] = 10 if padding_idx is None else padding_idx % 11  # padding row is used
    fn = lambda p, i: torch.tanh(PF.embedding(p, i, padding_idx=padding_idx)).pow(2).sum()  # noqa: E731
    grads = check_both_methods(fn, params, idx)
    if padding_idx is not None:
        assert grads["weight"][:, padding_idx].abs().max() == 0


@pytest.mark.parametrize("num_embeddings,batch,max_batch_size", [(5, 3, 16), (40, 7, 8), (7, 7, 7)])
def test_embedding_copies_are_offset_by_table_size(num_embeddings, batch, max_batch_size):
    """Example b's rows go to copy b: offset b * num_embeddings, whatever max_batch_size is
    (offsetting by max_batch_size sends them to other examples' copies when V != it)."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, num_embeddings, (batch, 4), generator=gen)
    idx[:, 0] = num_embeddings - 1  # every example touches the last row
    g = torch.randn(batch, 4, 3, dtype=F64, generator=gen)
    gw = per_sample_embedding_grad(idx, g, num_embeddings, None)
    for b in range(batch):
        expected = torch.zeros(num_embeddings, 3, dtype=F64).index_add_(0, idx[b], g[b])
        assert torch.equal(gw[b], expected)

    shell = pnn.Embedding(num_embeddings, 3, max_batch_size, dtype=F64)
    target = torch.randn(batch, 4, 3, dtype=F64, generator=gen)
    (shell(idx) * target).sum().backward()
    for b in range(batch):
        expected = torch.zeros(num_embeddings, 3, dtype=F64).index_add_(0, idx[b], target[b])
        assert torch.equal(shell.weight.grad_sample[b], expected)


# Gram norm when T <= 16 and T*T < V (100, 5); rows added per distinct index otherwise
@pytest.mark.parametrize("num_embeddings, positions", [(3, 5), (100, 5), (1000, 20)])
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_kind_norms_and_weighted_sum(num_embeddings, positions, padding_idx):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, num_embeddings, (4, positions), generator=gen)
    idx[:, 1] = idx[:, 0]  # repeated rows: both forms must add them before squaring
    idx[:, 3] = 1  # the padding row (when padding_idx is 1) in every example
    g = torch.randn(4, positions, 3, dtype=F64, generator=gen)
    kind = EmbeddingRows(num_embeddings, padding_idx)
    datas = [(idx[:, :2], g[:, :2]), (idx[:, 2:], g[:, 2:])]
    dense = kind.materialize(*datas[0]) + kind.materialize(*datas[1])
    torch.testing.assert_close(kind.norm2(datas), dense.flatten(1).pow(2).sum(1))
    c = torch.rand(4, dtype=F64, generator=gen)
    torch.testing.assert_close(kind.weighted_sum(datas, c), torch.einsum("b,b...->...", c, dense))


def test_batch_mode_embedding_needs_batch_dim():
    w = torch.zeros(4, 3).expand(2, 4, 3)
    with _rules.expanded_mode("batch"), pytest.raises(ValueError, match="batch dim"):
        PF.embedding({"weight": w}, torch.tensor(1))
    with _rules.expanded_mode("batch"), pytest.raises(ValueError, match="outside"):
        PF.embedding({"weight": w}, torch.tensor([1, 4]))


def test_embedding_fallback_for_computed_table(monkeypatch):
    calls = Counter()
    original = embedding_rule._EmbeddingPerSample.forward
    monkeypatch.setattr(embedding_rule._EmbeddingPerSample, "forward",
                        staticmethod(lambda *a: calls.update(["rule"]) or original(*a)))
    params = {"weight": torch.randn(6, 2, dtype=F64)}
    idx = torch.randint(0, 6, (4, 3))
    check_both_methods(lambda p, i: PF.embedding({"weight": p["weight"].exp()}, i).sin().sum(), params, idx)
    assert calls["rule"] == 0
    check_both_methods(lambda p, i: PF.embedding(p, i).sin().sum(), params, idx)
    assert calls["rule"] == 1  # the counter sees the rule when it does run


# ----------------------------------------------------------------------------- layer_norm


@pytest.mark.parametrize("normalized_shape", [(5,), (3, 4)], ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("example_rank", [0, 1, 2])
def test_layer_norm_rule_matches_oracle_and_vmap(normalized_shape, affine, example_rank):
    gen = torch.Generator().manual_seed(0)
    full = {k: torch.randn(normalized_shape, dtype=F64, generator=gen) for k in ("weight", "bias")}
    params = {k: v for k, v in full.items() if affine in (k, "both")}
    x = torch.randn(4, *(2, 3)[:example_rank], *normalized_shape, dtype=F64, generator=gen)
    if not params:  # nothing to differentiate: just the values
        with _rules.expanded_mode("batch"):
            out = PF.layer_norm({}, x, normalized_shape)
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, normalized_shape))
        return
    fn = lambda p, xi: torch.sin(PF.layer_norm(p, xi * 3, normalized_shape, eps=1e-3)).sum()  # noqa: E731
    check_both_methods(fn, params, x)


def test_layer_norm_batch_mode_errors():
    w = torch.ones(4).expand(3, 4)
    with _rules.expanded_mode("batch"), pytest.raises(ValueError, match="batch"):
        PF.layer_norm({"weight": w}, torch.zeros(4), 4)
    with _rules.expanded_mode("batch"), pytest.raises(ValueError, match="3 examples"):
        PF.layer_norm({"weight": w}, torch.zeros(2, 4), 4)


# ------------------------------------------------------------------ fast clipping (kinds)


def test_rules_feed_fast_clipping_without_materialising_fallback():
    """Every rule emits its pieces through psgfunc.per_sample._kinds: fast clipping gets the
    exact clipped sum and norms, with no 'materialised' warning."""
    gen = torch.Generator().manual_seed(0)
    params = {
        "conv": conv_params(2, 2, 4, (3, 3), groups=2),
        "emb": {"weight": torch.randn(30, 6, dtype=F64, generator=gen)},
        "ln": {"weight": torch.randn(6, dtype=F64, generator=gen),
               "bias": torch.randn(6, dtype=F64, generator=gen)},
    }
    x = torch.randn(5, 2, 6, 6, dtype=F64, generator=gen)
    idx = torch.randint(0, 30, (5, 4), generator=gen)

    def fn(p, xi, ii):
        h = PF.conv2d(p["conv"], xi, padding="same", padding_mode="reflect", groups=2)
        h = PF.layer_norm(p["ln"], torch.tanh(h).mean(0), 6)  # [6, 6] rows
        e = PF.embedding(p["emb"], ii, padding_idx=2)  # [4, 6]
        return torch.tanh(h).sum() + (PF.layer_norm(p["ln"], e, 6) * h[:4]).sum()

    expected = per_example_grads(fn, params, x, idx)
    leaves = [v.flatten(1) for v in torch.utils._pytree.tree_leaves(expected)]
    norms = torch.cat(leaves, dim=1).norm(dim=1)
    max_norm = float(norms.median())
    factors = (max_norm / norms).clamp(max=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summed, got_norms = clipped_grad_sum(fn, params, x, idx, max_norm=max_norm, method="fast")
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    clipped = torch.utils._pytree.tree_map(lambda g: torch.einsum("b,b...->...", factors, g), expected)
    assert_tree_close(summed, clipped, dtype=F64)


def _in_place_case(name: str) -> tuple[dict, object, torch.Tensor]:
    """``(params, batched layer, x)`` of a layer whose backward reads a weight it keeps on
    ``ctx`` by identity (not saved), float64."""
    gen = torch.Generator().manual_seed(0)

    def init(params: dict) -> dict:
        return {k: v.to(torch.float64).requires_grad_() for k, v in params.items()}

    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    if name == "linear":
        return init(PF.init_linear(5, 3, generator=gen)), PF.linear, x
    if name in ("lstm", "lstm_fused"):
        return init(PF.init_lstm(5, 3, generator=gen)), (lambda p, x: PF.lstm(p, x, batch_first=True)[0]), x
    if name == "gru":
        return init(PF.init_gru(5, 3, generator=gen)), (lambda p, x: PF.gru(p, x, batch_first=True)[0]), x
    if name == "group_norm":
        params = {"weight": torch.rand(4, generator=gen).add(0.5), "bias": torch.randn(4, generator=gen)}
        return init(params), (lambda p, x: PF.group_norm(p, x, 2)), x  # one native_group_norm
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "lstm", "lstm_fused", "gru", "group_norm"])
def test_a_weight_changed_in_place_before_the_backward_raises(name, monkeypatch):
    """Reproducer: ``y = pnn.Linear(...)(x); weight.mul_(2) (no_grad); y.sum().backward()``
    gave ``x.grad`` from the doubled weight, silently (the rule keeps the weight on ``ctx``
    by identity, so autograd's saved-tensor version check never ran); ``torch.nn.Linear``
    raises. Every rule whose backward reads a parameter it did not save checks its version."""
    from psgfunc.per_sample import _expanded
    from psgfunc.per_sample.rules import lstm as lstm_rule

    monkeypatch.setattr(lstm_rule, "_FUSED_WITH_GRAD", name == "lstm_fused")
    params, layer, x = _in_place_case(name)
    y = _expanded.module_call(layer, params, x.shape[0], x)
    y.square().sum().backward(retain_graph=True)  # unchanged: as before
    with torch.no_grad():
        for p in params.values():
            p.mul_(2)
    with pytest.raises(RuntimeError, match="modified (in place|by an inplace)"):
        y.square().sum().backward()
