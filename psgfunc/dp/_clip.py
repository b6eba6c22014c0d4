"""Per-example clipping and Gaussian noise over per-sample gradient pytrees.

A per-sample gradient pytree has the structure of the params pytree with every leaf shaped
``[B, *param_shape]`` (what :func:`psgfunc.per_sample_grads` returns). Clipping scales example
``b``'s gradient by ``min(1, C / ||g_b||)`` where ``||g_b||`` is the L2 norm over all of its
leaves together; the Gaussian mechanism then adds ``N(0, (sigma * C)^2)`` to every coordinate of
the clipped sum (Abadi et al. 2016, "Deep Learning with Differential Privacy").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any, Union

import optree
import torch

from psgfunc._tree import (
    accurate_sq_norms,
    batch_size,
    gamma,
    sq_norm_rel,
    tree_leaves,
    tree_map,
    unit_roundoff,
)
from psgfunc.functional import _autocast

MaxNorm = Union[float, Mapping[Any, float]]


# --------------------------------------------------------------------------- validation


def _check_positive_finite(value: Any, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def _check_max_norm(max_norm: Any, grads: Any, where: str) -> float | dict[Any, float]:
    """Validate ``max_norm``; a float, or a dict ``{top-level key of grads: C}``."""
    if not isinstance(max_norm, Mapping):
        return _check_positive_finite(max_norm, f"{where}: max_norm")
    if not isinstance(grads, Mapping):
        raise ValueError(
            f"{where}: per-layer max_norm (a mapping) needs grads to be a mapping too (a params "
            f"dict); got grads of type {type(grads).__name__}. Pass one float max_norm instead"
        )
    missing = [k for k in grads if k not in max_norm]
    extra = [k for k in max_norm if k not in grads]
    if missing or extra:
        raise ValueError(
            f"{where}: per-layer max_norm must have exactly the top-level keys of grads; "
            f"missing {missing}, unknown {extra}. Give every parameter group its own C"
        )
    return {
        k: _check_positive_finite(v, f"{where}: max_norm[{k!r}]") for k, v in max_norm.items()
    }


def total_max_norm(max_norm: float | Mapping[Any, float]) -> float:
    """The per-example sensitivity: ``C``, or ``sqrt(sum_k C_k^2)`` for per-layer clipping."""
    if isinstance(max_norm, Mapping):
        return math.sqrt(sum(float(c) ** 2 for c in max_norm.values()))
    return float(max_norm)


# --------------------------------------------------------------------------- norms


def _rows(leaf: torch.Tensor) -> torch.Tensor:
    """``[B, *shape] -> [B, prod(shape)]`` (works for ``B = 0`` and for 1-dim leaves)."""
    return leaf.reshape(leaf.shape[0], math.prod(leaf.shape[1:]))


def _acc_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    dtype = torch.float32
    for leaf in leaves:
        dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype


def _check_leaves(grads: Any, where: str) -> tuple[list[torch.Tensor], int]:
    leaves = tree_leaves(grads)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise ValueError(
                f"{where}: grads leaf {i} is {type(leaf).__name__}"
                f"{'' if not isinstance(leaf, torch.Tensor) else ' of dtype ' + str(leaf.dtype)}"
                "; every leaf must be a floating tensor shaped [B, *param_shape]"
            )
    b = batch_size(grads, what="grads")
    return leaves, b


def _norms_of(
    leaves: list[torch.Tensor],
    b: int,
    dtype: torch.dtype,
    where: str,
    all_leaves: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Global L2 norm per example over ``leaves``; raises on NaN/Inf, survives overflow.

    ``all_leaves`` (default ``leaves``) are the leaves searched for NaN/Inf when a norm is not
    finite, so that the error counts every bad example of the whole batch.
    """
    device = leaves[0].device if leaves else torch.device("cpu")
    sq = torch.zeros(b, dtype=torch.float64, device=device)
    floor = 0.0  # below it a leaf's squares may have underflowed (lost more than 2^-47)
    for leaf in leaves:  # float64 sums of float32 blocks: accurate for rows of any length
        sq = sq + accurate_sq_norms(leaf).to(device)
        acc = torch.float64 if leaf.dtype == torch.float64 else torch.float32
        floor = max(floor, math.prod(leaf.shape[1:]) * torch.finfo(acc).tiny / torch.finfo(acc).eps)
    norms = sq.sqrt().to(dtype)
    if bool(torch.isfinite(norms).all()):
        if b and bool((sq < floor).any()):
            # squares below the smallest subnormal are 0: float32 gradients of 1e-25 had
            # norm 0 and were not clipped (C = 1e-30); such rows are measured rescaled
            return _rescaled_norms(leaves, b, dtype, device, sq < floor, norms)
        return norms
    # Slow path: either a gradient holds NaN/Inf (an error), or the sum of squares overflowed.
    bad = torch.zeros(b, dtype=torch.bool, device=device)
    for leaf in leaves if all_leaves is None else all_leaves:
        bad |= ~torch.isfinite(_rows(leaf)).all(dim=1).to(device)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
        raise ValueError(
            f"{where}: {len(idx)} of {b} examples have NaN or Inf in their per-sample gradient "
            f"(batch indices {shown}); clipping would silently hide them. Find the source (a "
            "log(0) or division by zero in the loss, an exploding learning rate) or remove "
            "those examples from the batch before clipping"
        )
    # Finite values whose squares overflow: rescale by the per-example max |g|.
    return _rescaled_norms(leaves, b, dtype, device, ~torch.isfinite(norms), norms)


def _rescaled_norms(leaves: list[torch.Tensor], b: int, dtype: torch.dtype, device: Any,
                    redo: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``norms`` with the rows ``redo`` (``[B]`` bool) measured again as ``s ||g / s||``,
    ``s`` the row's largest magnitude: for squares that overflow or underflow."""
    scale = torch.zeros(b, dtype=dtype, device=device)
    for leaf in leaves:
        if leaf.numel():
            scale = torch.maximum(scale, _rows(leaf).abs().amax(dim=1).to(dtype).to(device))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    sq = torch.zeros(b, dtype=dtype, device=device)
    for leaf in leaves:
        scaled = _rows(leaf).to(dtype) / safe[:, None].to(leaf.device)  # (entries at most 1, one of them 1)
        sq = sq + accurate_sq_norms(scaled).to(dtype).to(device)
    return torch.where(redo, scale * sq.sqrt(), norms)


def per_sample_norms(grads: Any) -> torch.Tensor:
    """Global L2 norm of every example's gradient, over all leaves together.

    Args:
        grads: per-sample gradient pytree, leaves ``[B, *param_shape]``.

    Returns:
        ``[B]`` tensor ``||g_b|| = sqrt(sum over leaves of sum(g_b ** 2))``, in the promoted
        dtype of the leaves and float32 (float16/bfloat16 leaves are summed in float32).
        Sums of squares that overflow are recomputed with a per-example rescaling.

    Raises:
        ValueError: if leaves disagree on ``B``, a leaf is not a floating tensor, or an
            example's gradient contains NaN or Inf.
    """
    leaves, b = _check_leaves(grads, "per_sample_norms")
    return _norms_of(leaves, b, _acc_dtype(leaves), "per_sample_norms")


# --------------------------------------------------------------------------- clipping


def _slack(leaves: list[torch.Tensor]) -> float:
    """Relative slack of the norms clipping uses, so that the clipped gradients and sums
    AS COMPUTED stay within ``C (1 + 1e-5)``.

    Half-precision leaves are scaled (and summed) in float32 and rounded once to their
    dtype, which may move a coordinate by ``u`` (2^-8 for bfloat16) relatively: their
    norms are inflated by that, plus the float32 norm's and factor's error bound.
    Float32 and float64 leaves get none: their norms are accurate to 4e-6 and 1e-14
    (:func:`~psgfunc._tree.accurate_sq_norms`), inside the tolerance, and leaving them
    keeps clipping exact where it can be.
    """
    rel = 0.0
    for leaf in leaves:
        if leaf.dtype not in (torch.float32, torch.float64):
            k = math.prod(leaf.shape[1:])
            slack = unit_roundoff(leaf.dtype) + sq_norm_rel(leaf.dtype, k) + 6 * unit_roundoff(torch.float32)
            rel = max(rel, slack)
    return rel


def clip_factor(norms: torch.Tensor, c: float, floor: float = 0.0, largest: float | None = None) -> torch.Tensor:
    """``[B]`` clip factors ``C / max(norm, C)``: exactly 1 where ``norm <= C`` (zero
    gradients included), else ``C / norm``, and 0 where that is below float32's smallest
    normal number (about 1.2e-38: a norm above ``C`` times 8.5e37).

    Below it a factor rounds by up to its own size, not relatively (subnormal spacing), and
    a float32 gradient of about 1e38 scaled by ``C / norm`` rounded up came out at up to 2 C;
    the factors of float64 norms are used in float32 too where a leaf is float32. Such an
    example adds nothing: it is clipped harder, never less.

    ``floor`` (:func:`rounding_floor`): what rounding half-precision sums can add to a
    contribution beyond the relative error the norms carry; the factors then clip to
    ``C - floor`` (so that a contribution as computed stays within ``C``).

    ``largest``: an upper bound of ``norms`` the caller already has (their sum), below
    which no factor can reach the subnormal range (``C / largest`` at least 4 times
    float32's smallest normal number): the masking is skipped, two operations fewer.

    Raises:
        ValueError: ``floor`` is above ``C / 2`` (``max_norm`` too small for the params'
            dtype).
    """
    if floor:
        if floor > c / 2:
            raise ValueError(
                f"max_norm {c:g} is too small for half-precision parameters: rounding their "
                f"clipped sums can add up to {floor:.3g} to an example's contribution (their "
                "smallest steps, about 6e-8 for float16, times the square root of their "
                f"number of elements); use max_norm >= {2 * floor:.3g}, or float32 parameters"
            )
        c = c - floor
    factor = c / norms.clamp_min(c)
    if largest is not None and largest * (4 * _TINY) < c:
        return factor
    return factor.masked_fill(factor < _TINY, 0.0)


def rounding_floor(leaves: Any) -> float:
    """``sqrt(sum_i k_i eta_i^2)`` over ``(dtype, k)`` pairs (one per parameter leaf: its
    sum's dtype and number of elements) of half precision, ``eta`` half that dtype's
    smallest subnormal (``2^-25`` for float16, ``2^-134`` for bfloat16): by how much, in
    norm, rounding those leaves' float32 sums to their dtype can exceed the relative bound
    ``u`` that :func:`~psgfunc.per_sample._kinds.certified_norm` charges (below the
    smallest normal number each coordinate rounds by up to ``eta`` absolutely: a float16
    weight of 1024 elements, clipped to 1e-6, came out at 1.9e-6). 0 for float32/64."""
    total = 0.0
    for dtype, k in leaves:
        if dtype not in (torch.float32, torch.float64):
            total += k * (torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2) ** 2
    return math.sqrt(total) * (1 + 2**-20) if total else 0.0


_TINY = torch.finfo(torch.float32).tiny


def _covering_slack(leaves: list[torch.Tensor], roundings: int) -> float:
    """Relative slack that makes :func:`_norms_of`'s norms upper bounds that also cover what
    is computed from them: their own error (``sq_norm_rel`` of the squares, rescaled rows
    included) and ``roundings`` roundings more (``gamma``), in the leaves' accumulation
    precision.

    ``clip`` (6: the norm's rounding to the norms' dtype and the inflation's, the factor's,
    also to a float32 leaf's dtype, and each product's) keeps its result, as returned,
    within ``C``: at most about 1.3e-5 in float32 and 1e-12 in float64 for rows up to a
    million elements (without it, half the clipped float32 examples came out up to 3.4
    roundings above ``C``). A certified clipped sum (``B + 6``: the sum over the ``B``
    examples too) keeps every example's contribution within ``C`` as computed, as fast
    clipping's norms do: a few ``1e-6`` in float32."""
    rel = 0.0
    for leaf in leaves:
        acc = torch.float64 if leaf.dtype == torch.float64 else torch.float32
        k = max(1, math.prod(leaf.shape[1:]))
        rel = max(rel, sq_norm_rel(acc, k) + gamma(roundings, acc))
    return rel


def _clip_factors(
    grads: Any, max_norm: MaxNorm, where: str, certified: bool = False, scaled: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-leaf ``[B]`` clip factors ``min(1, C / ||g_b||)`` and the global norms ``[B]``.

    Factors are aligned with ``tree_leaves(grads)``; with per-layer ``max_norm`` every leaf
    under top-level key ``k`` gets group ``k``'s factor. The norms are inflated by
    :func:`_slack` (2^-8 with bfloat16 leaves, none for float32/64), with ``certified`` or
    ``scaled`` by :func:`_covering_slack` too (the clipped sum's rounding, or the scaled
    gradients', for ``clip``), and returned as used.
    """
    checked = _check_max_norm(max_norm, grads, where)
    leaves, b = _check_leaves(grads, where)
    dtype = _acc_dtype(leaves)
    roundings = b + 6 if certified else 6 if scaled else 0
    slack = 1 + _slack(leaves) + (_covering_slack(leaves, roundings) if roundings else 0.0)
    if not isinstance(checked, dict):
        norms = _norms_of(leaves, b, dtype, where) * slack
        factor = clip_factor(norms, checked, rounding_floor(_sizes(leaves)))
        return [factor] * len(leaves), norms
    paths, _, _ = optree.tree_flatten_with_path(grads)
    group_of = [path[0] for path in paths]
    factors_by_key: dict[Any, torch.Tensor] = {}
    norms = None
    for key, c in checked.items():
        group = [leaf for leaf, k in zip(leaves, group_of) if k == key]
        if not group:
            continue
        norms_k = _norms_of(group, b, dtype, where, all_leaves=leaves) * slack
        factors_by_key[key] = clip_factor(norms_k, c, rounding_floor(_sizes(group)))
        # (hypot: the global norms of group norms above 1.8e19 overflowed in float32 squares)
        norms = norms_k if norms is None else torch.hypot(norms, norms_k.to(norms.device))
    if norms is None:
        norms = torch.zeros(b, dtype=dtype)
    return [factors_by_key[k] for k in group_of], norms


def _sizes(leaves: list[torch.Tensor]) -> list[tuple[torch.dtype, int]]:
    """``(dtype, elements per example)`` of ``[B, *shape]`` leaves, for :func:`rounding_floor`."""
    return [(leaf.dtype, math.prod(leaf.shape[1:])) for leaf in leaves]


def _up(leaf: torch.Tensor) -> torch.Tensor:
    """Half-precision leaves are scaled and summed in float32 (then rounded once)."""
    return leaf if leaf.dtype in (torch.float32, torch.float64) else leaf.to(torch.float32)


def _scale(leaf: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    up = _up(leaf)
    f = factor.to(device=leaf.device, dtype=up.dtype)
    return (up * f.reshape(-1, *([1] * (leaf.dim() - 1)))).to(leaf.dtype)


def clip(grads: Any, max_norm: MaxNorm) -> Any:
    """Clip every example's gradient to L2 norm at most ``max_norm``.

    Example ``b`` is scaled by ``min(1, C / ||g_b||)`` with ``||g_b||`` the global norm over
    all leaves (:func:`per_sample_norms`), taken larger by the slack below: an example
    with norm ``<= C / (1 + slack)`` (a zero gradient included) is left unchanged, one just
    below ``C`` may be scaled by a factor a hair under 1. Half-precision leaves are scaled
    in float32 and rounded once, which can move each coordinate by 2^-8 (bfloat16)
    relatively, so their norms are taken 2^-8 larger; all norms are also taken larger by
    their own error bound and the scaling's (:func:`_covering_slack`: up to about 1.3e-5 in
    float32, 1e-12 in float64 for rows up to a million elements), so the clipped gradient,
    as returned, has norm at most ``C``.
    Below float16's smallest normal number (6.1e-5) rounding is absolute (up to 3e-8 per
    coordinate), so float16 leaves are clipped to ``C`` minus ``3e-8 sqrt(their size)``
    (:func:`rounding_floor`; a ``C`` below twice that raises).

    Per-layer clipping: ``max_norm`` may be a dict ``{key: C_k}`` whose keys are exactly the
    top-level keys of ``grads`` (a params dict such as ``{"fc1": {...}, "fc2": {...}}`` or
    ``dict(model.named_parameters())``); each group's gradient, all leaves under ``key``, is
    clipped to its own ``C_k``, so the whole example is bounded by ``sqrt(sum_k C_k^2)``.

    Args:
        grads: per-sample gradient pytree, leaves ``[B, *param_shape]``.
        max_norm: ``C > 0`` (finite), or the per-layer dict described above.

    Returns:
        ``grads``' structure, leaves ``[B, *param_shape]``, clipped per example.

    Raises:
        ValueError: if ``max_norm`` is not finite and positive, a per-layer dict does not
            match ``grads``' keys, leaves disagree on ``B``, any example's gradient
            contains NaN or Inf (the message says how many and which), or ``max_norm`` is
            too small for half-precision leaves (see above).
    """
    factors, _ = _clip_factors(grads, max_norm, "clip", scaled=True)
    leaves, spec = optree.tree_flatten(grads)
    return optree.tree_unflatten(spec, [_scale(g, f) for g, f in zip(leaves, factors)])


@_autocast.off()  # a caller's autocast block: norms and sums stay in the gradients' dtype
def clipped_sum(grads: Any, max_norm: MaxNorm, where: str = "clipped_sum", *,
                certified: bool = False) -> tuple[Any, torch.Tensor]:
    """``(sum_b clip(g)_b, norms [B])`` without materialising the clipped ``[B, ...]`` tree.

    ``certified``: norms raised by :func:`_covering_slack`, so that each example's
    contribution to the sum is at most ``C`` as computed (fast clipping's promise, for its
    fallback to materialised gradients); otherwise within ``C (1 + 1e-5)``."""
    factors, norms = _clip_factors(grads, max_norm, where, certified)
    leaves, spec = optree.tree_flatten(grads)
    sums = [
        torch.tensordot(f.to(device=g.device, dtype=_up(g).dtype), _up(g), dims=1).to(g.dtype)
        for g, f in zip(leaves, factors)
    ]
    return optree.tree_unflatten(spec, sums), norms


# --------------------------------------------------------------------------- noise


def add_noise(tree: Any, std: float, generator: torch.Generator | None) -> Any:
    """``leaf + std * N(0, 1)`` for every leaf, drawn leaf by leaf in ``tree_leaves`` order.

    With a generator the normal draws are made on the generator's device and moved to each
    leaf's device, so a seed gives the same numbers wherever the parameters live. ``std == 0``
    returns ``tree`` unchanged and draws nothing.
    """
    if std == 0:
        return tree

    def noisy(leaf: torch.Tensor) -> torch.Tensor:
        if generator is None:
            z = torch.randn(leaf.shape, dtype=leaf.dtype, device=leaf.device)
        else:
            z = torch.randn(leaf.shape, dtype=leaf.dtype, device=generator.device, generator=generator)
        return leaf + std * z.to(leaf.device)

    return tree_map(noisy, tree)


def privatize(
    grads: Any,
    max_norm: MaxNorm,
    noise_multiplier: float,
    *,
    generator: torch.Generator | None = None,
) -> Any:
    """The Gaussian mechanism on clipped per-example gradients: a noisy SUM, no batch dim.

    ``sum_b clip(g, C)_b + N(0, (sigma * C)^2)`` independently on every coordinate. With
    per-layer ``max_norm`` (see :func:`clip`) the noise uses the total sensitivity
    ``C = sqrt(sum_k C_k^2)``. Divide by the expected batch size yourself (or use
    :func:`dp_sgd_transform`) to get an average.

    Args:
        grads: per-sample gradient pytree, leaves ``[B, *param_shape]``; ``B = 0`` (an empty
            Poisson batch) gives pure noise of shape ``param_shape``.
        max_norm: clipping bound ``C`` (float > 0) or a per-layer dict, as in :func:`clip`.
        noise_multiplier: ``sigma >= 0``; 0 adds no noise (and draws no random numbers).
        generator: the source of the noise; ``None`` uses torch's global generator. Noise
            is drawn leaf by leaf in ``tree_leaves(grads)`` order (dict keys sorted).

    Returns:
        ``grads``' structure with leaves ``[*param_shape]``.

    Raises:
        ValueError: as :func:`clip`, and if ``noise_multiplier`` is negative or not finite.
    """
    sigma = _check_positive_finite(noise_multiplier, "privatize: noise_multiplier", allow_zero=True)
    summed, _ = clipped_sum(grads, max_norm, "privatize")
    return add_noise(summed, sigma * total_max_norm(max_norm), generator)
