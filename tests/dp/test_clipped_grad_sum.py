"""clipped_grad_sum against the float64 per-example loop oracle (ARCHITECTURE.md rule 8)."""

from __future__ import annotations

import pytest
import torch

import psgfunc.dp as dp
from tests.oracles import assert_tree_close, per_example_grads


def loss_fn(params, x, y):
    """Two-layer MLP on ONE example: x [5], y [] -> 0-dim loss."""
    h = torch.tanh(x @ params["fc1"]["weight"].T + params["fc1"]["bias"])
    out = h @ params["fc2"]["weight"].T + params["fc2"]["bias"]
    return torch.nn.functional.cross_entropy(out[None], y[None])


def make(n, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    params = {
        "fc1": {"weight": torch.randn(6, 5, generator=gen), "bias": torch.randn(6, generator=gen)},
        "fc2": {"weight": torch.randn(3, 6, generator=gen), "bias": torch.randn(3, generator=gen)},
    }
    params = {k: {n_: t.to(dtype) for n_, t in v.items()} for k, v in params.items()}
    x = 2 * torch.randn(n, 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return params, x, y


@pytest.mark.parametrize("method", ["auto", "fast", "materialize"])
@pytest.mark.parametrize("max_norm", [0.3, {"fc1": 0.2, "fc2": 0.4}, 1e30])
def test_matches_loop_oracle(method, max_norm):
    params, x, y = make(7)
    grads = per_example_grads(loss_fn, params, x, y)
    summed, norms = dp.clipped_grad_sum(loss_fn, params, x, y, max_norm=max_norm, method=method)
    assert_tree_close(summed, {k: {n: g.sum(0) for n, g in v.items()} for k, v in dp.clip(grads, max_norm).items()})
    torch.testing.assert_close(norms, dp.per_sample_norms(grads), rtol=1e-10, atol=0)
    assert norms.shape == (7,)


def test_float32_close_to_float64_oracle():
    params, x, y = make(5, torch.float32)
    grads = per_example_grads(loss_fn, params, x, y)  # float64
    summed, _ = dp.clipped_grad_sum(loss_fn, params, x, y, max_norm=0.5)
    expected = {k: {n: g.sum(0) for n, g in v.items()} for k, v in dp.clip(grads, 0.5).items()}
    assert_tree_close(summed, expected, dtype=torch.float32)


def test_empty_batch():
    params, x, y = make(0)
    summed, norms = dp.clipped_grad_sum(loss_fn, params, x, y, max_norm=1.0)
    assert norms.shape == (0,)
    assert summed["fc1"]["weight"].shape == (6, 5) and not summed["fc1"]["weight"].any()


def test_errors():
    params, x, y = make(3)
    for method in ("fast", "materialize"):
        with pytest.raises(ValueError, match="no tensor leaves"):
            dp.clipped_grad_sum(loss_fn, {}, x, y, max_norm=1.0, method=method)
    with pytest.raises(ValueError, match="unknown method 'hooks'"):
        dp.clipped_grad_sum(loss_fn, params, x, y, max_norm=1.0, method="hooks")
    with pytest.raises(ValueError, match="max_norm"):
        dp.clipped_grad_sum(loss_fn, params, x, y, max_norm=0.0)
    with pytest.raises(ValueError, match="missing"):
        dp.clipped_grad_sum(loss_fn, params, x, y, max_norm={"fc1": 1.0})
    with pytest.raises(ValueError, match="NaN or Inf"):
        dp.clipped_grad_sum(loss_fn, params, x * float("nan"), y, max_norm=1.0)


def test_fast_clipping_of_a_layer_of_width_zero():
    """Review reproducer: a hidden layer of width 0 (its weight ``[0, 4]``, the next one's
    ``[3, 0]``) made the fast route's sum of the next weight fail to reshape its empty
    ``[B, 0]`` input; it now gives what the materialising route gives (zero sums for the
    empty weights, the bias's own clipped sum)."""
    import psgfunc.functional as PF

    gen = torch.Generator().manual_seed(0)
    params = {"a": {"weight": torch.randn(0, 4, generator=gen, dtype=torch.float64), "bias": torch.zeros(0, dtype=torch.float64)},
              "b": {"weight": torch.randn(3, 0, generator=gen, dtype=torch.float64), "bias": torch.randn(3, generator=gen, dtype=torch.float64)}}

    def fn(p, x, y):
        return ((PF.linear(p["b"], torch.tanh(PF.linear(p["a"], x))) - y) ** 2).sum()

    x, y = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    fast, fast_norms = dp.clipped_grad_sum(fn, params, x, y, max_norm=1.0, method="fast")
    ref, ref_norms = dp.clipped_grad_sum(fn, params, x, y, max_norm=1.0, method="materialize")
    assert_tree_close(fast, ref, rtol=1e-10)
    torch.testing.assert_close(fast_norms, ref_norms, rtol=1e-10, atol=0)
