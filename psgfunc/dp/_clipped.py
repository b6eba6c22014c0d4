"""``clipped_grad_sum``: the sum of clipped per-example gradients of a loss function.

``method="fast"`` (what ``"auto"`` picks) never builds the ``[B, *param_shape]`` per-sample
gradients of layers that have a psgfunc rule: per-example norms come from layer inputs and
output gradients (:mod:`psgfunc.per_sample._clip`), then the clipped sum is one contraction
per parameter. ``method="materialize"`` builds all per-sample gradients with
:func:`psgfunc.per_sample_grads`, then clips and sums them (the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import torch

from psgfunc._dispatch import no_autograd
from psgfunc.dp._clip import MaxNorm, _check_max_norm, clip_factor, clipped_sum, rounding_floor
from psgfunc.per_sample import per_sample_grads
from psgfunc.per_sample._clip import grad_pieces
from psgfunc.per_sample._kinds import _FULL, _as, certified_norm

_METHODS = ("auto", "fast", "materialize")


def clipped_grad_sum(
    fn: Callable[..., torch.Tensor],
    params: Any,
    *batch: Any,
    max_norm: MaxNorm,
    method: str = "auto",
) -> tuple[Any, torch.Tensor]:
    """Sum over the batch of per-example gradients, each clipped to norm ``max_norm``.

    Computes ``sum_b min(1, C / ||g_b||) * g_b`` with ``g_b = grad fn(params, *batch[b])``.

    Args:
        fn: ``fn(params, *example) -> 0-dim loss`` of ONE example (no batch dim), as for
            :func:`psgfunc.per_sample_grads`.
        params: pytree of tensors, e.g. ``dict(model.named_parameters())``.
        *batch: pytrees whose tensor leaves share the leading size ``B`` (``B = 0`` allowed).
        max_norm: clipping bound ``C > 0``, or a per-layer dict ``{top-level key: C_k}``
            (see :func:`psgfunc.dp.clip`).
        method: ``"fast"``: norms from activations and output gradients, no ``B x P``
            tensor for psgfunc layers (linear with or without sequence dims, conv, embedding,
            layer_norm, lstm, and weights used several times: their pieces are combined
            before the norm); functions without a rule are materialised for their own
            parameters only, with a warning. ``"materialize"``: per_sample_grads, then clip
            and sum. ``"auto"``: ``"fast"``.

    Returns:
        ``(clipped_sum, norms)``: ``params``' structure with leaves ``[*param_shape]`` (in
        each param's dtype), and the ``[B]`` global norms of the unclipped per-example
        gradients (float32, or float64 for float64 params), the ones clipping used: each
        example is scaled by ``C / max(C, norm)``. With ``"fast"`` they are certified
        upper bounds that also cover the clipped sum's own rounding, so that every
        example's contribution is at most ``C`` as computed: above the exact norm by at
        most about 1e-4 relatively on ordinary float32 inputs (3e-5 on the MLP here),
        1e-13 in float64, 2^-8 more for bfloat16 params (their sums are computed in
        float32 and rounded once to bfloat16), and more for examples whose terms cancel
        (outer products that nearly sum to zero), which are then clipped a little harder.
        Convolutions whose per-example weight gradients are built (the direct form)
        carry their worst-case rounding, ``gamma_T`` times the size of the ``T`` terms:
        0.4% above the exact norm on a 64-channel 3x3 layer at 32x32 in float32. Where
        the gradients of a function with no rule are materialised, the bound is that of
        the gradients as materialised, whose own rounding it does not cover: each
        example's contribution as computed stays within ``C``. So where the squares
        overflow (float32 gradient entries above about 1e19) and the call falls back to
        materialising every gradient: norms of the gradients as materialised, raised to
        cover their computation and the sum's rounding (a few 1e-6 in float32). Under
        ``torch.autocast`` the bound is that of the gradient the autocast computation
        gives (its pieces in the autocast dtype), not of float32 arithmetic's.
        ``"materialize"`` returns the norms of the materialised gradients (inflated by 2^-8
        for bfloat16 leaves, see :func:`psgfunc.dp.clip`).

    Raises:
        ValueError: for an unknown ``method``, an invalid ``max_norm`` (also one too small
            for float16 params: their sums round by up to 3e-8 per coordinate below
            float16's smallest normal number, so factors clip to ``C`` minus ``3e-8
            sqrt(size)``, and a ``C`` below twice that is refused), params without tensor
            leaves, mismatched batch sizes, or NaN/Inf in a per-example gradient.
    """
    if method not in _METHODS:
        raise ValueError(f"clipped_grad_sum: unknown method {method!r}; use one of {_METHODS}")
    checked = _check_max_norm(max_norm, params, "clipped_grad_sum")
    if not optree.tree_leaves(params):
        raise ValueError("clipped_grad_sum: params has no tensor leaves; there is no gradient to clip")
    if method == "materialize":
        return clipped_sum(per_sample_grads(fn, params, *batch, method="auto"), max_norm, "clipped_grad_sum")
    pieces = grad_pieces(fn, params, *batch)
    with no_autograd():  # (the factors only scale the sums; the norms leave as a copy)
        factors, norms = _factors(pieces, params, checked)
    if factors is None:  # a non-finite norm: the materialising path names the bad examples
        grads = per_sample_grads(fn, params, *batch, method="auto")
        return clipped_sum(grads, max_norm, "clipped_grad_sum", certified=True)
    return pieces.weighted_sums(factors, release=True), norms.clone()


def _factors(pieces: Any, params: Any, checked: float | dict[Any, float]) -> tuple[Any, torch.Tensor]:
    """Per-leaf clip factors ``C / max(norm, C)`` from the certified norms
    (:func:`~psgfunc.per_sample._kinds.certified_norm`) and the global norms; None if a norm
    is not finite."""
    leaves = pieces.leaves
    dtype = leaves[0].sq_dtype if leaves else torch.get_default_dtype()
    if not isinstance(checked, dict):
        norms = certified_norm(leaves)
        total = float(norms.sum())  # (nonnegative norms: finite iff their sum is, short of
        if not math.isfinite(total):  # an overflow, which takes the exact path too)
            return None, norms
        # (the sums' dtypes and sizes: only half-precision sums have a rounding floor)
        half = [(leaf.dtype, p.numel()) for leaf, p in zip(leaves, pieces.prep.p_leaves) if leaf.dtype not in _FULL]
        factor = clip_factor(norms, checked, rounding_floor(half), largest=total)
        return [factor] * len(leaves), _as(norms, dtype)
    sizes = [(leaf.dtype, p.numel()) for leaf, p in zip(leaves, pieces.prep.p_leaves)]  # the sums'
    paths, _, _ = optree.tree_flatten_with_path(params)
    group_of = [path[0] for path in paths]
    by_key: dict[Any, list[Any]] = {}
    for key, leaf, size in zip(group_of, leaves, sizes):
        by_key.setdefault(key, []).append((leaf, size))
    factors_by_key = {}
    sq = None
    for key, pairs in by_key.items():
        n = certified_norm([leaf for leaf, _ in pairs])
        if not bool(torch.isfinite(n).all()):
            return None, n
        factors_by_key[key] = clip_factor(n, checked[key], rounding_floor([size for _, size in pairs]))
        sq = n.square() if sq is None else sq + n.square()
    norms = sq.sqrt() if sq is not None else torch.zeros(pieces.size, dtype=dtype)
    return [factors_by_key[k] for k in group_of], norms.to(dtype)
