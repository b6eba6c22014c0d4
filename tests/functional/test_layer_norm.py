"""PF.layer_norm against torch.nn.LayerNorm (values) and the per-example loop (gradients)."""

from __future__ import annotations

import math

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
AFFINE = {  # name -> (elementwise_affine, bias)
    "affine": (True, True),
    "weight_only": (True, False),
    "none": (False, True),
}
SHAPES = [(5,), (3, 4), (2, 3, 2)]


def make_params(shape, affine, dtype=torch.float64, seed=0):
    """init_layer_norm's keys with random values (ones/zeros would hide a swapped weight/bias)."""
    elementwise_affine, bias = AFFINE[affine]
    gen = torch.Generator().manual_seed(seed)
    params = PF.init_layer_norm(
        shape, elementwise_affine=elementwise_affine, bias=bias, dtype=dtype
    )
    params = {k: torch.randn(v.shape, dtype=dtype, generator=gen) for k, v in params.items()}
    return params, gen


def make_module(shape, affine, params, eps=1e-5, dtype=torch.float64):
    elementwise_affine, bias = AFFINE[affine]
    module = nn.LayerNorm(
        shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, dtype=dtype
    )
    module.load_state_dict(params, strict=True)
    return module


def layer_norm_loss(shape, eps=1e-5):
    def fn(params, x, target):
        return (torch.tanh(PF.layer_norm(params, x, shape, eps=eps)) * target).sum()

    return fn


# ---------------------------------------------------------------------------- values vs torch.nn


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)], ids=str)
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_output_equals_nn_layer_norm(affine, shape, lead, eps):
    params, gen = make_params(shape, affine)
    module = make_module(shape, affine, params, eps=eps)
    x = torch.randn(*lead, *shape, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        assert torch.equal(PF.layer_norm(params, x, shape, eps=eps), module(x))


def test_int_normalized_shape():
    params, gen = make_params((5,), "affine")
    x = torch.randn(2, 5, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        assert torch.equal(PF.layer_norm(params, x, 5), make_module(5, "affine", params)(x))


# ------------------------------------------------------------------ per-sample grads vs the loop


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["affine", "weight_only"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("example_lead", [(), (3,)], ids=str)
def test_per_sample_grads_match_loop(method, dtype, affine, shape, example_lead):
    params, gen = make_params(shape, affine, dtype=dtype)
    x = torch.randn(4, *example_lead, *shape, dtype=dtype, generator=gen)
    target = torch.randn(x.shape, dtype=dtype, generator=gen)
    fn = layer_norm_loss(shape)
    grads = per_sample_grads(fn, params, x, target, method=method)
    assert list(grads) == list(params) and all(g.dtype == dtype for g in grads.values())
    assert_tree_close(grads, per_example_grads(fn, params, x, target), dtype=dtype)


# -------------------------------------------------------------------------- hypothesis grid


@st.composite
def layer_norm_configs(draw):
    return dict(
        # one normalised element makes x - mean exactly 0 in theory and rounding noise in
        # practice, so the weight gradient has no scale to compare at: at least 2 elements
        shape=tuple(
            draw(
                st.lists(st.integers(1, 4), min_size=1, max_size=3).filter(
                    lambda s: math.prod(s) > 1
                )
            )
        ),
        example_lead=tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))),
        affine=draw(st.sampled_from(list(AFFINE))),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        batch=draw(st.integers(0, 4)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(cfg=layer_norm_configs())
def test_property_grid(method, cfg):
    shape, eps = cfg["shape"], cfg["eps"]
    params, gen = make_params(shape, cfg["affine"], seed=cfg["seed"])
    module = make_module(shape, cfg["affine"], params, eps=eps)
    x = torch.randn(cfg["batch"], *cfg["example_lead"], *shape, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        assert torch.equal(PF.layer_norm(params, x, shape, eps=eps), module(x))
    if not params:
        return  # no affine: nothing to differentiate
    target = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    fn = layer_norm_loss(shape, eps)
    grads = per_sample_grads(fn, params, x, target, method=method)
    assert {k: tuple(v.shape) for k, v in grads.items()} == {
        k: (cfg["batch"], *v.shape) for k, v in params.items()
    }
    assert_tree_close(grads, per_example_grads(fn, params, x, target), dtype=torch.float64)


# --------------------------------------------------------------------------- init_layer_norm


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("shape", [4, (5,), (3, 4), (2, 3, 2)], ids=str)
def test_init_layer_norm_matches_nn(affine, shape):
    elementwise_affine, bias = AFFINE[affine]
    params = PF.init_layer_norm(shape, elementwise_affine=elementwise_affine, bias=bias)
    expected = nn.LayerNorm(shape, elementwise_affine=elementwise_affine, bias=bias).state_dict()
    assert list(params) == list(expected)
    for k in params:
        assert params[k].dtype == expected[k].dtype and torch.equal(params[k], expected[k])


def test_init_layer_norm_dtype():
    params = PF.init_layer_norm((2, 3), dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.shape == (2, 3) for p in params.values())


# ---------------------------------------------------------------------------------- errors


def test_trailing_dims_mismatch():
    params, _ = make_params((3, 4), "affine")
    with pytest.raises(
        ValueError, match=r"shape \(2, 4, 3\) does not end in normalized_shape=\(3, 4\)"
    ):
        PF.layer_norm(params, torch.randn(2, 4, 3, dtype=torch.float64), (3, 4))
    with pytest.raises(ValueError, match="does not end in"):
        PF.layer_norm(params, torch.randn(4, dtype=torch.float64), (3, 4))  # too few dims
    with pytest.raises(ValueError, match="does not end in"):
        PF.layer_norm({}, torch.randn(2, 5), 4)


def test_param_shape_mismatch():
    params, _ = make_params((3, 4), "affine")
    with pytest.raises(ValueError, match=r"params\['weight'\] has shape \(3, 4\)"):
        PF.layer_norm(params, torch.randn(2, 4, dtype=torch.float64), (4,))
    params["bias"] = torch.zeros(12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"params\['bias'\]"):
        PF.layer_norm(params, torch.randn(2, 3, 4, dtype=torch.float64), (3, 4))


@pytest.mark.parametrize("bad", [(), 0, (3, -1), 2.0, "3"], ids=repr)
def test_malformed_normalized_shape(bad):
    with pytest.raises(ValueError, match="normalized_shape"):
        PF.layer_norm({}, torch.randn(2, 3), bad)
    with pytest.raises(ValueError, match="normalized_shape"):
        PF.init_layer_norm(bad)
