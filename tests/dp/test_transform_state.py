"""A DPSGDState is single-use: a second update from it would release the same noise twice."""

from __future__ import annotations

import pytest
import torch

import psgfunc.dp as dp

GRADS = {"w": torch.randn(4, 6, dtype=torch.float64), "b": torch.randn(4, 2, dtype=torch.float64)}
SUM = {"w": torch.randn(6, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
REUSED = "was already used for an update.*Keep the state each update returns"


@pytest.mark.parametrize("secure", [False, True])
def test_reusing_a_state_is_refused(secure):
    t = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4, seed=None if secure else 0, secure=secure)
    state = t.init(GRADS)
    _, s1 = t.update(GRADS, state)
    with pytest.raises(ValueError, match=r"dp_sgd_transform\.update: this state \(step 0\) " + REUSED):
        t.update(GRADS, state)
    with pytest.raises(ValueError, match=r"dp_sgd_transform\.update_from_sum: this state \(step 0\) " + REUSED):
        t.update_from_sum(SUM, state)
    _, s2 = t.update_from_sum(SUM, s1)
    with pytest.raises(ValueError, match=REUSED):
        t.update_from_sum(SUM, s1)
    with pytest.raises(ValueError, match=REUSED):
        t.update(GRADS, s1)
    # a rebuilt state holding a spent generator is the same state
    with pytest.raises(ValueError, match=REUSED):
        t.update(GRADS, s1._replace(step=7))
    # another transform does not accept it either
    other = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match=REUSED):
        other.update(GRADS, state)
    assert s2.step == 2


@pytest.mark.parametrize("secure", [False, True])
def test_the_normal_chain_runs(secure):
    t = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4, seed=None if secure else 3, secure=secure)
    state = t.init(GRADS)
    seen = []
    for i in range(6):
        updates, state = (t.update(GRADS, state) if i % 2 else t.update_from_sum(SUM, state))
        seen.append(updates["w"])
    assert state.step == 6
    assert len({tuple(u.tolist()) for u in seen}) == 6  # every step its own noise


def test_a_refused_update_does_not_spend_the_state():
    t = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4, seed=0)
    state = t.init(GRADS)
    bad = {"w": torch.full((4, 6), float("nan"), dtype=torch.float64), "b": GRADS["b"]}
    with pytest.raises(ValueError, match="NaN"):
        t.update(bad, state)
    _, s1 = t.update(GRADS, state)  # nothing was released: the state still serves once
    assert s1.step == 1


def test_not_a_state():
    t = dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=4, seed=0)
    state = t.init(GRADS)
    with pytest.raises(ValueError, match="state must be the DPSGDState returned by init"):
        t.update(GRADS, tuple(state))


@pytest.mark.parametrize("secure", [False, True])
def test_dp_optimizer_chain_and_resume(secure):
    """DPOptimizer keeps its own chain of states, through state_dict/load_state_dict too."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    kw = dict(max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2)
    opt = dp.DPOptimizer(torch.optim.SGD([p], lr=0.1), seed=None if secure else 0, secure=secure, **kw)
    for _ in range(3):
        p.grad_sample = torch.randn(2, 3, dtype=torch.float64)
        opt.step()
    saved = opt.state_dict()
    opt.load_state_dict(saved)  # into the same optimizer: its chain goes on
    opt.step()
    opt.load_state_dict(saved)
    opt.step()
    assert opt.dp_state.step == 4
    fresh = dp.DPOptimizer(torch.optim.SGD([p], lr=0.1), seed=None if secure else 1, secure=secure, **kw)
    fresh.load_state_dict(saved)
    fresh.step()
    assert fresh.dp_state.step == 4
