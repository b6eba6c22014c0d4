"""Privacy accounting for DP-SGD through Google's ``dp_accounting`` library.

One DP-SGD step with Poisson sampling at rate ``q`` and noise multiplier ``sigma`` is the
event ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; ``steps`` of them are that event
self-composed ``steps`` times, and a run whose ``sigma`` or ``q`` changes is the composition
of its segments ``(sigma, q, steps)``. The neighbouring relation is add-or-remove-one example
(the relation Opacus and ``dp_accounting`` default to). ``dp_accounting`` (and, for
``"prv"``, ``opacus``) are imported only when an accountant is used, so the rest of
``psgfunc`` does not need them.

Every accountant here reports an upper bound on the true epsilon (never less): ``"pld"`` is
``dp_accounting``'s pessimistic privacy-loss-distribution estimate, ``"rdp"`` is a Renyi-DP
bound, ``"prv"`` is Opacus's PRV upper bound. ``tests/dp/test_accounting.py`` checks all
three against the lower bound that Opacus's PRV accountant certifies.
"""

from __future__ import annotations

import logging
import math
import warnings
from numbers import Integral, Real

ACCOUNTANTS = ("pld", "rdp", "prv")
DEFAULT_ACCOUNTANT = "pld"

# RDP orders: dp_accounting's default grid (1.1 ... 10.9 by 0.1, 11 ... 63, 128, 256, 512,
# 1024) refined between the powers of two (the best order for large sigma and small
# q * steps is in the hundreds). Every order gives a valid bound, so more orders can only
# lower (tighten) the reported minimum. (Orders below 1.1 would help only where
# dp_accounting's fractional-order series does not converge and skips them anyway.)
RDP_ORDERS = tuple(
    [1 + x / 10 for x in range(1, 100)]
    + list(range(11, 64))
    + [80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024]
)

# The PLD grid step is the RDP epsilon / _PLD_STEPS_PER_EPSILON, clamped to
# [_PLD_INTERVAL_MIN, _PLD_INTERVAL_MAX]: the pessimistic estimate's excess over the exact
# PLD is a few grid steps, so this keeps it near 0.1 % of epsilon at a cost that hardly
# depends on epsilon (well under a second for typical DP-SGD runs).
_PLD_STEPS_PER_EPSILON = 5000
_PLD_INTERVAL_MIN = 1e-7
_PLD_INTERVAL_MAX = 1e-3

# noise_multiplier_for searches sigma in [_SIGMA_MIN, _SIGMA_MAX]
_SIGMA_MIN = 0.125
_SIGMA_MAX = 8192.0


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_rate(sample_rate, where: str) -> float:
    q = _real(sample_rate, f"{where}: sample_rate")
    if not 0 < q <= 1:
        raise ValueError(
            f"{where}: sample_rate must be in (0, 1] (the Poisson sampling probability, "
            f"expected_batch_size / dataset_size), got {sample_rate!r}"
        )
    return q


def _check_steps(steps, where: str, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(
            f"{where}: {name} must be an int >= 0 (the number of DP-SGD steps), got {steps!r}"
        )
    return int(steps)


def _check_delta(delta, where: str) -> float:
    d = _real(delta, f"{where}: delta")
    if not 0 < d < 1:
        raise ValueError(
            f"{where}: delta must be in (0, 1), typically well below 1 / dataset_size, got {delta!r}"
        )
    return d


def _check_accountant(accountant, where: str) -> str:
    if not isinstance(accountant, str) or accountant not in ACCOUNTANTS:
        raise ValueError(f"{where}: unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    return accountant


def _check_common(sample_rate, steps, delta, accountant, where: str) -> tuple[float, int, float]:
    q = _check_rate(sample_rate, where)
    steps = _check_steps(steps, where)
    d = _check_delta(delta, where)
    _check_accountant(accountant, where)
    return q, steps, d


def _check_sigma(noise_multiplier, where: str) -> float:
    sigma = _real(noise_multiplier, f"{where}: noise_multiplier")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"{where}: noise_multiplier must be a finite number > 0 (sigma = 0 gives no privacy, "
            f"epsilon = inf), got {noise_multiplier!r}"
        )
    return sigma


def _import_dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "privacy accounting needs Google's dp_accounting library: pip install dp-accounting"
        ) from error
    return dp_accounting


class _QuietAbsl:
    """dp_accounting logs a warning (absl) for every fractional RDP order whose series does
    not converge; those orders are skipped and the bounds
    stay valid, so keep the messages off stderr."""

    def __enter__(self):
        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


def _rdp_epsilon(segments, delta: float) -> float:
    dpa = _import_dp_accounting()
    acc = dpa.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    with _QuietAbsl():
        for sigma, q, steps in segments:
            acc.compose(
                dpa.SelfComposedDpEvent(
                    dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps
                )
            )
        return float(acc.get_epsilon(delta))


def _pld_interval(rdp_eps: float) -> float:
    if not math.isfinite(rdp_eps):
        return _PLD_INTERVAL_MAX
    return min(max(rdp_eps / _PLD_STEPS_PER_EPSILON, _PLD_INTERVAL_MIN), _PLD_INTERVAL_MAX)


def _pld_epsilon(segments, delta: float, interval: float) -> float:
    dpa = _import_dp_accounting()
    pld = None
    with _QuietAbsl():
        for sigma, q, steps in segments:
            one = dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=sigma,
                sampling_prob=q,
                pessimistic_estimate=True,  # rounds losses up: an upper bound on epsilon
                value_discretization_interval=interval,
            ).self_compose(steps)
            pld = one if pld is None else pld.compose(one)
        return float(pld.get_epsilon_for_delta(delta))


def _prv_epsilon(segments, delta: float) -> float:
    try:
        from opacus.accountants import PRVAccountant
    except ImportError as error:  # pragma: no cover - exercised only without opacus
        raise ImportError(
            'accountant="prv" uses Opacus\'s PRV accountant (dp_accounting has none): '
            'pip install opacus, or use accountant="pld" (as tight) or "rdp"'
        ) from error
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps) for sigma, q, steps in segments]
    with warnings.catch_warnings():
        # Opacus sizes the PRV domain with an internal RDP bound and warns about that
        # bound's orders; the warning says nothing about the PRV result.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(prv.get_epsilon(delta))


def _epsilon_of(segments, delta: float, accountant: str) -> float:
    """Unvalidated epsilon of the composed ``(sigma, q, steps)`` segments."""
    segments = [s for s in segments if s[2] > 0]
    if not segments:
        return 0.0
    if accountant == "prv":
        return _prv_epsilon(segments, delta)
    rdp = _rdp_epsilon(segments, delta)
    if accountant == "rdp":
        return rdp
    # Both are upper bounds on the true epsilon, so their minimum is one too; the RDP value
    # also sizes the PLD grid.
    return min(_pld_epsilon(segments, delta, _pld_interval(rdp)), rdp)


def _epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    return _epsilon_of([(sigma, q, steps)], delta, accountant)


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """The epsilon of ``steps`` DP-SGD steps at ``(epsilon, delta)``-DP.

    Each step samples every example independently with probability ``sample_rate`` (Poisson
    sampling, see :func:`poisson_batches`) and releases the clipped gradient sum plus
    Gaussian noise of std ``noise_multiplier * max_norm``. Every accountant returns an upper
    bound on the true epsilon; the default, ``"pld"``, is the tightest one shipped. (The
    default used to be ``"rdp"``, 5 % to 3x looser on ordinary settings; pass
    ``accountant="rdp"`` for that behaviour.)

    Args:
        noise_multiplier: ``sigma > 0``.
        sample_rate: ``q`` in ``(0, 1]``, i.e. expected batch size / dataset size.
        steps: number of steps ``>= 0``; 0 steps give ``epsilon = 0``.
        delta: target ``delta`` in ``(0, 1)``.
        accountant: ``"pld"`` (default): privacy loss distributions (Koskela et al. 2020;
            Doroshenko et al. 2022) from ``dp_accounting``, its pessimistic estimate on a
            grid of step ``epsilon_rdp / 5000`` (at most ``1e-3``), so within about 0.1 % of
            the exact epsilon; 0.1-2 s. The result is the smaller of that and the ``"rdp"``
            bound (both are upper bounds). ``"rdp"``: Renyi DP (Mironov 2017; Mironov,
            Talwar, Zhang 2019) from ``dp_accounting`` over the orders ``RDP_ORDERS``
            (1.1 to 1024) with the conversion of Balle et al. 2020; fast (~0.1 s) and
            looser (5 % to 3x above ``"pld"``, most for small ``sigma`` with large ``q``).
            ``"prv"``: ``dp_accounting`` has no PRV accountant, so this calls Opacus's
            ``PRVAccountant`` (Gopi, Lee, Wutschitz 2021), whose upper bound is about 0.01
            above ``"pld"`` (its default ``eps_error``); it raises ``ImportError`` when
            opacus is not installed.

    Returns:
        epsilon as a float (``inf`` when the library finds no finite bound).

    Raises:
        ValueError: if ``noise_multiplier <= 0``, ``sample_rate`` is outside ``(0, 1]``,
            ``steps`` is not an int ``>= 0``, ``delta`` is outside ``(0, 1)``, or
            ``accountant`` is not one of ``"pld"``, ``"rdp"``, ``"prv"``.
        ImportError: if ``dp_accounting`` (``pip install dp-accounting``) or, for
            ``"prv"``, ``opacus`` is missing.
    """
    sigma = _check_sigma(noise_multiplier, "epsilon")
    q, steps, delta = _check_common(sample_rate, steps, delta, accountant, "epsilon")
    return _epsilon(sigma, q, steps, delta, accountant)


def noise_multiplier_for(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    *,
    rtol: float = 1e-4,
) -> float:
    """The smallest noise multiplier whose :func:`epsilon` is at most ``target_epsilon``.

    Root finding on ``log(sigma)`` (epsilon decreases in sigma): a bracket ``[lo, hi]`` with
    ``epsilon(lo) > target >= epsilon(hi)`` is found by stepping from ``sigma = 1`` (for
    ``"pld"``/``"prv"``: from the cheap ``"rdp"`` answer, an upper guess since RDP's epsilon
    is the loosest) and then narrowed by secant steps on ``log(epsilon)`` against
    ``log(sigma)`` (regula falsi with the Illinois modification), until ``hi - lo <= rtol * hi``.
    The result is ``hi``, a sigma whose epsilon was computed and met the target, so
    ``epsilon(result, accountant=accountant) <= target_epsilon`` always holds (the answer
    errs on the private side) and it exceeds the root by at most a relative ``rtol``. Costs
    about 6-10 epsilon evaluations (under 2 s for ``"rdp"``; a few seconds for ``"pld"``
    and ``"prv"``, more for small sigma).

    Args:
        target_epsilon: ``epsilon > 0``.
        sample_rate: ``q`` in ``(0, 1]``.
        steps: number of steps ``>= 0``; with 0 steps no noise is needed and 0.0 is returned.
        delta: ``delta`` in ``(0, 1)``.
        accountant: ``"pld"`` (default), ``"rdp"`` or ``"prv"``, as in :func:`epsilon`.
        rtol: relative tolerance on sigma, in ``(0, 0.5)``.

    Returns:
        ``sigma`` in ``[1/8, 8192]`` (the search only visits that range). If even
        ``sigma = 1/8`` meets the target, 1/8 is returned: a valid but not minimal answer
        (such targets mean hardly any privacy).

    Raises:
        ValueError: for invalid arguments (as :func:`epsilon`, plus ``target_epsilon`` not
            finite and positive, ``rtol`` outside ``(0, 0.5)``), or if the target cannot be
            met with ``sigma <= 8192`` (an accountant's epsilon has a floor; raise the
            target, or lower ``steps`` or ``sample_rate``).
    """
    eps = _real(target_epsilon, "noise_multiplier_for: target_epsilon")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"noise_multiplier_for: target_epsilon must be a finite number > 0, got {target_epsilon!r}"
        )
    q, steps, delta = _check_common(sample_rate, steps, delta, accountant, "noise_multiplier_for")
    rtol = _real(rtol, "noise_multiplier_for: rtol")
    if not 0 < rtol < 0.5:
        raise ValueError(f"noise_multiplier_for: rtol must be in (0, 0.5), got {rtol!r}")
    if steps == 0:
        return 0.0

    def epsilon_with(name: str):
        return lambda sigma: _epsilon(sigma, q, steps, delta, name)

    start, factor = 1.0, 2.0
    if accountant != "rdp":
        # RDP is cheap and never below PLD/PRV's epsilon, so its root is a tight upper guess.
        guess = _root(epsilon_with("rdp"), eps, start, factor, 1e-2)
        if guess is not None:
            start, factor = guess, 1.25
    sigma = _root(epsilon_with(accountant), eps, start, factor, rtol)
    if sigma is None:
        raise ValueError(
            f"noise_multiplier_for: target_epsilon={eps} is not reached even with "
            f"noise_multiplier={_SIGMA_MAX:g} (sample_rate={q}, steps={steps}, "
            f"delta={delta}, accountant={accountant!r}); raise the target or lower "
            "steps or sample_rate"
        )
    return sigma


def _root(epsilon_of, target: float, start: float, factor: float, rtol: float) -> float | None:
    """Smallest sigma in ``[_SIGMA_MIN, _SIGMA_MAX]`` with ``epsilon_of(sigma) <= target``.

    Brackets from ``start`` by multiplying or dividing by ``factor`` (squared after each
    failed try), then narrows the bracket in ``log(sigma)`` by regula falsi on
    ``log(epsilon) - log(target)`` with the Illinois modification (an end kept twice in a
    row has its value halved); a step stays at least half the tolerance inside the bracket,
    so converging from one side closes it from the other. Returns the bracket's upper end (a
    sigma that was evaluated and met the target), or None if ``_SIGMA_MAX`` fails.
    """

    def gap(sigma: float) -> float:
        # log(epsilon / target): > 0 not private enough, <= 0 private enough
        value = epsilon_of(sigma)
        if value <= 0:
            return -math.inf
        return math.log(value / target)

    hi = min(max(start, _SIGMA_MIN), _SIGMA_MAX)
    g_hi = gap(hi)
    if g_hi <= 0:
        while True:
            if hi <= _SIGMA_MIN:
                return hi
            lo = max(hi / factor, _SIGMA_MIN)
            g_lo = gap(lo)
            if g_lo > 0:
                break
            hi, g_hi, factor = lo, g_lo, factor * factor
    else:
        while True:
            if hi >= _SIGMA_MAX:
                return None
            lo, g_lo = hi, g_hi
            hi = min(hi * factor, _SIGMA_MAX)
            g_hi = gap(hi)
            if g_hi <= 0:
                break
            factor = factor * factor
    log_tol = -math.log1p(-rtol)  # hi - lo <= rtol * hi  <=>  log(hi / lo) <= log_tol
    kept = 0  # +1: the last step moved lo (kept hi), -1: it moved hi (kept lo)
    while math.log(hi / lo) > log_tol:
        a, b = math.log(lo), math.log(hi)
        if math.isfinite(g_lo) and math.isfinite(g_hi):
            x = a + (b - a) * g_lo / (g_lo - g_hi)
        else:
            x = 0.5 * (a + b)
        x = min(max(x, a + 0.5 * log_tol), b - 0.5 * log_tol)
        sigma = math.exp(x)
        g = gap(sigma)
        if g <= 0:
            hi, g_hi = sigma, g
            if kept == -1:  # Illinois step: lo kept twice, halve its weight
                g_lo *= 0.5
            kept = -1
        else:
            lo, g_lo = sigma, g
            if kept == 1:
                g_hi *= 0.5
            kept = 1
    return hi


class PrivacyAccountant:
    """Counts DP-SGD steps and reports the epsilon spent so far.

    ``accountant.epsilon(delta)`` equals :func:`epsilon` for the steps counted so far; when
    the noise multiplier or the sample rate changes mid-training, the run is the composition
    of its segments ``(noise_multiplier, sample_rate, steps)`` (``history``), accounted
    together (``dp_accounting`` composes the different events; Opacus's PRV accountant takes
    the list). Standalone: it knows nothing of optimizers; call :meth:`step` once per
    noised update.

    Example::

        acc = pf.dp.PrivacyAccountant(noise_multiplier=1.1, sample_rate=256 / 60_000)
        for batch in loader:
            ...  # one DP-SGD step
            acc.step()
        acc.noise_multiplier = 0.9  # the following steps use less noise
        acc.step(100)
        acc.epsilon(1e-5)  # both segments composed

    Args:
        noise_multiplier: ``sigma > 0`` of the steps counted next.
        sample_rate: Poisson sampling rate ``q`` in ``(0, 1]`` of the steps counted next.
        accountant: ``"pld"`` (default, the tightest), ``"rdp"`` or ``"prv"``, as in
            :func:`epsilon`.

    Raises:
        ValueError: for an invalid ``noise_multiplier``, ``sample_rate`` or ``accountant``
            (here, on assignment, and in :meth:`step`).
    """

    def __init__(
        self, noise_multiplier: float, sample_rate: float, *, accountant: str = DEFAULT_ACCOUNTANT
    ):
        self._accountant = _check_accountant(accountant, "PrivacyAccountant")
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self._history: list[tuple[float, float, int]] = []
        self._cache: dict[float, float] = {}

    @property
    def accountant(self) -> str:
        """The accountant's name, ``"pld"``, ``"rdp"`` or ``"prv"`` (fixed at construction)."""
        return self._accountant

    @property
    def noise_multiplier(self) -> float:
        """``sigma`` of the steps counted next; assign to change it for later steps."""
        return self._sigma

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self._sigma = _check_sigma(value, "PrivacyAccountant")

    @property
    def sample_rate(self) -> float:
        """``q`` of the steps counted next; assign to change it for later steps."""
        return self._q

    @sample_rate.setter
    def sample_rate(self, value: float) -> None:
        self._q = _check_rate(value, "PrivacyAccountant")

    @property
    def steps(self) -> int:
        """The number of steps counted so far, over all segments."""
        return sum(n for _, _, n in self._history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The segments ``(noise_multiplier, sample_rate, steps)`` counted so far, in order
        (consecutive steps with the same settings share one segment); a copy."""
        return list(self._history)

    def step(self, n: int = 1) -> None:
        """Counts ``n >= 0`` more steps at the current ``noise_multiplier`` and ``sample_rate``.

        Raises:
            ValueError: if ``n`` is not an int ``>= 0``.
        """
        n = _check_steps(n, "PrivacyAccountant.step", name="n")
        if n == 0:
            return
        if self._history and self._history[-1][:2] == (self._sigma, self._q):
            sigma, q, count = self._history[-1]
            self._history[-1] = (sigma, q, count + n)
        else:
            self._history.append((self._sigma, self._q, n))
        self._cache.clear()

    def epsilon(self, delta: float) -> float:
        """The epsilon of the steps counted so far at ``delta`` (0.0 before any step).

        Equal to ``pf.dp.epsilon(noise_multiplier, sample_rate, steps, delta, accountant)``
        when all steps share one setting; the composition of the segments otherwise. The
        value is cached until the next :meth:`step`.

        Raises:
            ValueError: if ``delta`` is not in ``(0, 1)``.
        """
        delta = _check_delta(delta, "PrivacyAccountant.epsilon")
        if delta not in self._cache:
            self._cache[delta] = _epsilon_of(self._history, delta, self._accountant)
        return self._cache[delta]

    def state_dict(self) -> dict:
        """A plain dict (for ``torch.save``) that :meth:`load_state_dict` restores."""
        return {
            "accountant": self._accountant,
            "noise_multiplier": self._sigma,
            "sample_rate": self._q,
            "history": [list(segment) for segment in self._history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores the counts and settings saved by :meth:`state_dict`.

        Raises:
            ValueError: if ``state`` is not such a dict, or its accountant differs.
        """
        if not isinstance(state, dict) or set(state) != {
            "accountant",
            "noise_multiplier",
            "sample_rate",
            "history",
        }:
            raise ValueError(
                "PrivacyAccountant.load_state_dict: state must be the dict returned by "
                f"state_dict(), got {state!r}"
            )
        if state["accountant"] != self._accountant:
            raise ValueError(
                f"PrivacyAccountant.load_state_dict: the state was saved with accountant="
                f"{state['accountant']!r}, this accountant is {self._accountant!r}; "
                "build it with the same accountant"
            )
        where = "PrivacyAccountant.load_state_dict"
        history = [
            (_check_sigma(s, where), _check_rate(q, where), _check_steps(n, where))
            for s, q, n in state["history"]
        ]
        self.noise_multiplier = state["noise_multiplier"]
        self.sample_rate = state["sample_rate"]
        self._history = [segment for segment in history if segment[2] > 0]
        self._cache.clear()

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self._sigma}, sample_rate={self._q}, "
            f"accountant={self._accountant!r}, steps={self.steps})"
        )
