"""``DPMultiheadAttention``: ``torch.nn.MultiheadAttention`` with per-sample gradients.

Opacus's constructor signature, ``torch.nn.MultiheadAttention``'s parameters and
``state_dict`` (it IS one, a subclass: ``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``, ...; weights load both ways with ``strict=True``).
The forward is one call of :func:`psgfunc.functional.multi_head_attention` with every
parameter, those of the ``out_proj`` submodule included, expanded to the batch; the
projections are ``linear`` calls served by the linear rule, so each parameter's per-sample
gradient is one contraction and fast clipping never materialises it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn.lstm import _AnyBatch
from psgfunc.per_sample import module_call

__all__ = ["DPMultiheadAttention"]


class DPMultiheadAttention(_AnyBatch, nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose parameters get ``.grad_sample`` after backward.

    Shapes, as ``nn.MultiheadAttention`` (``L`` target length, ``S`` source length, ``E``
    embed_dim): ``query [L, B, E], key [S, B, kdim], value [S, B, vdim] -> out [L, B, E]``
    (``[B, L, *]`` with ``batch_first``); one unbatched example ``[L, E]`` -> ``[L, E]``
    (then ``grad_sample`` has ``B = 1``). Attention weights (``need_weights=True``, the
    default as in torch): ``[B, L, S]`` averaged over heads, or ``[B, H, L, S]``.

    Without ``batch_first`` the batch is dim 1, as for a time-major ``DPLSTM``: a
    batch-first layer after it needs the output transposed (see :mod:`psgfunc.nn.lstm`).
    ``is_causal=True`` works without an ``attn_mask`` (torch requires one).

    Args:
        embed_dim: ``E``.
        num_heads: ``H``, dividing ``E``.
        dropout: dropout on the attention weights, in training mode.
        bias: learn ``in_proj_bias`` and ``out_proj.bias``.
        add_bias_kv: learn ``bias_k``/``bias_v``, appended to the keys and values.
        add_zero_attn: append a zero key and value.
        kdim: features of ``key`` (default ``E``; differing: separate q/k/v weights).
        vdim: features of ``value``.
        batch_first: batched tensors are ``[B, L, *]``.
        device: where to allocate the parameters.
        dtype: their floating dtype.
        max_batch_size: keyword-only; None (default) accepts any batch size.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
            device=device, dtype=dtype,
        )
        self._set_optional_max(max_batch_size)

    # the out_proj submodule's parameters are this shell's: expand_weights leaves it alone
    _psg_serves_children = True

    @classmethod
    def from_multihead_attention(
        cls, layer: nn.MultiheadAttention, max_batch_size: int | None = None
    ) -> DPMultiheadAttention:
        """A shell holding ``layer``'s own ``Parameter`` objects and its ``out_proj`` module."""
        p = next(layer.parameters(), None)
        shell = cls(
            layer.embed_dim, layer.num_heads, dropout=layer.dropout,
            bias=layer.in_proj_bias is not None, add_bias_kv=layer.bias_k is not None,
            add_zero_attn=layer.add_zero_attn, kdim=layer.kdim, vdim=layer.vdim,
            batch_first=layer.batch_first, device="meta", dtype=None if p is None else p.dtype,
            max_batch_size=max_batch_size,
        )
        mine, theirs = list(shell._parameters), list(layer._parameters)
        if mine != theirs:  # pragma: no cover - both are built from the same arguments
            raise ValueError(f"DPMultiheadAttention has parameters {mine} but the layer has {theirs}")
        for name, value in layer._parameters.items():
            shell._parameters[name] = value
        shell.out_proj = layer.out_proj
        shell.train(layer.training)
        return shell

    def _expanded_params(self) -> dict[str, torch.Tensor]:
        """Every parameter by its ``named_parameters()`` name (``out_proj.weight`` included)."""
        return dict(self.named_parameters())

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention.forward``.

        Returns:
            ``(out, weights)``; ``weights`` is None unless ``need_weights``.

        Raises:
            ValueError: inputs not 2-D/3-D, batch sizes of query and key that differ, more
                than ``max_batch_size`` examples, and the functional layer's errors.
        """
        if not isinstance(query, torch.Tensor) or query.dim() not in (2, 3):
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(
                f"DPMultiheadAttention: query must be [L, B, {self.embed_dim}] ([B, L, "
                f"{self.embed_dim}] with batch_first) or one unbatched example [L, "
                f"{self.embed_dim}]; got {shape}"
            )
        unbatched = query.dim() == 2
        batch_dim = None if unbatched else 0 if self.batch_first else 1
        if unbatched:  # one example: a batch of one, batch-first
            q = query.unsqueeze(0)
            k = q if key is query else key.unsqueeze(0) if isinstance(key, torch.Tensor) else key
            v = q if value is query else k if value is key else (
                value.unsqueeze(0) if isinstance(value, torch.Tensor) else value)
            if isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            size = 1
        else:
            q, k, v = query, key, value
            size = query.shape[batch_dim]
            for name, t in (("key", key), ("value", value)):
                if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[batch_dim] != size:
                    raise ValueError(
                        f"DPMultiheadAttention: {name} holds {t.shape[batch_dim]} examples at dim "
                        f"{batch_dim}, query {size}; query, key and value must share the batch"
                    )
        self._check_batch(size, "query")
        _forward.consume(self, query, size, batch_dim)
        if batch_dim is not None:  # key and value hold the examples too (e.g. not a constant)
            for t in {id(t): t for t in (key, value) if isinstance(t, torch.Tensor) and t is not query}.values():
                _forward.consume(self, t, size, batch_dim)
        out, weights = module_call(
            PF.multi_head_attention, self._expanded_params(), size, q, k, v, self.num_heads,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
            dropout=float(self.dropout), training=self.training, need_weights=need_weights,
            batch_first=True if unbatched else self.batch_first,
            average_attn_weights=average_attn_weights, add_zero_attn=self.add_zero_attn,
        )
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return _forward.produce(self, out, batch_dim), weights
