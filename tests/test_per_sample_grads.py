"""The per_sample_grads contract on arbitrary pure functions, against the float64 loop oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import psgfunc as pf
import psgfunc.functional as PF
from tests.oracles import assert_tree_close, per_example_grads

METHODS = ["vmap", "expanded", "auto"]


def mlp_params(dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "l1": PF.init_linear(4, 6, dtype=dtype, generator=g),
        "l2": PF.init_linear(6, 3, dtype=dtype, generator=g),
        "scale": [torch.tensor(1.5, dtype=dtype)],
    }


def mlp_loss(params, x, y):
    h = torch.tanh(PF.linear(params["l1"], x)) * params["scale"][0]
    return F.cross_entropy(PF.linear(params["l2"], h).unsqueeze(0), y.unsqueeze(0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", [1, 5])
def test_nested_params_match_oracle(method, dtype, size):
    params = mlp_params(dtype)
    x = torch.randn(size, 4, dtype=dtype)
    y = torch.randint(0, 3, (size,))
    grads = pf.per_sample_grads(mlp_loss, params, x, y, method=method)
    assert grads["l1"]["weight"].shape == (size, 6, 4)
    assert grads["scale"][0].shape == (size,) and grads["scale"][0].dtype == dtype
    assert_tree_close(grads, per_example_grads(mlp_loss, params, x, y), dtype=dtype)


@pytest.mark.parametrize("method", METHODS)
def test_dict_batch_token_ids_and_constants(method):
    emb = torch.randn(10, 4, dtype=torch.float64)

    def fn(params, example, k):
        h = emb[example["ids"]].sum(0) * k + example["x"]
        return PF.linear(params, h).pow(2).sum()

    params = PF.init_linear(4, 2, dtype=torch.float64)
    batch = {"ids": torch.randint(0, 10, (3, 5)), "x": torch.randn(3, 4, dtype=torch.float64)}
    grads = pf.per_sample_grads(fn, params, batch, 2.0, method=method)
    assert_tree_close(grads, per_example_grads(fn, params, batch, 2.0))


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_returns_empty_leaves(method):
    params = mlp_params(torch.float32)
    grads = pf.per_sample_grads(mlp_loss, params, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), method=method)
    assert grads["l1"]["weight"].shape == (0, 6, 4) and grads["scale"][0].shape == (0,)


@pytest.mark.parametrize("method", METHODS)
def test_params_without_leaves_give_an_empty_tree(method):
    """Nothing to differentiate: every method returns the (empty) structure, as vmap(grad) does."""
    assert pf.per_sample_grads(lambda p, x: x.sum(), {}, torch.randn(3, 2), method=method) == {}
    assert pf.per_sample_grads(lambda p, x: x.sum(), {"a": []}, torch.randn(3, 2), method=method) == {"a": []}


@pytest.mark.parametrize("method", ["vmap", "expanded"])
def test_chunking_gives_the_same_result(method):
    params = mlp_params(torch.float64)
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    whole = pf.per_sample_grads(mlp_loss, params, x, y, method=method)
    chunked = pf.per_sample_grads(mlp_loss, params, x, y, method=method, chunk_size=3)
    assert_tree_close(chunked, whole)


def test_expanded_equals_vmap_on_a_sequence_model_with_tied_weights():
    params = {"w": PF.init_linear(5, 5, dtype=torch.float64)}

    def fn(p, x):  # the same weight used twice, and once through a generic op
        h = torch.tanh(PF.linear(p["w"], x))
        h = PF.linear(p["w"], h) + h @ p["w"]["weight"]
        return h.pow(2).mean()

    x = torch.randn(4, 3, 5, dtype=torch.float64)
    ref = per_example_grads(fn, params, x)
    assert_tree_close(pf.per_sample_grads(fn, params, x, method="expanded"), ref)
    assert_tree_close(pf.per_sample_grads(fn, params, x, method="vmap"), ref)


def test_functional_call_on_an_nn_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = per_example_grads(fn, params, x, y)
    for method in METHODS:
        assert_tree_close(pf.per_sample_grads(fn, params, x, y, method=method), ref)


def test_randomness_dropout():
    params = PF.init_linear(6, 6)
    x = torch.ones(4, 6)

    def fn(p, x):
        return F.dropout(PF.linear(p, x), 0.5, training=True).sum()

    with pytest.raises(RuntimeError, match="randomness"):
        pf.per_sample_grads(fn, params, x, randomness="error")
    for method in ["vmap", "expanded"]:
        g = pf.per_sample_grads(fn, params, x, method=method)  # default "different"
        assert not torch.equal(g["weight"][0], g["weight"][1])
        same = pf.per_sample_grads(fn, params, x, method=method, randomness="same")
        assert torch.equal(same["weight"][0], same["weight"][1])


def test_contract_errors():
    params = mlp_params(torch.float32)
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        pf.per_sample_grads(mlp_loss, params, x, y[:2])
    with pytest.raises(ValueError, match="method"):
        pf.per_sample_grads(mlp_loss, params, x, y, method="hooks")
    with pytest.raises(ValueError, match="randomness"):
        pf.per_sample_grads(mlp_loss, params, x, y, randomness="sometimes")
    with pytest.raises(ValueError, match="chunk_size"):
        pf.per_sample_grads(mlp_loss, params, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="no batch dimension"):
        pf.per_sample_grads(mlp_loss, params, torch.tensor(1.0), y)
    with pytest.raises(ValueError, match="at least one batch"):
        pf.per_sample_grads(mlp_loss, params)
    with pytest.raises(ValueError, match="floating tensor"):
        pf.per_sample_grads(mlp_loss, {"w": torch.zeros(2, dtype=torch.long)}, x, y)
    with pytest.raises(TypeError, match="callable"):
        pf.per_sample_grads("loss", params, x, y)
    for method in ["vmap", "expanded"]:
        with pytest.raises(ValueError, match="0-dim loss"):
            pf.per_sample_grads(lambda p, x: PF.linear(p["l1"], x), params, x, method=method)
