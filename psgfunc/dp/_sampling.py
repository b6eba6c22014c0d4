"""Poisson sampling of batches, the sampling the DP-SGD accountants assume.

Every step includes each of the ``N`` examples independently with probability ``q``
(``sample_rate``), so batch sizes vary (``Binomial(N, q)``, mean ``q N``) and may be 0. The
privacy accounting in :func:`psgfunc.dp.epsilon` is for exactly this sampling.

Uniform fixed-size batches (an ordinary ``DataLoader(..., shuffle=True)``) still work with
:class:`DPOptimizer` and :func:`dp_sgd_transform`, but they do NOT match the accountant's
Poisson assumption: the epsilon reported for them is not a proven guarantee.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from numbers import Integral, Real
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate


def _check_args(num_examples: Any, sample_rate: Any, steps: Any, where: str) -> tuple[int, float, int]:
    if isinstance(num_examples, bool) or not isinstance(num_examples, Integral) or num_examples < 1:
        raise ValueError(f"{where}: num_examples must be an int >= 1, got {num_examples!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, Real) or not 0 < sample_rate <= 1:
        raise ValueError(
            f"{where}: sample_rate must be in (0, 1] (expected_batch_size / num_examples), "
            f"got {sample_rate!r}"
        )
    if steps is None:
        steps = max(1, round(1 / float(sample_rate)))
    elif isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(f"{where}: steps must be an int >= 0 or None, got {steps!r}")
    return int(num_examples), float(sample_rate), int(steps)


def _draw(num_examples: int, sample_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    mask = torch.rand(num_examples, generator=generator, device=device) < sample_rate
    return torch.nonzero(mask).flatten().cpu()


def poisson_batches(
    num_examples: int,
    sample_rate: float,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``steps`` Poisson-sampled batches of example indices.

    Args:
        num_examples: dataset size ``N >= 1``.
        sample_rate: inclusion probability ``q`` in ``(0, 1]`` of every example at every step.
        steps: number of batches ``>= 0``; ``None``: ``round(1 / q)`` (one expected epoch).
        generator: source of randomness (``None``: torch's global generator).

    Yields:
        int64 index tensors ``[B_t]``, sorted, with ``B_t ~ Binomial(N, q)`` (empty batches
        are yielded too: the accountant counts them as steps).

    Raises:
        ValueError: if ``num_examples < 1``, ``sample_rate`` is outside ``(0, 1]``, or
            ``steps`` is negative.
    """
    n, q, steps = _check_args(num_examples, sample_rate, steps, "poisson_batches")
    for _ in range(steps):
        yield _draw(n, q, generator)


class PoissonBatchSampler(Sampler[list[int]]):
    """A ``batch_sampler`` for ``DataLoader`` that draws Poisson batches (possibly empty).

    Each pass yields ``steps`` lists of indices, every example included independently with
    probability ``sample_rate``. Give it to ``DataLoader(dataset, batch_sampler=...)``; use
    :class:`PoissonDataLoader` to also get correctly shaped empty batches.

    Args:
        num_examples: dataset size ``N >= 1``.
        sample_rate: ``q`` in ``(0, 1]``.
        steps: batches per pass; ``None``: ``round(1 / q)``.
        generator: source of randomness (``None``: torch's global generator).

    Raises:
        ValueError: as :func:`poisson_batches`.
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.num_examples, self.sample_rate, self.steps = _check_args(
            num_examples, sample_rate, steps, "PoissonBatchSampler"
        )
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield _draw(self.num_examples, self.sample_rate, self.generator).tolist()

    def __len__(self) -> int:
        return self.steps


def _empty_like_batch(batch: Any) -> Any:
    """A batch with the structure of ``batch`` (a collated batch) and ``B = 0``."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({k: _empty_like_batch(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_empty_like_batch(v) for v in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        if all(isinstance(v, (torch.Tensor, Mapping, Sequence)) and not isinstance(v, (str, bytes)) for v in batch):
            return type(batch)(_empty_like_batch(v) for v in batch)  # fields of an example
        return type(batch)()  # a collated list of non-tensor items (e.g. strings): [B] -> []
    raise ValueError(
        f"PoissonDataLoader: cannot build an empty batch from a collated {type(batch).__name__}; "
        "collate_fn should return tensors (or dicts/tuples/lists of them)"
    )


class _EmptySafeCollate:
    """``collate_fn`` that answers an empty index list with the B = 0 slice of a real batch."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self._empty: Any = None

    def __call__(self, examples: list[Any]) -> Any:
        if examples:
            return self.collate_fn(examples)
        if self._empty is None:
            self._empty = _empty_like_batch(self.collate_fn([self.dataset[0]]))
        return self._empty


class PoissonDataLoader(DataLoader):
    """``DataLoader`` whose batches are Poisson samples of the dataset, empty ones included.

    An empty batch comes out with the structure, dtypes and trailing shapes of a real batch
    and leading size 0 (e.g. images ``[0, 1, 28, 28]`` and labels ``[0]``), built by
    collating ``dataset[0]`` once and slicing it to zero rows, so the model, the loss and
    :class:`DPOptimizer` see a batch with ``B = 0``. Iterating yields ``steps`` batches.

    Uniform fixed-size batches (an ordinary shuffled ``DataLoader``) are available too but
    do not match the accountant's Poisson assumption.

    Args:
        dataset: a map-style dataset (``len`` and ``dataset[i]``).
        sample_rate: ``q`` in ``(0, 1]``; expected batch size ``q * len(dataset)``.
        generator: randomness of the sampling (``None``: torch's global generator).
        collate_fn: as ``DataLoader``'s (default ``default_collate``).
        steps: batches per pass; ``None``: ``round(1 / q)``.
        **kwargs: further ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...);
            ``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last`` are
            fixed by the Poisson sampling and may not be given.

    Raises:
        ValueError: if the dataset is empty or the sampling arguments are invalid.
    """

    def __init__(
        self,
        dataset: Any,
        sample_rate: float,
        *,
        generator: torch.Generator | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        fixed = {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"} & set(kwargs)
        if fixed:
            raise ValueError(
                f"PoissonDataLoader: {sorted(fixed)} cannot be set; batches are drawn by Poisson "
                "sampling at sample_rate"
            )
        try:
            n = len(dataset)
        except TypeError:
            raise ValueError("PoissonDataLoader: dataset must be map-style (have a length)") from None
        if n == 0:
            raise ValueError("PoissonDataLoader: dataset is empty; it needs at least one example")
        self.sample_rate = float(sample_rate) if isinstance(sample_rate, Real) else sample_rate
        sampler = PoissonBatchSampler(n, sample_rate, steps=steps, generator=generator)
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=_EmptySafeCollate(dataset, collate_fn or default_collate),
            **kwargs,
        )
