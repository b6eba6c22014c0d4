"""Torch ops with special gradient rules inside ``fn``, against the float64 per-example loop.

With ``method="expanded"`` a model written with ``torch.nn`` runs torch's own functions under
vmap over stride-0 expanded params. torch's batching rule for ``F.embedding`` with a batched
weight keeps ``padding_idx`` for the flattened ``[B*V, D]`` table, so only the first
example's padding row got a zero gradient. Every special option of the embedding ops
(padding_idx, scale_grad_by_freq, sparse, max_norm; embedding_bag's modes, padding_idx and
per_sample_weights) is checked here for every method, and a tiny HF BERT end to end.
"""

from __future__ import annotations

import warnings

import optree
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from psgfunc import per_sample_grads
from psgfunc.dp import clipped_grad_sum
from psgfunc.dp._clip import clipped_sum
from tests.oracles import assert_tree_close, per_example_grads

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
    pytest.mark.filterwarnings("ignore:psgfunc fast clipping"),
]

F64 = torch.float64
METHODS = ["vmap", "expanded", "auto"]
V, D, T = 7, 3, 5


def _dense(tree):
    return optree.tree_map(lambda t: t.to_dense() if t.is_sparse else t, tree)


def _check(fn, params, *batch, methods=METHODS):
    """Every method against the float64 loop at 1e-10 (the loop's sparse grads densified)."""
    expected = _dense(per_example_grads(fn, params, *batch))
    for method in methods:
        assert_tree_close(per_sample_grads(fn, params, *batch, method=method), expected, F64)


def _ids(size, pad=0, seed=0):
    """``[size, T]`` ids with the padding id in every example after the first, at varied places."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (size, T), generator=g)
    ids[ids == pad] = (pad + 1) % V  # the first example: no padding
    for b in range(1, size):
        ids[b, b % T:] = pad
    if size > 2:
        ids[2, 0] = pad  # a padding id first, then real tokens
        ids[2, 1] = (pad + 2) % V
    return ids


def _weight(seed=0):
    return torch.randn(V, D, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _target(size, seed=1):
    return torch.randn(size, T, D, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("padding_idx", [0, 3, -1])
def test_nn_embedding_padding_idx_through_functional_call(size, padding_idx):
    emb = nn.Embedding(V, D, padding_idx=padding_idx).double()
    params = {k: v.detach() for k, v in emb.named_parameters()}
    ids = _ids(size, pad=padding_idx % V)

    def fn(p, i, y):
        return (torch.func.functional_call(emb, p, (i,)) * y).sum()

    _check(fn, params, ids, _target(size))
    grads = per_sample_grads(fn, params, ids, _target(size), method="expanded")["weight"]
    assert grads[:, padding_idx % V].abs().max() == 0  # the padding row of every example


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_scale_grad_by_freq(padding_idx):
    def fn(p, i, y):
        return (F.embedding(i, p["w"], padding_idx=padding_idx, scale_grad_by_freq=True) * y).sum()

    ids = _ids(4)
    ids[0, :3] = 2  # a repeated id
    _check(fn, {"w": _weight()}, ids, _target(4))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_sparse_gives_the_dense_per_sample_gradient(padding_idx):
    def fn(p, i, y):
        return (F.embedding(i, p["w"], padding_idx=padding_idx, sparse=True) * y).sum()

    _check(fn, {"w": _weight()}, _ids(4), _target(4))


def test_torch_embedding_padding_idx():
    def fn(p, i, y):
        return (torch.embedding(p["w"], i, 0) * y).sum()

    _check(fn, {"w": _weight()}, _ids(4), _target(4))


def test_embedding_weight_used_twice_and_computed():
    # tied weights: the lookup (padding) and an output head on the same table; and a weight
    # computed from the params (not a stride-0 expansion: the generic route)
    def fn(p, i, y):
        h = F.embedding(i, p["w"], padding_idx=0)
        logits = F.linear(h, p["w"])
        return (h * y).sum() + logits.logsumexp(-1).sum() + (F.embedding(i, 2 * p["w"], padding_idx=0) ** 2).sum()

    _check(fn, {"w": _weight()}, _ids(4), _target(4))


def test_embedding_position_ids_without_batch_dim():
    # position ids closed over (unbatched) with a batched weight, as HF models do
    pos = torch.tensor([0, 1, 2, 0, 4])

    def fn(p, i, y):
        return ((F.embedding(i, p["w"], padding_idx=0) + F.embedding(pos, p["w"], padding_idx=0)) * y).sum()

    _check(fn, {"w": _weight()}, _ids(3), _target(3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bag", [False, True])
def test_max_norm_is_refused_and_the_weight_is_untouched(method, bag):
    w = _weight() * 10  # rows far above max_norm: a renorm would change them

    def fn(p, i):
        if bag:
            return F.embedding_bag(i, p["w"], torch.tensor([0, 2]), max_norm=1.0).sum()
        return F.embedding(i, p["w"], max_norm=1.0).sum()

    before = w.clone()
    with pytest.raises(ValueError, match="max_norm"):
        per_sample_grads(fn, {"w": w}, _ids(3), method=method)
    with pytest.raises(ValueError, match="max_norm"):
        clipped_grad_sum(fn, {"w": w}, _ids(3), max_norm=1.0)
    assert torch.equal(w, before)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_bag_modes_and_padding(mode, padding_idx):
    offsets = torch.tensor([0, 2])

    def fn(p, i, y):
        one_d = F.embedding_bag(i, p["w"], offsets, mode=mode, padding_idx=padding_idx)
        two_d = F.embedding_bag(i.view(1, -1), p["w"], mode=mode, padding_idx=padding_idx)
        return (one_d * y[:2]).sum() + (two_d * y[:1]).sum()

    _check(fn, {"w": _weight()}, _ids(4), _target(4))


@pytest.mark.parametrize("weights_in", ["batch", "params"])
def test_embedding_bag_per_sample_weights(weights_in):
    offsets = torch.tensor([0, 2, 5])
    psw = torch.randn(4, T, dtype=F64)

    def fn(p, i, y, s):
        s = p["s"] if weights_in == "params" else s
        out = F.embedding_bag(
            i, p["w"], offsets, mode="sum", per_sample_weights=s, include_last_offset=True, padding_idx=0
        )
        return (out * y[:2]).sum()

    params = {"w": _weight(), "s": torch.randn(T, dtype=F64)} if weights_in == "params" else {"w": _weight()}
    _check(fn, params, _ids(4), _target(4), psw)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_sparse_and_scale_grad_by_freq(mode):
    def fn(p, i, y):
        a = F.embedding_bag(i, p["w"], torch.tensor([0, 2]), mode=mode, sparse=True, padding_idx=0)
        b = F.embedding_bag(i, p["w"], torch.tensor([0, 3]), mode=mode, scale_grad_by_freq=True)
        return (a * y[:2]).sum() + (b * y[2:4]).sum()

    _check(fn, {"w": _weight()}, _ids(4), _target(4))


def test_fast_clipping_gets_nn_embedding_pieces_without_materialising():
    # F.embedding with an expanded weight runs psgfunc's embedding rule, so fast clipping
    # gets its pieces (no [B, V, D] per-sample gradient, no warning) and pads correctly
    emb = nn.Embedding(V, D, padding_idx=0).double()
    params = {k: v.detach() for k, v in emb.named_parameters()}
    ids, y = _ids(4), _target(4)

    def fn(p, i, t):
        return (torch.func.functional_call(emb, p, (i,)) * t).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summed, norms = clipped_grad_sum(fn, params, ids, y, max_norm=0.5, method="fast")
    expected, expected_norms = clipped_sum(per_example_grads(fn, params, ids, y), 0.5, "test")
    assert_tree_close(summed, expected, F64)
    assert_tree_close(norms, expected_norms, F64)


def test_registry_rules_can_be_added():
    from psgfunc.per_sample import _torch_ops

    assert _torch_ops.rule_for(F.embedding) is not None
    seen = []

    def spy(method, func, args, kwargs):
        seen.append(method)
        return NotImplemented  # run the function as it is

    prev = _torch_ops.rule_for(torch.tanh)
    _torch_ops.register(torch.tanh)(spy)
    try:
        for method in ("vmap", "expanded"):
            per_sample_grads(lambda p, x: torch.tanh(p["w"] * x).sum(), {"w": _weight()}, torch.ones(2, V, D), method=method)
    finally:
        if prev is None:
            _torch_ops._RULES.pop(torch.tanh)
        else:  # pragma: no cover
            _torch_ops.register(torch.tanh)(prev)
    assert seen == ["vmap", "expanded"]


def _assert_close_to_scale(actual, expected, rtol=1e-10):
    """Every leaf within ``rtol`` of the largest gradient entry of the whole tree (some BERT
    leaves, e.g. the attention key bias, have gradients that are zero up to rounding)."""
    scale = max(float(e.abs().max()) for e in optree.tree_leaves(expected))
    for name, a in actual.items():
        err = float((a - expected[name]).abs().max())
        assert err <= rtol * scale, f"{name}: error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def test_tiny_bert_with_padding_matches_the_float64_loop():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )
    model = transformers.BertModel(config).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    ids[1, 4:] = 0  # pad tokens (padding_idx = pad_token_id = 0) in examples 1 and 2
    ids[2, 2:] = 0

    def fn(p, i):
        out = torch.func.functional_call(model, p, (i.unsqueeze(0),))
        return (out.last_hidden_state**2).sum() + out.pooler_output.sum()

    expected = per_example_grads(fn, params, ids)
    for method in METHODS:
        got = per_sample_grads(fn, params, ids, method=method)
        _assert_close_to_scale(got, expected)
        assert got["embeddings.word_embeddings.weight"][:, 0].abs().max() == 0
    summed, norms = clipped_grad_sum(fn, params, ids, max_norm=1.0, method="fast")
    expected_sum, expected_norms = clipped_sum(expected, 1.0, "test")
    _assert_close_to_scale(summed, expected_sum)
    assert_tree_close(norms, expected_norms, F64)
