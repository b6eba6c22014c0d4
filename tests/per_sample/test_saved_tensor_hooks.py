"""Fast clipping under ``torch.autograd.graph.saved_tensors_hooks`` (checkpointing, activation
offloading, any pack/unpack hook): a rule must find its parameter's recorder on the expanded
param it keeps by identity, never on a tensor from ``ctx.saved_tensors`` (unpacked, that is
another object, without it), else the leaf is materialised with a warning. Every layer family
with a rule, in float64, against ``method="materialize"`` and the vmap method at 1e-10."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import optree
import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

import psgfunc.functional as PF
import psgfunc.nn as pnn
from psgfunc import dp
from psgfunc.dp import clipped_grad_sum
from psgfunc.per_sample import per_sample_grads
from psgfunc.per_sample._clip import grad_pieces
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _f64(params: dict) -> dict:
    return optree.tree_map(lambda t: t.to(F64), params)


def _weights(shape: tuple[int, ...]) -> torch.Tensor:
    """Fixed, non-uniform output weights (so no parameter's gradient vanishes by symmetry)."""
    return torch.linspace(-1.0, 2.0, int(torch.tensor(shape).prod())).reshape(shape).to(F64)


def _case(name: str, size: int) -> tuple[dict, object, tuple]:
    """``(params, fn(params, *example) -> loss, batch)`` for one layer family, float64."""
    gen = _gen(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(size, *shape, generator=gen, dtype=F64)

    def ints(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, (size, *shape), generator=gen)

    if name == "linear":
        return _f64(PF.init_linear(4, 3, generator=gen)), lambda p, x: PF.linear(p, x).square().sum(), (randn(5, 4),)
    if name == "linear_twice":  # one weight used twice: its pieces are combined
        def twice(p, x):
            return PF.linear(p, torch.tanh(PF.linear(p, x))).square().sum()
        return _f64(PF.init_linear(4, 4, generator=gen)), twice, (randn(5, 4),)
    if name == "conv1d":
        return (_f64(PF.init_conv(2, 3, (3,), generator=gen)),
                lambda p, x: PF.conv1d(p, x, padding=1).square().sum(), (randn(2, 6),))
    if name == "conv2d_groups":
        return (_f64(PF.init_conv(2, 4, (3, 2), groups=2, generator=gen)),
                lambda p, x: PF.conv2d(p, x, groups=2, stride=(1, 2)).square().sum(), (randn(2, 5, 5),))
    if name == "conv3d":
        return (_f64(PF.init_conv(2, 3, (2, 2, 2), generator=gen)),
                lambda p, x: PF.conv3d(p, x).square().sum(), (randn(2, 3, 3, 3),))
    if name == "conv_transpose2d":
        return (_f64(PF.init_conv_transpose(2, 3, (3, 3), stride=2, generator=gen)),
                lambda p, x: PF.conv_transpose2d(p, x, stride=2).square().sum(), (randn(2, 3, 3),))
    if name == "layer_norm":
        return (_f64(PF.init_layer_norm(4)) | {"weight": 1 + randn(4)[0] / 4, "bias": randn(4)[0]},
                lambda p, x: (PF.layer_norm(p, x, 4) * _weights((4,))).square().sum(), (randn(5, 4),))
    if name == "group_norm":  # weight and bias: one native_group_norm
        return ({"weight": 1 + randn(4)[0] / 4, "bias": randn(4)[0]},
                lambda p, x: (PF.group_norm(p, x.unsqueeze(0), 2) * _weights((4, 1))).square().sum(),
                (randn(4, 5),))
    if name == "group_norm_weight_only":  # the normalisation, then the shared affine step
        return ({"weight": 1 + randn(4)[0] / 4},
                lambda p, x: (PF.group_norm(p, x.unsqueeze(0), 2) * _weights((4, 1))).square().sum(),
                (randn(4, 5),))
    if name == "group_norm_bias_only":
        return ({"bias": randn(4)[0]},
                lambda p, x: (PF.group_norm(p, x.unsqueeze(0), 2) * _weights((4, 1))).square().sum(),
                (randn(4, 5),))
    if name == "instance_norm":
        return ({"weight": 1 + randn(4)[0] / 4, "bias": randn(4)[0]},
                lambda p, x: (PF.instance_norm(p, x.unsqueeze(0)) * _weights((4, 1))).square().sum(),
                (randn(4, 5),))
    if name == "rms_norm":
        return ({"weight": 1 + randn(4)[0] / 4},
                lambda p, x: (PF.rms_norm(p, x, 4) * _weights((4,))).square().sum(), (randn(5, 4),))
    if name == "embedding":
        return (_f64(PF.init_embedding(10, 4, padding_idx=2, generator=gen)),
                lambda p, i: PF.embedding(p, i, padding_idx=2).square().sum(), (ints(10, 5),))
    if name == "embedding_bag_max":  # the backward looks rows up in the shared table
        return (_f64(PF.init_embedding_bag(10, 4, mode="max", generator=gen)),
                lambda p, i: PF.embedding_bag(p, i, mode="max").square().sum(), (ints(10, 2, 3),))
    if name == "embedding_bag_weighted":
        return (_f64(PF.init_embedding_bag(10, 4, mode="sum", generator=gen)),
                lambda p, i, w: PF.embedding_bag(p, i, mode="sum", per_sample_weights=w).square().sum(),
                (ints(10, 2, 3), randn(2, 3)))
    if name == "lstm":
        return (_f64(PF.init_lstm(3, 4, generator=gen)),
                lambda p, x: PF.lstm(p, x)[0].square().sum(), (randn(5, 3),))
    if name == "gru":
        return _f64(PF.init_gru(3, 4, generator=gen)), lambda p, x: PF.gru(p, x)[0].square().sum(), (randn(5, 3),)
    if name == "rnn":
        return _f64(PF.init_rnn(3, 4, generator=gen)), lambda p, x: PF.rnn(p, x)[0].square().sum(), (randn(5, 3),)
    if name == "multi_head_attention":
        params = _f64(PF.init_multi_head_attention(4, 2, add_bias_kv=True, generator=gen))
        params = optree.tree_map(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen, dtype=F64), params)

        def mha(p, x):
            return PF.multi_head_attention(p, x, x, x, 2)[0].square().sum()
        return params, mha, (randn(5, 4),)
    if name == "contraction":  # a parameter operand of torch.einsum / matmul: the contraction rule
        params = {"w": torch.randn(3, 4, generator=gen, dtype=F64), "u": torch.randn(3, 2, generator=gen, dtype=F64)}
        return params, lambda p, x: (torch.einsum("ti,oi->to", x, p["w"]) @ p["u"]).square().sum(), (randn(5, 4),)
    raise AssertionError(name)


CASES = [
    "linear", "linear_twice", "conv1d", "conv2d_groups", "conv3d", "conv_transpose2d", "layer_norm",
    "group_norm", "group_norm_weight_only", "group_norm_bias_only", "instance_norm", "rms_norm",
    "embedding", "embedding_bag_max", "embedding_bag_weighted", "lstm", "gru", "rnn",
    "multi_head_attention", "contraction",
]


def _clone_hooks() -> contextlib.AbstractContextManager:
    """Pack and unpack both copy: every unpacked saved tensor is a new object."""
    return saved_tensors_hooks(lambda t: t.clone(), lambda t: t.clone())


def _identity_hooks() -> contextlib.AbstractContextManager:
    return saved_tensors_hooks(lambda t: t, lambda t: t)


@pytest.mark.parametrize("name", CASES)
def test_fast_clipping_under_saved_tensor_hooks_records_every_leaf(name):
    for size in (3, 1):
        params, fn, batch = _case(name, size)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "materialised" fallback warning
            with _clone_hooks():
                pieces = grad_pieces(fn, params, *batch)
            assert pieces.materialized == []
            ref, ref_norms = clipped_grad_sum(fn, params, *batch, max_norm=0.5, method="materialize")
            for hooks in (_clone_hooks, _identity_hooks):
                with hooks():
                    got, norms = clipped_grad_sum(fn, params, *batch, max_norm=0.5, method="fast")
                assert_tree_close(got, ref, rtol=1e-10)
                torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", CASES)
# torch's vmap of embedding_bag (the reference here) loops per example and says so
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_expanded_method_under_saved_tensor_hooks_equals_vmap(name):
    params, fn, batch = _case(name, 3)
    expected = per_sample_grads(fn, params, *batch, method="vmap")
    with _clone_hooks():
        got = per_sample_grads(fn, params, *batch, method="expanded")
    assert_tree_close(got, expected, rtol=1e-10)
    assert_tree_close(got, per_example_grads(fn, params, *batch), rtol=1e-10)


class _Blocks(nn.Module):
    """Conv, GroupNorm, Linear, LayerNorm, Embedding and a head; ``route="checkpoint"`` runs
    the blocks under ``torch.utils.checkpoint`` (saved tensors come back recomputed)."""

    def __init__(self, route: str):
        super().__init__()
        self.route = route
        self.block = nn.Sequential(
            nn.Conv1d(2, 4, 3, dtype=F64), nn.GroupNorm(2, 4, dtype=F64), nn.Tanh(), nn.Flatten(),
            nn.Linear(16, 6, dtype=F64), nn.LayerNorm(6, dtype=F64),
        )
        self.emb = nn.Embedding(10, 6, dtype=F64)
        self.head = nn.Linear(6, 2, dtype=F64)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.route == "checkpoint":
            h = checkpoint(self.block, x, use_reentrant=False)
            h = h + checkpoint(self.emb, idx, use_reentrant=False).sum(1)
        else:
            h = self.block(x) + self.emb(idx).sum(1)
        return self.head(h)


@pytest.mark.parametrize("route", ["offload", "checkpoint"])
def test_dp_optimizer_fast_path_under_saved_tensor_hooks(route):
    """The shells' route (DPOptimizer(fast_clipping=True)) under a copying pack/unpack hook
    (as activation offloading) and under torch.utils.checkpoint: pieces recorded, no dense
    grad_sample (before the fix: the weights were materialised, silently), the same norms
    and step as the per-example loop."""
    torch.manual_seed(0)
    size = 3
    model = _Blocks(route)
    x, idx = torch.randn(size, 2, 6, dtype=F64), torch.randint(0, 10, (size, 4))

    def loss_of(p, xe, ie):
        return torch.func.functional_call(model, p, (xe.unsqueeze(0), ie.unsqueeze(0))).square().sum()

    expected = per_example_grads(loss_of, {k: p.detach() for k, p in model.named_parameters()}, x, idx)
    norms = dp.per_sample_norms(expected)
    c = float(norms.median())
    clipped = optree.tree_map(lambda g: g.sum(0), dp.clip(expected, c))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    pnn.expand_weights(model, size)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=c, noise_multiplier=0.0,
                         expected_batch_size=size, fast_clipping=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _clone_hooks() if route == "offload" else contextlib.nullcontext():
            model(x, idx).square().sum().backward()
        assert [k for k, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None] == []
        got = opt.accumulate()
    torch.testing.assert_close(got, norms, rtol=1e-10, atol=0)
    opt.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - 0.5 * clipped[k] / size, rtol=1e-10, atol=1e-13)


def test_offloading_hook_packs_no_expanded_table():
    """An embedding's backward reads no table values (nor embedding_bag's, but for max and
    per_sample_weights): the rules save none, so a copying hook never packs a ``[B, V, D]``
    copy of the expanded table (B times the table, per call)."""
    size = 8
    params = {"emb": _f64(PF.init_embedding(50, 4, generator=_gen())),
              "bag": _f64(PF.init_embedding_bag(40, 4, mode="mean", generator=_gen()))}

    def model(p, i):
        return (PF.embedding(p["emb"], i) * PF.embedding_bag(p["bag"], i.view(2, 3), mode="mean").sum(0)).square().sum()

    idx = torch.randint(0, 40, (size, 6), generator=_gen())
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t.clone()

    with saved_tensors_hooks(pack, lambda t: t):
        clipped_grad_sum(model, params, idx, max_norm=1.0, method="fast")
    assert packed and (size, 50, 4) not in packed and (size, 40, 4) not in packed


def _rows_of(layer: Any) -> Any:
    """A ``[N, C, *S]`` layer (rows first) as a layer of one example ``[C, *S]`` or a batch."""
    return lambda p, x, **kw: layer(p, x.unsqueeze(0), **kw).squeeze(0)


_DOUBLE = {  # (params, batched layer, per-example layer, per-example shape)
    "linear": (lambda: PF.init_linear(4, 3), PF.linear, PF.linear, (5, 4)),
    "conv2d": (lambda: PF.init_conv(2, 3, (2, 2)), PF.conv2d, PF.conv2d, (2, 4, 4)),
    "conv_transpose2d": (lambda: PF.init_conv_transpose(2, 3, (2, 2)), PF.conv_transpose2d,
                         PF.conv_transpose2d, (2, 3, 3)),
    "layer_norm": (lambda: PF.init_layer_norm(4), lambda p, x: PF.layer_norm(p, x, 4),
                   lambda p, x: PF.layer_norm(p, x, 4), (5, 4)),
    "rms_norm": (lambda: PF.init_rms_norm(4), lambda p, x: PF.rms_norm(p, x, 4),
                 lambda p, x: PF.rms_norm(p, x, 4), (5, 4)),
    "instance_norm": (lambda: PF.init_instance_norm(4, affine=True), PF.instance_norm,
                      _rows_of(PF.instance_norm), (4, 5)),
    "group_norm_weight_only": (lambda: {"weight": torch.ones(4)}, lambda p, x: PF.group_norm(p, x, 2),
                               _rows_of(lambda p, x: PF.group_norm(p, x, 2)), (4, 5)),
}


@pytest.mark.parametrize("name", list(_DOUBLE))
def test_a_gradient_of_the_input_gradient_is_refused_on_the_module_path(name):
    """A rule's backward computes the input gradient with the SHARED weight, so under
    create_graph=True the gradient of that input gradient (a gradient penalty) cannot be
    told apart per example. It used to reach the expanded param through a view of row 0
    (or an as_strided view spread evenly over the rows): p.grad right, every grad_sample row
    silently wrong (review h16: 12% off for an nn.Linear, 99% for a Conv1d, with
    DPOptimizer clipping the wrong norms). It now reaches the parameter directly, a use the
    rows miss, which the total-gradient check refuses when backward() would fill grad_sample,
    naming the vmap route; that route gives the per-example loop's numbers. autograd.grad
    fills no grad_sample (rows follow .grad), so it returns the weights' total gradients."""
    from psgfunc.per_sample._expanded import module_call

    init, batched, one, shape = _DOUBLE[name]
    size = 2
    params = {k: (v.to(F64) + 0.1 * torch.randn(v.shape, generator=_gen(), dtype=F64)).requires_grad_()
              for k, v in init().items()}
    x = torch.randn(size, *shape, generator=_gen(1), dtype=F64, requires_grad=True)
    y = module_call(batched, params, size, x)
    (gx,) = torch.autograd.grad((y * _weights(tuple(y.shape))).square().sum(), x, create_graph=True)
    penalty = gx.square().sum()
    totals = torch.autograd.grad(penalty, list(params.values()), retain_graph=True)
    assert all(getattr(p, "grad_sample", None) is None for p in params.values())
    with pytest.raises(ValueError, match=r"create_graph=True.*method='vmap'"):
        penalty.backward()

    def fn(p: dict[str, torch.Tensor], xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        gxb = torch.func.grad(lambda xx: (one(p, xx) * wb).square().sum())(xb)
        return gxb.square().sum()

    detached = {k: v.detach() for k, v in params.items()}
    w = _weights(tuple(y.shape))
    got = per_sample_grads(fn, detached, x.detach(), w, method="vmap")

    def loop_fn(p: dict[str, torch.Tensor], xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        xb = xb.clone().requires_grad_(True)
        (gxb,) = torch.autograd.grad((one(p, xb) * wb).square().sum(), xb, create_graph=True)
        return gxb.square().sum()

    assert_tree_close(got, per_example_grads(loop_fn, detached, x.detach(), w))
    for total, rows in zip(totals, got.values()):  # the totals autograd.grad returned are right
        torch.testing.assert_close(total, rows.sum(0), rtol=1e-10, atol=1e-12)
