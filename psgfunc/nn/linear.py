"""``Linear`` and ``ConvLinear``: ``torch.nn.Linear`` with per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import module_call

__all__ = ["Linear", "ConvLinear"]


class Linear(ExpandedModule, nn.Linear):
    """``torch.nn.Linear`` whose parameters get ``.grad_sample`` after backward.

    Shapes: ``[B, *, in_features] -> [B, *, out_features]``; dim 0 is always the batch (one
    example must be passed as ``x.unsqueeze(0)``), ``B <= max_batch_size``.
    In a model converted by :func:`psgfunc.nn.expand_weights`, an input that is a time-major
    ``[T, B, H]`` recurrent output (not transposed) raises a ValueError, also when ``T == B``
    (see :mod:`psgfunc.nn._forward`); elsewhere dim 0 is taken as given.

    The forward is ``F.linear`` with the shared weight (no per-example copy); in the
    backward each example's weight gradient ``g_b^T x_b`` comes out of one batched
    contraction (the ``psgfunc.functional.linear`` rule). Parameters, ``state_dict`` and
    initialisation are ``torch.nn.Linear``'s.

    Args:
        in_features: size of each input row.
        out_features: size of each output row.
        max_batch_size: the largest batch the layer accepts.
        bias: whether to learn an additive bias.
        device: where to allocate the parameters.
        dtype: their floating dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_batch_size: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self._batch_size(x, min_dim=2, expected=f"[B, *, {self.in_features}]")
        return _forward.produce(self, module_call(PF.linear, self._expanded_params(), size, x), 0)


class ConvLinear(Linear):
    """A linear layer that BastionLab computes as a 1-D convolution; here, :class:`Linear`.

    Same signature, parameters and ``state_dict`` as ``torch.nn.Linear`` (and
    :class:`Linear`). BastionLab offered this variant because its ``Linear`` ran the forward
    as an einsum over per-example weight copies, which a kernel-size-1 convolution beat.
    psgfunc's linear rule already runs the forward as one ``F.linear`` with the shared weight
    and gets every example's weight gradient in one contraction, so a detour through a
    convolution would only add transposes and copies: ``ConvLinear`` keeps the name for code
    written against BastionLab and behaves exactly as :class:`Linear`.
    """
