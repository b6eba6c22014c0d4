"""Multi-head attention, as ``torch.nn.MultiheadAttention``, built from psgfunc's own layers.

The layer is a composition: the input projections and the output projection are
:func:`psgfunc.functional.linear` calls on the params leaves themselves, the attention is
``F.scaled_dot_product_attention`` (no params), and the two pieces that touch a parameter
outside a linear map (``in_proj_bias`` added after separate q/k/v weights, and
``bias_k``/``bias_v`` appended to the keys and values) are two small dispatchable layers.
So every parameter reaches its per-sample gradient through a rule (the linear rule's
``Outer``/``RowSum`` kinds, ``psgfunc.per_sample.rules.attention``'s ``RowSum`` pieces):
``per_sample_grads(method="expanded")``, fast clipping and the compiled route need no
attention-specific rule, and the shells (``psgfunc.nn.DPMultiheadAttention``) work by
calling this function with the parameters expanded to the batch.

The packed ``in_proj_weight [3E, E]`` is ONE params leaf that serves three projections. It
is always passed whole to ``linear`` (a slice of a parameter would be a computed weight,
which the expanded method cannot serve from the shared weight, so fast clipping would
materialise it):

* self-attention (``query is key is value``): one ``linear`` of the packed weight, its
  output split into q, k, v (the flops of the three projections, no more);
* otherwise the distinct inputs are concatenated along the sequence dim and go through one
  ``linear`` of the packed weight; q, k, v are the blocks each needs (the sequence rows of
  its input, the output columns of its weight). That computes each input against all three
  weight blocks, 3x the flops of the projections it keeps (2x for ``key is value``), but it
  is exact, one call, and its per-sample gradient is one ``Outer`` piece whose output
  gradient is zero outside the kept blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable
from psgfunc.functional.linear import linear

__all__ = ["multi_head_attention", "init_multi_head_attention"]


@dispatchable
def split_bias(
    params: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q + b[:E], k + b[E:2E], v + b[2E:])`` for the packed ``in_proj_bias`` ``b [3E]``.

    Shapes: ``q [*, Lq, E], k [*, S, E], v [*, S, E]`` -> the same (``*``: nothing for one
    example, ``B`` for a batch). Used when the projection weights are separate (``kdim`` or
    ``vdim`` differ from ``embed_dim``) but the bias is still one packed parameter.
    """
    bq, bk, bv = params["bias"].chunk(3)
    return q + bq, k + bk, v + bv


@dispatchable
def append_bias_kv(
    params: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``bias_k``/``bias_v`` ``[1, 1, E]`` as one more key and value position.

    Shapes: ``k, v [*, S, E] -> [*, S + 1, E]`` (``*``: nothing for one example, ``B`` for a
    batch), as ``torch.nn.MultiheadAttention(add_bias_kv=True)``.
    """
    bk, bv = params["bias_k"], params["bias_v"]
    e = k.shape[-1]
    rows = (*k.shape[:-2], 1, e)
    return (torch.cat([k, bk.reshape(e).expand(rows)], dim=-2),
            torch.cat([v, bv.reshape(e).expand(rows)], dim=-2))


def _float_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True: may not attend) as an additive float mask; a float mask as is."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(
            f"multi_head_attention: {name} must be a bool tensor (True: may not attend) or a "
            f"floating tensor (added to the scores), got "
            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


def _to_batch_first(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[L, B, E]`` -> ``[B, L, E]`` for the three inputs, keeping which ones are the same object."""
    q = query.transpose(0, 1)
    k = q if key is query else key.transpose(0, 1)
    v = q if value is query else k if value is key else value.transpose(0, 1)
    return q, k, v


def _project(
    params: dict[str, torch.Tensor], q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, e: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[*, L, E]`` from the inputs (see the module docstring for the packed weight)."""
    bias = params.get("in_proj_bias")
    w = params.get("in_proj_weight")
    if w is None:
        q = linear({"weight": params["q_proj_weight"]}, q_in)
        k = linear({"weight": params["k_proj_weight"]}, k_in)
        v = linear({"weight": params["v_proj_weight"]}, v_in)
        if bias is not None:
            q, k, v = split_bias({"bias": bias}, q, k, v)
        return q, k, v
    packed = {"weight": w, "bias": bias}
    if q_in is k_in and k_in is v_in:
        return linear(packed, q_in).split(e, dim=-1)
    distinct = [q_in] + ([k_in] if k_in is not q_in else []) + (
        [v_in] if v_in is not q_in and v_in is not k_in else [])
    out = linear(packed, torch.cat(distinct, dim=-2))
    starts, at = {}, 0
    for x in distinct:
        starts[id(x)] = (at, at + x.shape[-2])
        at += x.shape[-2]

    def block(x: torch.Tensor, j: int) -> torch.Tensor:
        s, t = starts[id(x)]
        return out[..., s:t, j * e:(j + 1) * e]

    return block(q_in, 0), block(k_in, 1), block(v_in, 2)


def multi_head_attention(
    params: dict[str, torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
    batch_first: bool = False,
    average_attn_weights: bool = True,
    add_zero_attn: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention, exactly ``torch.nn.MultiheadAttention.forward``.

    ``out = concat_h(softmax(q_h k_h^T / sqrt(D) + mask) v_h) W_o^T + b_o`` with
    ``q = query W_q^T + b_q`` (likewise k, v), ``H = num_heads`` heads of ``D = E / H``
    features (Vaswani et al. 2017, "Attention Is All You Need").

    Shapes (``L`` target length, ``S`` source length, ``E`` embed_dim, ``Ek``/``Ev`` kdim
    and vdim): one example ``query [L, E], key [S, Ek], value [S, Ev] -> out [L, E]``; a
    batch ``[L, B, *] -> [L, B, E]``, or ``[B, L, *] -> [B, L, E]`` with ``batch_first``.
    Weights (``need_weights``): ``[L, S']`` / ``[B, L, S']`` averaged over heads, or
    ``[H, L, S']`` / ``[B, H, L, S']`` with ``average_attn_weights=False`` (``S'`` is ``S``
    plus one for ``bias_k`` and one for ``add_zero_attn``).

    Args:
        params: ``dict(nn.MultiheadAttention(...).named_parameters())``: ``in_proj_weight
            [3E, E]`` (or ``q_proj_weight [E, E]``, ``k_proj_weight [E, Ek]``,
            ``v_proj_weight [E, Ev]`` when kdim/vdim differ from E), ``in_proj_bias [3E]``,
            ``out_proj.weight [E, E]``, ``out_proj.bias [E]`` (biases absent with
            ``bias=False``), and ``bias_k``/``bias_v [1, 1, E]`` with ``add_bias_kv``.
        query, key, value: as above. Passing the same tensor (``x, x, x``) runs one packed
            projection (see the module docstring).
        num_heads: ``H``; must divide E.
        key_padding_mask: ``[B, S]`` (``[S]`` for one example); bool (True: ignore that key)
            or float (added to the scores).
        attn_mask: ``[L, S]``, or ``[B*H, L, S]`` (``[H, L, S]`` for one example); bool
            (True: may not attend) or float (added).
        is_causal: position i attends to keys ``j <= i`` only. With ``attn_mask`` given,
            a hint that it IS the causal mask (as in torch: the fused causal kernel is then
            used when there is no ``key_padding_mask`` and no ``need_weights``); without
            one, the causal mask is built here (torch requires it to be passed).
        dropout: probability of dropping an attention weight, when ``training``.
        training: apply ``dropout``.
        need_weights: also return the attention weights (computed explicitly; otherwise
            ``F.scaled_dot_product_attention`` runs, and None is returned).
        batch_first: batched inputs are ``[B, L, *]`` (ignored for one example).
        average_attn_weights: average the returned weights over heads.
        add_zero_attn: append a zero key and value (per head) after the projections.

    Returns:
        ``(out, weights or None)``.

    Raises:
        ValueError: inputs of the wrong rank or feature size, ``num_heads`` not dividing
            E, or masks of the wrong shape or dtype.
    """
    e = params["out_proj.weight"].shape[-1]
    _check(params, query, key, value, num_heads, key_padding_mask, attn_mask, e)
    batched = query.dim() == 3
    if batched and not batch_first:
        query, key, value = _to_batch_first(query, key, value)
    q, k, v = _project(params, query, key, value, e)
    lq, s = q.shape[-2], k.shape[-2]
    lead = q.shape[:-2]  # (B,) or ()

    kpm = _float_mask(key_padding_mask, "key_padding_mask", q.dtype)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(lq, s, dtype=torch.bool, device=q.device).triu(1)
    if is_causal and kpm is None and not need_weights:
        mask = None  # the hint: the fused kernel's own causal mask (torch's choice too)
    else:
        is_causal = False
        mask = _float_mask(attn_mask, "attn_mask", q.dtype)
        if mask is not None and mask.dim() == 3:  # [B*H, L, S] or [H, L, S]
            mask = mask.reshape(*lead, num_heads, lq, s)
    if "bias_k" in params:
        k, v = append_bias_kv({"bias_k": params["bias_k"], "bias_v": params["bias_v"]}, k, v)
        mask, kpm = _pad_col(mask), _pad_col(kpm)

    d = e // num_heads
    q = q.unflatten(-1, (num_heads, d)).transpose(-3, -2)  # [*, H, L, D]
    k = k.unflatten(-1, (num_heads, d)).transpose(-3, -2)
    v = v.unflatten(-1, (num_heads, d)).transpose(-3, -2)
    if add_zero_attn:
        zeros = k.new_zeros((*k.shape[:-2], 1, d))
        k, v = torch.cat([k, zeros], dim=-2), torch.cat([v, zeros], dim=-2)
        mask, kpm = _pad_col(mask), _pad_col(kpm)
    if kpm is not None:  # [*, S] -> [*, 1, 1, S]
        kpm = kpm.unsqueeze(-2).unsqueeze(-2)
        mask = kpm if mask is None else mask + kpm
    p = dropout if training else 0.0

    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if p > 0:  # torch returns the weights after dropout too
            weights = F.dropout(weights, p=p)
        out = weights @ v
        if average_attn_weights:
            weights = weights.mean(dim=-3)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
    out = out.transpose(-3, -2).flatten(-2)  # [*, L, E]
    out = linear({"weight": params["out_proj.weight"], "bias": params.get("out_proj.bias")}, out)
    if batched and not batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _pad_col(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more (zero: attend) column at the end of the last dim."""
    return None if mask is None else F.pad(mask, (0, 1))


def _check(
    params: dict[str, Any],
    query: Any,
    key: Any,
    value: Any,
    num_heads: Any,
    key_padding_mask: Any,
    attn_mask: Any,
    e: int,
) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"multi_head_attention: {name} must be a tensor, got {type(t).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or e % num_heads:
        raise ValueError(
            f"multi_head_attention: num_heads={num_heads!r} must be a positive int dividing "
            f"embed_dim={e} (the size of params['out_proj.weight'])"
        )
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            "multi_head_attention: query, key and value must all be [L, E] (one example) or all "
            f"[L, B, E] ([B, L, E] with batch_first); got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if "in_proj_weight" in params and params["in_proj_weight"] is not None:
        kdim = vdim = e
    else:
        missing = [n for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight") if n not in params]
        if missing:
            raise ValueError(
                f"multi_head_attention: params needs 'in_proj_weight' or all of q/k/v_proj_weight; "
                f"missing {missing} (use dict(nn.MultiheadAttention(...).named_parameters()) or "
                "init_multi_head_attention)"
            )
        kdim, vdim = params["k_proj_weight"].shape[-1], params["v_proj_weight"].shape[-1]
    for name, t, want in (("query", query, e), ("key", key, kdim), ("value", value, vdim)):
        if t.shape[-1] != want:
            raise ValueError(
                f"multi_head_attention: {name} has {t.shape[-1]} features, the params expect "
                f"{want}; got shape {tuple(t.shape)}"
            )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"multi_head_attention: key {tuple(key.shape)} and value {tuple(value.shape)} must "
            "have the same sequence (and batch) sizes"
        )
    if ("bias_k" in params) != ("bias_v" in params):
        raise ValueError("multi_head_attention: params must hold both bias_k and bias_v, or neither")
    kpm_dims = query.dim() - 1
    if key_padding_mask is not None and (
            not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dim() != kpm_dims):
        raise ValueError(
            f"multi_head_attention: key_padding_mask must be {'[S]' if kpm_dims == 1 else '[B, S]'} "
            f"for query {tuple(query.shape)}, got "
            f"{tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else key_padding_mask!r}"
        )
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dim() not in (2, 3)):
        raise ValueError(
            "multi_head_attention: attn_mask must be [L, S] or [B*num_heads, L, S] "
            "([num_heads, L, S] for one example), got "
            f"{tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else attn_mask!r}"
        )


def init_multi_head_attention(
    embed_dim: int,
    num_heads: int,
    dropout: float = 0.0,
    bias: bool = True,
    add_bias_kv: bool = False,
    add_zero_attn: bool = False,
    kdim: int | None = None,
    vdim: int | None = None,
    batch_first: bool = False,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`multi_head_attention` with ``torch.nn.MultiheadAttention``'s init.

    ``out_proj.weight`` ~ ``U(-1/sqrt(E), 1/sqrt(E))`` (a Linear's default; its bias is
    drawn too, then zeroed), then the input projections Xavier-uniform (``in_proj_weight``
    as one ``[3E, E]`` matrix, or q/k/v each), ``in_proj_bias`` and ``out_proj.bias`` zero,
    ``bias_k``/``bias_v`` Xavier-normal (std ``1/sqrt(E)``). The draws are torch's, in
    torch's order: with the global generator and the same seed the values equal
    ``nn.MultiheadAttention``'s. ``dropout``, ``add_zero_attn`` and ``batch_first`` are
    forward options (accepted for the constructor's signature; pass them to the layer).

    Returns:
        A dict in ``named_parameters()`` order: ``in_proj_weight`` (or ``q_proj_weight``,
        ``k_proj_weight``, ``v_proj_weight``), ``in_proj_bias``, ``bias_k``, ``bias_v``,
        ``out_proj.weight``, ``out_proj.bias`` (those that exist).
    """
    for name, n in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"init_multi_head_attention: {name}={n!r} must be a positive int")
    if embed_dim % num_heads:
        raise ValueError(
            f"init_multi_head_attention: num_heads={num_heads} must divide embed_dim={embed_dim}"
        )
    kdim = embed_dim if kdim is None else kdim
    vdim = embed_dim if vdim is None else vdim
    kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    e = embed_dim
    bound = 1.0 / math.sqrt(e)
    out_w = torch.empty((e, e), **kw).uniform_(-bound, bound, generator=generator)
    out_b = torch.empty(e, **kw).uniform_(-bound, bound, generator=generator) if bias else None

    def xavier(rows: int, cols: int) -> torch.Tensor:
        a = math.sqrt(6.0 / (rows + cols))
        return torch.empty((rows, cols), **kw).uniform_(-a, a, generator=generator)

    params: dict[str, torch.Tensor] = {}
    if kdim == e and vdim == e:
        params["in_proj_weight"] = xavier(3 * e, e)
    else:
        params["q_proj_weight"] = xavier(e, e)
        params["k_proj_weight"] = xavier(e, kdim)
        params["v_proj_weight"] = xavier(e, vdim)
    if bias:
        params["in_proj_bias"] = torch.zeros(3 * e, **kw)
    if add_bias_kv:
        std = math.sqrt(2.0 / (2 * e))
        params["bias_k"] = torch.empty((1, 1, e), **kw).normal_(0.0, std, generator=generator)
        params["bias_v"] = torch.empty((1, 1, e), **kw).normal_(0.0, std, generator=generator)
    params["out_proj.weight"] = out_w
    if out_b is not None:
        params["out_proj.bias"] = out_b.zero_()
    return params
