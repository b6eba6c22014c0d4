"""Pytree helpers on optree, shared by every floor above.

A pytree here is any nesting of dicts, lists, tuples and namedtuples whose leaves are
tensors (optree's default registry, ``none_is_leaf=False``). Per-sample gradient pytrees
have the structure of the params pytree with every leaf shaped ``[B, *leaf.shape]``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import optree
import torch

__all__ = [
    "tree_map",
    "tree_leaves",
    "tree_flatten",
    "tree_unflatten",
    "tree_structure",
    "batch_size",
    "tree_stack",
    "tree_unstack",
    "per_example_norms",
    "row_sq_norms",
    "accurate_sq_norms",
    "unit_roundoff",
    "gamma",
    "sq_norm_rel",
    "tree_index",
]

tree_flatten = optree.tree_flatten
tree_unflatten = optree.tree_unflatten
tree_structure = optree.tree_structure


def tree_map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``f`` leaf-wise over one or several pytrees of the same structure.

    Args:
        f: called as ``f(leaf, *other_leaves)``.
        tree: the pytree that fixes the structure.
        *rest: further pytrees with the same structure as ``tree``.

    Raises:
        ValueError: if a tree in ``rest`` has another structure.
    """
    try:
        return optree.tree_map(f, tree, *rest)
    except ValueError as error:
        raise ValueError(
            f"tree_map: the pytrees do not share one structure ({error}); pass trees "
            "with the same keys and nesting"
        ) from None


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in optree's canonical order (dict keys sorted)."""
    return optree.tree_leaves(tree)


def batch_size(*batch: Any, what: str = "batch") -> int:
    """The common leading size ``B`` of every tensor leaf in ``batch``.

    Args:
        *batch: one or more pytrees whose tensor leaves are shaped ``[B, ...]``.
        what: how the error message names the argument.

    Returns:
        ``B`` (may be 0).

    Raises:
        ValueError: if there is no tensor leaf, a leaf is 0-dimensional (no batch
            dimension), or the leading sizes differ.
    """
    def name(i: int, path: tuple[Any, ...]) -> str:  # (built for an error only)
        return f"{what}[{i}]" + "".join(f"[{p!r}]" for p in path)

    sizes: list[tuple[int, Any, int]] = []
    for i, tree in enumerate(batch):
        if isinstance(tree, torch.Tensor):  # (the usual argument: no pytree pass)
            paths, leaves = [()], [tree]
        else:
            paths, leaves, _ = optree.tree_flatten_with_path(tree)
        for path, leaf in zip(paths, leaves):
            if not isinstance(leaf, torch.Tensor):
                continue
            if leaf.dim() == 0:
                raise ValueError(
                    f"{name(i, path)} is a 0-dim tensor and has no batch dimension; every batch "
                    "leaf must be shaped [B, ...] (use x.unsqueeze(0) for a single example)"
                )
            sizes.append((i, path, leaf.shape[0]))
    if not sizes:
        raise ValueError(
            f"the {what} has no tensor leaves; pass at least one tensor shaped [B, ...]"
        )
    i0, path0, first = sizes[0]
    for i, path, size in sizes[1:]:
        if size != first:
            raise ValueError(
                f"mismatched batch sizes: {name(i0, path0)} has leading size {first} but "
                f"{name(i, path)} has {size}; every tensor in the {what} must share the batch "
                "dimension B"
            )
    return first


def tree_stack(trees: list[Any]) -> Any:
    """Stack a list of pytrees with one structure into one pytree of ``[N, ...]`` leaves."""
    if len(trees) == 0:
        raise ValueError("tree_stack needs at least one pytree to take the structure from")
    return tree_map(lambda *leaves: torch.stack(leaves), trees[0], *trees[1:])


def tree_unstack(tree: Any) -> list[Any]:
    """Split a pytree of ``[N, ...]`` leaves into a list of ``N`` pytrees (inverse of stack)."""
    leaves, spec = optree.tree_flatten(tree)
    if not leaves:
        return []
    n = batch_size(tree, what="tree")
    return [optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(n)]


def tree_index(tree: Any, index: Any) -> Any:
    """Index the leading dimension of every tensor leaf: ``leaf[index]``."""
    return tree_map(lambda leaf: leaf[index] if isinstance(leaf, torch.Tensor) else leaf, tree)


def row_sq_norms(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, *shape] -> [B]``: each example's squared L2 norm (``B = 0`` and 1-dim ``t`` too).

    One fused reduction (``torch.linalg.vector_norm``, optionally accumulating in ``dtype``):
    ``t.pow(2).sum`` writes a temporary as large as ``t`` and was 15x slower on a 64 MB leaf.
    """
    rows = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    return torch.linalg.vector_norm(rows, dim=1, dtype=dtype).square()


_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of one rounding to ``dtype`` (half its epsilon)."""
    u = _UNIT.get(dtype)
    return torch.finfo(dtype).eps / 2 if u is None else u


def gamma(k: int, dtype: torch.dtype) -> float:
    """``gamma_k = k u / (1 - k u)``: the relative error bound of ``k`` roundings in ``dtype``,
    e.g. of a ``k``-term dot product in any summation order (Higham, "Accuracy and Stability
    of Numerical Algorithms", 2002, section 3.1). A sum of products with signs may lose far
    more than that relative to its value; the bound is relative to ``sum |terms|``."""
    ku = k * unit_roundoff(dtype)
    return ku / (1 - ku)


_SQ_BLOCK = 128
"""Longest row part whose squares :func:`accurate_sq_norms` sums in the input's precision."""

FAST_ONE_PASS = 512
"""``one_pass`` of the fast-clipping kinds' norms (``psgfunc.per_sample._kinds``): rows up to
512 in one reduction (relative error ``gamma_517``, 3e-5 in float32, which their certified
norms include) instead of blocks of 128 (8e-6): three fewer operations per norm, a fifth of
a small MLP's fast-clipping step. Dense clipping keeps the default, whose float32 norms are
accurate to 4e-6 (``psgfunc.dp.clip``'s tolerance is ``C (1 + 1e-5)``)."""


def sq_norm_rel(dtype: torch.dtype, k: int | None = None, one_pass: int = _SQ_BLOCK) -> float:
    """Relative error bound of :func:`accurate_sq_norms` (and of its square root) on rows of
    ``k`` elements (None: any length; not for float64) of ``dtype``, with the same
    ``one_pass``: a row of at most ``one_pass`` summed at once, or at most ``_SQ_BLOCK``
    squares summed in the accumulation dtype (float32 for half precision), then the
    partial sums (in float64 beyond ``_SQ_BLOCK`` of them: below one float32 rounding for
    float32 and half-precision rows, counted once; each of their additions for float64
    rows, whose bound therefore grows with ``k``).

    Raises:
        ValueError: for float64 with ``k`` None.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if k is None:
        if acc == torch.float64:
            raise ValueError(
                "sq_norm_rel: float64 rows have no bound for every length (their partial "
                "sums are added in float64 too); pass the row length k"
            )
        return gamma(max(one_pass + 1, 2 * _SQ_BLOCK) + 4, acc)
    block = _block(k, one_pass)
    parts = k // block if block else 0
    second = parts if parts <= _SQ_BLOCK or acc == torch.float64 else 1
    return gamma(block + second + (k % block > 0 if block else 0) + 4, acc)


def _block(k: int, one_pass: int = _SQ_BLOCK) -> int:
    """The partial-sum length for rows of ``k``: ``k`` itself up to ``one_pass``, else the
    largest divisor of ``k`` not above ``_SQ_BLOCK`` (one reshape, no tail), or
    ``_SQ_BLOCK`` with a separate tail when ``k`` has no divisor above 32."""
    if k <= max(one_pass, _SQ_BLOCK):
        return k
    for b in range(_SQ_BLOCK, 32, -1):
        if k % b == 0:
            return b
    return _SQ_BLOCK


def accurate_sq_norms(t: torch.Tensor, one_pass: int = _SQ_BLOCK) -> torch.Tensor:
    """``[B, *shape] -> [B]`` squared norms (float32, float64 for float64 ``t``), relative
    error at most :func:`sq_norm_rel` (with the same ``one_pass``) whatever the row length.

    ``row_sq_norms`` in float32 sums a long row in few accumulators and under-estimates:
    by 4e-6 for 2^18 elements and 2e-5 for 2^20 here, enough to clip an example above its
    bound. Here rows of at most ``one_pass`` (default 128; :data:`FAST_ONE_PASS` for the
    fast-clipping kinds) are one reduction (accurate to ``gamma_{k+5}``, whatever its order
    of summation); longer rows are cut into blocks of at most 128 whose norms (one fused
    reduction, in float32 for half-precision inputs, whose squares are exact there) are
    then added up (in float64 beyond 128 blocks): as fast, and accurate to ``gamma_260``.
    """
    size = t.shape[0]
    k = math.prod(t.shape[1:])
    acc = None if t.dtype in (torch.float32, torch.float64) else torch.float32
    block = _block(k, one_pass)
    if block == k:  # (over t's own dims: no reshape op)
        dims = tuple(range(1, t.dim())) if t.dim() > 1 else None
        rows = t if dims else t.reshape(size, k)
        return torch.linalg.vector_norm(rows, dim=dims or 1, dtype=acc).square()
    m = k - k % block
    if m == k:  # (one view op: a step of a small model pays per op)
        parts = torch.linalg.vector_norm(t.reshape(size, m // block, block), dim=2, dtype=acc)
    else:
        rows = t.reshape(size, k)
        parts = torch.linalg.vector_norm(rows[:, :m].reshape(size, m // block, block), dim=2, dtype=acc)
    # the sum of the parts' squares (each square rounded, then added: the bound's terms)
    sq = torch.linalg.vecdot(parts, parts) if m // block <= _SQ_BLOCK else (
        parts.square().sum(1, dtype=torch.float64).to(parts.dtype))
    if m < k:
        sq = sq + torch.linalg.vector_norm(rows[:, m:], dim=1, dtype=acc).square()
    return sq


def per_example_norms(grads: Any) -> torch.Tensor:
    """Per-example global L2 norm of a per-sample gradient pytree.

    Args:
        grads: pytree whose leaves are shaped ``[B, *param_shape]``.

    Returns:
        ``[B]`` tensor: ``sqrt(sum over leaves of ||g_b||^2)`` in the leaves' dtype.

    Raises:
        ValueError: if the leaves disagree on ``B`` or there are none.
    """
    leaves = [leaf for leaf in tree_leaves(grads) if isinstance(leaf, torch.Tensor)]
    batch_size(grads, what="grads")  # checks that the leaves agree on B
    total = None
    for leaf in leaves:
        sq = row_sq_norms(leaf)
        total = sq if total is None else total + sq.to(total.dtype)
    return total.sqrt()
