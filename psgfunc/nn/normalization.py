"""Normalisation shells: ``torch.nn.LayerNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d`` and
``RMSNorm`` with per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import module_call

__all__ = ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm"]


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


class GroupNorm(ExpandedModule, nn.GroupNorm):
    """``torch.nn.GroupNorm`` whose affine parameters get ``.grad_sample`` after backward.

    Shapes: ``[B, C, *] -> same``; dim 0 is always the batch, ``B <= max_batch_size``.

    Each example is normalised on its own (over groups of channels and its positions) by the
    ordinary ``F.group_norm`` without affine; the per-channel affine step uses the shared
    weight and bias and gives each example's gradients (sums over positions of ``g * x_hat``
    and of ``g``) in its backward (the ``psgfunc.functional.group_norm`` rule). Parameters,
    ``state_dict`` and initialisation are ``torch.nn.GroupNorm``'s. The replacement for
    BatchNorm in a model trained with DP-SGD.

    Args:
        num_groups: how many groups the channels are split into; must divide
            ``num_channels``.
        num_channels: ``C``.
        max_batch_size: the largest batch the layer accepts.
        eps: added to the variance.
        affine: whether to learn a per-channel ``weight`` and ``bias``.
        device: where to allocate the parameters.
        dtype: their floating dtype.
        bias: whether to learn ``bias`` when ``affine`` (``torch.nn.GroupNorm``'s keyword).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        max_batch_size: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype, bias=bias)
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self._batch_size(x, min_dim=2, expected=f"[B, {self.num_channels}, *]")
        out = module_call(PF.group_norm, self._expanded_params(), size, x, self.num_groups, eps=self.eps)
        return _forward.produce(self, out, 0)


_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}


class _InstanceNorm(ExpandedModule):
    """What ``InstanceNorm1d/2d/3d`` share (put before the ``torch.nn`` class)."""

    _dim = 0

    def __init__(
        self,
        num_features: int,
        max_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        _refuse_running_stats(type(self).__name__, track_running_stats)
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=False,
            device=device, dtype=dtype, bias=bias,
        )
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_running_stats(type(self).__name__, self.track_running_stats)
        d = self._dim
        size = self._batch_size(
            x, min_dim=d + 2, max_dim=d + 2, expected=f"[B, {self.num_features}, {_SPATIAL[d]}]"
        )
        out = module_call(PF.instance_norm, self._expanded_params(), size, x, eps=self.eps)
        return _forward.produce(self, out, 0)


def _refuse_running_stats(owner: str, track_running_stats: bool) -> None:
    if track_running_stats:
        raise ValueError(
            f"{owner}: track_running_stats=True is not supported: running statistics average "
            "over the examples of each batch (they mix examples and would release data outside "
            "DP-SGD's accounting); use track_running_stats=False (each example is normalised by "
            "its own statistics, in training and evaluation alike)"
        )


_INSTANCE_DOC = """``torch.nn.InstanceNorm{d}d`` (``track_running_stats=False``) whose affine parameters,
    if any, get ``.grad_sample`` after backward.

    Shapes: ``[B, C, {spatial}] -> same``; dim 0 is always the batch (``torch.nn``'s one example
    ``[C, {spatial}]`` must be passed as ``x.unsqueeze(0)``), ``B <= max_batch_size``.

    Each example's channels are normalised over their own positions by the ordinary
    ``F.instance_norm`` without affine; the per-channel affine step uses the shared weight and
    bias and gives each example's gradients in its backward (the
    ``psgfunc.functional.instance_norm`` rule). Parameters, ``state_dict`` and initialisation
    are ``torch.nn.InstanceNorm{d}d``'s.

    Args:
        num_features: ``C``.
        max_batch_size: the largest batch the layer accepts.
        eps: added to the variance.
        momentum: unused (no running statistics), kept for ``torch.nn``'s signature.
        affine: whether to learn a per-channel ``weight`` and ``bias`` (default: no).
        track_running_stats: must be False (a ValueError otherwise): running statistics mix
            the examples of each batch.
        device: where to allocate the parameters.
        dtype: their floating dtype.
        bias: whether to learn ``bias`` when ``affine`` (``torch.nn``'s keyword).
    """


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _INSTANCE_DOC.format(d=1, spatial=_SPATIAL[1])
    _dim = 1


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _INSTANCE_DOC.format(d=2, spatial=_SPATIAL[2])
    _dim = 2


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _INSTANCE_DOC.format(d=3, spatial=_SPATIAL[3])
    _dim = 3


class RMSNorm(ExpandedModule, nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose weight gets ``.grad_sample`` after backward.

    Shapes: ``[B, *, *normalized_shape] -> same``; dim 0 is always the batch (one example
    must be passed as ``x.unsqueeze(0)``), ``B <= max_batch_size``.

    The normalisation runs as the ordinary ``F.rms_norm`` without weight (statistics per
    position); the elementwise scale uses the shared weight and gives each example's
    gradient (the sum of ``g * x_hat`` over the non-normalised dims) in its backward.
    Parameters, ``state_dict`` and initialisation are ``torch.nn.RMSNorm``'s.

    Args:
        normalized_shape: the trailing dims to normalise over (an int or a tuple).
        max_batch_size: the largest batch the layer accepts.
        eps: added to the mean square (None: ``torch.finfo(x.dtype).eps``).
        elementwise_affine: whether to learn ``weight``.
        device: where to allocate the parameters.
        dtype: their floating dtype.
    """

    def __init__(
        self,
        normalized_shape: int | list[int] | torch.Size,
        max_batch_size: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = ", ".join(map(str, self.normalized_shape))
        size = self._batch_size(x, min_dim=len(self.normalized_shape) + 1, expected=f"[B, *, {shape}]")
        out = module_call(PF.rms_norm, self._expanded_params(), size, x, self.normalized_shape, eps=self.eps)
        return _forward.produce(self, out, 0)
