"""Poisson sampling of batches, the sampling the DP-SGD accountants assume.

Every step includes each of the ``N`` examples independently with probability ``q``
(``sample_rate``), so batch sizes vary (``Binomial(N, q)``, mean ``q N``) and may be 0. The
privacy accounting in :func:`psgfunc.dp.epsilon` is for exactly this sampling, and it
assumes that the sampling is UNPREDICTABLE: whoever could reproduce the draws would know
which examples were in which step, and amplification by sampling would no longer hold. By
default the batches come from torch's global generator, so ``torch.manual_seed(0)``
reproduces them, which is right for experiments and wrong for a release: pass
``secure=True`` (every step's draw from a fresh generator seeded from ``os.urandom``, as
``DPOptimizer(secure=True)`` does for the noise) for production runs, or ``generator=`` for
reproducible ones. With either, the global generator is not touched.

``distributed=True`` (several processes, ``torch.distributed``) gives each rank a disjoint
shard, the indices ``i`` with ``i % world_size == rank`` of one Poisson sample of the whole
dataset, so the union over the ranks is one Poisson sample at rate ``q``.

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

from psgfunc.dp._distributed import rank_and_world, resolve_group
from psgfunc.dp._transform import _entropy_seed, _fresh_generator


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


def _check_source(generator: Any, secure: Any, where: str) -> bool:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if secure and generator is not None:
        raise ValueError(
            f"{where}: generator and secure=True exclude each other (secure draws every batch "
            "from fresh OS entropy, so a generator would be ignored); pass generator=None or "
            "secure=False"
        )
    return bool(secure)


def _shard(distributed: Any, where: str) -> tuple[int, int] | None:
    """``(rank, world_size)`` of the process group ``distributed`` names, None for False."""
    group = resolve_group(distributed, where)
    return None if group is None else rank_and_world(group)


def _draw(
    num_examples: int,
    sample_rate: float,
    generator: torch.Generator | None,
    secure: bool = False,
    shard: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One Poisson sample of ``range(num_examples)``, or this rank's shard of one."""
    if secure:
        generator = _fresh_generator(torch.device("cpu"), _entropy_seed())
    device = generator.device if generator is not None else torch.device("cpu")
    mask = torch.rand(num_examples, generator=generator, device=device) < sample_rate
    indices = torch.nonzero(mask).flatten().cpu()
    if shard is not None:
        # Every rank draws the whole dataset's mask and keeps its residue class: with the same
        # stream on all ranks they cut one draw; with independent streams (secure=True) the
        # shards are independent. Either way each example is in with probability q, alone.
        rank, world = shard
        indices = indices[indices % world == rank]
    return indices


def poisson_batches(
    num_examples: int,
    sample_rate: float,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    secure: bool = False,
    distributed: Any = False,
) -> Iterator[torch.Tensor]:
    """Yield ``steps`` Poisson-sampled batches of example indices.

    The accountant assumes nobody can predict the batches: use ``secure=True`` for a
    release; the default (torch's global generator) repeats after ``torch.manual_seed``.

    Args:
        num_examples: dataset size ``N >= 1``.
        sample_rate: inclusion probability ``q`` in ``(0, 1]`` of every example at every step.
        steps: number of batches ``>= 0``; ``None``: ``round(1 / q)`` (one expected epoch).
        generator: source of randomness for reproducible runs (``None``: torch's global
            generator, unless ``secure``).
        secure: draw every batch from a fresh generator seeded from OS entropy
            (``os.urandom``): no seed reproduces the batches. Excludes ``generator``.
        distributed: ``True`` (default process group) or a ``ProcessGroup``: yield this
            rank's disjoint shard (indices ``i % world_size == rank``) of each Poisson sample
            of the whole dataset; the union over the ranks is the sample. Every rank gets
            ``steps`` batches, empty ones included.

    Yields:
        int64 index tensors ``[B_t]``, sorted, with ``B_t ~ Binomial(N, q)`` (empty batches
        are yielded too: the accountant counts them as steps); distributed: this rank's part.

    Raises:
        ValueError: if ``num_examples < 1``, ``sample_rate`` is outside ``(0, 1]``,
            ``steps`` is negative, ``generator`` is given with ``secure=True``, or
            ``distributed`` asks for a process group that is not initialised.
    """
    n, q, steps = _check_args(num_examples, sample_rate, steps, "poisson_batches")
    secure = _check_source(generator, secure, "poisson_batches")
    shard = _shard(distributed, "poisson_batches")
    return _batches(n, q, steps, generator, secure, shard)


def _batches(
    n: int, q: float, steps: int, generator: Any, secure: bool, shard: tuple[int, int] | None
) -> Iterator[torch.Tensor]:
    for _ in range(steps):
        yield _draw(n, q, generator, secure, shard)


class PoissonBatchSampler(Sampler[list[int]]):
    """A ``batch_sampler`` for ``DataLoader`` that draws Poisson batches (possibly empty).

    Each pass yields ``steps`` lists of indices, every example included independently with
    probability ``sample_rate``. Give it to ``DataLoader(dataset, batch_sampler=...)``; use
    :class:`PoissonDataLoader` to also get correctly shaped empty batches. The accountant
    assumes unpredictable batches: ``secure=True`` for a release (see
    :func:`poisson_batches`).

    Args:
        num_examples: dataset size ``N >= 1``.
        sample_rate: ``q`` in ``(0, 1]``.
        steps: batches per pass; ``None``: ``round(1 / q)``.
        generator: source of randomness for reproducible runs (``None``: torch's global
            generator, unless ``secure``).
        secure: every batch from fresh OS entropy; excludes ``generator``.
        distributed: ``True`` or a ``ProcessGroup``: this rank's disjoint shard of each
            Poisson sample of all ``num_examples`` (see :func:`poisson_batches`).

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
        secure: bool = False,
        distributed: Any = False,
    ) -> None:
        self.num_examples, self.sample_rate, self.steps = _check_args(
            num_examples, sample_rate, steps, "PoissonBatchSampler"
        )
        self.secure = _check_source(generator, secure, "PoissonBatchSampler")
        self.generator = generator
        self.shard = _shard(distributed, "PoissonBatchSampler")

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield _draw(self.num_examples, self.sample_rate, self.generator, self.secure, self.shard).tolist()

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
    do not match the accountant's Poisson assumption, nor do predictable batches: the
    default (torch's global generator) repeats after ``torch.manual_seed``; use
    ``secure=True`` for a release.

    With ``generator`` or ``secure=True`` the loader leaves torch's global generator alone
    (the ``DataLoader`` base seed for workers comes from a private generator, seeded from
    ``generator.initial_seed()`` or from OS entropy).

    Args:
        dataset: a map-style dataset (``len`` and ``dataset[i]``).
        sample_rate: ``q`` in ``(0, 1]``; expected batch size ``q * len(dataset)``.
        generator: randomness of the sampling, for reproducible runs (``None``: torch's
            global generator, unless ``secure``).
        secure: every batch from a fresh generator seeded from OS entropy (``os.urandom``),
            so no seed reproduces the batches; excludes ``generator``.
        distributed: ``True`` (default process group) or a ``ProcessGroup``: each rank
            loads its disjoint shard (indices ``i % world_size == rank``) of each Poisson
            sample of the whole dataset, so the union over the ranks is one Poisson sample
            at rate ``q``; a rank's batch may be empty while others are not. The global
            expected batch (``DPOptimizer``'s ``expected_batch_size``) stays
            ``q * len(dataset)``; each rank expects ``1 / world_size`` of it.
        collate_fn: as ``DataLoader``'s (default ``default_collate``).
        steps: batches per pass; ``None``: ``round(1 / q)``.
        **kwargs: further ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...);
            ``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last`` are
            fixed by the Poisson sampling and may not be given.

    Raises:
        ValueError: if the dataset is empty, the sampling arguments are invalid,
            ``generator`` is given with ``secure=True``, or ``distributed`` asks for a
            process group that is not initialised.
    """

    def __init__(
        self,
        dataset: Any,
        sample_rate: float,
        *,
        generator: torch.Generator | None = None,
        secure: bool = False,
        distributed: Any = False,
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
        sampler = PoissonBatchSampler(
            n, sample_rate, steps=steps, generator=generator, secure=secure, distributed=distributed
        )
        # DataLoader draws a worker base seed per pass from its own generator (the global one
        # when None): give it a private one so that the global stream is not consumed either.
        own = None
        if sampler.secure:
            own = _fresh_generator(torch.device("cpu"), _entropy_seed())
        elif generator is not None:
            own = _fresh_generator(torch.device("cpu"), generator.initial_seed())
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=_EmptySafeCollate(dataset, collate_fn or default_collate),
            generator=own,
            **kwargs,
        )
