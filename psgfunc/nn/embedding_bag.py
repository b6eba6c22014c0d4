"""``EmbeddingBag``: ``torch.nn.EmbeddingBag`` with per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.nn.embedding import _check_options
from psgfunc.per_sample import module_call

__all__ = ["EmbeddingBag"]


class EmbeddingBag(ExpandedModule, nn.EmbeddingBag):
    """``torch.nn.EmbeddingBag`` whose table gets ``.grad_sample`` after backward.

    An example is ONE bag:

    * ``forward(input [B, n])``: row b is example b's bag of ``n`` indices, output ``[B, D]``;
    * ``forward(input [T], offsets [B])`` (``[B + 1]`` with ``include_last_offset``, the last
      equal to ``T``): bag b, ``input[offsets[b]:offsets[b+1]]``, is example b (bags may
      differ in length, or be empty), output ``[B, D]``.

    So ``B`` (the number of bags) ``<= max_batch_size``, and a model whose example holds
    several bags should use :func:`psgfunc.functional.embedding_bag` with
    :func:`psgfunc.per_sample_grads` (there, one example is any set of bags).
    ``per_sample_weights`` (shaped like ``input``, ``mode="sum"``) and ``padding_idx`` work as
    in torch.nn.

    The bags are computed by one ``F.embedding_bag`` on the shared table; in the backward
    each example's table gradient is the scatter of its bag's output gradient (divided by the
    bag's size for ``"mean"``, weighted for ``per_sample_weights``, to the maximal rows per
    dim for ``"max"``) into its rows, without ``[B, V, D]`` for fast clipping (the
    ``psgfunc.functional.embedding_bag`` rule). Parameters, ``state_dict`` and
    initialisation are ``torch.nn.EmbeddingBag``'s.

    Args:
        num_embeddings: rows of the table.
        embedding_dim: size of each row.
        max_batch_size: the largest number of bags (examples) a forward accepts.
        max_norm: must be None (it renormalises the table in place during the forward).
        norm_type: kept for signature compatibility (only used with ``max_norm``).
        scale_grad_by_freq: must be False (it couples the examples).
        mode: ``"sum"``, ``"mean"`` or ``"max"``.
        sparse: must be False (per-sample gradients are dense).
        _weight: a ``[num_embeddings, embedding_dim]`` table to start from.
        include_last_offset: ``offsets`` ends with the end of the last bag (``len(input)``).
        padding_idx: a row left out of every bag, with no gradient.
        device: where to allocate the table.
        dtype: its floating dtype.

    Raises:
        ValueError: ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` set (the message says
            why and what to do instead).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        max_batch_size: int,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        _check_options(type(self).__name__, max_norm, scale_grad_by_freq, sparse)
        super().__init__(
            num_embeddings, embedding_dim, max_norm=max_norm, norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq, mode=mode, sparse=sparse, _weight=_weight,
            include_last_offset=include_last_offset, padding_idx=padding_idx, device=device,
            dtype=dtype,
        )
        self._set_max_batch_size(max_batch_size)

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_options(type(self).__name__, self.max_norm, self.scale_grad_by_freq, self.sparse)
        if offsets is None:
            size = self._batch_size(input, min_dim=2, max_dim=2, expected="[B, n] (one bag per row)")
        else:
            if not isinstance(input, torch.Tensor) or input.dim() != 1:
                got = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
                raise ValueError(
                    f"{type(self).__name__}: with offsets, input must be 1-D (the bags end to "
                    f"end), got {got}; pass a 2-D input [B, n] without offsets for bags of one length"
                )
            starts = offsets[:-1] if self.include_last_offset and isinstance(offsets, torch.Tensor) else offsets
            size = self._batch_size(starts, min_dim=1, max_dim=1, expected="[B] (one bag per example)",
                                    name="offsets", data=False)
        out = module_call(
            PF.embedding_bag, self._expanded_params(), size, input, offsets, mode=self.mode,
            per_sample_weights=per_sample_weights, padding_idx=self.padding_idx,
            include_last_offset=self.include_last_offset,
        )
        return _forward.produce(self, out, 0)
