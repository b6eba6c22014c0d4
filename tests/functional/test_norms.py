"""PF.group_norm, PF.instance_norm, PF.rms_norm against torch.nn (values, init) and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import psgfunc.functional as PF

F64 = torch.float64


def perturbed(params, gen):
    """Random values under init's keys (ones/zeros would hide a swapped weight and bias)."""
    return {k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in params.items()}


def load(module, params):
    module.load_state_dict(params, strict=True)
    return module


# ---------------------------------------------------------------------------- group_norm


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 2, 3)], ids=str)
def test_group_norm_equals_nn(affine, groups, spatial):
    eps = 0.5 if groups == 2 else 1e-5
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(affine=affine != "none", bias=affine == "both")
    params = perturbed(PF.init_group_norm(groups, 6, eps, dtype=F64, **kwargs), gen)
    module = load(nn.GroupNorm(groups, 6, eps, dtype=F64, **kwargs), params)
    x = torch.randn(3, 6, *spatial, dtype=F64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(PF.group_norm(params, x, groups, eps=eps), module(x), rtol=1e-10, atol=1e-12)


def test_group_norm_bias_only_and_one_row():
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(4, dtype=F64, generator=gen)
    x = torch.randn(1, 4, 7, dtype=F64, generator=gen)
    expected = torch.nn.functional.group_norm(x, 2, None, None) + b.view(4, 1)
    torch.testing.assert_close(PF.group_norm({"bias": b}, x, 2), expected, rtol=1e-12, atol=1e-12)


def test_init_group_norm_is_nn_group_norm():
    for args, kwargs in [((2, 4), {}), ((2, 4, 1e-3, False), {}), ((1, 3), {"bias": False}),
                         ((3, 6, 1e-5, True, None, torch.float64), {})]:
        params = PF.init_group_norm(*args, **kwargs)
        ref = nn.GroupNorm(*args, **kwargs).state_dict()
        assert list(params) == list(ref)
        for k in params:
            assert torch.equal(params[k], ref[k]) and params[k].dtype == ref[k].dtype


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: PF.group_norm({}, torch.randn(4), 2), r"\[N, C, \*S\]"),
        (lambda: PF.group_norm({}, torch.randn(2, 5, 3), 2), "num_groups=2 must divide the C=5"),
        (lambda: PF.group_norm({}, torch.randn(2, 4, 3), 0), "num_groups=0 must be a positive int"),
        (lambda: PF.group_norm({"weight": torch.ones(3)}, torch.randn(2, 4, 3), 2),
         r"params\['weight'\] has shape \(3,\).*C=4.*init_group_norm\(2, 4\)"),
        # one example [C, *S] without its row dim: named
        (lambda: PF.group_norm({"weight": torch.ones(4)}, torch.randn(4, 6, 6), 2), r"unsqueeze\(0\)"),
        (lambda: PF.init_group_norm(3, 4), "num_groups=3 must divide num_channels=4"),
        (lambda: PF.init_group_norm(0, 4), "num_groups=0"),
        (lambda: PF.init_group_norm(2, 4, -1.0), "eps=-1.0"),
    ],
)
def test_group_norm_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------- instance_norm


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_instance_norm_equals_nn(dim, affine):
    eps = 0.5 if dim == 2 else 1e-5
    gen = torch.Generator().manual_seed(dim)
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
    kwargs = dict(affine=affine != "none", bias=affine == "both")
    params = perturbed(PF.init_instance_norm(3, eps, dtype=F64, **kwargs), gen)
    module = load(cls(3, eps, dtype=F64, **kwargs), params)
    x = torch.randn(2, 3, *(4, 3, 2)[:dim], dtype=F64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(PF.instance_norm(params, x, eps=eps), module(x), rtol=1e-10, atol=1e-12)
        # torch.nn's one example (no batch dim) is our x.unsqueeze(0)
        torch.testing.assert_close(PF.instance_norm(params, x[:1], eps=eps)[0], module(x[0]), rtol=1e-10, atol=1e-12)


def test_init_instance_norm_is_nn_instance_norm():
    for args, kwargs in [((4,), {}), ((4, 1e-3, 0.2, True), {}), ((2,), {"affine": True, "bias": False}),
                         ((3, 1e-5, 0.1, True, False, None, torch.float64), {})]:
        params = PF.init_instance_norm(*args, **kwargs)
        ref = nn.InstanceNorm2d(*args, **kwargs).state_dict()
        assert list(params) == list(ref)
        for k in params:
            assert torch.equal(params[k], ref[k]) and params[k].dtype == ref[k].dtype


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: PF.instance_norm({}, torch.randn(3, 4)), r"\[N, C, \*S\].*unsqueeze\(0\)"),
        (lambda: PF.instance_norm({"bias": torch.ones(2)}, torch.randn(2, 3, 5)),
         r"params\['bias'\] has shape \(2,\).*C=3"),
        (lambda: PF.instance_norm({"weight": torch.ones(3)}, torch.randn(3, 5, 4)), r"unsqueeze\(0\)"),
        (lambda: PF.init_instance_norm(3, track_running_stats=True), "track_running_stats=False"),
        (lambda: PF.init_instance_norm(0), "num_features=0"),
    ],
)
def test_instance_norm_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------ rms_norm


@pytest.mark.parametrize("shape", [(5,), (3, 4)], ids=str)
@pytest.mark.parametrize("lead", [(), (2, 3)], ids=str)
@pytest.mark.parametrize("eps", [None, 0.5])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_equals_nn(shape, lead, eps, affine):
    gen = torch.Generator().manual_seed(0)
    params = perturbed(PF.init_rms_norm(shape, eps, affine, dtype=F64), gen)
    module = load(nn.RMSNorm(shape, eps, affine, dtype=F64), params)
    x = torch.randn(*lead, *shape, dtype=F64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(PF.rms_norm(params, x, shape, eps=eps), module(x), rtol=1e-10, atol=1e-12)
    if len(shape) == 1:
        torch.testing.assert_close(PF.rms_norm(params, x, shape[0], eps=eps), module(x), rtol=1e-10, atol=1e-12)


def test_rms_norm_float32_default_eps():
    x = torch.full((2, 4), 1e-4)
    torch.testing.assert_close(PF.rms_norm({}, x, 4), nn.RMSNorm(4, elementwise_affine=False)(x))


def test_init_rms_norm_is_nn_rms_norm():
    for args in [(5,), ((2, 3), 1e-3), ((4,), None, False), ((4,), None, True, None, torch.float64)]:
        params = PF.init_rms_norm(*args)
        ref = nn.RMSNorm(*args).state_dict()
        assert list(params) == list(ref)
        for k in params:
            assert torch.equal(params[k], ref[k]) and params[k].dtype == ref[k].dtype


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: PF.rms_norm({}, torch.randn(2, 4), 5), r"does not end in normalized_shape=\(5,\)"),
        (lambda: PF.rms_norm({"weight": torch.ones(3)}, torch.randn(2, 4), 4),
         r"params\['weight'\] has shape \(3,\).*init_rms_norm"),
        (lambda: PF.rms_norm({"weight": torch.ones(4), "bias": torch.zeros(4)}, torch.randn(2, 4), 4),
         "weight only"),
        (lambda: PF.rms_norm({}, torch.randn(2, 4), 0), "normalized_shape=0"),
        (lambda: PF.init_rms_norm([]), "normalized_shape"),
        (lambda: PF.init_rms_norm(4, -0.1), "eps=-0.1"),
    ],
)
def test_rms_norm_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_group_norm_bias_without_weight_differentiates():
    """torch's fused group_norm with a bias and no weight fails in backward ("tensor does not
    have a device"); PF.group_norm adds the bias itself then."""
    b = torch.randn(4, dtype=F64, requires_grad=True)
    x = torch.randn(2, 4, 3, dtype=F64)
    PF.group_norm({"bias": b}, x, 2).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((4,), 6.0, dtype=F64))


def test_instance_norm_empty_batch_with_affine():
    """torch's instance_norm indexes row 0 of an empty batch when it has affine params."""
    p = PF.init_instance_norm(3, affine=True, dtype=F64)
    p["weight"].requires_grad_(True)
    out = PF.instance_norm(p, torch.zeros(0, 3, 5, dtype=F64))
    assert out.shape == (0, 3, 5)
    out.sum().backward()
    assert torch.equal(p["weight"].grad, torch.zeros(3, dtype=F64))
