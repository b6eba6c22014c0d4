"""``clipped_grad_sum``: the sum of clipped per-example gradients of a loss function.

``method="fast"`` (what ``"auto"`` picks) never builds the ``[B, *param_shape]`` per-sample
gradients of layers that have a psgfunc rule: per-example norms come from layer inputs and
output gradients (:mod:`psgfunc.per_sample._clip`), then the clipped sum is one contraction
per parameter. ``method="materialize"`` builds all per-sample gradients with
:func:`psgfunc.per_sample_grads`, then clips and sums them (the reference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from psgfunc.dp._clip import MaxNorm, _check_max_norm, clipped_sum
from psgfunc.per_sample import per_sample_grads
from psgfunc.per_sample._clip import grad_pieces

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
        ``(clipped_sum, norms)``: ``params``' structure with leaves ``[*param_shape]``, and
        the ``[B]`` global norms of the unclipped per-example gradients.

    Raises:
        ValueError: for an unknown ``method``, an invalid ``max_norm``, params without
            tensor leaves, mismatched batch sizes, or NaN/Inf in a per-example gradient.
    """
    if method not in _METHODS:
        raise ValueError(f"clipped_grad_sum: unknown method {method!r}; use one of {_METHODS}")
    checked = _check_max_norm(max_norm, params, "clipped_grad_sum")
    if not optree.tree_leaves(params):
        raise ValueError("clipped_grad_sum: params has no tensor leaves; there is no gradient to clip")
    if method == "materialize":
        return clipped_sum(per_sample_grads(fn, params, *batch, method="auto"), max_norm, "clipped_grad_sum")
    pieces = grad_pieces(fn, params, *batch)
    factors, norms = _factors(pieces, params, checked)
    if factors is None:  # a non-finite norm: the materialising path names the bad examples
        return clipped_sum(per_sample_grads(fn, params, *batch, method="auto"), max_norm, "clipped_grad_sum")
    return pieces.weighted_sums(factors), norms


def _factors(pieces: Any, params: Any, checked: float | dict[Any, float]) -> tuple[Any, torch.Tensor]:
    """Per-leaf clip factors ``C / max(norm, C)`` and global norms; None if a norm is not finite."""
    sq = pieces.sq_norms
    size = pieces.size
    dtype = sq[0].dtype if sq else torch.get_default_dtype()
    if not isinstance(checked, dict):
        total = torch.zeros(size, dtype=dtype) if not sq else sum(sq[1:], sq[0])
        norms = total.sqrt()
        if not bool(torch.isfinite(norms).all()):
            return None, norms
        return [checked / norms.clamp_min(checked)] * len(sq), norms
    paths, _, _ = optree.tree_flatten_with_path(params)
    group_of = [path[0] for path in paths]
    by_key: dict[Any, torch.Tensor] = {}
    for key, s in zip(group_of, sq):
        by_key[key] = s if key not in by_key else by_key[key] + s
    factors_by_key = {}
    for key, s in by_key.items():
        n = s.sqrt()
        if not bool(torch.isfinite(n).all()):
            return None, n
        factors_by_key[key] = checked[key] / n.clamp_min(checked[key])
    norms = sum(by_key.values()).sqrt() if by_key else torch.zeros(size, dtype=dtype)
    return [factors_by_key[k] for k in group_of], norms
