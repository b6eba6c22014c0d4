"""Sum of clipped per-example gradients without materialising them (fast clipping).

One forward under vmap with expanded params and one backward, as the expanded method, but
the rules record their pieces (layer inputs and output gradients) instead of building
``[B, *shape]`` gradients (see :mod:`psgfunc.per_sample._kinds`). From the pieces come the
per-example norms (Gram form where cheaper: ghost clipping, Li et al. 2021) and then the
clipped sum in one contraction per parameter (book-keeping, Bu et al. 2023). A parameter that
something other than a rule consumed (a function with no rule, or one rule plus a generic
op) is materialised for that parameter alone, with a warning saying so.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from psgfunc import _rules
from psgfunc.per_sample._api import _prepare
from psgfunc.per_sample._kinds import Collector

__all__ = ["clipped_sum", "clip_factors"]


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, C / norm)`` per example; a zero norm gives 1 (its gradient stays zero).

    Raises:
        ValueError: if a norm is NaN or infinite (a non-finite gradient must never be
            silently clipped away: it would break the privacy guarantee).
    """
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} of {norms.numel()} examples have a NaN or infinite gradient norm "
            f"(examples {bad.nonzero().flatten().tolist()[:10]}); fix the loss or inputs (e.g. "
            "log of 0, overflow in float16) before clipping"
        )
    return torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))


def clipped_sum(
    fn: Any,
    params: Any,
    *batch: Any,
    max_norm: float,
    randomness: str = "different",
) -> tuple[Any, torch.Tensor]:
    """``(sum_b clip(grad_b), norms [B])`` for ``fn(params, *example) -> loss``.

    Same ``fn``/``params``/``batch`` convention as :func:`psgfunc.per_sample_grads`. The sum
    has params' structure and shapes (no batch dim); the norms are the per-example global L2
    norms before clipping.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    prep = _prepare(fn, params, batch, None, randomness)
    size = prep.size
    if size == 0:
        return prep.unflatten([torch.zeros_like(p) for p in prep.p_leaves]), prep.p_leaves[0].new_zeros(0)
    views = [p.expand(size, *p.shape).requires_grad_(True) for p in prep.p_leaves]
    collector = Collector(views)
    with torch.enable_grad(), _rules.expanded_mode("vmap"):
        losses = prep.expanded_losses(views, prep.b_leaves)
        grads = torch.autograd.grad(losses.sum(), views, allow_unused=True)

    plans: list[tuple[Any, ...]] = []
    norm2 = None
    materialized = []
    for i, (view, g) in enumerate(zip(views, grads)):
        records = collector.records[i]
        kinds = {id(kind) for kind, _ in records}
        if g is None and len(kinds) == 1:
            kind = records[0][0]
            datas = [data for _, data in records]
            n2 = kind.norm2(datas)
            plans.append(("kind", kind, datas))
        else:
            if g is not None:
                materialized.append(i)
            total = torch.zeros_like(view) if g is None else g
            for kind, data in records:
                total = total + kind.materialize(*data)
            n2 = total.reshape(size, -1).pow(2).sum(1)
            plans.append(("dense", total))
        norm2 = n2 if norm2 is None else norm2 + n2
    if materialized:
        warnings.warn(
            f"clipped_grad_sum: {len(materialized)} of {len(views)} parameter leaves are used by "
            "functions with no psgfunc rule, so their per-sample gradients were materialised "
            "(correct, but B times their size in memory); use psgfunc.functional layers to avoid it",
            stacklevel=3,
        )
    norms = norm2.sqrt()
    c = clip_factors(norms, max_norm)
    out = []
    for plan in plans:
        if plan[0] == "kind":
            out.append(plan[1].weighted_sum(plan[2], c))
        else:
            dense = plan[1]
            out.append(torch.einsum("b,bk->k", c.to(dense.dtype), dense.reshape(size, -1)).reshape(dense.shape[1:]))
    return prep.unflatten(out), norms
