"""Noise: std sigma * C, reproducible from a seed, fresh with secure=True (ARCHITECTURE.md rule 8)."""

from __future__ import annotations

import pytest
import torch

import psgfunc.dp as dp

N = 200_000  # coordinates per draw: the sample std is within ~0.3 % of the truth (1 sigma)


@pytest.mark.parametrize("sigma,c", [(1.0, 1.0), (0.7, 3.0), (2.5, 0.1)])
def test_noise_std_is_sigma_times_c(sigma, c):
    grads = {"w": torch.zeros(3, 400, 250, dtype=torch.float64)}  # zero gradients: pure noise
    out = dp.privatize(grads, c, sigma, generator=torch.Generator().manual_seed(0))["w"]
    assert out.shape == (400, 250)
    assert abs(out.std().item() / (sigma * c) - 1) < 0.02
    assert abs(out.mean().item()) < 0.02 * sigma * c


def test_noise_std_over_many_steps_of_the_transform():
    """Coordinate 0 over 2000 steps of one transform: std sigma C / expected_batch_size."""
    t = dp.dp_sgd_transform(2.0, 1.5, expected_batch_size=4, seed=3)
    state = t.init({"w": torch.zeros(5)})
    draws = []
    for _ in range(2000):
        u, state = t.update({"w": torch.zeros(0, 5, dtype=torch.float64)}, state)
        draws.append(u["w"])
    draws = torch.stack(draws)
    assert state.step == 2000
    # the std estimate of 2000 normal draws has relative sd 1/sqrt(4000) = 1.6 %; allow 5 sd
    assert ((draws.std(0) / (1.5 * 2.0 / 4)) - 1).abs().max() < 0.08
    # successive draws are not repeated
    assert torch.unique(draws[:, 0]).numel() == 2000


def test_same_seed_same_noise_different_seed_differs():
    grads = {"w": torch.randn(4, 10, dtype=torch.float64), "b": torch.randn(4, 3, dtype=torch.float64)}

    def run(seed):
        return dp.privatize(grads, 1.0, 1.0, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)


def test_transform_is_pure_in_its_state():
    t = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4, seed=0)
    grads = {"w": torch.randn(4, 6, dtype=torch.float64)}
    state = t.init(grads)
    before = state.generator.get_state().clone()
    u1, s1 = t.update(grads, state)
    assert torch.equal(state.generator.get_state(), before)  # the given state is untouched
    assert s1.step == 1 and state.step == 0
    # a copy of the state (same generator state, new object) gives the same update: the
    # noise is a function of the state alone (reusing `state` itself is refused, see
    # tests/dp/test_transform_state.py)
    twin = dp.DPSGDState(torch.Generator().set_state(before), 0)
    u2, s2 = t.update(grads, twin)
    assert torch.equal(u1["w"], u2["w"]) and s2.step == 1
    u3, _ = t.update(grads, s1)  # the next state draws new noise
    assert not torch.equal(u1["w"], u3["w"])
    # a second transform with the same seed reproduces the whole sequence
    t2 = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4, seed=0)
    v1, r1 = t2.update(grads, t2.init(grads))
    v3, _ = t2.update(grads, r1)
    assert torch.equal(u1["w"], v1["w"]) and torch.equal(u3["w"], v3["w"])
    # a different seed differs
    t3 = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4, seed=1)
    w1, _ = t3.update(grads, t3.init(grads))
    assert not torch.equal(u1["w"], w1["w"])


def test_secure_draws_fresh_noise_every_time():
    t = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=1, secure=True)
    grads = {"w": torch.zeros(0, 8)}
    state = t.init(grads)
    u1, s1 = t.update(grads, state)
    twin = dp.DPSGDState(torch.Generator().set_state(state.generator.get_state()), 0)
    u2, _ = t.update(grads, twin)  # even from a copy of the same state: new OS entropy
    assert not torch.equal(u1["w"], u2["w"])
    assert s1.step == 1


def test_unseeded_transforms_differ():
    grads = {"w": torch.zeros(0, 8)}
    t = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=1)
    assert not torch.equal(t.update(grads, t.init(grads))[0]["w"], t.update(grads, t.init(grads))[0]["w"])


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="seed and secure=True exclude each other"):
        dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=2, seed=0, secure=True)
    with pytest.raises(ValueError, match="seed must be an int"):
        dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=2, seed=1.5)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.dp_sgd_transform(1.0, -0.1, expected_batch_size=2)
    with pytest.raises(ValueError, match="max_norm"):
        dp.dp_sgd_transform(0.0, 1.0, expected_batch_size=2)
    with pytest.raises(ValueError, match=r"max_norm\['b'\]"):
        dp.dp_sgd_transform({"a": 1.0, "b": -1.0}, 1.0, expected_batch_size=2)
