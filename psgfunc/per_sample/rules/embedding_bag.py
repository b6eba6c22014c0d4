"""Rule for :func:`psgfunc.functional.embedding_bag`.

Forward: ONE ordinary ``F.embedding_bag`` call on the shared table ``w[0]`` for the whole
batch (the examples' bags laid end to end; with ``include_last_offset``, the positions after
an example's last offset go to a dropped extra bag so they never join the next example's).

Backward: with ``G [bags, D]`` the output gradient of one example, every position ``t`` of
bag ``j`` adds a vector ``u_t`` to row ``idx_t`` of the example's table gradient:

* ``sum``: ``u_t = G_j`` (times ``per_sample_weights_t`` when given);
* ``mean``: ``u_t = G_j / count_j`` (``count_j``: the bag's entries other than ``padding_idx``);
* ``max``: ``u_t[d] = G_j[d]`` where ``t`` is the bag's first position holding the maximum
  of dim ``d`` (torch's choice: its CPU kernel keeps the first maximum), else 0;

and ``padding_idx`` entries (left out of the bag) and positions in no bag add nothing. So
the gradient is an embedding scatter of ``(idx [B, T], u [B, T, D])`` (each example's
positions of one row merged first, :func:`_merge`, so norms have no cancelling terms): the
kind of
:func:`psgfunc.functional.embedding`
(:class:`~psgfunc.per_sample.rules.embedding.EmbeddingRows`), whose norms come from index
matches (a ``[T, T]`` Gram, or sums per distinct index) without building ``[B, V, D]`` and
whose clipped sum is one ``index_add_``. ``per_sample_weights`` gets its ordinary gradient
``G_j . w[idx_t]``.

Batch conventions of :meth:`EmbeddingBagRule.batched` (params ``[B, V, D]``):

* ``idx [B, bags, n]``: example b is ``idx[b]`` (2-D bags), output ``[B, bags, D]``;
* ``idx [B, T]`` with ``offsets [B, K]``: example b is ``idx[b]`` with ``offsets[b]``;
* ``idx [B, n]`` alone: example b is ONE bag ``idx[b]``, output ``[B, D]``
  (``psgfunc.nn.EmbeddingBag`` with a 2-D input);
* ``idx [T]`` with ``offsets [B]`` (``[B + 1]`` with ``include_last_offset``): example b is
  bag b, output ``[B, D]`` (``psgfunc.nn.EmbeddingBag`` with offsets).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vmap

from psgfunc import _rules
from psgfunc.functional.embedding_bag import _check_args, _check_offsets, embedding_bag
from psgfunc.per_sample._expanded import (
    Rule,
    apply_function,
    call_rule,
    check_versions,
    is_shared,
    versions,
)
from psgfunc.per_sample._kinds import emit
from psgfunc.per_sample.rules.embedding import EmbeddingRows, _rows_kind

__all__ = ["EmbeddingBagRule"]


class _Layout:
    """Where the positions of ``E`` rows of indices ``idx [E, T]`` go.

    ``bag [E, T]``: each position's bag (``bags``: none), ``start [E, T]``: the position its
    bag starts at, ``valid [E, T]``: in a bag and not ``padding_idx``, ``coef [E, T]``: the
    factor of its row in the bag's sum/mean (``None`` for ``max``).
    """

    def __init__(self, idx: torch.Tensor, offsets: torch.Tensor | None, n: int, bags: int,
                 include_last_offset: bool, padding_idx: int | None, mode: str,
                 psw: torch.Tensor | None, dtype: torch.dtype):
        e, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        if offsets is None:  # bags of n in a row
            bag = (pos // max(n, 1)).expand(e, t)
            start = (bag * n)
        else:
            offsets = offsets.to(torch.int64).contiguous()
            if offsets.shape[1] == 0:  # no bags
                offsets = offsets.new_zeros(e, 1)
            bag = torch.searchsorted(offsets, pos.expand(e, t).contiguous(), right=True) - 1
            bag = torch.where(bag < 0, bags, bag).clamp_max(bags)  # past the last offset (CSR): none
            start = offsets.gather(1, bag.clamp_max(offsets.shape[1] - 1))
        valid = bag < bags
        if padding_idx is not None:
            valid = valid & (idx != padding_idx)
        self.bag, self.start, self.valid, self.bags = bag.contiguous(), start, valid, bags
        self.coef = None
        if mode != "max":
            coef = valid.to(psw.dtype if psw is not None else dtype)
            if mode == "mean":
                counts = torch.zeros(e, bags + 1, dtype=coef.dtype, device=idx.device).scatter_add(1, self.bag, coef)
                coef = coef / counts.gather(1, self.bag).clamp_min(1)
            elif psw is not None:
                coef = coef * psw
            self.coef = coef

    def spread(self, g: torch.Tensor) -> torch.Tensor:
        """``g [E, bags, D] -> [E, T, D]``: each position's bag gradient (0 outside bags)."""
        e, _, d = g.shape
        ext = torch.cat([g, g.new_zeros(e, 1, d)], 1)
        return ext.gather(1, self.bag.unsqueeze(-1).expand(-1, -1, d))

    def first_max(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``[E, T, D]``: 1 where a position holds its bag's maximum of a dim first (max mode).

        ``rows [E, T, D]``: the looked-up rows; ``out [E, bags, D]``: the bag maxima.
        """
        match = (rows == self.spread(out)) & self.valid.unsqueeze(-1)
        count = match.to(torch.int32).cumsum(1)
        before = (count - match.to(torch.int32)).gather(1, self.start.unsqueeze(-1).expand_as(count))
        return (match & (count - before == 1)).to(rows.dtype)


def _merge(idx: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [B, T], u [B, T, D])`` with each example's positions of one row merged: slot s
    of the result holds the row of the s-th distinct index and the sum of its vectors, the
    slots after the last distinct index hold row 0 and zeros.

    The table gradient is unchanged; but every pair of slots of an example now holds
    different rows (or a zero vector), so the index-match norm of
    :class:`~psgfunc.per_sample.rules.embedding.EmbeddingRows` is a sum of squares with no
    cancelling cross terms: in float32, rows that nearly cancel (weights of opposite signs
    on a repeated index, one row's gradients from several bags) can no longer round the norm
    under the norm of what the clipped sum adds, which adds these same merged vectors.
    Sort and scatters only: traceable by ``torch.compile``.
    """
    sorted_idx, order = idx.sort(dim=1, stable=True)
    us = u.gather(1, order.unsqueeze(-1).expand_as(u))
    first = torch.ones_like(sorted_idx[:, :1], dtype=torch.bool)
    new = torch.cat([first, sorted_idx[:, 1:] != sorted_idx[:, :-1]], 1)
    seg = new.to(torch.int64).cumsum(1) - 1
    merged = torch.zeros_like(u).scatter_add(1, seg.unsqueeze(-1).expand_as(u), us)
    return torch.zeros_like(idx).scatter(1, seg, sorted_idx), merged


def _first(w: torch.Tensor) -> torch.Tensor:
    return w[0] if w.shape[0] > 0 else w.new_zeros(w.shape[1:])


class _BagPerSample(torch.autograd.Function):
    """``w [B, V, D] (shared), psw -> [E, bags, D]`` with per-sample table gradients; ``call``
    holds the flattened call and the layout."""

    @staticmethod
    def forward(w: torch.Tensor, psw: torch.Tensor | None, call: Any) -> torch.Tensor:  # type: ignore[override]
        table = _first(w)
        out = F.embedding_bag(
            call.flat_idx, table, call.flat_offsets, mode=call.mode,
            per_sample_weights=None if psw is None else psw.reshape(call.flat_idx.shape),
            include_last_offset=call.flat_last, padding_idx=call.padding_idx,
        )
        return out.view(call.e, -1, out.shape[-1])[:, : call.layout.bags]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        w, psw, call = inputs
        ctx.call = call
        ctx.psw_shape = None if psw is None else psw.shape
        # the table where the backward looks rows up (max, per_sample_weights) only: packing
        # the expanded table would copy it B times; by identity for emit (a saved tensor may
        # come back from saved-tensor hooks as another object, without its Collector)
        lookups = call.mode == "max" or psw is not None
        ctx.save_for_backward(w if lookups else None, output if call.mode == "max" else None)
        ctx.weight = w
        # the indices and offsets are kept on `call` (not saved): autograd does not check them
        ctx.versions = versions(call.idx, call.offsets)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        saved, out = ctx.saved_tensors
        w = ctx.weight
        call = ctx.call
        check_versions(ctx.versions, "embedding_bag", call.idx, call.offsets, what="an index or offsets tensor")
        layout = call.layout
        gp = layout.spread(g)  # [E, T, D]
        gw = gpsw = None
        table = None if saved is None else _first(saved)
        if ctx.needs_input_grad[0]:
            if call.mode == "max":
                u = gp * layout.first_max(F.embedding(call.idx, table), out)
            else:
                u = gp * layout.coef.to(g.dtype).unsqueeze(-1)
            gw = emit(w, _rows_kind(w.shape[1], call.padding_idx), *_merge(*call.pieces(u)))
        if ctx.needs_input_grad[1]:
            gpsw = ((gp * F.embedding(call.idx, table)).sum(-1) * layout.valid).reshape(ctx.psw_shape)
        return gw, gpsw, None


class _Call:
    """One batched embedding_bag: the flattened torch call, the layout, how pieces regroup."""

    def __init__(self, idx: torch.Tensor, offsets: torch.Tensor | None, n: int, bags: int,
                 examples_are_bags: bool, include_last_offset: bool, padding_idx: int | None,
                 mode: str, psw: torch.Tensor | None, dtype: torch.dtype):
        self.mode, self.padding_idx, self.idx, self.offsets = mode, padding_idx, idx, offsets  # idx [E, T]
        self.e, t = idx.shape
        self.examples_are_bags = examples_are_bags
        self.layout = _Layout(idx, offsets, n, bags, include_last_offset, padding_idx, mode,
                              None if psw is None else psw.reshape(idx.shape), dtype)
        if offsets is None:
            self.flat_idx, self.flat_offsets, self.flat_last = idx.reshape(-1, n), None, False
        elif examples_are_bags or self.e == 1:
            self.flat_idx, self.flat_offsets, self.flat_last = idx.reshape(-1), offsets.reshape(-1), include_last_offset
        else:  # bags laid end to end; positions past an example's last offset: a dropped bag
            shifted = offsets.to(torch.int64) + t * torch.arange(self.e, device=idx.device).unsqueeze(1)
            self.flat_idx = idx.reshape(-1)
            if include_last_offset:
                end = torch.tensor([self.e * t], device=idx.device, dtype=torch.int64)
                self.flat_offsets, self.flat_last = torch.cat([shifted.reshape(-1), end]), True
            else:
                self.flat_offsets, self.flat_last = shifted.reshape(-1), False

    def pieces(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u [E, T, D]`` -> ``(idx [B, L], u [B, L, D])`` per example."""
        if not self.examples_are_bags or self.e != 1:
            return self.idx, u
        # one row of bags, one example per bag: each bag's positions padded to the longest
        layout, d = self.layout, u.shape[-1]
        bag, slot = layout.bag[0], (torch.arange(self.idx.shape[1], device=u.device) - layout.start[0])
        keep = bag < layout.bags
        bag, slot = bag[keep], slot[keep]
        length = int(slot.max()) + 1 if slot.numel() else 1
        idx = self.idx.new_zeros(layout.bags, length)
        idx[bag, slot] = self.idx[0][keep]
        out = u.new_zeros(layout.bags, length, d)
        out[bag, slot] = u[0][keep]
        return idx, out


class EmbeddingBagRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.embedding_bag` (see the module doc)."""

    def batched(
        self,
        params: dict[str, torch.Tensor],
        idx: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
    ) -> torch.Tensor:
        fn = "embedding_bag"
        w = params.get("weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            shape = None if not isinstance(w, torch.Tensor) else tuple(w.shape[1:])
            raise ValueError(
                f"{fn}: params['weight'] must be [V, D] (2-D), got {shape}; build params with "
                "init_embedding_bag(num_embeddings, embedding_dim)"
            )
        size = w.shape[0]
        kwargs = dict(mode=mode, per_sample_weights=per_sample_weights, padding_idx=padding_idx,
                      include_last_offset=include_last_offset)
        example = {"weight": _first(w)}
        psw = per_sample_weights
        if not isinstance(idx, torch.Tensor) or (offsets is not None and not isinstance(offsets, torch.Tensor)):
            _check_args(example, idx, offsets, mode, psw, padding_idx, include_last_offset, fn)
        off_dim = None if offsets is None else offsets.dim()
        if psw is not None and (not isinstance(psw, torch.Tensor) or psw.shape != idx.shape):
            got = tuple(psw.shape) if isinstance(psw, torch.Tensor) else psw
            raise ValueError(f"{fn}: per_sample_weights must be a tensor shaped like idx {tuple(idx.shape)}, got {got}")
        bags_are_examples = idx.dim() == 1 and off_dim == 1
        if bags_are_examples or (idx.dim() == 2 and off_dim is None):
            # one bag per example: [T] with offsets [B(+1)], or rows [B, n]
            _, idx, padding_idx = _check_args(example, idx, offsets, mode, psw, padding_idx, include_last_offset, fn)
            batch = offsets.shape[0] - (1 if include_last_offset else 0) if bags_are_examples else idx.shape[0]
        elif (idx.dim() == 3 and off_dim is None) or (idx.dim() == 2 and off_dim == 2):
            flat = idx.reshape(-1, idx.shape[-1])
            _, flat, padding_idx = _check_args(example, flat, None, mode, None if psw is None else psw.reshape(flat.shape),
                                               padding_idx, include_last_offset, fn)
            idx = flat.reshape(idx.shape)
            if off_dim == 2:
                if offsets.shape[0] != idx.shape[0]:
                    raise ValueError(f"{fn}: idx holds {idx.shape[0]} examples but offsets {offsets.shape[0]}")
                _check_offsets(offsets, idx.shape[1], include_last_offset, fn)
            batch = idx.shape[0]
        else:
            raise ValueError(
                f"{fn} on a batch of {size} examples needs idx [B, bags, n], idx [B, n] (one bag "
                f"per example), idx [B, T] with offsets [B, K], or idx [T] with offsets [B] (one "
                f"bag per example); got idx {tuple(idx.shape)} and offsets "
                f"{None if offsets is None else tuple(offsets.shape)}"
            )
        if batch != size:
            raise ValueError(
                f"{fn}: params hold {size} examples but the input {batch} "
                f"({'bags' if bags_are_examples else 'rows of idx'}); keep the batch dim first"
            )
        if not is_shared(w):
            return self._fallback(params, idx, offsets, bags_are_examples, kwargs)
        return self._run(w, idx, offsets, bags_are_examples, padding_idx, mode, psw, include_last_offset)

    def _run(self, w, idx, offsets, bags_are_examples, padding_idx, mode, psw, include_last_offset):
        if bags_are_examples:
            bags = offsets.shape[0] - (1 if include_last_offset else 0)
            call = _Call(idx.unsqueeze(0), offsets.unsqueeze(0), 0, bags, True, include_last_offset,
                         padding_idx, mode, psw, w.dtype)
            return apply_function(_BagPerSample, w, psw, call)[0]
        if idx.dim() == 2 and offsets is None:  # one bag per example
            n = idx.shape[1]
            call = _Call(idx, None, n, 1, False, include_last_offset, padding_idx, mode, psw, w.dtype)
            return apply_function(_BagPerSample, w, psw, call)[:, 0]
        if offsets is None:  # [B, bags, n]
            size, bags, n = idx.shape
            call = _Call(idx.reshape(size, bags * n), None, n, bags, False, include_last_offset,
                         padding_idx, mode, psw, w.dtype)
            return apply_function(_BagPerSample, w, psw, call)
        bags = offsets.shape[1] - (1 if include_last_offset else 0)
        call = _Call(idx, offsets, 0, bags, False, include_last_offset, padding_idx, mode, psw, w.dtype)
        return apply_function(_BagPerSample, w, psw, call)

    def _fallback(self, params, idx, offsets, bags_are_examples, kwargs):
        """Per-example tables that are not one shared tensor: the plain layer per example."""
        plain = self.plain
        psw = kwargs.pop("per_sample_weights")
        if bags_are_examples:  # one example per bag: split the ragged bags
            ends = offsets[1:].tolist() if kwargs["include_last_offset"] else [*offsets[1:].tolist(), idx.shape[0]]
            sub = {**kwargs, "include_last_offset": False}
            outs = []
            for b, (s, e) in enumerate(zip(offsets.tolist(), ends)):
                p = {k: v[b] for k, v in params.items()}
                weights = None if psw is None else psw[s:e]
                outs.append(plain(p, idx[s:e], idx.new_zeros(1), weights, **sub)[0])
            return torch.stack(outs) if outs else params["weight"].new_zeros(0, params["weight"].shape[-1])
        if idx.dim() == 2 and offsets is None:  # rows [B, n]: one bag each
            idx, psw = idx.unsqueeze(1), None if psw is None else psw.unsqueeze(1)
            return self._fallback(params, idx, None, False, {**kwargs, "per_sample_weights": psw})[:, 0]
        dims = (0, 0, None if offsets is None else 0, None if psw is None else 0)
        return vmap(lambda p, i, o, s: plain(p, i, o, s, **kwargs), in_dims=dims)(params, idx, offsets, psw)

    def vmapped(
        self,
        params: dict[str, torch.Tensor],
        idx: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
    ) -> Any:
        ok = (idx.dim() == 3 and offsets is None) or (idx.dim() == 2 and offsets is not None and offsets.dim() == 2)
        if not ok:
            return NotImplemented  # the plain layer under vmap raises its own error
        return self.batched(params, idx, offsets, per_sample_weights, mode=mode,
                            padding_idx=padding_idx, include_last_offset=include_last_offset)

    def tapped(
        self,
        tap: Any,
        params: dict[str, torch.Tensor],
        idx: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
    ) -> Any:
        w = params.get("weight")
        i = tap.index(w)
        if i is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
            return NotImplemented
        if isinstance(per_sample_weights, torch.Tensor) and per_sample_weights.requires_grad:
            return NotImplemented  # its gradient comes from the plain layer's autograd
        try:
            _, idx, padding_idx = _check_args(params, idx, offsets, mode, per_sample_weights, padding_idx,
                                              include_last_offset, "embedding_bag")
        except (ValueError, TypeError):
            return NotImplemented  # the plain layer raises its own error
        table = w.detach()
        if idx.dim() == 2:
            bags, n = idx.shape
            row, off = idx.reshape(1, -1), None
        else:
            bags, n = offsets.shape[0] - (1 if include_last_offset else 0), 0
            row, off = idx.unsqueeze(0), offsets.unsqueeze(0)
        psw = None if per_sample_weights is None else per_sample_weights.reshape(1, -1)
        layout = _Layout(row, off, n, bags, include_last_offset, padding_idx, mode, psw, w.dtype)
        rows = F.embedding(row, table)  # [1, T, D]
        y = self._pure(layout, rows, mode)  # [1, bags, D]
        coef = layout.coef if mode != "max" else layout.first_max(rows, y)
        kind = EmbeddingRows(w.shape[0], padding_idx)  # not the lru_cache: torch.compile traces this

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            s_idx, s_bag, s_coef = saved  # [B, 1, T], [B, 1, T], [B, 1, T] or [B, 1, T, D]
            size, d = g.shape[0], g.shape[-1]
            ext = torch.cat([g, g.new_zeros(size, 1, d)], 1)
            gp = ext.gather(1, s_bag[:, 0].unsqueeze(-1).expand(-1, -1, d))  # [B, T, D]
            c = s_coef[:, 0].to(g.dtype)
            u = gp * (c if mode == "max" else c.unsqueeze(-1))
            return [(i, kind, _merge(s_idx[:, 0], u))]

        return tap.out(y[0], (row, layout.bag, coef), build)

    @staticmethod
    def _pure(layout: _Layout, rows: torch.Tensor, mode: str) -> torch.Tensor:
        """The bags from the looked-up ``rows [E, T, D]`` with plain tensor ops (traceable)."""
        e, _, d = rows.shape
        index = layout.bag.unsqueeze(-1).expand(-1, -1, d)
        if mode != "max":
            vals = rows * layout.coef.to(rows.dtype).unsqueeze(-1)
            return rows.new_zeros(e, layout.bags + 1, d).scatter_add(1, index, vals)[:, : layout.bags]
        low = torch.finfo(rows.dtype).min
        vals = torch.where(layout.valid.unsqueeze(-1), rows, torch.full_like(rows, low))
        out = torch.full((e, layout.bags + 1, d), low, dtype=rows.dtype, device=rows.device)
        out = out.scatter_reduce(1, index, vals, "amax")[:, : layout.bags]
        counts = torch.zeros(e, layout.bags + 1, dtype=rows.dtype, device=rows.device).scatter_add(
            1, layout.bag, layout.valid.to(rows.dtype))[:, : layout.bags]
        return torch.where(counts.unsqueeze(-1) > 0, out, torch.zeros_like(out))


def _plain(
    params: dict[str, torch.Tensor],
    idx: torch.Tensor,
    offsets: torch.Tensor | None = None,
    per_sample_weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The layer with ``per_sample_weights`` positional: the rule's entry points get it among
    the batched arguments (vmap unwraps positional tensors, not keywords)."""
    return embedding_bag.plain(params, idx, offsets, per_sample_weights=per_sample_weights, **kwargs)


EMBEDDING_BAG = EmbeddingBagRule(_plain)


@_rules.register_rule(embedding_bag)
def _embedding_bag(
    params: dict[str, torch.Tensor],
    idx: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    per_sample_weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    return call_rule(EMBEDDING_BAG, params, idx, offsets, per_sample_weights, **kwargs)
