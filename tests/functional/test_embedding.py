"""PF.embedding against torch.nn.Embedding (values) and the per-example loop (gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import psgfunc.functional as PF
from psgfunc import per_sample_grads
from tests.oracles import assert_tree_close, per_example_grads

METHODS = ["vmap", "expanded"]
DTYPES = [torch.float64, torch.float32]
V, D = 7, 3


def make_table(padding_idx=None, dtype=torch.float64, seed=0):
    """Params with the padding row non-zero, so that a zero gradient there means something."""
    gen = torch.Generator().manual_seed(seed)
    params = PF.init_embedding(V, D, padding_idx, dtype=dtype, generator=gen)
    params["weight"] = torch.randn(V, D, dtype=dtype, generator=gen)
    return params, gen


def embedding_loss(padding_idx):
    def fn(params, idx, target):
        return (torch.tanh(PF.embedding(params, idx, padding_idx=padding_idx)) * target).sum()

    return fn


# ---------------------------------------------------------------------------- values vs torch.nn


@pytest.mark.parametrize("padding_idx", [None, 0, 4, -1, -V])
@pytest.mark.parametrize("shape", [(), (5,), (3, 5), (2, 3, 4)], ids=str)
def test_output_equals_nn_embedding(padding_idx, shape):
    params, gen = make_table(padding_idx)
    module = nn.Embedding(V, D, padding_idx=padding_idx, dtype=torch.float64)
    module.load_state_dict(params, strict=True)
    idx = torch.randint(0, V, shape, generator=gen)
    out = PF.embedding(params, idx, padding_idx=padding_idx)
    assert out.shape == (*shape, D)
    with torch.no_grad():
        assert torch.equal(out, module(idx))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8], ids=str)
def test_integer_index_dtypes(dtype):
    params, _ = make_table()
    idx = torch.tensor([[0, 6], [3, 3]], dtype=dtype)
    assert torch.equal(PF.embedding(params, idx), params["weight"][idx.long()])


def test_empty_indices():
    params, _ = make_table()
    assert PF.embedding(params, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, D)


# ------------------------------------------------------------------ per-sample grads vs the loop


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("shape", [(5,), (3, 4)], ids=str)
def test_per_sample_grads_match_loop(method, dtype, padding_idx, shape):
    params, gen = make_table(padding_idx, dtype=dtype)
    idx = torch.randint(0, V, (4, *shape), generator=gen)
    target = torch.randn(4, *shape, D, dtype=dtype, generator=gen)
    fn = embedding_loss(padding_idx)
    grads = per_sample_grads(fn, params, idx, target, method=method)
    assert grads["weight"].dtype == dtype
    assert_tree_close(grads, per_example_grads(fn, params, idx, target), dtype=dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padding_idx", [0, 3, -1])
def test_padding_row_gets_exactly_zero_gradient(method, padding_idx):
    params, gen = make_table(padding_idx)
    row = padding_idx % V
    idx = torch.randint(0, V, (5, 6), generator=gen)
    idx[:, 0] = row  # every example looks the padding row up
    target = torch.randn(5, 6, D, dtype=torch.float64, generator=gen)
    grads = per_sample_grads(embedding_loss(padding_idx), params, idx, target, method=method)
    g = grads["weight"]
    assert g.shape == (5, V, D)
    assert torch.equal(g[:, row], torch.zeros(5, D, dtype=torch.float64))
    # the other rows an example looks up do get a gradient
    for b in range(5):
        for i in set(idx[b].tolist()) - {row}:
            assert g[b, i].abs().sum() > 0


def test_padding_row_zero_under_vmap_with_batched_weight():
    """Per-example tables (what the expanded method does): every example's padding row gets 0.

    With a vmapped forward over a batched weight and an ordinary backward, torch's batching
    rule for F.embedding(padding_idx=...) zeroes the padding row of the first example only;
    the layer must not rely on it.
    """
    params, gen = make_table(3)
    tables = params["weight"].expand(4, V, D).clone().requires_grad_(True)
    idx = torch.full((4, 5), 3)
    idx[:, 1] = 1
    fn = embedding_loss(3)
    losses = torch.func.vmap(fn)({"weight": tables}, idx, torch.ones(4, 5, D))
    (grad,) = torch.autograd.grad(losses.sum(), tables)
    assert not grad[:, 3].any()
    assert grad[:, 1].abs().sum(-1).gt(0).all()
    per_example = torch.func.vmap(torch.func.grad(fn))({"weight": tables}, idx, torch.ones(4, 5, D))
    assert torch.equal(per_example["weight"], grad)


# -------------------------------------------------------------------------- hypothesis grid


@st.composite
def embedding_configs(draw):
    num = draw(st.integers(1, 6))
    return dict(
        num=num,
        dim=draw(st.integers(1, 4)),
        padding_idx=draw(st.one_of(st.none(), st.integers(-num, num - 1))),
        batch=draw(st.integers(0, 4)),
        shape=tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(cfg=embedding_configs())
def test_property_grid(method, cfg):
    gen = torch.Generator().manual_seed(cfg["seed"])
    num, dim, padding_idx = cfg["num"], cfg["dim"], cfg["padding_idx"]
    params = {"weight": torch.randn(num, dim, dtype=torch.float64, generator=gen)}
    module = nn.Embedding(num, dim, padding_idx=padding_idx, dtype=torch.float64)
    module.load_state_dict(params, strict=True)
    idx = torch.randint(0, num, (cfg["batch"], *cfg["shape"]), generator=gen)
    with torch.no_grad():
        out = PF.embedding(params, idx, padding_idx=padding_idx)
        assert torch.equal(out, module(idx))
    target = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    fn = embedding_loss(padding_idx)
    grads = per_sample_grads(fn, params, idx, target, method=method)
    assert grads["weight"].shape == (cfg["batch"], num, dim)
    assert_tree_close(grads, per_example_grads(fn, params, idx, target), dtype=torch.float64)
    if padding_idx is not None:
        assert not grads["weight"][:, padding_idx].any()


# ---------------------------------------------------------------------------- init_embedding


@pytest.mark.parametrize("padding_idx", [None, 2, -2])
def test_init_embedding_matches_nn(padding_idx):
    torch.manual_seed(3)
    module = nn.Embedding(V, D, padding_idx=padding_idx)
    params = PF.init_embedding(V, D, padding_idx, generator=torch.Generator().manual_seed(3))
    assert list(params) == ["weight"]
    assert torch.equal(params["weight"], module.weight.detach())
    if padding_idx is not None:
        assert not params["weight"][padding_idx].any()


def test_init_embedding_dtype_and_generator():
    a = PF.init_embedding(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = PF.init_embedding(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert a["weight"].dtype == torch.float64 and torch.equal(a["weight"], b["weight"])


# ---------------------------------------------------------------------------------- errors


def test_float_indices_raise_type_error():
    params, _ = make_table()
    with pytest.raises(TypeError, match="idx has dtype torch.float32.*idx.long"):
        PF.embedding(params, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="torch.bool"):
        PF.embedding(params, torch.tensor([True]))
    with pytest.raises(TypeError, match="tensor"):
        PF.embedding(params, [1, 2])


def test_out_of_range_indices_raise_value_error():
    params, _ = make_table()
    with pytest.raises(ValueError, match=f"holds {V}, outside \\[0, {V}\\)"):
        PF.embedding(params, torch.tensor([0, V]))
    with pytest.raises(ValueError, match="holds -1"):
        PF.embedding(params, torch.tensor([[-1, 2]]))


@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_indices_raise_under_per_sample_grads(method):
    """Under vmap the values are hidden from Python; the lookup itself refuses them."""
    params, _ = make_table()
    idx = torch.tensor([[0, 1], [2, V]])
    with pytest.raises((IndexError, ValueError)):
        per_sample_grads(embedding_loss(None), params, idx, torch.ones(2, 2, D), method=method)


def test_padding_idx_out_of_range():
    params, _ = make_table()
    with pytest.raises(ValueError, match=f"padding_idx={V} is out of range"):
        PF.embedding(params, torch.tensor([0]), padding_idx=V)
    with pytest.raises(ValueError, match=f"padding_idx={-V - 1} is out of range"):
        PF.embedding(params, torch.tensor([0]), padding_idx=-V - 1)
    with pytest.raises(ValueError, match="padding_idx"):
        PF.init_embedding(V, D, padding_idx=V)
    with pytest.raises(ValueError, match="padding_idx"):
        PF.embedding(params, torch.tensor([0]), padding_idx=1.0)


def test_weight_of_wrong_rank_and_negative_sizes():
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        PF.embedding({"weight": torch.randn(V)}, torch.tensor([0]))
    with pytest.raises(ValueError, match=">= 0"):
        PF.init_embedding(-1, 3)
