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
from psgfunc._dispatch import grads_of, no_autograd
from psgfunc.functional import _autocast
from psgfunc.per_sample._api import _prepare
from psgfunc.per_sample._expanded import expand_leaf
from psgfunc.per_sample._kinds import Collector, LeafPieces, forget_scaled, leaf_pieces

__all__ = ["GradPieces", "grad_pieces", "weighted_sums"]


class GradPieces:
    """What one pass recorded: a :class:`LeafPieces` per params leaf (optree order).

    Attributes:
        size: the batch size ``B``.
        leaves: per params leaf, its pieces (``.sq_norm`` ``[B]``, ``.weighted_sum(c)``).
        sq_norms: per leaf, ``[B]`` squared norms of that leaf's per-example gradient.
        materialized: indices of the leaves that had to be materialised.
    """

    def __init__(self, prep: Any, leaves: list[LeafPieces]):
        self.prep, self.leaves, self.size = prep, leaves, prep.size
        self.materialized = [i for i, leaf in enumerate(leaves) if leaf.materialized]

    @property
    def sq_norms(self) -> list[torch.Tensor]:
        # (copies: the pieces' own are inference tensors, which a caller could not save for
        # a backward nor change in place)
        return [leaf.sq_norm.clone() for leaf in self.leaves]

    def weighted_sums(self, factors: list[torch.Tensor], *, release: bool = False) -> Any:
        """``sum_b factors[i][b] * grad_b`` for every leaf ``i``; params' structure, no batch dim.

        ``release=True``: each leaf's pieces are dropped as soon as its sum is taken
        (:meth:`~psgfunc.per_sample._kinds.LeafPieces.release`), so the pass never holds all
        the pieces and all the sums at once; the pieces cannot be summed again afterwards.
        """
        with _autocast.off():  # a caller's autocast block: the sums stay in the params' dtype
            sums = weighted_sums(self.leaves, factors, release=release)
        return self.prep.unflatten(sums)


def weighted_sums(leaves: list[LeafPieces], factors: list[torch.Tensor], *, release: bool) -> list[torch.Tensor]:
    """``leaves[i].weighted_sum(factors[i])`` for every leaf; ``release=True``: each leaf's
    pieces are dropped as soon as its sum is taken, in :func:`_release_order` (they are freed
    then if nothing else holds them: the caller drops its own references first)."""
    sums: list[Any] = [None] * len(leaves)
    # (small pieces: the order does not matter for memory, and finding it costs a small
    # model's step more than its sums)
    ordered = release and _pieces_bytes(leaves) > RELEASE_ORDER_BYTES
    try:
        for i in _release_order(leaves) if ordered else range(len(leaves)):
            sums[i] = leaves[i].weighted_sum(factors[i])
            if release:
                leaves[i].release()
    finally:
        forget_scaled()  # (rows a layer's weight and bias shared)
    return sums


RELEASE_ORDER_BYTES = 1 << 24
"""Pieces of all leaves together above this size (16 MiB) are summed in :func:`_release_order`;
below it, in the leaves' order (each still released after its sum)."""


def _pieces_bytes(leaves: list[LeafPieces]) -> int:
    """An upper bound on the bytes the leaves' pieces hold (a shared piece counted per use)."""
    return sum(t.nbytes for leaf in leaves for data in leaf.datas for t in data if isinstance(t, torch.Tensor))


def _release_order(leaves: list[LeafPieces]) -> list[int]:
    """The leaves' indices, those with the largest pieces first, each followed by the other
    leaves that share a piece with it (a layer's bias after its weight: their output
    gradient goes as soon as both sums are taken), so that large pieces are freed before
    most sums exist."""
    storages = [
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
         for data in leaf.datas for t in data if isinstance(t, torch.Tensor)}
        for leaf in leaves
    ]
    order: list[int] = []
    done = [False] * len(leaves)
    for i in sorted(range(len(leaves)), key=lambda i: -sum(storages[i].values())):
        if done[i]:
            continue
        done[i] = True
        order.append(i)
        for j in range(len(leaves)):
            if not done[j] and not storages[i].keys().isdisjoint(storages[j]):
                done[j] = True
                order.append(j)
    return order


_OPS_UNUSED: dict[Any, bool | None] = {}
"""``fn.__code__ -> True`` where a pass of ``fn`` with the torch-function rules' mode saw no
parameter handed to a torch function (only psgfunc layers took them): later passes run
without the mode, whose per-op cost (several us for every torch call in ``fn``: ~10% of a
small MLP's step) then buys nothing. ``None``: a later pass did hand one over (a parameter
got a gradient outside the rules, or the pass failed without them): the mode stays on for
that code. The step is the mode's: a pass without the mode that meets such an op is
discarded and done again with it (``fn`` then runs twice for that one call: its side
effects happen twice and the discarded pass has drawn its random numbers; a failure of the
pass without the mode is raised as it is unless the pass with the mode saw a parameter)."""

_OPS_UNUSED_MAX = 256


def grad_pieces(fn: Any, params: Any, *batch: Any, randomness: str = "different") -> GradPieces:
    """Run ``fn`` once forward and backward over the batch and keep per-parameter pieces.

    Same ``fn``/``params``/``batch`` convention as :func:`psgfunc.per_sample_grads`; ``B``
    may be 0 (no pass is run). The pass runs without the torch-function rules' mode where
    an earlier pass of ``fn``'s code showed it needs none, and is done again with it when
    it does (see :data:`_OPS_UNUSED`).
    """
    prep = _prepare(fn, params, batch, None, randomness)
    size = prep.size
    if size == 0:
        return GradPieces(prep, [LeafPieces([], p.new_zeros((0, *p.shape)), 0, p.shape) for p in prep.p_leaves])
    code = getattr(fn, "__code__", None)
    ops = code is None or not _OPS_UNUSED.get(code, False)
    views = [expand_leaf(p, size) for p in prep.p_leaves]
    collector = Collector(views, outputs=True)
    n = len(views)
    try:
        with torch.enable_grad(), _rules.expanded_mode("vmap"):
            losses = prep.expanded_losses(views, prep.b_leaves, ops=ops)
            # the views (their per-sample gradients, or the rules' records) and the layer
            # outputs whose gradients make the pieces (Collector.output)
            total = losses.sum()
            # a loss that does not depend on the params: no gradient anywhere (zeros below)
            grads = (grads_of(total, views + collector.inputs) if total.requires_grad
                     else [None] * (n + len(collector.inputs)))
    except Exception as err:  # noqa: BLE001 - without the mode: see below
        if ops:
            raise
        failure, grads = err, None
    else:
        failure = None
    # (a view's own gradient: a parameter that reached an op outside the rules)
    outside = grads is None or any(g is not None for g in grads[:n])
    if not ops and outside:
        # fn handed a parameter to a torch function this time (or failed without the
        # rules): the pass is done again with them, as every later one of this code, so
        # that the step is what it would have been
        _OPS_UNUSED[code] = None
        again = grad_pieces(fn, params, *batch, randomness=randomness)
        if failure is not None and not again.prep.saw_param:
            # the pass with the rules handed them no parameter: the failure was fn's own
            # (not the mode's absence), and fn's error is what the call raises
            raise failure
        return again
    if ops and code is not None and not prep.saw_param and not outside and code not in _OPS_UNUSED:
        if len(_OPS_UNUSED) >= _OPS_UNUSED_MAX:
            _OPS_UNUSED.clear()
        _OPS_UNUSED[code] = True
    collector.finish(grads[n:])
    grads = grads[:n]
    # the loss may not depend on a leaf at all (no gradient, no records): zeros
    unused = [g is None and not records for g, records in zip(grads, collector.records)]
    dense = [torch.zeros_like(v) if u else g for v, g, u in zip(views, grads, unused)]
    # norms never in half precision, even in a caller's autocast block; the pieces' bounds
    # are never differentiated (no_autograd: inference tensors, read by the sums)
    with _autocast.off(), no_autograd():
        leaves = leaf_pieces(collector.records, dense, size, [v.shape[1:] for v in views])
    for leaf, u in zip(leaves, unused):
        leaf.materialized = leaf.materialized and not u
    pieces = GradPieces(prep, leaves)
    if pieces.materialized:
        warnings.warn(
            f"psgfunc fast clipping: {len(pieces.materialized)} of {len(views)} parameter leaves "
            "are used by functions with no psgfunc rule, so their per-sample gradients were "
            "materialised (correct, but B times their size in memory); build the model from "
            "psgfunc.functional layers to avoid it",
            stacklevel=3,
        )
    return pieces
