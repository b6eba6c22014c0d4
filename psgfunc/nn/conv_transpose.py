"""``ConvTranspose1d``, ``ConvTranspose2d``, ``ConvTranspose3d`` with per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import module_call

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]

_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}
_LAYERS = {1: PF.conv_transpose1d, 2: PF.conv_transpose2d, 3: PF.conv_transpose3d}


class _ConvTransposeNd(ExpandedModule):
    """What the transposed-convolution shells share (put before the ``torch.nn`` class)."""

    _dim = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        max_batch_size: int,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: Any = 1,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device=device, dtype=dtype,
        )
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        d = self._dim
        size = self._batch_size(x, min_dim=d + 2, max_dim=d + 2, expected=f"[B, {self.in_channels}, {_SPATIAL[d]}]")
        # torch.nn's choice of output_padding for a requested output_size (configuration only)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, d, self.dilation
        )
        out = module_call(
            _LAYERS[d], self._expanded_params(), size, x, stride=self.stride, padding=self.padding,
            output_padding=tuple(output_padding), groups=self.groups, dilation=self.dilation,
        )
        return _forward.produce(self, out, 0)


_DOC = """``torch.nn.ConvTranspose{d}d`` whose parameters get ``.grad_sample`` after backward.

    Shapes: ``[B, C_in, {sp}] -> [B, C_out, {spo}]``; dim 0 is always the batch (one example
    must be passed as ``x.unsqueeze(0)``), ``B <= max_batch_size``. ``forward(x,
    output_size=None)`` as torch.nn's (``output_size`` picks the ``output_padding``).

    One transposed convolution with the shared weight; the backward gives each example's
    weight gradient (its input positions against the unfolded output-gradient patches, or one
    grouped transposed-convolution gradient with the batch as the groups) and bias gradient
    (the ``psgfunc.functional.conv_transpose{d}d`` rule). Parameters, ``state_dict`` and
    initialisation are ``torch.nn.ConvTranspose{d}d``'s.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: an int or a {d}-tuple.
        max_batch_size: the largest batch the layer accepts.
        stride, padding, output_padding, groups, bias, dilation: as ``torch.nn``.
        padding_mode: ``"zeros"`` (the only mode ``torch.nn.ConvTranspose{d}d`` supports).
        device: where to allocate the parameters.
        dtype: their floating dtype.
    """


def _doc(d: int) -> str:
    sp = _SPATIAL[d]
    return _DOC.format(d=d, sp=sp, spo=", ".join(f"{s}'" for s in sp.split(", ")))


class ConvTranspose1d(_ConvTransposeNd, nn.ConvTranspose1d):
    __doc__ = _doc(1)
    _dim = 1


class ConvTranspose2d(_ConvTransposeNd, nn.ConvTranspose2d):
    __doc__ = _doc(2)
    _dim = 2


class ConvTranspose3d(_ConvTransposeNd, nn.ConvTranspose3d):
    __doc__ = _doc(3)
    _dim = 3
