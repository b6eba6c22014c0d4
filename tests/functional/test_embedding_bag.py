"""PF.embedding_bag against torch.nn.EmbeddingBag (values, init) and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import psgfunc.functional as PF

F64 = torch.float64


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("layout", ["2d", "offsets", "last_offset"])
def test_equals_nn(mode, padding_idx, layout):
    gen = torch.Generator().manual_seed(0)
    params = PF.init_embedding_bag(6, 3, mode=mode, padding_idx=padding_idx, dtype=F64, generator=gen)
    params = {"weight": torch.randn(6, 3, dtype=F64, generator=gen)}
    module = nn.EmbeddingBag(6, 3, mode=mode, padding_idx=padding_idx, include_last_offset=layout == "last_offset",
                             dtype=F64)
    module.load_state_dict(params, strict=True)
    kwargs = dict(mode=mode, padding_idx=padding_idx, include_last_offset=layout == "last_offset")
    if layout == "2d":
        idx, offsets = torch.randint(0, 6, (4, 5), generator=gen), None
        idx[1] = 2 if padding_idx == 2 else idx[1]  # a bag of padding only
    else:
        idx = torch.randint(0, 6, (9,), generator=gen)
        offsets = torch.tensor([0, 2, 2, 5] + ([9] if layout == "last_offset" else []))
    expected = module(idx, offsets)
    torch.testing.assert_close(PF.embedding_bag(params, idx, offsets, **kwargs), expected, rtol=1e-10, atol=1e-12)
    if mode == "sum":
        psw = torch.randn(idx.shape, dtype=F64, generator=gen)
        torch.testing.assert_close(PF.embedding_bag(params, idx, offsets, per_sample_weights=psw, **kwargs),
                                   module(idx, offsets, per_sample_weights=psw), rtol=1e-10, atol=1e-12)


def test_init_is_nn_init():
    for args, kwargs in [((6, 3), {}), ((5, 4), {"padding_idx": 1, "mode": "sum"}), ((4, 2), {"padding_idx": -1})]:
        torch.manual_seed(3)
        ref = nn.EmbeddingBag(*args, **kwargs).state_dict()
        torch.manual_seed(3)
        params = PF.init_embedding_bag(*args, **kwargs)
        assert list(params) == list(ref) and torch.equal(params["weight"], ref["weight"])
    w = torch.randn(3, 2)
    assert PF.init_embedding_bag(3, 2, _weight=w)["weight"] is w
    gen = torch.Generator().manual_seed(0)
    assert PF.init_embedding_bag(3, 2, dtype=F64, generator=gen)["weight"].dtype == F64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_norm=1.0), "max_norm=1.0 is not supported.*IN PLACE"),
        (dict(scale_grad_by_freq=True), "scale_grad_by_freq"),
        (dict(mode="median"), "mode='median'"),
        (dict(_weight=torch.zeros(2, 2)), "_weight has shape"),
        (dict(padding_idx=7), "padding_idx=7"),
    ],
)
def test_init_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PF.init_embedding_bag(4, 2, **kwargs)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: PF.embedding_bag({"weight": torch.zeros(3)}, torch.zeros(2, 2, dtype=torch.long)),
         r"params\['weight'\] must be \[V, D\]"),
        (lambda p: PF.embedding_bag(p, torch.zeros(2, 2, dtype=torch.long), mode="avg"), "mode='avg'"),
        (lambda p: PF.embedding_bag(p, torch.zeros(2, 2)), "integer"),
        (lambda p: PF.embedding_bag(p, torch.full((2, 2), 4)), "outside"),
        (lambda p: PF.embedding_bag(p, torch.zeros(2, 2, dtype=torch.long), torch.tensor([0])), "offsets must be None"),
        (lambda p: PF.embedding_bag(p, torch.zeros(4, dtype=torch.long)), "needs offsets"),
        (lambda p: PF.embedding_bag(p, torch.zeros(2, 2, 2, dtype=torch.long)), "2-D"),
        (lambda p: PF.embedding_bag(p, torch.zeros(4, dtype=torch.long), torch.tensor([1, 2])), "start at 0"),
        (lambda p: PF.embedding_bag(p, torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 2])), "not decrease"),
        (lambda p: PF.embedding_bag(p, torch.zeros(4, dtype=torch.long), torch.tensor([0, 5])), "past the end"),
        (lambda p: PF.embedding_bag(p, torch.zeros(4, dtype=torch.long), torch.tensor([0, 2]), include_last_offset=True),
         "must equal the length"),
        (lambda p: PF.embedding_bag(p, torch.zeros(4, dtype=torch.long), torch.tensor([0.0])), "integer offsets"),
        (lambda p: PF.embedding_bag(p, torch.zeros(2, 2, dtype=torch.long), per_sample_weights=torch.ones(2, 2)),
         "needs mode='sum'"),
        (lambda p: PF.embedding_bag(p, torch.zeros(2, 2, dtype=torch.long), mode="sum",
                                    per_sample_weights=torch.ones(4)), "shaped like idx"),
    ],
)
def test_errors(call, match):
    params = PF.init_embedding_bag(4, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        call(params)
