"""Rule for :func:`psgfunc.functional.embedding`.

Forward: the ordinary ``F.embedding`` lookup in the shared table ``w[0]``. Backward: example
b's gradient is the scatter-add of its output gradient rows into its own copy of the table.
All copies live in one ``[B*V, D]`` buffer, so the whole batch is a single ``index_add_``
with example b's indices offset by ``b * V`` (``V = num_embeddings``). The offset is the
table size, never the maximum batch size (using the latter sends the rows of different
examples to the wrong copies whenever the two differ). The ``padding_idx`` row of every copy
gets a zero gradient, as in ``torch.nn.Embedding``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vmap

from psgfunc import _rules
from psgfunc._tree import accurate_sq_norms, gamma, sq_norm_rel, unit_roundoff
from psgfunc.functional.embedding import _check_indices, _normalize_padding_idx, embedding
from psgfunc.per_sample._expanded import Rule, apply_function, call_rule, is_shared
from psgfunc.per_sample._kinds import F64, GradKind, NormBound, _acc, _lift, _up, emit, underflow

__all__ = ["EmbeddingRule", "EmbeddingRows", "per_sample_embedding_grad"]


def per_sample_embedding_grad(
    idx: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None
) -> torch.Tensor:
    """Per-example gradients of an embedding table.

    Shapes: ``idx [B, *]``, ``g [B, *, D] -> [B, V, D]``.

    Args:
        idx: integer indices in ``[0, V)``.
        g: the gradient of the loss with respect to the looked-up rows.
        num_embeddings: ``V``.
        padding_idx: a row whose gradient is zero in every copy, or None.

    Returns:
        ``dW [B, V, D]`` with ``dW[b, v] = sum of g[b, t] over positions t with idx[b, t] == v``.
    """
    size, dim = idx.shape[0], g.shape[-1]
    offsets = torch.arange(size, device=idx.device, dtype=torch.int64) * num_embeddings
    rows = (idx.to(torch.int64) + offsets.view(size, *([1] * (idx.dim() - 1)))).reshape(-1)
    gw = g.new_zeros(size * num_embeddings, dim)
    gw.index_add_(0, rows, g.reshape(-1, dim))
    gw = gw.view(size, num_embeddings, dim)
    if padding_idx is not None:
        gw[:, padding_idx] = 0
    return gw


class EmbeddingRows(GradKind):
    """``grad_b`` of an embedding table from data ``(idx [B, *], g [B, *, D])``.

    ``materialize``: :func:`per_sample_embedding_grad`. ``norm2``: with the positions of
    example b flattened to ``t = 1..T``, ``|grad_b|^2 = sum_{t,t'} [idx_t == idx_t'] g_t . g_t'``
    (a ``T x T`` Gram matrix instead of a ``V x D`` table, for short sequences: ``T <= 16`` and
    ``T * T < V``; longer ones add up each example's rows per distinct index, ``B*T*D`` work).
    ``weighted_sum``: the ordinary embedding backward of ``c_b g_b`` (one ``index_add_``).
    """

    def __init__(self, num_embeddings: int, padding_idx: int | None):
        self.num_embeddings, self.padding_idx = num_embeddings, padding_idx

    def materialize(self, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return per_sample_embedding_grad(idx, g, self.num_embeddings, self.padding_idx)

    def _flat(self, datas: Any) -> tuple[torch.Tensor, torch.Tensor]:
        size, dim = datas[0][1].shape[0], datas[0][1].shape[-1]
        if len(datas) == 1:  # no concatenation: a copy of the output gradient
            idx, g = datas[0][0].reshape(size, -1), datas[0][1].reshape(size, -1, dim)
        else:
            idx = torch.cat([i.reshape(size, -1) for i, _ in datas], dim=1)
            g = torch.cat([gi.reshape(size, -1, dim) for _, gi in datas], dim=1)
        if self.padding_idx is not None:
            g = g * (idx != self.padding_idx).unsqueeze(-1).to(g.dtype)
        return idx, g

    def bound(self, datas: Any, cache: dict | None = None) -> NormBound:
        idx, g = self._flat(datas)
        dtype, g = _acc(g.dtype), _up(g)
        size, positions, dim = g.shape
        # rounding: a Gram entry errs by gamma_D ||g_t|| ||g_t'||, a row summed from m
        # positions by gamma_m sum ||g_t||, the weighted sum's rows likewise
        rho = _lift(torch.linalg.vector_norm(g, dim=2), dim)  # [B, T]
        a = rho.sum(1)
        grow = (1 + gamma(dim + 3, dtype)) * (1 + gamma(positions + 2, dtype))
        err_scale = gamma(positions + 2, dtype) * grow
        if positions <= _GRAM_MAX_POSITIONS and positions**2 < self.num_embeddings:
            same = idx.unsqueeze(2) == idx.unsqueeze(1)  # [B, T, T]
            est = torch.sum(torch.bmm(g, g.transpose(1, 2)) * same, (1, 2), dtype=F64).to(dtype)
            paired = ((rho.unsqueeze(2) * rho.unsqueeze(1)) * same).sum((1, 2))
            coef = gamma(dim + 1, dtype) + gamma(positions**2 + 2, F64) + unit_roundoff(dtype)
            err = paired * (coef * grow**2 * (1 + gamma(positions**2 + 5, dtype)))
            # each of the (at most T^2) products g_t . g_t' of D terms may lose D products
            # to underflow: 0 for entries below 4e-23 (float32), whose rows still count
            err = err + positions**2 * underflow(dtype, dim)
            return NormBound(est, (est + err).clamp_min(0), a, 1 + gamma(2, dtype), err_scale)
        # longer sequences: add up each example's rows per distinct index (B*T*D work, never
        # the [B, V, D] table), then square. The keys are sorted and each run of equal keys
        # numbered (static shapes, unlike torch.unique: torch.compile traces it in one graph);
        # the B*T slots left over stay zero rows
        offsets = torch.arange(size, device=idx.device).unsqueeze(1) * self.num_embeddings
        keys, order = torch.sort((idx.to(torch.int64) + offsets).reshape(-1))
        starts = torch.cat([keys.new_ones(min(keys.numel(), 1), dtype=torch.bool), keys[1:] != keys[:-1]])
        run = torch.cumsum(starts, 0) - 1  # [B*T] the run (distinct key) of each sorted slot
        rows = g.new_zeros(keys.numel(), dim).index_add_(0, run, g.reshape(-1, dim)[order])
        example = torch.zeros_like(keys).scatter_(0, run, torch.div(keys, self.num_embeddings, rounding_mode="floor"))
        est = g.new_zeros(size, dtype=F64).index_add_(0, example, accurate_sq_norms(rows).to(F64)).to(dtype)
        est = est + underflow(dtype, positions * dim)  # the rows' squares that underflowed
        rel = sq_norm_rel(dtype, dim) + gamma(positions + 1, dtype)  # and the float64 sums' rounding
        hi = est.sqrt() * (1 + rel) + a * (gamma(positions + 2, dtype) * grow)
        return NormBound(est, hi.square(), a, 1 + gamma(4, dtype), err_scale)

    def weighted_sum(self, datas: Any, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_b c_b grad_b`` ``[V, D]``; ``out``: a ``[V, D]`` tensor to add it to in place
        (a tied head's sum; in the accumulation dtype), returned."""
        idx, g = self._flat(datas)
        dtype, g = g.dtype, _up(g)  # half precision: summed in float32
        g = g * c.to(g.dtype).view(-1, 1, 1)
        if out is None:
            out = g.new_zeros(self.num_embeddings, g.shape[-1])
        elif out.dtype != g.dtype:
            return out + self.weighted_sum(datas, c).to(out.dtype)
        return out.index_add_(0, idx.reshape(-1).to(torch.int64), g.reshape(-1, g.shape[-1])).to(dtype)


_GRAM_MAX_POSITIONS = 16
"""Longest (flattened) sequence whose embedding norms use the ``T x T`` Gram; longer ones
sort the indices instead. Measured (1 thread, D = 100): Gram 40-125 us against 70-140 us up
to T = 16 (the sort's fixed cost), but 1.1 ms against 0.29 ms at B = T = 64 (with
``torch.unique``; the sort and run numbering that replaced it cost about the same)."""


@functools.lru_cache(maxsize=64)
def _rows_kind(num_embeddings: int, padding_idx: int | None) -> EmbeddingRows:
    return EmbeddingRows(num_embeddings, padding_idx)


class _EmbeddingPerSample(torch.autograd.Function):
    """``idx [B, *], w [B, V, D] (shared) -> [B, *, D]`` with per-sample table gradients."""

    @staticmethod
    def forward(idx: torch.Tensor, w: torch.Tensor, padding_idx: int | None) -> torch.Tensor:  # type: ignore[override]
        table = w[0] if w.shape[0] > 0 else w.new_zeros(w.shape[1:])
        return F.embedding(idx, table, padding_idx)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        idx, w, padding_idx = inputs
        ctx.save_for_backward(idx)
        # the table by identity, for emit only: a saved tensor may come back from saved-tensor
        # hooks as another object, without its Collector (and packing it would copy it B times)
        ctx.weight = w
        ctx.num_embeddings, ctx.padding_idx = w.shape[1], padding_idx

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        (idx,) = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[1]:
            gw = emit(ctx.weight, _rows_kind(ctx.num_embeddings, ctx.padding_idx), idx, g)
        return None, gw, None


class EmbeddingRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.embedding` (batch dim 0 of ``idx``)."""

    def batched(
        self, params: dict[str, torch.Tensor], idx: torch.Tensor, *, padding_idx: int | None = None
    ) -> torch.Tensor:
        w = params.get("weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            shape = None if not isinstance(w, torch.Tensor) else tuple(w.shape[1:])
            raise ValueError(
                f"embedding: params['weight'] must be [V, D] (2-D), got {shape}; build params "
                "with init_embedding(num_embeddings, embedding_dim)"
            )
        if not isinstance(idx, torch.Tensor) or idx.dim() < 1 or idx.shape[0] != w.shape[0]:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(
                f"embedding on a batch of {w.shape[0]} examples needs idx shaped [B, *] with "
                f"B = {w.shape[0]}, got {shape}; add the batch dim (idx.unsqueeze(0) for one "
                "example)"
            )
        num_embeddings = w.shape[1]
        padding_idx = _normalize_padding_idx(padding_idx, num_embeddings, "embedding")
        idx = _check_indices(idx, num_embeddings, "embedding")
        if not is_shared(w):
            return vmap(lambda p, i: self.plain(p, i, padding_idx=padding_idx))(params, idx)
        return apply_function(_EmbeddingPerSample, idx, w, padding_idx)

    def tapped(
        self, tap: Any, params: dict[str, torch.Tensor], idx: torch.Tensor, *, padding_idx: int | None = None
    ) -> Any:
        w = params.get("weight")
        i = tap.index(w)
        if i is None or w.dim() != 2:
            return NotImplemented
        y = self.plain({"weight": w.detach()}, idx, padding_idx=padding_idx)
        kind = EmbeddingRows(w.shape[0], _normalize_padding_idx(padding_idx, w.shape[0], "embedding"))
        return tap.out(y, (idx,), lambda saved, g: [(i, kind, (saved[0], g))])


EMBEDDING = EmbeddingRule(embedding.plain)


@_rules.register_rule(embedding)
def _embedding(
    params: dict[str, torch.Tensor], idx: torch.Tensor, *, padding_idx: int | None = None
) -> torch.Tensor:
    return call_rule(EMBEDDING, params, idx, padding_idx=padding_idx)
