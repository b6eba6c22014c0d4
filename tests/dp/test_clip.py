"""Clipping and the Gaussian mechanism: analytic values checked by hand (ARCHITECTURE.md rule 8)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import psgfunc.dp as dp
from tests.oracles import assert_tree_close

B = 5


def constant_grads(dtype=torch.float64):
    """Example i's gradient is the constant i in every coordinate (example 0 is zero)."""
    i = torch.arange(B, dtype=dtype)
    return {
        "w": i[:, None, None].expand(B, 3, 2).clone(),  # 6 coordinates
        "b": i[:, None].expand(B, 2).clone(),  # 2 coordinates
    }


def test_per_sample_norms_constant():
    norms = dp.per_sample_norms(constant_grads())
    expected = torch.arange(B, dtype=torch.float64) * math.sqrt(8)
    torch.testing.assert_close(norms, expected, rtol=1e-15, atol=0)


def test_clip_by_hand():
    # ||g_i|| = i sqrt(8); C = 2.5 sqrt(8): examples 0, 1, 2 stay, 3 and 4 become 2.5 everywhere.
    clipped = dp.clip(constant_grads(), 2.5 * math.sqrt(8))
    expected = torch.tensor([0.0, 1.0, 2.0, 2.5, 2.5], dtype=torch.float64)
    torch.testing.assert_close(clipped["w"], expected[:, None, None].expand(B, 3, 2), rtol=1e-14, atol=0)
    torch.testing.assert_close(clipped["b"], expected[:, None].expand(B, 2), rtol=1e-14, atol=0)
    assert not clipped["w"][0].any()  # the zero gradient stays exactly zero


def test_privatize_without_noise_is_clipped_sum():
    summed = dp.privatize(constant_grads(), 2.5 * math.sqrt(8), 0.0)
    # 0 + 1 + 2 + 2.5 + 2.5 = 8 in every coordinate, no batch dim
    assert summed["w"].shape == (3, 2) and summed["b"].shape == (2,)
    assert torch.equal(summed["w"], torch.full((3, 2), 8.0, dtype=torch.float64))
    assert torch.equal(summed["b"], torch.full((2,), 8.0, dtype=torch.float64))


def test_huge_max_norm_keeps_gradients():
    grads = {"w": torch.randn(7, 4, 3, dtype=torch.float64), "b": torch.randn(7, 3, dtype=torch.float64)}
    c = torch.finfo(torch.float32).max
    assert_tree_close(dp.clip(grads, c), grads, rtol=0)
    assert_tree_close(dp.privatize(grads, c, 0.0), {k: v.sum(0) for k, v in grads.items()}, rtol=1e-15)


def test_per_layer_clipping_by_hand():
    grads = {"fc1": {"w": torch.full((2, 4), 1.0)}, "fc2": {"w": torch.full((2, 9), 1.0)}}
    grads["fc2"]["w"][1] = 0.0
    # norms: fc1 2 for both examples, fc2 3 and 0; C's 1 and 6: fc1 halves, fc2 unchanged
    clipped = dp.clip(grads, {"fc1": 1.0, "fc2": 6.0})
    # (a hair under 0.5: clip's norms cover the scaling's own rounding, so that the result
    # stays within C as returned)
    torch.testing.assert_close(clipped["fc1"]["w"], torch.full((2, 4), 0.5), rtol=1e-5, atol=0)
    assert bool((clipped["fc1"]["w"] <= 0.5).all())
    assert torch.equal(clipped["fc2"]["w"], grads["fc2"]["w"])
    summed = dp.privatize(grads, {"fc1": 1.0, "fc2": 6.0}, 0.0)
    assert torch.equal(summed["fc1"]["w"], torch.full((4,), 1.0))
    assert torch.equal(summed["fc2"]["w"], torch.full((9,), 1.0))


def test_per_layer_noise_uses_total_norm():
    grads = {"a": torch.zeros(0, 100_000), "b": torch.zeros(0, 100_000)}
    gen = torch.Generator().manual_seed(0)
    noise = dp.privatize(grads, {"a": 3.0, "b": 4.0}, 0.5, generator=gen)
    for leaf in noise.values():
        assert abs(leaf.std().item() / (0.5 * 5.0) - 1) < 0.02


def test_empty_batch_is_pure_noise_of_param_shapes():
    grads = {"w": torch.zeros(0, 3, 2), "b": torch.zeros(0, 2)}
    out = dp.privatize(grads, 1.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert out["w"].shape == (3, 2) and out["b"].shape == (2,)
    assert out["w"].abs().sum() > 0
    zero = dp.privatize(grads, 1.0, 0.0)
    assert not zero["w"].any() and not zero["b"].any()
    assert dp.per_sample_norms(grads).shape == (0,)
    assert dp.clip(grads, 1.0)["w"].shape == (0, 3, 2)


def test_overflowing_norm_is_recomputed():
    # squares overflow float32 (9e38 + 1.6e39 = inf) but the gradient is finite: norm 5e19
    grads = {"w": torch.tensor([[3e19, 4e19], [0.3, 0.4]], dtype=torch.float32)}
    norms = dp.per_sample_norms(grads)
    torch.testing.assert_close(norms, torch.tensor([5e19, 0.5]))
    clipped = dp.clip(grads, 1.0)
    torch.testing.assert_close(clipped["w"], torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_half_precision_norms_in_float32():
    grads = {"w": torch.full((2, 4), 300.0, dtype=torch.float16)}  # 300^2 * 4 overflows float16
    norms = dp.per_sample_norms(grads)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.full((2,), 600.0))
    assert dp.clip(grads, 60.0)["w"].dtype == torch.float16


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients_raise(bad):
    grads = {"w": torch.ones(4, 3), "b": torch.ones(4)}
    grads["w"][1, 2] = bad
    grads["b"][3] = float("nan")
    for call in (
        lambda: dp.clip(grads, 1.0),
        lambda: dp.privatize(grads, 1.0, 1.0),
        lambda: dp.per_sample_norms(grads),
        lambda: dp.clip(grads, {"w": 1.0, "b": 1.0}),
    ):
        with pytest.raises(ValueError, match=r"2 of 4 examples have NaN or Inf.*indices 1, 3"):
            call()


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), float("nan"), "1", None, True])
def test_bad_max_norm_raises(max_norm):
    grads = {"w": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="max_norm"):
        dp.clip(grads, max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        dp.privatize(grads, max_norm, 1.0)


def test_bad_per_layer_max_norm_raises():
    grads = {"a": torch.ones(2, 3), "b": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        dp.clip(grads, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match=r"max_norm\['b'\]"):
        dp.clip(grads, {"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="needs grads to be a mapping"):
        dp.clip([torch.ones(2, 3)], {"a": 1.0})


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), "x"])
def test_bad_noise_multiplier_raises(sigma):
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.privatize({"w": torch.ones(2, 3)}, 1.0, sigma)


def test_bad_grads_raise():
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        dp.clip({"w": torch.ones(2, 3), "b": torch.ones(3)}, 1.0)
    with pytest.raises(ValueError, match="floating tensor"):
        dp.clip({"w": torch.ones(2, 3, dtype=torch.int64)}, 1.0)
    with pytest.raises(ValueError, match="no tensor leaves"):
        dp.per_sample_norms({})


@settings(max_examples=40, deadline=None)
@given(
    norms=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=1, max_size=6),
    c=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_clip_property(norms, c, seed):
    """Clipped norms are min(norm, C), directions are kept, the sum is the clipped sum."""
    gen = torch.Generator().manual_seed(seed)
    grads = {"a": torch.randn(len(norms), 3, generator=gen, dtype=torch.float64),
             "b": torch.randn(len(norms), 2, 2, generator=gen, dtype=torch.float64)}
    target = torch.tensor(norms, dtype=torch.float64)
    scale = target / dp.per_sample_norms(grads)
    grads = {k: v * scale.view(-1, *[1] * (v.dim() - 1)) for k, v in grads.items()}
    clipped = dp.clip(grads, c)
    torch.testing.assert_close(dp.per_sample_norms(clipped), target.clamp(max=c), rtol=1e-12, atol=1e-300)
    factor = c / target.clamp(min=c)
    for k in grads:
        expected = grads[k] * factor.view(-1, *[1] * (grads[k].dim() - 1))
        torch.testing.assert_close(clipped[k], expected, rtol=1e-12, atol=1e-300)
    summed = dp.privatize(grads, c, 0.0)
    assert_tree_close(summed, {k: v.sum(0) for k, v in clipped.items()}, rtol=1e-12)


@pytest.mark.parametrize("route", ["clip", "fast", "materialize", "compiled", "dict"])
def test_a_clip_factor_below_float32_normal_range_is_zero(route):
    """Review reproducer (h12): where ``C / norm`` falls below float32's smallest normal
    number (norm above C * 8.5e37) the factor rounds by up to its own size (here 0.75 of
    the smallest subnormal rounded up to 1: the example added 1.33 C). Such factors are 0
    now (clipped harder, never less), on every route; ordinary factors are unchanged."""
    import warnings

    import psgfunc.functional as PF

    c = 1e-30
    big = c / (0.75 * 2.0**-149)  # the factor C / big is 0.75 of float32's smallest subnormal
    if route == "clip":
        grads = {"bias": torch.tensor([[big], [0.5 * c]], dtype=torch.float32)}
        out = dp.clip(grads, c)["bias"]
        assert float(out[0, 0]) == 0.0 and float(out[1, 0]) == 0.5 * float(torch.tensor(c))
        return
    params = {"weight": torch.zeros(1, 4), "bias": torch.zeros(1)}
    x, a = torch.zeros(2, 4), torch.tensor([[big], [1.0]], dtype=torch.float32)

    def fn(p, xi, ai):
        return (PF.linear(p, xi) * ai).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if route == "compiled":
            summed, norms = dp.compiled_clipped_grad_sum(fn, c, backend="eager")(params, x, a)
        else:
            limit = {"weight": c, "bias": c} if route == "dict" else c
            summed, norms = dp.clipped_grad_sum(fn, params, x, a, max_norm=limit,
                                                method="materialize" if route == "materialize" else "fast")
    assert float(norms[0]) >= big
    # only example 1 (gradient 1 >> C: clipped to C) is left in the sum
    assert float(summed["bias"][0]) == pytest.approx(c, rel=1e-5, abs=0)


@pytest.mark.parametrize("route", ["clip", "fast", "materialize", "compiled"])
def test_float16_sums_in_the_subnormal_range_stay_within_max_norm(route):
    """Review reproducer (h12): float16 sums are computed in float32 and rounded once; below
    float16's smallest normal number (6.1e-5) that rounding is absolute (up to 3e-8 per
    coordinate), not the relative 2^-11 the norms carry: a 1024-element weight clipped to
    C = 1e-6 came out at 1.9 C. The factors now clip to C minus what that rounding can add
    (sqrt(1024) * 2^-25 = 9.5e-7), and a C below twice that is refused, naming max_norm."""
    import warnings

    import psgfunc.functional as PF

    params = {"weight": torch.zeros(1, 1024, dtype=torch.float16)}
    x = torch.ones(1, 1024, dtype=torch.float16)  # B = 1: the sum is the contribution

    def fn(p, xi):
        return PF.linear(p, xi).sum()  # the gradient: all ones, norm 32

    def run(c):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if route == "clip":
                return dp.clip({"weight": torch.ones(1, 1, 1024, dtype=torch.float16)}, c)["weight"][0]
            if route == "compiled":
                return dp.compiled_clipped_grad_sum(fn, c, method="fast", backend="eager")(params, x)[0]["weight"]
            return dp.clipped_grad_sum(fn, params, x, max_norm=c, method=route)[0]["weight"]

    for c in (4e-6, 1e-4, 1.0):
        out = run(c)
        assert out.dtype == torch.float16
        assert float(out.double().norm()) <= c, (c, float(out.double().norm()) / c)
    with pytest.raises(ValueError, match="max_norm 1e-06 is too small for half-precision"):
        run(1e-6)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-25), (torch.float64, 1e-300)])
def test_norms_of_gradients_whose_squares_underflow(dtype, scale):
    """Gradients of 1e-25 in float32 (1e-300 in float64): each square is below the smallest
    subnormal number, so the sums of squares were 0, per_sample_norms said 0, and clipping
    to C = 1e-30 left them whole (contributions of 5e-25). They are measured rescaled now."""
    g = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(3, 40, 5, dtype=torch.float64, generator=g), "b": torch.randn(3, 5, dtype=torch.float64, generator=g)}
    grads["w"][2] = 0.0  # a zero example stays at norm 0
    grads["b"][2] = 0.0
    exact = torch.cat([t.flatten(1) for t in grads.values()], 1).norm(dim=1) * scale
    tiny = {k: (v * scale).to(dtype) for k, v in grads.items()}
    norms = dp.per_sample_norms(tiny)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    c = scale * 1e-5
    clipped = dp.clip(tiny, c)
    for b in range(2):
        norm = math.sqrt(sum(float((t[b].double() / scale).square().sum()) for t in clipped.values())) * scale
        assert norm <= c * (1 + 1e-5)
    assert all(bool((t[2] == 0).all()) for t in clipped.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_gradients_as_returned_are_within_max_norm(dtype):
    """clip's promise holds for the numbers it returns, measured exactly (rational sums of
    squares): before, its norms did not cover the scaling's rounding and half the clipped
    examples came out a rounding or three above C."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(0)
    c = 0.7
    grads = {"w": torch.randn(300, 5, 7, generator=gen, dtype=torch.float64).to(dtype),
             "b": torch.randn(300, 7, generator=gen, dtype=torch.float64).to(dtype)}
    clipped = dp.clip(grads, c)
    rows = torch.cat([clipped["w"].flatten(1), clipped["b"]], 1).double().tolist()
    bound = Fraction(c) ** 2
    over = [i for i, row in enumerate(rows) if sum(Fraction(v) ** 2 for v in row) > bound]
    assert not over, f"{len(over)} examples above C"
