"""pf.dp.PrivacyAccountant: step counting, segments, and agreement with pf.dp.epsilon."""

from __future__ import annotations

import math

import pytest

import psgfunc.dp as dp

opacus_accountants = pytest.importorskip("opacus.accountants")

DELTA = 1e-5


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_equals_the_function_for_the_steps_so_far(accountant):
    acc = dp.PrivacyAccountant(1.1, 0.01, accountant=accountant)
    assert acc.accountant == accountant and acc.steps == 0
    assert acc.epsilon(DELTA) == 0.0  # nothing spent yet
    for _ in range(30):
        acc.step()
    acc.step(70)
    assert acc.steps == 100
    assert acc.history == [(1.1, 0.01, 100)]
    assert acc.epsilon(DELTA) == dp.epsilon(1.1, 0.01, 100, DELTA, accountant=accountant)


def test_default_accountant_is_pld_and_step_zero_is_a_no_op():
    acc = dp.PrivacyAccountant(2.0, 0.01)
    assert acc.accountant == "pld"
    acc.step(0)
    assert acc.steps == 0 and acc.history == []
    acc.step(10)
    first = acc.epsilon(DELTA)
    acc.step()  # the cached value is dropped after a step
    assert acc.epsilon(DELTA) > first
    assert acc.epsilon(DELTA) == dp.epsilon(2.0, 0.01, 11, DELTA)
    assert "steps=11" in repr(acc)


def test_segments_are_kept_in_order_and_merged():
    acc = dp.PrivacyAccountant(1.0, 0.01, accountant="rdp")
    acc.step(3)
    acc.noise_multiplier = 2.0
    acc.step(2)
    acc.step()
    acc.sample_rate = 0.02
    acc.step(4)
    acc.noise_multiplier, acc.sample_rate = 1.0, 0.01  # back to the first setting: new segment
    acc.step()
    assert acc.history == [(1.0, 0.01, 3), (2.0, 0.01, 3), (2.0, 0.02, 4), (1.0, 0.01, 1)]
    assert acc.steps == 11
    history = acc.history
    history.clear()  # a copy
    assert acc.steps == 11


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_changed_noise_multiplier_is_composed_like_opacus():
    # 300 steps at sigma 1.1 then 500 at sigma 2: Opacus's RDP accountant composes the same
    # history (agreement as in test_rdp_matches_opacus_rdp), and PLD lies within the
    # bounds Opacus's PRV accountant certifies for it.
    segments = [(1.1, 0.01, 300), (2.0, 0.01, 500)]
    rdp = dp.PrivacyAccountant(1.1, 0.01, accountant="rdp")
    pld = dp.PrivacyAccountant(1.1, 0.01)
    for sigma, _, steps in segments:
        for acc in (rdp, pld):
            acc.noise_multiplier = sigma
            acc.step(steps)
    theirs = opacus_accountants.RDPAccountant()
    theirs.history = list(segments)
    assert rdp.epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-3)

    prv = opacus_accountants.PRVAccountant()
    prv.history = list(segments)
    eps_error, delta_error = 0.01, DELTA / 1000
    lower, _, upper = prv._get_dprv(eps_error=eps_error, delta_error=delta_error).compute_epsilon(
        DELTA, delta_error, eps_error
    )
    assert lower <= pld.epsilon(DELTA) <= upper
    # more noise in the second segment: less than 800 steps at sigma 1.1, more than at sigma 2
    assert dp.epsilon(2.0, 0.01, 800, DELTA) < pld.epsilon(DELTA) < dp.epsilon(1.1, 0.01, 800, DELTA)


def test_state_dict_round_trip():
    acc = dp.PrivacyAccountant(1.0, 0.01, accountant="rdp")
    acc.step(5)
    acc.noise_multiplier = 1.5
    acc.step(7)
    state = acc.state_dict()
    other = dp.PrivacyAccountant(3.0, 0.5, accountant="rdp")
    other.load_state_dict(state)
    assert other.history == acc.history and other.noise_multiplier == 1.5
    assert other.sample_rate == 0.01
    assert other.epsilon(DELTA) == acc.epsilon(DELTA)
    with pytest.raises(ValueError, match="saved with accountant='rdp'.*same accountant"):
        dp.PrivacyAccountant(1.0, 0.01).load_state_dict(state)
    with pytest.raises(ValueError, match="state must be the dict returned by state_dict"):
        other.load_state_dict({"history": []})
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0"):
        other.load_state_dict(state | {"history": [[0.0, 0.01, 3]]})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_multiplier=0.0), "noise_multiplier must be a finite number > 0"),
        (dict(noise_multiplier=math.nan), "noise_multiplier must be a finite number > 0"),
        (dict(sample_rate=0.0), "sample_rate must be in \\(0, 1\\]"),
        (dict(sample_rate=True), "sample_rate must be a real number"),
        (dict(accountant="gdp"), "unknown accountant 'gdp'"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(noise_multiplier=1.0, sample_rate=0.01) | kwargs
    accountant = args.pop("accountant", "pld")
    with pytest.raises(ValueError, match=match):
        dp.PrivacyAccountant(**args, accountant=accountant)


def test_assignment_step_and_delta_errors():
    acc = dp.PrivacyAccountant(1.0, 0.01)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0"):
        acc.noise_multiplier = -1.0
    with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\]"):
        acc.sample_rate = 2.0
    assert (acc.noise_multiplier, acc.sample_rate) == (1.0, 0.01)  # unchanged after an error
    for n in (-1, 1.0, True):
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            acc.step(n)
    for delta in (0.0, 1.0, "1e-5"):
        with pytest.raises(ValueError, match="delta"):
            acc.epsilon(delta)
    with pytest.raises(AttributeError):
        acc.accountant = "rdp"  # fixed at construction
