"""What a rule knows about a parameter's per-sample gradient, before it is materialised.

A rule's backward does not have to build ``[B, *shape]`` gradients itself: it hands the
pieces (layer inputs and output gradients) to :func:`emit` together with a :class:`GradKind`
that knows three things about them:

* ``materialize(*data) -> [B, *shape]``: the per-sample gradient (the expanded method);
* ``norm2(datas) -> [B]``: the squared per-example norm of the SUM of several such pieces
  (one per use of the parameter: time steps, tied weights), without building ``[B, *shape]``
  where a cheaper form exists (Goodfellow 2015; ghost clipping, Li et al. 2021);
* ``weighted_sum(datas, c) -> [*shape]``: ``sum_b c_b * grad_b`` in one contraction
  (book-keeping, Bu et al. 2023).

Normally :func:`emit` materialises. For parameters a :class:`Collector` tracks (fast
clipping), the pieces are recorded instead and the rule passes no gradient on; the caller
then asks the kinds for norms and the clipped sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from psgfunc._tree import row_sq_norms

__all__ = ["GradKind", "Outer", "RowSum", "Materialized", "emit", "Collector", "LeafPieces", "leaf_pieces", "COMBINERS"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, *shape] -> [B, prod(shape)]``, also for ``B = 0``."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _time_major(t: torch.Tensor) -> bool:
    """Whether ``t [B, N, K]`` is a transposed view of a contiguous ``[N, B, K]``."""
    return t.shape[0] > 1 and t.shape[1] > 1 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def _key(t: Any) -> Any:
    """Identity of a piece's tensor (storage, offset, shape, strides), for :func:`_shared`."""
    if not isinstance(t, torch.Tensor):
        return t
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _shared(cache: dict | None, tag: str, t: torch.Tensor, compute: Any) -> Any:
    """``compute()``, or its result from an earlier call for the same ``tag`` and tensor ``t``
    on ``cache`` (None: no sharing)."""
    if cache is None:
        return compute()
    key = (tag, _key(t))
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _sq1(cache: dict | None, t: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms of ``t [B, 1, K]`` (one position per example), shared via ``cache``."""
    return _shared(cache, "sq1", t, lambda: row_sq_norms(t[:, 0]))


class GradKind:
    """Base: a kind that can only materialise (norms and sums from the materialised form).

    Kinds compare equal when they are of one class with equal attributes, so the pieces of
    several calls of one layer (each making its own kind object) are combined.
    """

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.__dict__.items()))))

    def materialize(self, *data: Any) -> torch.Tensor:
        raise NotImplementedError

    def prefers_dense(self, datas: Sequence[tuple[Any, ...]]) -> bool:
        """Whether materialising is the cheapest way to this parameter's norms (then the
        dense gradient is built once and also serves the weighted sum)."""
        return type(self).norm2 is GradKind.norm2

    def norm2(self, datas: Sequence[tuple[Any, ...]], cache: dict | None = None) -> torch.Tensor:
        """``[B]`` squared norms of the summed pieces; ``cache`` (see :func:`leaf_pieces`)
        lets parameters whose pieces share a tensor compute what depends on it once."""
        total = self.materialize(*datas[0])
        for data in datas[1:]:
            total = total + self.materialize(*data)
        return row_sq_norms(total)

    def weighted_sum(self, datas: Sequence[tuple[Any, ...]], c: torch.Tensor) -> torch.Tensor:
        total = None
        for data in datas:
            g = self.materialize(*data)
            s = torch.tensordot(c.to(g.dtype), g, dims=1)
            total = s if total is None else total + s
        return total


class Materialized(GradKind):
    """Data is the per-sample gradient itself, ``[B, *shape]``."""

    def materialize(self, g: torch.Tensor) -> torch.Tensor:
        return g


class Outer(GradKind):
    """``grad_b = sum_n g[b, n]^T x[b, n]``: data ``(g [B, N, O], x [B, N, I])`` -> ``[B, O, I]``.

    ``shape`` (optional) reshapes the ``[O, I]`` result (e.g. a conv weight from unfolded
    inputs). Norms use the Gram form ``sum_{n,m} (g_n . g_m)(x_n . x_m)`` when it is cheaper
    than materialising, i.e. when ``N * (O + I) < O * I`` (the "mixed" rule).
    """

    def __init__(self, shape: tuple[int, ...] | None = None):
        self.shape = shape

    def materialize(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(g.transpose(1, 2), x)
        return out if self.shape is None else out.reshape(out.shape[0], *self.shape)

    def prefers_dense(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        n = sum(d[0].shape[1] for d in datas)
        o, i = datas[0][0].shape[2], datas[0][1].shape[2]
        return n > 1 and n * (o + i) >= o * i

    def norm2(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]], cache: dict | None = None) -> torch.Tensor:
        g = torch.cat([d[0] for d in datas], dim=1) if len(datas) > 1 else datas[0][0]
        x = torch.cat([d[1] for d in datas], dim=1) if len(datas) > 1 else datas[0][1]
        n, o, i = g.shape[1], g.shape[2], x.shape[2]
        if n == 1:  # ||g x^T|| = ||g|| ||x||; the layer's bias (a RowSum of g) reuses ||g||^2
            return _sq1(cache, g) * _sq1(cache, x)
        if n * (o + i) < o * i:
            # [B, N, N] each; an LSTM's W_ih and W_hh share g (the gate gradients): one Gram
            one = len(datas) == 1
            gram_g = _shared(cache if one else None, "gram", g, lambda: torch.bmm(g, g.transpose(1, 2)))
            gram_x = _shared(cache if one else None, "gram", x, lambda: torch.bmm(x, x.transpose(1, 2)))
            return (gram_g * gram_x).sum((1, 2))
        return row_sq_norms(torch.bmm(g.transpose(1, 2), x))

    def weighted_sum(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]], c: torch.Tensor) -> torch.Tensor:
        total = None
        for g, x in datas:
            # the ordinary weight gradient with each example's output gradient scaled:
            # [O, B*N] @ [B*N, I], one matmul (as autograd's own; einsum took 3x longer).
            # Rows in whichever order (b, n) or (n, b) the pieces are stored: the recurrence
            # keeps its gate gradients time-major, and copying them cost a third of the sum.
            c3 = c.to(g.dtype).reshape(-1, 1, 1)
            if _time_major(g) or _time_major(x):
                g, x, c3 = g.transpose(0, 1), x.transpose(0, 1), c3.transpose(0, 1)
            scaled = (g * c3).reshape(-1, g.shape[2])
            rows = x.reshape(-1, x.shape[2])
            total = scaled.t() @ rows if total is None else total.addmm_(scaled.t(), rows)
        return total if self.shape is None else total.reshape(self.shape)


class RowSum(GradKind):
    """``grad_b = sum_n g[b, n]``: data ``(g [B, N, K],)`` -> ``[B, K]`` (biases)."""

    def __init__(self, shape: tuple[int, ...] | None = None):
        self.shape = shape

    def materialize(self, g: torch.Tensor) -> torch.Tensor:
        out = g.sum(1)
        return out if self.shape is None else out.reshape(out.shape[0], *self.shape)

    def prefers_dense(self, datas: Sequence[tuple[torch.Tensor]]) -> bool:
        return len(datas) > 1  # one piece: norms below; several: add them up densely

    def norm2(self, datas: Sequence[tuple[torch.Tensor]], cache: dict | None = None) -> torch.Tensor:
        if len(datas) > 1:
            return super().norm2(datas)
        (g,) = datas[0]
        if g.shape[1] == 1:
            return _sq1(cache, g)
        # the [B, K] gradient is the cheap form; an LSTM's b_ih and b_hh share it (both dz)
        return _shared(cache, "rowsum", g, lambda: row_sq_norms(g.sum(1)))

    def weighted_sum(self, datas: Sequence[tuple[torch.Tensor]], c: torch.Tensor) -> torch.Tensor:
        total = None
        for (g,) in datas:
            s = (c.to(g.dtype) @ g.transpose(0, 1)).sum(0)  # [B] @ [N, B, K] -> [N, K] -> [K]
            total = s if total is None else total + s
        return total if self.shape is None else total.reshape(self.shape)


class Collector:
    """Records ``(kind, data)`` pieces for each of ``targets`` (expanded param views).

    Each target gets a ``_psg_record`` attribute; :func:`emit` calls it instead of
    materialising. Attaching it to the tensor (not to a context) means recording also works
    when the backward pass runs outside the block that built the graph.
    """

    def __init__(self, targets: Sequence[torch.Tensor] = ()):
        self.records: list[list[tuple[GradKind, tuple[Any, ...]]]] = []
        for t in targets:
            self.track(t)

    def track(self, target: torch.Tensor) -> int:
        """Start recording for ``target``; returns its index in ``records``."""
        i = len(self.records)
        self.records.append([])
        target._psg_record = lambda kind, data: self.records[i].append((kind, data))
        return i


def emit(target: torch.Tensor, kind: GradKind, *data: Any) -> torch.Tensor | None:
    """The per-sample gradient for ``target`` (an expanded ``[B, *shape]`` param).

    Materialised, unless a :class:`Collector` tracks ``target``: then the pieces are recorded
    and None is returned (the rule passes no gradient on for it).
    """
    record = getattr(target, "_psg_record", None)
    if record is not None:
        record(kind, tuple(_in_dtype(t, target.dtype) for t in data))
        return None
    return kind.materialize(*data).to(target.dtype)  # autocast: computed in the pieces' dtype


def _in_dtype(t: Any, dtype: torch.dtype) -> Any:
    """A piece to record: detached, and a floating one in the parameter's ``dtype`` (under
    autocast the rules' pieces are half precision; norms and sums then run in ``dtype``).
    One cast per tensor object: the pieces a layer shares between its weight and bias stay
    one tensor."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.dtype == dtype or not t.is_floating_point():
        return t.detach()
    cached = getattr(t, "_psg_cast", None)  # (version of t, its cast)
    if cached is None or cached[0] != t._version or cached[1].dtype != dtype:
        cached = t._psg_cast = (t._version, t.detach().to(dtype))
    return cached[1]


class LeafPieces:
    """One parameter's per-sample gradient as recorded pieces, plus any dense part.

    Args:
        records: ``(kind, data)`` pieces emitted by rules for this parameter.
        dense: a materialised ``[B, *shape]`` contribution (from ops without a rule), or None.
        size: the batch size ``B``.
        shape: the parameter's shape.
        cache: shared by the parameters of one pass (:func:`leaf_pieces`), or None.

    If all records share one kind and there is no dense part, norms and sums come from the
    kind without materialising; otherwise the pieces are added up densely.
    """

    def __init__(
        self,
        records: Sequence[tuple[GradKind, tuple[Any, ...]]],
        dense: torch.Tensor | None,
        size: int,
        shape: Sequence[int],
        cache: dict | None = None,
    ):
        self.size = size
        self.materialized = dense is not None
        if size == 0:  # an empty (Poisson) batch: nothing to ask the kinds
            floats = [t for _, data in records for t in data if isinstance(t, torch.Tensor) and t.is_floating_point()]
            ref = dense if dense is not None else floats[0]
            self.kind, self.datas = None, []
            self.dense = ref.new_zeros((0, *shape))
            self.sq_norm = ref.new_zeros(0)
            return
        first = records[0][0] if records else None
        # kinds compare by value (GradKind.__eq__), rules mostly reuse one object: `is` first
        one_kind = dense is None and first is not None and all(k is first or k == first for k, _ in records)
        if one_kind and not first.prefers_dense([data for _, data in records]):
            self.kind: GradKind | None = first
            self.datas = [data for _, data in records]
            self.dense = None
            self.sq_norm = first.norm2(self.datas, cache)
            return
        self.kind, self.datas = None, []
        total = dense
        for kind, data in records:
            g = kind.materialize(*data)
            total = g if total is None else total + g
        if total is None:
            raise ValueError(f"no gradient pieces for a parameter of shape {tuple(shape)}")
        self.dense = total
        self.sq_norm = row_sq_norms(total)

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        """``sum_b c_b grad_b``, shaped like the parameter."""
        if self.kind is not None:
            return self.kind.weighted_sum(self.datas, c)
        dense = self.dense
        return (c.to(dense.dtype) @ _rows(dense)).reshape(dense.shape[1:])


def leaf_pieces(
    records: Sequence[Sequence[tuple[GradKind, tuple[Any, ...]]]],
    dense: Sequence[torch.Tensor | None],
    size: int,
    shapes: Sequence[Sequence[int]],
) -> list[LeafPieces]:
    """:class:`LeafPieces` for several parameters of one pass, computing what their pieces
    share once (the Gram of an output gradient that two weights see, the norms of a layer's
    output gradient for its bias and its weight). Under ``torch.compile`` nothing is shared
    by identity (traced tensors have no storage; the compiler merges equal work itself)."""
    cache: dict | None = None if torch.compiler.is_compiling() else {}
    records = [_combined(r) for r in records]
    return [LeafPieces(r, d, size, s, cache) for r, d, s in zip(records, dense, shapes)]


COMBINERS: list[Any] = []
"""``combine(records) -> records or None``: rewrite one parameter's pieces of several kinds
into pieces of one kind that knows their sum (a table used by an embedding and by a tied
output head); the first that applies wins. Rules' modules append to it."""


def _combined(records: Sequence[tuple[GradKind, tuple[Any, ...]]]) -> Sequence[tuple[GradKind, tuple[Any, ...]]]:
    if len(records) < 2 or not COMBINERS:
        return records
    first = records[0][0]
    if all(k is first or k == first for k, _ in records):
        return records
    for combine in COMBINERS:
        out = combine(records)
        if out is not None:
            return out
    return records
