"""DP-SGD as an explicit ``(init, update)`` gradient transformation (ARCHITECTURE.md rule 6).

The state carries the noise generator, so the noise is a function of the state alone:
``update`` never touches a global generator and never mutates the state it is given (it
draws from a copy of the generator and returns that copy in the new state).

A state is single-use: noise drawn twice from one state would be the same noise, and two
releases with the same noise leak their difference, which breaks the privacy analysis. Each
state a transform hands out may therefore be given to ``update`` / ``update_from_sum`` once;
a second time is refused (the generators of spent states are remembered in a weak set, so
nothing is kept alive). Keep the returned state, ``updates, state = dp.update(g, state)``.
"""

from __future__ import annotations

import os
import weakref
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
from psgfunc.dp._distributed import all_reduce_sum, broadcast_seed, resolve_group


class DPSGDState(NamedTuple):
    """State of :func:`dp_sgd_transform`; single-use (see :meth:`DPSGDTransform.update`).

    Attributes:
        generator: the ``torch.Generator`` the next step's noise is drawn from (with
            ``secure=True``: the fresh generator of the last step, never reused). Its
            identity marks the state: once a state was used, any state holding this
            generator is refused.
        step: number of updates made so far.
    """

    generator: torch.Generator
    step: int


# Generators of states already given to an update: a state must not draw its noise twice.
_SPENT: weakref.WeakSet[torch.Generator] = weakref.WeakSet()


def _check_unspent(state: Any, where: str) -> None:
    if not isinstance(state, DPSGDState):
        raise ValueError(
            f"{where}: state must be the DPSGDState returned by init() or by the previous "
            f"update, got {type(state).__name__}"
        )
    if state.generator in _SPENT:
        raise ValueError(
            f"{where}: this state (step {state.step}) was already used for an update; using it "
            "again would draw the same noise twice, which breaks differential privacy. Keep the "
            "state each update returns: updates, state = dp.update(grads, state)"
        )


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
        distributed: Any = False,
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
        self.process_group = resolve_group(distributed, "dp_sgd_transform")
        self.distributed = self.process_group is not None

    def _seed(self, device: torch.device) -> int:
        """The seed of a new generator: ``seed`` or OS entropy; rank 0's when distributed."""
        seed = _entropy_seed() if self.seed is None or self.secure else self.seed
        if self.process_group is not None:
            seed = broadcast_seed(seed, self.process_group)
        return seed

    def __repr__(self) -> str:
        return (
            f"dp_sgd_transform(max_norm={self.max_norm!r}, noise_multiplier="
            f"{self.noise_multiplier!r}, expected_batch_size={self.expected_batch_size!r}, "
            f"seed={self.seed!r}, secure={self.secure!r}, distributed={self.distributed!r})"
        )

    def init(self, params: Any) -> DPSGDState:
        """Initial state: a generator on the device of ``params``' first leaf (CPU if none).

        Args:
            params: the params pytree (only its device is used).

        Returns:
            ``DPSGDState(generator, step=0)``; the generator is seeded with ``seed``, or from
            OS entropy when ``seed`` is None (distributed: rank 0's seed, on every rank).
        """
        leaves = [leaf for leaf in tree_leaves(params) if isinstance(leaf, torch.Tensor)]
        device = leaves[0].device if leaves else torch.device("cpu")
        return DPSGDState(_fresh_generator(device, self._seed(device)), 0)

    def update(self, per_sample_grads: Any, state: DPSGDState) -> tuple[Any, DPSGDState]:
        """One DP-SGD gradient: ``privatize(grads, C, sigma) / expected_batch_size``.

        Args:
            per_sample_grads: pytree with leaves ``[B, *param_shape]`` (``B = 0`` allowed:
                the update is pure noise).
            state: from :meth:`init` or the previous update, used ONCE: it is not modified,
                but a second update from it would draw the same noise again and is refused.

        Returns:
            ``(updates, new_state)``: ``updates`` has ``per_sample_grads``' structure with
            leaves ``[*param_shape]``; hand it to an optimizer as the gradient. With
            ``distributed``, ``per_sample_grads`` are this rank's examples and ``updates``
            are the global step's, identical on every rank.

        Raises:
            ValueError: as :func:`psgfunc.dp.clip` (NaN/Inf, mismatched ``B``, per-layer keys),
                or if ``state`` was already used for an update.
        """
        _check_unspent(state, "dp_sgd_transform.update")
        summed, _ = clipped_sum(per_sample_grads, self.max_norm, "dp_sgd_transform.update")
        return self.update_from_sum(summed, state)

    def update_from_sum(self, clipped_sum: Any, state: DPSGDState) -> tuple[Any, DPSGDState]:
        """Like :meth:`update` but from an already clipped sum, e.g. the first output of
        :func:`psgfunc.dp.clipped_grad_sum` or clipped sums added over micro-batches.

        Args:
            clipped_sum: pytree with leaves ``[*param_shape]``: ``sum_b clip(g_b, C)`` over
                the whole logical batch (the caller vouches for the clipping); with
                ``distributed``, over this rank's part of it: the transform sums it over
                the ranks (one all-reduce) before adding the noise once.
            state: as for :meth:`update` (used once).

        Returns:
            ``((clipped_sum + N(0, (sigma C)^2)) / expected_batch_size, new_state)``; noise is
            drawn leaf by leaf in ``tree_leaves(clipped_sum)`` order.

        Raises:
            ValueError: if ``state`` was already used for an update.
        """
        _check_unspent(state, "dp_sgd_transform.update_from_sum")
        if self.process_group is not None:
            clipped_sum = all_reduce_sum(clipped_sum, self.process_group)
        if self.secure:
            device = state.generator.device
            generator = _fresh_generator(device, self._seed(device))
        else:
            generator = _copy_generator(state.generator)
        noisy = add_noise(clipped_sum, self.noise_std, generator)
        updates = tree_map(lambda t: t / self.expected_batch_size, noisy)
        _SPENT.add(state.generator)
        return updates, DPSGDState(generator, state.step + 1)


def dp_sgd_transform(
    max_norm: MaxNorm,
    noise_multiplier: float,
    *,
    expected_batch_size: float,
    seed: int | None = None,
    secure: bool = False,
    distributed: Any = False,
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

    Each state is used once: ``update`` returns the next one, and giving it a state that
    already served an update raises (the same noise twice would break the privacy analysis).

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
        distributed: ``False`` (one process), ``True`` (torch.distributed's default process
            group) or a ``ProcessGroup``: ``update`` / ``update_from_sum`` take this rank's
            per-example gradients / clipped sum, sum the clipped sums over the ranks with one
            all-reduce and add the noise once, with a generator seeded identically on every
            rank (rank 0's ``seed`` or OS entropy, broadcast; with ``secure=True`` a fresh
            rank-0 entropy seed every step), so every rank returns bit-identical updates.
            ``expected_batch_size`` is then the GLOBAL expected batch (all ranks together).
            Every rank must call ``init`` and each update in the same order (collectives).

    Returns:
        a :class:`DPSGDTransform` with ``init``, ``update`` and ``update_from_sum``.

    Raises:
        ValueError: if ``max_norm`` or ``expected_batch_size`` is not finite and positive,
            ``noise_multiplier`` is negative, ``seed`` is not an int, ``seed`` is given
            with ``secure=True``, or ``distributed`` asks for a process group that is not
            initialised.
    """
    return DPSGDTransform(
        max_norm,
        noise_multiplier,
        expected_batch_size=expected_batch_size,
        seed=seed,
        secure=secure,
        distributed=distributed,
    )
