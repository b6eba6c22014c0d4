"""Privacy accounting against Opacus's accountants and a published value."""

from __future__ import annotations

import math

import pytest

import psgfunc.dp as dp

opacus_accountants = pytest.importorskip("opacus.accountants")

DELTA = 1e-5


def opacus_rdp(sigma, q, steps, delta):
    acc = opacus_accountants.RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 10_000), (4.0, 0.01, 10_000), (0.8, 256 / 60_000, 3_000)])
def test_rdp_matches_opacus_rdp(sigma, q, steps):
    # Both compute the subsampled Gaussian's RDP and the same RDP -> DP conversion; only the
    # grid of orders differs slightly.
    ours = dp.epsilon(sigma, q, steps, DELTA)
    assert ours == pytest.approx(opacus_rdp(sigma, q, steps, DELTA), rel=1e-3)


def test_abadi_et_al_moments_accountant_value():
    # Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10000 gives
    # epsilon ~ 1.26 with the moments accountant. RDP with the tighter conversion gives a
    # little less (1.035), PLD less still.
    rdp = dp.epsilon(4.0, 0.01, 10_000, DELTA)
    pld = dp.epsilon(4.0, 0.01, 10_000, DELTA, accountant="pld")
    assert 0.9 < rdp <= 1.26
    assert 0.8 < pld < rdp


def test_pld_and_prv_agree_and_are_tighter_than_rdp():
    sigma, q, steps = 4.0, 0.01, 10_000
    pld = dp.epsilon(sigma, q, steps, DELTA, accountant="pld")
    prv = dp.epsilon(sigma, q, steps, DELTA, accountant="prv")  # Opacus's PRV accountant
    assert pld == pytest.approx(prv, rel=0.03)
    assert max(pld, prv) < dp.epsilon(sigma, q, steps, DELTA)


def test_epsilon_monotone_and_zero_steps():
    assert dp.epsilon(1.0, 0.01, 0, DELTA) == 0.0
    eps = [dp.epsilon(s, 0.01, 1000, DELTA) for s in (0.6, 1.0, 2.0)]
    assert eps[0] > eps[1] > eps[2] > 0
    assert dp.epsilon(1.0, 0.01, 2000, DELTA) > dp.epsilon(1.0, 0.01, 1000, DELTA)
    assert dp.epsilon(1.0, 0.02, 1000, DELTA) > dp.epsilon(1.0, 0.01, 1000, DELTA)
    assert dp.epsilon(1.0, 1.0, 10, DELTA) > 0  # full-batch steps (q = 1) are allowed


def test_noise_multiplier_for_inverts_epsilon():
    q, steps = 0.01, 10_000
    sigma = dp.noise_multiplier_for(2.0, q, steps, DELTA)
    assert dp.epsilon(sigma, q, steps, DELTA) <= 2.0  # always on the private side
    assert dp.epsilon(sigma * (1 - 2e-4), q, steps, DELTA) > 2.0  # and within rtol of the root
    assert dp.noise_multiplier_for(dp.epsilon(1.1, q, steps, DELTA), q, steps, DELTA) == pytest.approx(1.1, rel=2e-4)


def test_noise_multiplier_for_pld_and_edges():
    q, steps = 0.01, 10_000
    sigma = dp.noise_multiplier_for(2.0, q, steps, DELTA, accountant="pld", rtol=1e-2)
    assert dp.epsilon(sigma, q, steps, DELTA, accountant="pld") <= 2.0
    assert dp.epsilon(sigma * 0.98, q, steps, DELTA, accountant="pld") > 2.0
    assert sigma < dp.noise_multiplier_for(2.0, q, steps, DELTA)  # PLD is tighter than RDP
    assert dp.noise_multiplier_for(1.0, q, 0, DELTA) == 0.0  # no steps need no noise
    assert dp.noise_multiplier_for(1e6, q, 1, DELTA) == 0.125  # the search's lower end


def test_noise_multiplier_for_unreachable_target():
    with pytest.raises(ValueError, match="is not reached even with noise_multiplier=8192"):
        dp.noise_multiplier_for(1e-4, 1.0, 100, DELTA)


BAD_COMMON = [
    (dict(sample_rate=0.0), "sample_rate must be in \\(0, 1\\]"),
    (dict(sample_rate=1.01), "sample_rate must be in \\(0, 1\\]"),
    (dict(sample_rate="0.1"), "sample_rate must be a real number"),
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(steps=10.0), "steps must be an int >= 0"),
    (dict(delta=0.0), "delta must be in \\(0, 1\\)"),
    (dict(delta=1.0), "delta must be in \\(0, 1\\)"),
    (dict(accountant="gdp"), "unknown accountant 'gdp'.*'rdp', 'pld', 'prv'"),
]


@pytest.mark.parametrize("bad,match", BAD_COMMON)
def test_epsilon_errors(bad, match):
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=DELTA) | bad
    with pytest.raises(ValueError, match=match):
        dp.epsilon(**args)


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan, None])
def test_epsilon_noise_multiplier_errors(sigma):
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.epsilon(sigma, 0.01, 100, DELTA)


@pytest.mark.parametrize("bad,match", BAD_COMMON)
def test_noise_multiplier_for_errors(bad, match):
    args = dict(target_epsilon=1.0, sample_rate=0.01, steps=100, delta=DELTA) | bad
    with pytest.raises(ValueError, match=match):
        dp.noise_multiplier_for(**args)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, "1"])
def test_noise_multiplier_for_target_errors(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        dp.noise_multiplier_for(target, 0.01, 100, DELTA)


@pytest.mark.parametrize("rtol", [0.0, 0.5, -1e-3])
def test_noise_multiplier_for_rtol_errors(rtol):
    with pytest.raises(ValueError, match="rtol"):
        dp.noise_multiplier_for(1.0, 0.01, 100, DELTA, rtol=rtol)
