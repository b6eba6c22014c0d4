"""Privacy accounting against Opacus's accountants and a published value."""

from __future__ import annotations

import inspect
import math

import pytest

import psgfunc.dp as dp

opacus_accountants = pytest.importorskip("opacus.accountants")

DELTA = 1e-5


def opacus_rdp(sigma, q, steps, delta):
    acc = opacus_accountants.RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def opacus_prv_bounds(sigma, q, steps, delta):
    """Opacus's PRV accountant's certified (lower, upper) bounds on the true epsilon."""
    acc = opacus_accountants.PRVAccountant()
    acc.history = [(sigma, q, steps)]
    eps_error, delta_error = 0.01, delta / 1000  # PRVAccountant.get_epsilon's defaults
    lower, _, upper = acc._get_dprv(eps_error=eps_error, delta_error=delta_error).compute_epsilon(
        delta, delta_error, eps_error
    )
    return lower, upper


def test_default_accountant_is_pld():
    # the tightest accountant shipped is the default of both functions
    assert dp.epsilon(2.0, 0.01, 100, DELTA) == dp.epsilon(2.0, 0.01, 100, DELTA, accountant="pld")
    for fn in (dp.epsilon, dp.noise_multiplier_for):
        assert inspect.signature(fn).parameters["accountant"].default == "pld"


# (sigma, q, steps): corners of the README grid, a large-sigma point whose best RDP order
# (256) is beyond Opacus's orders (<= 63), and a small-sigma, large-q point where
# dp_accounting's fractional-order RDP is looser than Opacus's.
BOUND_POINTS = [(1.0, 0.01, 1000), (2.0, 0.001, 100), (5.0, 0.001, 100), (0.8, 0.1, 100)]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("sigma,q,steps", BOUND_POINTS)
def test_no_accountant_reports_less_than_a_certified_lower_bound(sigma, q, steps):
    # An accountant that reports less than the true epsilon is a privacy bug. Opacus's PRV
    # accountant certifies a lower bound on it; PLD must lie between that and PRV's upper
    # bound (both are tight to eps_error = 0.01), and RDP is a looser upper bound.
    lower, upper = opacus_prv_bounds(sigma, q, steps, DELTA)
    pld = dp.epsilon(sigma, q, steps, DELTA, accountant="pld")
    rdp = dp.epsilon(sigma, q, steps, DELTA, accountant="rdp")
    assert lower <= pld <= upper
    assert pld <= rdp
    assert pld <= opacus_rdp(sigma, q, steps, DELTA)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 10_000), (4.0, 0.01, 10_000), (0.8, 256 / 60_000, 3_000)])
def test_rdp_matches_opacus_rdp(sigma, q, steps):
    # Where the best order is within both grids and dp_accounting's fractional-order series
    # converge, both compute the same subsampled Gaussian RDP and the same RDP -> DP
    # conversion (Balle et al. 2020).
    ours = dp.epsilon(sigma, q, steps, DELTA, accountant="rdp")
    assert ours == pytest.approx(opacus_rdp(sigma, q, steps, DELTA), rel=1e-3)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_rdp_below_opacus_rdp_only_through_higher_orders():
    # The "RDP 56 % below Opacus's RDP": Opacus's orders stop at 63; for large sigma
    # and small q * steps the best order is far higher, so Opacus's bound is the loose one.
    # Both are upper bounds; ours stays above the certified lower bound (test above) and
    # equals Opacus's when restricted to Opacus's orders.
    from psgfunc.dp import _accounting

    sigma, q, steps = 5.0, 0.001, 100
    ours = dp.epsilon(sigma, q, steps, DELTA, accountant="rdp")
    theirs = opacus_rdp(sigma, q, steps, DELTA)
    assert ours < 0.5 * theirs
    dpa = pytest.importorskip("dp_accounting")
    opacus_orders = [o for o in _accounting.RDP_ORDERS if o <= 63 and o != 11]
    acc = dpa.rdp.RdpAccountant(orders=opacus_orders)
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert acc.get_epsilon(DELTA) == pytest.approx(theirs, rel=1e-6)


def test_rdp_order_grid_only_tightens():
    # More orders can only lower the minimum over orders: our grid is never looser than
    # dp_accounting's default grid.
    dpa = pytest.importorskip("dp_accounting")
    for sigma, q, steps in [(20.0, 0.001, 100), (1.0, 0.01, 1000)]:
        acc = dpa.rdp.RdpAccountant()
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
        assert dp.epsilon(sigma, q, steps, DELTA, accountant="rdp") <= acc.get_epsilon(DELTA)


def test_abadi_et_al_moments_accountant_value():
    # Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10000 gives
    # epsilon ~ 1.26 with the moments accountant. RDP with the tighter conversion gives a
    # little less (1.035), PLD less still.
    rdp = dp.epsilon(4.0, 0.01, 10_000, DELTA, accountant="rdp")
    pld = dp.epsilon(4.0, 0.01, 10_000, DELTA)
    assert 0.9 < rdp <= 1.26
    assert 0.8 < pld < rdp


def test_pld_and_prv_agree_and_are_tighter_than_rdp():
    sigma, q, steps = 4.0, 0.01, 10_000
    pld = dp.epsilon(sigma, q, steps, DELTA, accountant="pld")
    prv = dp.epsilon(sigma, q, steps, DELTA, accountant="prv")  # Opacus's PRV accountant
    assert pld == pytest.approx(prv, rel=0.03)
    assert max(pld, prv) < dp.epsilon(sigma, q, steps, DELTA, accountant="rdp")


def test_epsilon_monotone_and_zero_steps():
    assert dp.epsilon(1.0, 0.01, 0, DELTA) == 0.0
    for accountant in ("pld", "rdp"):
        eps = [dp.epsilon(s, 0.01, 100, DELTA, accountant=accountant) for s in (0.6, 1.0, 2.0)]
        assert eps[0] > eps[1] > eps[2] > 0
        base = eps[1]
        assert dp.epsilon(1.0, 0.01, 200, DELTA, accountant=accountant) > base
        assert dp.epsilon(1.0, 0.02, 100, DELTA, accountant=accountant) > base
    assert dp.epsilon(1.0, 1.0, 10, DELTA) > 0  # full-batch steps (q = 1) are allowed


def test_noise_multiplier_for_inverts_epsilon():
    q, steps = 0.01, 10_000
    sigma = dp.noise_multiplier_for(2.0, q, steps, DELTA, accountant="rdp")
    assert dp.epsilon(sigma, q, steps, DELTA, accountant="rdp") <= 2.0  # always private side
    assert dp.epsilon(sigma * (1 - 2e-4), q, steps, DELTA, accountant="rdp") > 2.0  # within rtol
    eps = dp.epsilon(1.1, q, steps, DELTA, accountant="rdp")
    assert dp.noise_multiplier_for(eps, q, steps, DELTA, accountant="rdp") == pytest.approx(1.1, rel=2e-4)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("accountant", ["pld", "prv"])
def test_noise_multiplier_for_is_consistent_with_epsilon(accountant):
    # epsilon(noise_multiplier_for(e)) <= e with the same accountant, and close to the root
    q, steps = 0.01, 100
    sigma = dp.noise_multiplier_for(1.0, q, steps, DELTA, accountant=accountant, rtol=1e-2)
    assert dp.epsilon(sigma, q, steps, DELTA, accountant=accountant) <= 1.0
    assert dp.epsilon(sigma * (1 - 2e-2), q, steps, DELTA, accountant=accountant) > 1.0
    # PLD and PRV are tighter than RDP, so they need less noise
    assert sigma < dp.noise_multiplier_for(1.0, q, steps, DELTA, accountant="rdp", rtol=1e-2)


def test_noise_multiplier_for_edges():
    q = 0.01
    assert dp.noise_multiplier_for(1.0, q, 0, DELTA) == 0.0  # no steps need no noise
    assert dp.noise_multiplier_for(1e6, q, 1, DELTA, accountant="rdp") == 0.125  # lower end


def test_noise_multiplier_for_unreachable_target():
    with pytest.raises(ValueError, match="is not reached even with noise_multiplier=8192"):
        dp.noise_multiplier_for(1e-4, 1.0, 100, DELTA, accountant="rdp")


BAD_COMMON = [
    (dict(sample_rate=0.0), "sample_rate must be in \\(0, 1\\]"),
    (dict(sample_rate=1.01), "sample_rate must be in \\(0, 1\\]"),
    (dict(sample_rate="0.1"), "sample_rate must be a real number"),
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(steps=10.0), "steps must be an int >= 0"),
    (dict(delta=0.0), "delta must be in \\(0, 1\\)"),
    (dict(delta=1.0), "delta must be in \\(0, 1\\)"),
    (dict(accountant="gdp"), "unknown accountant 'gdp'.*'pld', 'rdp', 'prv'"),
    (dict(accountant=None), "unknown accountant None"),
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
