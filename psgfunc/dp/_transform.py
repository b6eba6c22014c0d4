"""DP-SGD as an explicit ``(init, update)`` gradient transformation (ARCHITECTURE.md rule 6).

The state carries the noise generator, so the noise is a function of the state alone:
``update`` never touches a global generator and never mutates the state it is given (it
draws from a copy of the generator and returns that copy in the new state).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from psgfunc._tree import tree_leaves, tree_map
from psgfunc.dp._clip import (
    MaxNorm,
    _check_positive_finite,
    add_noise,
    clipped_sum,
    total_max_norm,
)


class DPSGDState(NamedTuple):
    """State of :func:`dp_sgd_transform`.

    Attributes:
        generator: the ``torch.Generator`` the next step's noise is drawn from (with
            ``secure=True``: the fresh generator of the last step, never reused).
        step: number of updates made so far.
    """

    generator: torch.Generator
    step: int


def _entropy_seed() -> int:
    """A 63-bit seed from the operating system's entropy source."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def _fresh_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


class DPSGDTransform:
    """DP-SGD gradient transformation; build it with :func:`dp_sgd_transform`.

    Methods:
        init(params) -> DPSGDState
        update(per_sample_grads, state) -> (updates, new_state)
        update_from_sum(clipped_sum, state) -> (updates, new_state)
    """

    def __init__(
        self,
        max_norm: MaxNorm,
        noise_multiplier: float,
        *,
        expected_batch_size: float,
        seed: int | None = None,
        secure: bool = False,
    ) -> None:
        if not isinstance(max_norm, Mapping):
            max_norm = _check_positive_finite(max_norm, "dp_sgd_transform: max_norm")
        else:
            for k, c in max_norm.items():
                _check_positive_finite(c, f"dp_sgd_transform: max_norm[{k!r}]")
        self.max_norm = max_norm
        self.noise_multiplier = _check_positive_finite(
            noise_multiplier, "dp_sgd_transform: noise_multiplier", allow_zero=True
        )
        self.expected_batch_size = _check_positive_finite(
            expected_batch_size, "dp_sgd_transform: expected_batch_size"
        )
        if secure and seed is not None:
            raise ValueError(
                "dp_sgd_transform: seed and secure=True exclude each other (secure draws fresh "
                "OS entropy every step, so a seed would be ignored); pass seed=None or secure=False"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"dp_sgd_transform: seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.secure = bool(secure)
        self.noise_std = self.noise_multiplier * total_max_norm(max_norm)

    def __repr__(self) -> str:
        return (
            f"dp_sgd_transform(max_norm={self.max_norm!r}, noise_multiplier="
            f"{self.noise_multiplier!r}, expected_batch_size={self.expected_batch_size!r}, "
            f"seed={self.seed!r}, secure={self.secure!r})"
        )

    def init(self, params: Any) -> DPSGDState:
        """Initial state: a generator on the device of ``params``' first leaf (CPU if none).

        Args:
            params: the params pytree (only its device is used).

        Returns:
            ``DPSGDState(generator, step=0)``; the generator is seeded with ``seed``, or from
            OS entropy when ``seed`` is None.
        """
        leaves = [leaf for leaf in tree_leaves(params) if isinstance(leaf, torch.Tensor)]
        device = leaves[0].device if leaves else torch.device("cpu")
        seed = _entropy_seed() if self.seed is None else self.seed
        return DPSGDState(_fresh_generator(device, seed), 0)

    def update(self, per_sample_grads: Any, state: DPSGDState) -> tuple[Any, DPSGDState]:
        """One DP-SGD gradient: ``privatize(grads, C, sigma) / expected_batch_size``.

        Args:
            per_sample_grads: pytree with leaves ``[B, *param_shape]`` (``B = 0`` allowed:
                the update is pure noise).
            state: from :meth:`init` or a previous update; it is not modified.

        Returns:
            ``(updates, new_state)``: ``updates`` has ``per_sample_grads``' structure with
            leaves ``[*param_shape]``; hand it to an optimizer as the gradient.

        Raises:
            ValueError: as :func:`psgfunc.dp.clip` (NaN/Inf, mismatched ``B``, per-layer keys).
        """
        summed, _ = clipped_sum(per_sample_grads, self.max_norm, "dp_sgd_transform.update")
        return self.update_from_sum(summed, state)

    def update_from_sum(self, clipped_sum: Any, state: DPSGDState) -> tuple[Any, DPSGDState]:
        """Like :meth:`update` but from an already clipped sum, e.g. the first output of
        :func:`psgfunc.dp.clipped_grad_sum` or clipped sums added over micro-batches.

        Args:
            clipped_sum: pytree with leaves ``[*param_shape]``: ``sum_b clip(g_b, C)`` over
                the whole logical batch (the caller vouches for the clipping).
            state: as for :meth:`update`.

        Returns:
            ``((clipped_sum + N(0, (sigma C)^2)) / expected_batch_size, new_state)``; noise is
            drawn leaf by leaf in ``tree_leaves(clipped_sum)`` order.
        """
        if self.secure:
            generator = _fresh_generator(state.generator.device, _entropy_seed())
        else:
            generator = _copy_generator(state.generator)
        noisy = add_noise(clipped_sum, self.noise_std, generator)
        updates = tree_map(lambda t: t / self.expected_batch_size, noisy)
        return updates, DPSGDState(generator, state.step + 1)


def dp_sgd_transform(
    max_norm: MaxNorm,
    noise_multiplier: float,
    *,
    expected_batch_size: float,
    seed: int | None = None,
    secure: bool = False,
) -> DPSGDTransform:
    """DP-SGD (Abadi et al. 2016) as an Optax-style ``(init, update)`` transformation.

    ``update(per_sample_grads, state)`` returns
    ``(sum_b clip(g_b, C) + N(0, (sigma C)^2)) / expected_batch_size``: the noisy average
    over a Poisson-sampled batch, divided by the expected (not the realised) batch size so
    that the batch size itself leaks nothing. Feed it to any optimizer as the gradient::

        dp = dp_sgd_transform(1.0, 1.1, expected_batch_size=256, seed=0)
        state = dp.init(params)
        grads = pf.per_sample_grads(loss_fn, params, x, y)    # leaves [B, *shape]
        updates, state = dp.update(grads, state)              # leaves [*shape]

    Args:
        max_norm: clipping bound ``C > 0``, or a per-layer dict ``{top-level key: C_k}`` (see
            :func:`psgfunc.dp.clip`; noise then uses ``sqrt(sum_k C_k^2)``).
        noise_multiplier: ``sigma >= 0``.
        expected_batch_size: ``sample_rate * dataset_size`` (> 0).
        seed: seeds the state's generator once, for reproducible runs; ``None`` seeds it
            from OS entropy.
        secure: draw every step's noise from a fresh generator seeded from OS entropy
            (``os.urandom``), so no seed or generator state can reproduce the noise; use it for
            production runs. torch's generators are not cryptographically secure; this
            removes the single reusable seed, it does not turn them into a CSPRNG.

    Returns:
        a :class:`DPSGDTransform` with ``init``, ``update`` and ``update_from_sum``.

    Raises:
        ValueError: if ``max_norm`` or ``expected_batch_size`` is not finite and positive,
            ``noise_multiplier`` is negative, ``seed`` is not an int, or ``seed`` is given
            with ``secure=True``.
    """
    return DPSGDTransform(
        max_norm,
        noise_multiplier,
        expected_batch_size=expected_batch_size,
        seed=seed,
        secure=secure,
    )
