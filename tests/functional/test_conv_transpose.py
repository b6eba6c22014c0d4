"""PF.conv_transpose1d/2d/3d against torch.nn.ConvTransposeNd (values, init) and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import psgfunc.functional as PF

F64 = torch.float64
LAYERS = {1: PF.conv_transpose1d, 2: PF.conv_transpose2d, 3: PF.conv_transpose3d}
MODULES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SPATIAL = {1: (5,), 2: (4, 3), 3: (3, 2, 3)}

# (dim, groups, stride, padding, output_padding, dilation, bias)
OPTIONS = [
    (1, 1, 1, 0, 0, 1, True),
    (1, 2, 3, 1, 2, 1, False),
    (1, 1, 1, 1, 1, 2, True),  # output_padding >= stride, below the dilation
    (2, 1, (2, 1), (1, 0), (1, 0), (1, 2), True),
    (2, 2, 2, 1, 0, 1, True),
    (2, 1, (1, 3), (0, 2), (1, 2), (2, 1), False),
    (3, 1, (2, 1, 1), 1, (1, 0, 0), 1, True),
    (3, 2, 1, 0, 0, (1, 2, 1), True),
]


def params_and_module(dim, groups, stride, padding, output_padding, dilation, bias, gen):
    args = (4, 6, (3, 2, 2)[:dim], stride, padding, output_padding, groups, bias, dilation)
    params = PF.init_conv_transpose(*args, dtype=F64, generator=gen)
    module = MODULES[dim](*args, dtype=F64)
    module.load_state_dict(params, strict=True)
    return params, module


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_equals_nn_one_example_and_batch(opts):
    dim, groups, stride, padding, output_padding, dilation, bias = opts
    gen = torch.Generator().manual_seed(0)
    params, module = params_and_module(*opts, gen)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    x = torch.randn(3, 4, *SPATIAL[dim], dtype=F64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(LAYERS[dim](params, x, **kwargs), module(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(LAYERS[dim](params, x[1], **kwargs), module(x[1]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_init_is_nn_init(dim):
    for args in [(4, 6, 3), (4, 6, 3, 2, 1, 1, 2, False, 1), (2, 3, 2)]:
        torch.manual_seed(5)
        ref = MODULES[dim](*args).state_dict()
        torch.manual_seed(5)
        params = PF.init_conv_transpose(*args, dim=dim)
        assert list(params) == list(ref)
        for k in params:
            assert torch.equal(params[k], ref[k]), k
    gen = torch.Generator().manual_seed(1)
    a = PF.init_conv_transpose(4, 6, (3,) * dim, dtype=F64, generator=gen)
    assert a["weight"].shape == (4, 6, *(3,) * dim) and a["weight"].dtype == F64


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: PF.init_conv_transpose(4, 6, 3), "dim=1, 2 or 3"),
        (lambda: PF.init_conv_transpose(4, 6, (3, 3), dim=1), "disagrees"),
        (lambda: PF.init_conv_transpose(4, 6, 3, dim=4), "dim=4"),
        (lambda: PF.init_conv_transpose(3, 6, 3, groups=2, dim=1), "in_channels=3 is not divisible"),
        (lambda: PF.init_conv_transpose(4, 5, 3, groups=2, dim=1), "out_channels=5 is not divisible"),
        (lambda: PF.init_conv_transpose(4, 6, 3, stride=1, output_padding=1, dim=1), "output_padding"),
        (lambda: PF.init_conv_transpose(4, 6, "3"), "kernel_size"),
    ],
)
def test_init_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: PF.conv_transpose2d(p, torch.randn(2, 4, 3)), r"params\['weight'\] must be"),
        (lambda p: PF.conv_transpose1d(p, torch.randn(2, 2, 4, 3)), r"x must be \[C_in, L\]"),
        (lambda p: PF.conv_transpose1d(p, torch.randn(2, 3, 5)), "x has 3 channels"),
        (lambda p: PF.conv_transpose1d(p, torch.randn(2, 4, 5), groups=3), "not divisible by groups=3"),
        (lambda p: PF.conv_transpose1d(p, torch.randn(2, 4, 5), groups=0), "groups=0"),
        (lambda p: PF.conv_transpose1d(p, torch.randn(4, 5), padding="same"), "int padding only"),
        (lambda p: PF.conv_transpose1d(p, torch.randn(4, 5), stride=2, output_padding=2), "output_padding"),
        (lambda p: PF.conv_transpose1d(p, torch.randn(4, 5), stride=(1, 1)), "stride"),
        (lambda p: PF.conv_transpose1d({**p, "bias": torch.zeros(5)}, torch.randn(4, 5)), r"params\['bias'\]"),
    ],
)
def test_errors(call, match):
    params = PF.init_conv_transpose(4, 6, 3, dim=1)
    with pytest.raises(ValueError, match=match):
        call(params)
