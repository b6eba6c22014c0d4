"""Per-example norms and re-weighted gradient sums without materialising per-sample gradients.

One forward under vmap with expanded params and one backward, as the expanded method, but
the rules record their pieces (layer inputs and output gradients) instead of building
``[B, *shape]`` gradients (see :mod:`psgfunc.per_sample._kinds`). From the pieces come each
parameter's per-example squared norms (Gram form where cheaper: ghost clipping, Li et al.
2021) and then, for any per-example weights ``c``, ``sum_b c_b grad_b`` in one contraction per
parameter (book-keeping, Bu et al. 2023). A parameter that something other than a rule
consumed (a function with no rule, or a rule plus a generic op) is materialised for that
parameter alone, with a warning saying so. ``psgfunc.dp.clipped_grad_sum`` builds clipping
on top of this.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from psgfunc import _rules
from psgfunc.per_sample._api import _prepare
from psgfunc.per_sample._kinds import Collector

__all__ = ["GradPieces", "grad_pieces"]


class GradPieces:
    """What one pass recorded, per parameter leaf (in optree order of the params).

    Attributes:
        size: the batch size ``B``.
        sq_norms: per leaf, ``[B]`` squared norms of that leaf's per-example gradient.
        materialized: indices of the leaves that had to be materialised.
    """

    def __init__(self, prep: Any, plans: list[tuple[Any, ...]], sq_norms: list[torch.Tensor], materialized: list[int]):
        self.prep, self.plans, self.sq_norms, self.materialized = prep, plans, sq_norms, materialized
        self.size = prep.size

    def weighted_sums(self, factors: list[torch.Tensor]) -> Any:
        """``sum_b factors[i][b] * grad_b`` for every leaf ``i``; params' structure, no batch dim."""
        out = []
        for plan, c in zip(self.plans, factors):
            if plan[0] == "kind":
                out.append(plan[1].weighted_sum(plan[2], c))
            else:
                dense = plan[1]
                out.append(torch.tensordot(c.to(dense.dtype), dense, dims=1))
        return self.prep.unflatten(out)


def grad_pieces(fn: Any, params: Any, *batch: Any, randomness: str = "different") -> GradPieces:
    """Run ``fn`` once forward and backward over the batch and keep per-parameter pieces.

    Same ``fn``/``params``/``batch`` convention as :func:`psgfunc.per_sample_grads`; ``B``
    may be 0 (no pass is run).
    """
    prep = _prepare(fn, params, batch, None, randomness)
    size = prep.size
    if size == 0:
        zeros = [p.new_zeros((0, *p.shape)) for p in prep.p_leaves]
        return GradPieces(prep, [("dense", z) for z in zeros], [z.new_zeros(0) for z in zeros], [])
    views = [p.expand(size, *p.shape).requires_grad_(True) for p in prep.p_leaves]
    collector = Collector(views)
    with torch.enable_grad(), _rules.expanded_mode("vmap"):
        losses = prep.expanded_losses(views, prep.b_leaves)
        grads = torch.autograd.grad(losses.sum(), views, allow_unused=True)

    plans: list[tuple[Any, ...]] = []
    sq_norms: list[torch.Tensor] = []
    materialized: list[int] = []
    for i, (view, g) in enumerate(zip(views, grads)):
        records = collector.records[i]
        if g is None and records and len({kind for kind, _ in records}) == 1:
            kind = records[0][0]
            datas = [data for _, data in records]
            sq_norms.append(kind.norm2(datas))
            plans.append(("kind", kind, datas))
            continue
        if g is not None:
            materialized.append(i)
        total = torch.zeros_like(view) if g is None else g
        for kind, data in records:
            total = total + kind.materialize(*data)
        sq_norms.append(total.reshape(size, -1).pow(2).sum(1))
        plans.append(("dense", total))
    if materialized:
        warnings.warn(
            f"psgfunc fast clipping: {len(materialized)} of {len(views)} parameter leaves are "
            "used by functions with no psgfunc rule, so their per-sample gradients were "
            "materialised (correct, but B times their size in memory); build the model from "
            "psgfunc.functional layers to avoid it",
            stacklevel=3,
        )
    return GradPieces(prep, plans, sq_norms, materialized)
