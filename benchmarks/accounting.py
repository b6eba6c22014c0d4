"""``python -m benchmarks.accounting``: psgfunc's accountants against Opacus's, as a table.

For every ``sigma`` in {0.8, 1, 2}, ``q`` in {0.001, 0.01, 0.1} and ``steps`` in {100, 1000,
10000} at ``delta = 1e-5`` it prints one Markdown row: ``psgfunc.dp.epsilon`` with
``accountant="pld"`` (the default) and ``"rdp"``, Opacus's ``PRVAccountant`` (its upper
bound) and ``RDPAccountant``, and the lower bound on the true epsilon that Opacus's PRV
accountant certifies (any correct accountant reports at least that). Needs opacus; takes
about a minute. The table in README.md's accounting paragraph is this script's output.
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import psgfunc.dp as dp

SIGMAS = (0.8, 1.0, 2.0)
RATES = (0.001, 0.01, 0.1)
STEPS = (100, 1000, 10_000)


def opacus_epsilons(sigma: float, q: float, steps: int, delta: float) -> tuple[float, float, float]:
    """Opacus's ``(PRV lower bound, PRV upper bound, RDP)`` epsilons (default settings)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        prv = PRVAccountant()
        prv.history = [(sigma, q, steps)]
        eps_error, delta_error = 0.01, delta / 1000  # PRVAccountant.get_epsilon's defaults
        dprv = prv._get_dprv(eps_error=eps_error, delta_error=delta_error)
        lower, _, upper = dprv.compute_epsilon(delta, delta_error, eps_error)
        rdp = RDPAccountant()
        rdp.history = [(sigma, q, steps)]
        return float(lower), float(upper), float(rdp.get_epsilon(delta))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args(argv)
    print(
        "| sigma | q | steps | psgfunc PLD (default) | psgfunc RDP | Opacus PRV | Opacus RDP "
        "| PRV lower bound |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sigma, q, steps in itertools.product(SIGMAS, RATES, STEPS):
        pld = dp.epsilon(sigma, q, steps, args.delta, accountant="pld")
        rdp = dp.epsilon(sigma, q, steps, args.delta, accountant="rdp")
        lower, prv, opacus_rdp = opacus_epsilons(sigma, q, steps, args.delta)
        print(
            f"| {sigma:g} | {q:g} | {steps} | {pld:.3f} | {rdp:.3f} | {prv:.3f} "
            f"| {opacus_rdp:.3f} | {lower:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
