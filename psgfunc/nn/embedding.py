"""``Embedding``: ``torch.nn.Embedding`` with per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import module_call

__all__ = ["Embedding"]


def _check_options(owner: str, max_norm: Any, scale_grad_by_freq: bool, sparse: bool) -> None:
    """Refuse the ``nn.Embedding`` options that per-sample gradients cannot honour."""
    if max_norm is not None:
        raise ValueError(
            f"{owner}: max_norm={max_norm!r} is not supported: it rescales rows of the shared "
            "table in place during the forward, a side effect outside autograd that depends "
            "on which rows the batch looks up, so the per-sample gradients would not be those "
            "of a fixed table. Use max_norm=None and, if you need the constraint, renormalise "
            "after each optimizer step (with torch.no_grad(): "
            "layer.weight.renorm_(2, 0, max_norm))"
        )
    if scale_grad_by_freq:
        raise ValueError(
            f"{owner}: scale_grad_by_freq=True is not supported: it divides each row's "
            "gradient by how often the whole batch uses that row, which couples the examples "
            "(an example's gradient would depend on the others). Use scale_grad_by_freq=False"
        )
    if sparse:
        raise ValueError(
            f"{owner}: sparse=True is not supported: per-sample gradients of a table are "
            "dense [B, num_embeddings, embedding_dim] tensors, and DP noise makes the summed "
            "gradient dense too. Use sparse=False"
        )


class Embedding(ExpandedModule, nn.Embedding):
    """``torch.nn.Embedding`` whose table gets ``.grad_sample`` after backward.

    Shapes: ``[B, *] -> [B, *, embedding_dim]``; dim 0 of the indices is always the batch
    (``[B]`` is one index per example; one example's sequence must be passed as
    ``idx.unsqueeze(0)``), ``B <= max_batch_size``.

    Indices shared by every example (position ids ``torch.arange(T)[None]``, ``[1, *]``) in
    a model converted by :func:`psgfunc.nn.expand_weights` whose forward has ``B != 1``
    examples are looked up once per example: the output is ``[B, *, embedding_dim]`` (it
    broadcasts against ``[B, ...]`` tensors exactly as the ``[1, ...]`` one would), so each
    example's table gradient is the scatter of its own output-gradient rows. A lookup shared
    by the batch cannot give that: its output gradient arrives summed over the examples.
    ``B`` is the batch the forward's earlier shells read, else the leading size of the
    model's first tensor input. Outside such a model (shells called directly) ``[1, *]`` is
    a batch of one example: expand shared indices yourself, ``idx.expand(B, -1)``. A 1-D
    ``[T]`` index tensor is ``T`` examples of one index each, never shared positions: pass
    ``arange(T)[None]``.

    The lookup uses the shared table; in the backward the rows of example b are scattered
    into b's own ``[num_embeddings, embedding_dim]`` slice of one ``[B * num_embeddings,
    embedding_dim]`` buffer (one ``index_add_``, indices offset by ``b * num_embeddings``).
    ``padding_idx`` rows get zero gradient, as in torch.nn. Parameters, ``state_dict`` and
    initialisation are ``torch.nn.Embedding``'s.

    Args:
        num_embeddings: rows of the table.
        embedding_dim: size of each row.
        max_batch_size: the largest batch the layer accepts.
        padding_idx: a row that gets no gradient (negative counts from the end).
        max_norm: must be None (see Raises).
        norm_type: kept for signature compatibility (only used with ``max_norm``).
        scale_grad_by_freq: must be False.
        sparse: must be False.
        device: where to allocate the table.
        dtype: its floating dtype.

    Raises:
        ValueError: ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` set: none of them has
            exact per-sample gradients (the message says why and what to do instead).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        max_batch_size: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        _check_options(type(self).__name__, max_norm, scale_grad_by_freq, sparse)
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            device=device,
            dtype=dtype,
        )
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_options(type(self).__name__, self.max_norm, self.scale_grad_by_freq, self.sparse)
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1:
            batch = _forward.broadcast_batch()  # None outside an expand_weights model
            if batch is not None and batch != 1:  # indices shared by every example
                x = x.expand(batch, *x.shape[1:])
        size = self._batch_size(x, min_dim=1, expected="[B, *] (integer indices)")
        out = module_call(PF.embedding, self._expanded_params(), size, x, padding_idx=self.padding_idx)
        return _forward.produce(self, out, 0)
