"""``LayerNorm``: ``torch.nn.LayerNorm`` with per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import module_call

__all__ = ["LayerNorm"]


class LayerNorm(ExpandedModule, nn.LayerNorm):
    """``torch.nn.LayerNorm`` whose affine parameters get ``.grad_sample`` after backward.

    Shapes: ``[B, *, *normalized_shape] -> same``; dim 0 is always the batch (one example
    must be passed as ``x.unsqueeze(0)``), ``B <= max_batch_size``.

    The normalisation runs as the ordinary ``F.layer_norm`` (its statistics are per
    position, so examples never mix); the elementwise affine step uses the shared weight and
    bias and gives each example's gradients (sums of ``g * x_hat`` and of ``g`` over the
    non-normalised dims) in its backward. Parameters, ``state_dict`` and initialisation are
    ``torch.nn.LayerNorm``'s.

    Args:
        normalized_shape: the trailing dims to normalise over (an int or a tuple).
        max_batch_size: the largest batch the layer accepts.
        eps: added to the variance.
        elementwise_affine: whether to learn ``weight`` (and ``bias``).
        device: where to allocate the parameters.
        dtype: their floating dtype.
        bias: whether to learn ``bias`` when ``elementwise_affine`` (``torch.nn.LayerNorm``'s
            ``bias``; after ``dtype`` so that the seed's positional order is kept).
    """

    def __init__(
        self,
        normalized_shape: int | list[int] | torch.Size,
        max_batch_size: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        bias: bool = True,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        super().__init__(
            normalized_shape,
            eps=eps,
            elementwise_affine=elementwise_affine,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = ", ".join(map(str, self.normalized_shape))
        size = self._batch_size(x, min_dim=len(self.normalized_shape) + 1, expected=f"[B, *, {shape}]")
        out = module_call(PF.layer_norm, self._expanded_params(), size, x, self.normalized_shape, eps=self.eps)
        return _forward.produce(self, out, 0)
