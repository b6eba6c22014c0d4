"""One-call setup of DP-SGD for a torch.nn model (Opacus users' ``PrivacyEngine.make_private``).

:func:`make_private` converts the model (:func:`psgfunc.nn.expand_weights`), wraps the
optimizer (:class:`~psgfunc.dp.DPOptimizer`), and replaces the data loader by a Poisson one
that cuts each logical batch into physical batches of bounded size (:class:`VirtualBatchLoader`);
the optimizer then steps once per LOGICAL batch, and its ``accountant`` counts the steps
actually taken. The training loop stays the ordinary one::

    model, optimizer, loader = pf.dp.make_private(model, optimizer, loader, max_norm=1.0,
                                                  target_epsilon=2.0, epochs=10,
                                                  max_physical_batch_size=64)
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()           # accumulates until the logical batch is complete
        optimizer.zero_grad()
    optimizer.accountant.epsilon(1e-5)

:func:`physical_batches` is the same split for functional users.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from psgfunc._tree import batch_size, tree_map
from psgfunc.dp._accounting import PrivacyAccountant, noise_multiplier_for
from psgfunc.dp._distributed import check_not_ddp
from psgfunc.dp._optimizer import DPOptimizer
from psgfunc.dp._sampling import PoissonDataLoader

__all__ = ["make_private", "VirtualBatchLoader", "physical_batches"]


def physical_batches(batch: Any, max_physical_batch_size: int) -> Iterator[Any]:
    """Cut one (logical) batch into consecutive chunks of at most ``max_physical_batch_size``.

    ``batch`` is a pytree whose tensor leaves share the leading size ``B``; each chunk is the
    same pytree sliced along dim 0 (views, no copy). An empty batch (``B = 0``) yields itself
    once, so a loop over the chunks still runs one (pure-noise) step.

    Functional DP-SGD over a logical batch too large for memory::

        total = None
        for chunk in pf.dp.physical_batches((x, y), 64):
            s, _ = pf.dp.clipped_grad_sum(fn, params, *chunk, max_norm=C)
            total = s if total is None else tree_map(torch.add, total, s)

    Clipping is per example, so the sum over chunks is the logical batch's clipped sum.

    Raises:
        ValueError: ``max_physical_batch_size`` is not a positive int, or the leaves' leading
            sizes differ.
    """
    _check_size(max_physical_batch_size, "physical_batches")
    size = batch_size(batch, what="batch")
    if size == 0:
        yield batch
        return
    for start in range(0, size, max_physical_batch_size):
        stop = min(start + max_physical_batch_size, size)
        yield tree_map(lambda t, a=start, b=stop: t[a:b] if isinstance(t, torch.Tensor) else t, batch)


def _check_size(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{where}: max_physical_batch_size must be a positive int (the most examples one "
            f"forward/backward may hold), got {value!r}"
        )
    return value


class VirtualBatchLoader:
    """Poisson logical batches, served as physical batches of bounded size.

    Iterating yields, for each logical (Poisson) batch of the inner loader, consecutive
    slices of at most ``max_physical_batch_size`` examples (an empty logical batch: one empty
    batch). Before each slice it tells ``optimizer`` whether the slice ends its logical batch:
    ``optimizer.step()`` after any other slice only clips and accumulates it; after the last
    one it adds noise once and steps the inner optimizer (Opacus's ``BatchMemoryManager``
    semantics). The privacy analysis is that of the logical batches: one step each.

    Args:
        loader: a loader of logical batches (typically a :class:`PoissonDataLoader`).
        optimizer: the :class:`DPOptimizer` stepping on these batches.
        max_physical_batch_size: the largest physical batch, or None to serve logical
            batches whole.
    """

    def __init__(self, loader: Any, optimizer: DPOptimizer, max_physical_batch_size: int | None):
        if max_physical_batch_size is not None:
            _check_size(max_physical_batch_size, "VirtualBatchLoader")
        self.loader = loader
        self.optimizer = optimizer
        self.max_physical_batch_size = max_physical_batch_size

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def sample_rate(self) -> float:
        return self.loader.sample_rate

    def __len__(self) -> int:
        """The number of LOGICAL batches (optimizer steps) per pass."""
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for logical in self.loader:
            if self.max_physical_batch_size is None:
                self.optimizer._end_of_logical_batch(True)
                yield logical
                continue
            chunks = physical_batches(logical, self.max_physical_batch_size)
            chunk = next(chunks)
            for following in chunks:
                self.optimizer._end_of_logical_batch(False)
                yield chunk
                chunk = following
            self.optimizer._end_of_logical_batch(True)
            yield chunk


def _shell_limit(model: nn.Module) -> int | None:
    limits = [m.max_batch_size for m in model.modules() if isinstance(getattr(m, "max_batch_size", None), int)]
    return min(limits) if limits else None


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Any,
    *,
    max_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: int | None = None,
    delta: float = 1e-5,
    max_physical_batch_size: int | None = None,
    fast_clipping: bool = True,
    secure: bool = False,
    accountant: str = "pld",
    loss_reduction: str = "mean",
    seed: int | None = None,
) -> tuple[nn.Module, DPOptimizer, VirtualBatchLoader]:
    """Make ``model``/``optimizer``/``data_loader`` train with DP-SGD, in one call.

    1. ``model`` is converted in place by :func:`psgfunc.nn.expand_weights` (BatchNorm and
       other layers without per-sample gradients are refused with advice).
    2. The data loader's dataset is resampled by Poisson sampling at the rate
       ``q = batch_size / len(dataset)`` of the given loader (a :class:`PoissonDataLoader`
       keeps its own rate and steps), one logical batch per step, ``round(1 / q)`` steps per epoch,
       cut into physical batches of at most ``max_physical_batch_size`` examples.
    3. ``optimizer`` is wrapped in a :class:`DPOptimizer` (expected batch ``q * len(dataset)``)
       that steps once per logical batch and carries ``optimizer.accountant``, a
       :class:`PrivacyAccountant` counting the steps actually taken.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` (with ``epochs``) is given;
    with ``target_epsilon`` the noise multiplier is the smallest whose ``epochs`` epochs of
    steps spend at most ``target_epsilon`` at ``delta`` (:func:`noise_multiplier_for`).

    Args:
        model: a ``torch.nn.Module`` (converted in place; the returned object is the one to use).
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters.
        data_loader: a ``torch.utils.data.DataLoader`` with a map-style dataset and a
            ``batch_size`` (the expected logical batch), or a :class:`PoissonDataLoader`.
        max_norm: per-example clipping bound ``C``.
        noise_multiplier: ``sigma``.
        target_epsilon: the privacy budget to spend in ``epochs`` epochs.
        epochs: epochs the budget is for (required with ``target_epsilon``).
        delta: the ``delta`` of ``target_epsilon``.
        max_physical_batch_size: the largest batch one forward/backward may hold (memory);
            None: the smallest ``max_batch_size`` of shells already in the model, else whole
            logical batches. The converted model's shells accept up to this many examples.
        fast_clipping: clip from layer inputs and output gradients (no ``[B, *p.shape]``).
        secure: OS entropy for the noise of every step AND for the sampling (production
            runs); ``seed`` may not be given then.
        accountant: ``"pld"`` (default, tightest), ``"rdp"`` or ``"prv"``.
        loss_reduction: ``"mean"`` (default, as ``F.cross_entropy``) or ``"sum"``: how the
            loss you call ``backward()`` on reduces over the (physical) batch.
        seed: seeds the noise (reproducible runs).

    Returns:
        ``(model, optimizer, loader)``: the converted model, the :class:`DPOptimizer`, the
        :class:`VirtualBatchLoader`.

    Raises:
        TypeError: ``model``, ``optimizer`` or ``data_loader`` of the wrong type.
        ValueError: both or neither of ``noise_multiplier``/``target_epsilon``,
            ``target_epsilon`` without ``epochs``, an optimizer over other parameters, a
            DistributedDataParallel model, invalid sizes.
    """
    from psgfunc.nn import expand_weights

    if not isinstance(model, nn.Module):
        raise TypeError(f"make_private: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
        raise TypeError(
            "make_private: optimizer must be a plain torch.optim.Optimizer over the model's "
            f"parameters (make_private wraps it), got {type(optimizer).__name__}"
        )
    check_not_ddp(model)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "make_private: give exactly one of noise_multiplier and target_epsilon (with epochs)"
        )
    if target_epsilon is not None and epochs is None:
        raise ValueError("make_private: target_epsilon needs epochs (the budget is spent over them)")
    if max_physical_batch_size is not None:
        _check_size(max_physical_batch_size, "make_private")
    own = {id(p) for p in model.parameters()}
    foreign = [i for g in optimizer.param_groups for i, p in enumerate(g["params"]) if id(p) not in own]
    if foreign:
        raise ValueError(
            f"make_private: the optimizer holds {len(foreign)} parameter(s) that are not the "
            "model's; build it from model.parameters()"
        )
    dataset, sample_rate, generator, steps_per_epoch = _sampling_of(data_loader)
    n = len(dataset)
    if target_epsilon is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"make_private: epochs must be a positive int, got {epochs!r}")
        noise_multiplier = noise_multiplier_for(
            target_epsilon, sample_rate, epochs * steps_per_epoch, delta, accountant=accountant
        )
    physical = max_physical_batch_size or _shell_limit(model)
    model = expand_weights(model, physical or n)
    dp_optimizer = DPOptimizer(
        optimizer,
        max_norm=max_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=sample_rate * n,
        seed=seed,
        secure=secure,
        loss_reduction=loss_reduction,
        fast_clipping=fast_clipping,
    )
    dp_optimizer.accountant = PrivacyAccountant(noise_multiplier, sample_rate, accountant=accountant)
    poisson = PoissonDataLoader(
        dataset,
        sample_rate,
        generator=None if secure else generator,
        secure=secure,
        collate_fn=getattr(data_loader, "collate_fn", None),
        steps=steps_per_epoch,
        **_loader_kwargs(data_loader),
    )
    return model, dp_optimizer, VirtualBatchLoader(poisson, dp_optimizer, physical)


def _sampling_of(data_loader: Any) -> tuple[Any, float, torch.Generator | None, int]:
    """``(dataset, sample rate, generator, steps per epoch)`` of the loader make_private gets."""
    if isinstance(data_loader, VirtualBatchLoader):
        data_loader = data_loader.loader
    if not isinstance(data_loader, DataLoader):
        raise TypeError(
            "make_private: data_loader must be a torch.utils.data.DataLoader (its dataset is "
            f"Poisson-resampled), got {type(data_loader).__name__}"
        )
    dataset = data_loader.dataset
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError("make_private: the data loader's dataset must be map-style (have a length)") from None
    if n == 0:
        raise ValueError("make_private: the data loader's dataset is empty")
    if isinstance(data_loader, PoissonDataLoader):
        sampler = data_loader.batch_sampler
        return dataset, data_loader.sample_rate, sampler.generator, sampler.steps
    if data_loader.batch_size is None:
        raise ValueError(
            "make_private: the data loader has no batch_size; give a DataLoader(dataset, "
            "batch_size=B) whose B is the expected logical batch, or a PoissonDataLoader"
        )
    rate = min(1.0, data_loader.batch_size / n)
    return dataset, rate, getattr(data_loader, "generator", None), max(1, round(1 / rate))


_PASSED_ON = ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
              "prefetch_factor", "persistent_workers")


def _loader_kwargs(data_loader: DataLoader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _PASSED_ON:
        if hasattr(data_loader, name):
            value = getattr(data_loader, name)
            if name == "prefetch_factor" and data_loader.num_workers == 0:
                continue
            if name == "persistent_workers" and data_loader.num_workers == 0:
                continue
            out[name] = value
    return out
