"""Rules for the two parameter uses of :func:`psgfunc.functional.multi_head_attention` that
are not linear maps.

Everything else in multi-head attention is ``linear`` (the projections: the linear rule) or
parameter-free (``F.scaled_dot_product_attention``). What remains are additions of a
parameter to activations, whose per-sample gradient is a sum of the output gradient over
positions (a :class:`~psgfunc.per_sample._kinds.RowSum`, as a Linear's bias):

* :func:`~psgfunc.functional.attention.split_bias`: ``in_proj_bias [3E]`` added in three
  blocks to q, k, v (separate projection weights). ``grad_b = [sum_n gq, sum_n gk,
  sum_n gv]``, one ``[B, 3E]`` piece (summed by the rule: a
  :class:`~psgfunc.per_sample._kinds.SummedRows`, which bounds that sum's rounding).
* :func:`~psgfunc.functional.attention.append_bias_kv`: ``bias_k``/``bias_v [1, 1, E]``
  appended as one more key and value position. ``grad_bias_k = gk[:, S]``, the output
  gradient at that position.

Both run the op with the shared parameter (``batched``) and tap their outputs on the
compiled route (``tapped``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vmap

from psgfunc import _rules
from psgfunc.functional.attention import append_bias_kv, split_bias
from psgfunc.per_sample._expanded import (
    Rule,
    _call_batched,
    apply_function,
    call_rule,
    is_shared,
    shared,
    vmap_randomness,
)
from psgfunc.per_sample._kinds import RowSum, SummedRows, emit, presum

__all__ = ["SplitBiasRule", "BiasKVRule", "batched_sdpa"]

_ROWSUM = RowSum()
_SUMMED = SummedRows()


def _sums(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, *, K] -> ([B, K], [B])``: the output gradient summed over each example's
    positions and the bound of that sum's rounding (:func:`~psgfunc.per_sample._kinds.presum`;
    explicit sizes: B may be 0)."""
    return presum(g.reshape(g.shape[0], math.prod(g.shape[1:-1]), g.shape[-1]), (1,))


class _SplitBias(torch.autograd.Function):
    """``q, k, v [B, *, E], b [B, 3E] (shared) -> q + b[:E], k + b[E:2E], v + b[2E:]``."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> Any:  # type: ignore[override]
        bq, bk, bv = shared(b).chunk(3)
        return q + bq, k + bk, v + bv

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.bias = inputs[3]  # identity only, for emit's bookkeeping

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> Any:
        gb = None
        if ctx.needs_input_grad[3]:
            parts = [_sums(gq), _sums(gk), _sums(gv)]
            rows = torch.cat([s for s, _ in parts], dim=-1)  # [B, 3E]
            gb = emit(ctx.bias, _SUMMED, rows.unsqueeze(1), parts[0][1] + parts[1][1] + parts[2][1])
        return gq, gk, gv, gb


class SplitBiasRule(Rule):
    """Per-sample rule of ``split_bias`` (batch dim 0 of q, k, v)."""

    def batched(self, params: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> Any:
        b = params["bias"]
        if not is_shared(b):
            return vmap(lambda p, *x: self.plain(p, *x))(params, q, k, v)
        return apply_function(_SplitBias, q, k, v, b)

    def tapped(self, tap: Any, params: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> Any:
        b = params["bias"]
        ib = tap.index(b)
        if ib is None:
            return NotImplemented
        e = q.shape[-1]
        outs = self.plain({"bias": b.detach()}, q, k, v)
        tapped = []
        for j, y in enumerate(outs):

            def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor, j: int = j) -> list[Any]:
                s, a = _sums(g)
                rows = F.pad(s, (j * e, (2 - j) * e))  # this block's columns of [B, 3E]
                return [(ib, _SUMMED, (rows.unsqueeze(1), a))]

            tapped.append(tap.out(y, (), build))
        return tuple(tapped)


class _BiasKV(torch.autograd.Function):
    """``k, v [B, S, E], bias_k, bias_v [B, 1, 1, E] (shared) -> [B, S + 1, E]`` each."""

    @staticmethod
    def forward(k: torch.Tensor, v: torch.Tensor, bk: torch.Tensor, bv: torch.Tensor) -> Any:  # type: ignore[override]
        size, e = k.shape[0], k.shape[-1]
        return (torch.cat([k, shared(bk).reshape(1, 1, e).expand(size, 1, e)], dim=1),
                torch.cat([v, shared(bv).reshape(1, 1, e).expand(size, 1, e)], dim=1))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.bk, ctx.bv = inputs[2], inputs[3]  # identity only, for emit's bookkeeping

    @staticmethod
    def backward(ctx: Any, gk: torch.Tensor, gv: torch.Tensor) -> Any:
        kind = RowSum(tuple(ctx.bk.shape[1:]))
        gbk = emit(ctx.bk, kind, gk[:, -1:]) if ctx.needs_input_grad[2] else None
        gbv = emit(ctx.bv, kind, gv[:, -1:]) if ctx.needs_input_grad[3] else None
        return gk[:, :-1], gv[:, :-1], gbk, gbv


class BiasKVRule(Rule):
    """Per-sample rule of ``append_bias_kv`` (batch dim 0 of k, v ``[B, S, E]``)."""

    def batched(self, params: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> Any:
        bk, bv = params["bias_k"], params["bias_v"]
        if k.dim() != 3 or v.dim() != 3 or not (is_shared(bk) and is_shared(bv)):
            return vmap(lambda p, *x: self.plain(p, *x))(params, k, v)
        return apply_function(_BiasKV, k, v, bk, bv)

    def tapped(self, tap: Any, params: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> Any:
        bk, bv = params["bias_k"], params["bias_v"]
        ik, iv = tap.index(bk), tap.index(bv)
        if ik is None or iv is None:
            return NotImplemented
        kind = RowSum(tuple(bk.shape))
        outs = self.plain({"bias_k": bk.detach(), "bias_v": bv.detach()}, k, v)
        tapped = []
        for i, y in ((ik, outs[0]), (iv, outs[1])):

            def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor, i: int = i) -> list[Any]:
                return [(i, kind, (g[:, -1:].reshape(g.shape[0], 1, g.shape[-1]),))]

            tapped.append(tap.out(y, (), build))
        return tuple(tapped)


SPLIT_BIAS = SplitBiasRule(split_bias.plain)
BIAS_KV = BiasKVRule(append_bias_kv.plain)


@_rules.register_rule(split_bias)
def _split_bias(params: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    return call_rule(SPLIT_BIAS, params, q, k, v)


@_rules.register_rule(append_bias_kv)
def _append_bias_kv(params: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> Any:
    return call_rule(BIAS_KV, params, k, v)


class _SDPARule(Rule):
    """``F.scaled_dot_product_attention`` (no parameters) on a vmap's whole batch at once.

    The examples' tensors ``[*, L, E]`` become ``[B, *, L, E]``; attention treats every
    leading dim as a batch dim, so one call of torch's own kernel (the fused one where it
    applies: it saves ``[B, heads, L]`` statistics, not the ``[B, heads, L, S]`` weights
    the ordinary-ops route keeps for its backward) computes every example's attention.
    """

    def vmapped(self, params: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Any, dropout_p: float, is_causal: bool, scale: Any, enable_gqa: bool) -> Any:
        if dropout_p > 0 and vmap_randomness() != "different":
            return NotImplemented  # one mask for all examples, or an error: the vmap route
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.dim() < 3:  # torch refuses it on one example; on the stacked batch, [B, E]
                # would read as a sequence of the B examples, mixing them
                raise ValueError(
                    f"scaled_dot_product_attention: each example's {name} must be at least 2-D "
                    f"[..., L, E] (as torch requires), got an example of shape {tuple(t.shape[1:])}; "
                    "add the sequence dim, e.g. q.unsqueeze(-2)"
                )
        tensors = [t for t in (q, k, v, mask) if isinstance(t, torch.Tensor)]
        rank = max(t.dim() for t in tensors)

        def aligned(t: Any) -> Any:  # examples' dims right-aligned behind the batch dim
            if not isinstance(t, torch.Tensor) or t.dim() == rank:
                return t
            return t.reshape(t.shape[0], *([1] * (rank - t.dim())), *t.shape[1:])

        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(
            aligned(q), aligned(k), aligned(v), attn_mask=aligned(mask), dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, **kwargs)


_SDPA = _SDPARule(F.scaled_dot_product_attention)


def batched_sdpa(a: dict[str, Any]) -> Any:
    """Attention with the arguments ``a`` (by name, as ``F.scaled_dot_product_attention``
    takes them) on the whole batch when the innermost transform is psgfunc's vmap (the
    expanded method and fast clipping); else ``NotImplemented``."""
    args = (a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"],
            a["scale"], a["enable_gqa"])
    if not all(isinstance(t, torch.Tensor) for t in args[:3]):
        return NotImplemented
    return _call_batched(_SDPA, {}, args, {})
