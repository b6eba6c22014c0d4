"""PF.conv1d/2d/3d against torch.nn.ConvNd (values) and the per-example loop (gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import psgfunc.functional as PF
from psgfunc import per_sample_grads
from psgfunc.functional.conv import _pad_input, _resolve_padding
from tests.oracles import assert_tree_close, per_example_grads

METHODS = ["vmap", "expanded"]
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
DTYPES = [torch.float64, torch.float32]
CONV = {1: PF.conv1d, 2: PF.conv2d, 3: PF.conv3d}
NN_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ["zeros", "reflect", "replicate", "circular"]


def per_dim(values: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(values[:dim])


# (name, kernel per dim, options); tuples are cut to the conv's dimension.
CASES = [
    ("default", (3, 3, 3), {}),
    ("no_bias", (3, 2, 3), {"bias": False}),
    ("stride2_pad1", (3, 3, 3), {"stride": 2, "padding": 1}),
    ("tuple_opts", (2, 3, 1), {"stride": (1, 2, 2), "padding": (2, 0, 1), "dilation": (2, 1, 1)}),
    ("dilation2", (3, 2, 2), {"dilation": 2, "padding": 1}),
    ("groups2", (3, 3, 3), {"groups": 2, "padding": 1}),
    ("depthwise", (3, 1, 3), {"groups": 4, "padding": 1}),
    ("valid", (2, 2, 2), {"padding": "valid"}),
    ("same_odd", (3, 3, 3), {"padding": "same"}),
    ("same_even", (2, 4, 2), {"padding": "same"}),
    ("same_even_dilated", (2, 3, 4), {"padding": "same", "dilation": (3, 2, 1)}),
    *[
        (f"{mode}_{name}", kernel, {"padding_mode": mode, **opts})
        for mode in MODES[1:]
        for name, kernel, opts in [
            ("pad1", (3, 3, 3), {"padding": 1}),
            ("pad_tuple_stride", (3, 2, 3), {"padding": (2, 1, 0), "stride": (2, 1, 2)}),
            ("same_even", (2, 4, 3), {"padding": "same", "dilation": (1, 1, 2)}),
            ("same_groups", (3, 3, 2), {"padding": "same", "groups": 2}),
            ("valid", (3, 3, 3), {"padding": "valid"}),
        ]
    ],
]
CASE_IDS = [c[0] for c in CASES]


def make_case(
    dim,
    kernel,
    opts,
    *,
    batch=3,
    dtype=torch.float64,
    in_channels=4,
    out_channels=4,
    spatial=(7, 6, 5),
    seed=0,
):
    """(nn module, params, kwargs for PF, input [B, C, *spatial]) with the same weights."""
    opts = dict(opts)
    bias = opts.pop("bias", True)
    kwargs = {k: per_dim(v, dim) if isinstance(v, tuple) else v for k, v in opts.items()}
    gen = torch.Generator().manual_seed(seed)
    params = PF.init_conv(
        in_channels,
        out_channels,
        per_dim(kernel, dim),
        groups=kwargs.get("groups", 1),
        bias=bias,
        dtype=dtype,
        generator=gen,
    )
    module = NN_CONV[dim](
        in_channels, out_channels, per_dim(kernel, dim), bias=bias, dtype=dtype, **kwargs
    )
    module.load_state_dict(params, strict=True)
    x = torch.randn(batch, in_channels, *per_dim(spatial, dim), dtype=dtype, generator=gen)
    return module, params, kwargs, x


# ---------------------------------------------------------------------------- values vs torch.nn


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_output_equals_nn_conv(dim, case):
    _, kernel, opts = case
    module, params, kwargs, x = make_case(dim, kernel, opts)
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(CONV[dim](params, x, **kwargs), expected)
        # one example, no batch dim, as the torch op accepts
        assert torch.equal(CONV[dim](params, x[1], **kwargs), module(x[1]))
        assert torch.equal(CONV[dim](params, x[1], **kwargs), expected[1])


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_resolve_padding_matches_nn(dim, case):
    """The shared padding helper reproduces nn.ConvNd's F.pad amounts and conv padding."""
    _, kernel, opts = case
    module, params, kwargs, x = make_case(dim, kernel, opts)
    pad, conv_padding = _resolve_padding(
        module.padding, module.kernel_size, module.stride, module.dilation, module.padding_mode
    )
    assert all(isinstance(p, int) for p in conv_padding) and len(conv_padding) == dim
    if module.padding_mode != "zeros":
        assert conv_padding == (0,) * dim
        assert (pad or [0] * 2 * dim) == list(module._reversed_padding_repeated_twice)
    elif isinstance(module.padding, str):
        # the same total padding as nn's: conv padding both sides plus the extra F.pad zeros
        total = [
            d * (k - 1) if module.padding == "same" else 0
            for d, k in zip(module.dilation, module.kernel_size)
        ]
        extra = pad or [0] * 2 * dim
        got = [
            2 * conv_padding[i] + extra[2 * (dim - 1 - i)] + extra[2 * (dim - 1 - i) + 1]
            for i in range(dim)
        ]
        assert got == total
    else:
        assert pad is None and conv_padding == module.padding
    # and the padded input followed by an int-padded conv gives nn's output
    op = {
        1: torch.nn.functional.conv1d,
        2: torch.nn.functional.conv2d,
        3: torch.nn.functional.conv3d,
    }[dim]
    with torch.no_grad():
        y = op(
            _pad_input(x, pad, module.padding_mode),
            params["weight"],
            params.get("bias"),
            module.stride,
            conv_padding,
            module.dilation,
            module.groups,
        )
        assert torch.equal(y, module(x))


def test_same_even_kernel_pads_one_more_at_the_end():
    pad, conv_padding = _resolve_padding("same", (4, 3), (1, 1), (1, 1), "zeros")
    assert conv_padding == (1, 1) and pad == [0, 0, 0, 1]  # F.pad order: last dim first
    pad, conv_padding = _resolve_padding("same", (4, 3), (1, 1), (1, 1), "reflect")
    assert conv_padding == (0, 0) and pad == [1, 1, 1, 2]
    assert _resolve_padding("same", (3,), (1,), (1,), "zeros") == (None, (1,))
    # int stride/dilation broadcast; dilation 2 makes the even kernel's padding symmetric
    assert _resolve_padding("same", (4, 3), 1, 2, "zeros") == (None, (3, 2))
    assert _resolve_padding(0, (3,), (1,), (1,), "circular") == (None, (0,))


# ------------------------------------------------------------------ per-sample grads vs the loop


def conv_loss(dim, kwargs):
    def fn(params, x, target):
        return (torch.tanh(CONV[dim](params, x, **kwargs)) * target).sum()

    return fn


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_per_sample_grads_match_loop(method, dtype, dim, case):
    _, kernel, opts = case
    _, params, kwargs, x = make_case(dim, kernel, opts, dtype=dtype)
    with torch.no_grad():
        target = torch.randn_like(CONV[dim](params, x, **kwargs))
    fn = conv_loss(dim, kwargs)
    grads = per_sample_grads(fn, params, x, target, method=method)
    expected = per_example_grads(fn, params, x, target)
    assert all(grads[k].dtype == dtype for k in grads)
    assert_tree_close(grads, expected, dtype=dtype)


# -------------------------------------------------------------------------- hypothesis grid


@st.composite
def conv_configs(draw):
    dim = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding_mode = draw(st.sampled_from(MODES))
    padding = draw(
        st.one_of(
            st.sampled_from(["same", "valid"]),
            st.integers(0, 2),
            st.tuples(*[st.integers(0, 2)] * dim),
        )
    )
    stride = (
        1
        if padding == "same"
        else draw(st.one_of(st.integers(1, 2), st.tuples(*[st.integers(1, 2)] * dim)))
    )
    # every size >= 3 (reflect needs pad < size) and >= the dilated kernel (output >= 1)
    spatial = tuple(
        draw(st.integers(max(3, d * (k - 1) + 1), max(3, d * (k - 1) + 1) + (2 if dim < 3 else 1)))
        for k, d in zip(kernel, dilation)
    )
    return dict(
        dim=dim,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel=kernel,
        bias=draw(st.booleans()),
        batch=draw(st.integers(0, 4)),
        spatial=spatial,
        kwargs=dict(
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        ),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(cfg=conv_configs())
def test_property_grid(method, cfg):
    dim, kwargs = cfg["dim"], cfg["kwargs"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    params = PF.init_conv(
        cfg["in_channels"],
        cfg["out_channels"],
        cfg["kernel"],
        groups=kwargs["groups"],
        bias=cfg["bias"],
        dtype=torch.float64,
        generator=gen,
    )
    module = NN_CONV[dim](
        cfg["in_channels"],
        cfg["out_channels"],
        cfg["kernel"],
        bias=cfg["bias"],
        dtype=torch.float64,
        **kwargs,
    )
    module.load_state_dict(params, strict=True)
    x = torch.randn(
        cfg["batch"], cfg["in_channels"], *cfg["spatial"], dtype=torch.float64, generator=gen
    )
    with torch.no_grad():
        out = CONV[dim](params, x, **kwargs)
        assert torch.equal(out, module(x))
    target = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    fn = conv_loss(dim, kwargs)
    grads = per_sample_grads(fn, params, x, target, method=method)
    assert {k: tuple(v.shape) for k, v in grads.items()} == {
        k: (cfg["batch"], *v.shape) for k, v in params.items()
    }
    assert_tree_close(grads, per_example_grads(fn, params, x, target), dtype=torch.float64)


# --------------------------------------------------------------------------------- init_conv


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_init_conv_matches_nn_default_init(dim, groups, bias):
    kernel = per_dim((3, 2, 1), dim)
    torch.manual_seed(7)
    module = NN_CONV[dim](4, 6, kernel, groups=groups, bias=bias)
    params = PF.init_conv(
        4, 6, kernel, groups=groups, bias=bias, generator=torch.Generator().manual_seed(7)
    )
    expected = dict(module.state_dict())
    assert list(params) == list(expected)
    for k in params:
        assert params[k].shape == expected[k].shape and params[k].dtype == expected[k].dtype
        # same generator stream and the same bound (up to rounding of sqrt)
        torch.testing.assert_close(params[k], expected[k], rtol=1e-6, atol=1e-7)
    bound = 1 / math.sqrt(4 // groups * math.prod(kernel))
    assert all(p.abs().max() <= bound for p in params.values())


def test_init_conv_int_kernel_with_dim_and_options():
    params = PF.init_conv(3, 5, 2, dim=3, dtype=torch.float64)
    assert params["weight"].shape == (5, 3, 2, 2, 2) and params["bias"].shape == (5,)
    assert params["weight"].dtype == torch.float64
    assert PF.init_conv(3, 5, (2, 3), dim=2)["weight"].shape == (5, 3, 2, 3)
    a = PF.init_conv(2, 2, (3,), generator=torch.Generator().manual_seed(1))
    b = PF.init_conv(2, 2, (3,), generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- errors


def test_init_conv_errors():
    with pytest.raises(ValueError, match="dim"):
        PF.init_conv(3, 4, 3)  # int kernel without dim
    with pytest.raises(ValueError, match="disagrees"):
        PF.init_conv(3, 4, (3, 3), dim=3)
    with pytest.raises(ValueError, match="dim=4"):
        PF.init_conv(3, 4, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="in_channels=3 is not divisible by groups=2"):
        PF.init_conv(3, 4, (3,), groups=2)
    with pytest.raises(ValueError, match="out_channels=3 is not divisible by groups=2"):
        PF.init_conv(4, 3, (3,), groups=2)
    with pytest.raises(ValueError, match="groups"):
        PF.init_conv(4, 4, (3,), groups=0)
    with pytest.raises(ValueError, match="kernel_size"):
        PF.init_conv(4, 4, (3, 0))


def test_wrong_input_rank():
    params = PF.init_conv(3, 4, (3, 3))
    with pytest.raises(ValueError, match=r"\[C, H, W\].*\[B, C, H, W\].*2-D"):
        PF.conv2d(params, torch.randn(3, 8))
    with pytest.raises(ValueError, match="5-D"):
        PF.conv2d(params, torch.randn(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[C, L\]"):
        PF.conv1d(PF.init_conv(3, 4, (3,)), torch.randn(2, 2, 3, 8))


def test_weight_of_wrong_rank():
    with pytest.raises(ValueError, match="params\\['weight'\\]"):
        PF.conv1d(PF.init_conv(3, 4, (3, 3)), torch.randn(2, 3, 8))


def test_channel_mismatch():
    params = PF.init_conv(3, 4, (3, 3))
    with pytest.raises(ValueError, match="5 channels.*expects.*3"):
        PF.conv2d(params, torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="5 channels"):
        PF.conv2d(params, torch.randn(5, 8, 8))


def test_channels_not_divisible_by_groups():
    params = PF.init_conv(4, 4, (3,), groups=2)
    with pytest.raises(ValueError, match="in_channels=3 .*not divisible by groups=2"):
        PF.conv1d(params, torch.randn(2, 3, 8), groups=2)
    with pytest.raises(ValueError, match="out_channels=4 .*not divisible by groups=3"):
        PF.conv1d(params, torch.randn(2, 6, 8), groups=3)
    with pytest.raises(ValueError, match="groups"):
        PF.conv1d(params, torch.randn(2, 4, 8), groups=0)


def test_same_padding_with_stride():
    params = PF.init_conv(3, 4, (3, 3))
    with pytest.raises(ValueError, match="padding='same' needs stride=1"):
        PF.conv2d(params, torch.randn(3, 8, 8), padding="same", stride=2)
    with pytest.raises(ValueError, match="padding='same' needs stride=1"):
        PF.conv2d(
            params, torch.randn(3, 8, 8), padding="same", stride=(1, 2), padding_mode="reflect"
        )


def test_unknown_padding_mode_and_string():
    params = PF.init_conv(3, 4, (3,))
    with pytest.raises(ValueError, match="padding_mode='mirror'"):
        PF.conv1d(params, torch.randn(3, 8), padding_mode="mirror")
    with pytest.raises(ValueError, match="padding='full'"):
        PF.conv1d(params, torch.randn(3, 8), padding="full")


def test_malformed_stride_padding_dilation():
    params = PF.init_conv(3, 4, (3, 3))
    x = torch.randn(3, 8, 8)
    with pytest.raises(ValueError, match="stride"):
        PF.conv2d(params, x, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="stride"):
        PF.conv2d(params, x, stride=0)
    with pytest.raises(ValueError, match="padding"):
        PF.conv2d(params, x, padding=-1)
    with pytest.raises(ValueError, match="dilation"):
        PF.conv2d(params, x, dilation=(1,))


def test_bias_of_wrong_shape():
    params = PF.init_conv(3, 4, (3,))
    params["bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match="bias"):
        PF.conv1d(params, torch.randn(3, 8))
