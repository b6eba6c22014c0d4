"""``Conv1d``, ``Conv2d``, ``Conv3d`` with per-sample gradients, and ``expanded_convolution``."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _pair, _single, _triple

import psgfunc.functional as PF
from psgfunc import _rules
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import module_call

__all__ = ["Conv1d", "Conv2d", "Conv3d", "expanded_convolution"]

_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}
# torch's functional convolutions stand for psgfunc's (BastionLab passes F.convNd)
_FROM_TORCH = {F.conv1d: PF.conv1d, F.conv2d: PF.conv2d, F.conv3d: PF.conv3d}
_DIMS = {PF.conv1d: 1, PF.conv2d: 2, PF.conv3d: 3}
_CLASSES: dict[tuple[Any, Any], type] = {}


class _ExpandedConvNd(ExpandedModule, _ConvNd):
    """Shared body of the convolution shells; :func:`expanded_convolution` subclasses it."""

    _conv_fn: Callable[..., torch.Tensor]
    _tuple_fn: Callable[[Any], tuple[int, ...]]
    _dim: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        max_batch_size: int,
        stride: Any = 1,
        padding: str | Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_max_batch_size(max_batch_size, type(self).__name__)
        tup = type(self)._tuple_fn
        super().__init__(
            in_channels,
            out_channels,
            tup(kernel_size),
            tup(stride),
            padding if isinstance(padding, str) else tup(padding),
            tup(dilation),
            False,
            tup(0),
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._set_max_batch_size(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self._dim
        size = self._batch_size(
            x, min_dim=d + 2, max_dim=d + 2, expected=f"[B, {self.in_channels}, {_SPATIAL[d]}]"
        )
        out = module_call(
            type(self)._conv_fn,
            self._expanded_params(),
            size,
            x,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )
        return _forward.produce(self, out, 0)


def expanded_convolution(
    conv_fn: Callable[..., torch.Tensor], tuple_fn: Callable[[Any], tuple[int, ...]]
) -> type:
    """Build the convolution shell class for one dimension.

    ``Conv1d``, ``Conv2d`` and ``Conv3d`` of this package are
    ``expanded_convolution(PF.conv1d, _single)``, ``(PF.conv2d, _pair)`` and
    ``(PF.conv3d, _triple)``.

    Args:
        conv_fn: the functional convolution the shell calls: ``psgfunc.functional.conv1d``,
            ``conv2d`` or ``conv3d`` (torch's ``F.conv1d``/``F.conv2d``/``F.conv3d``, as
            BastionLab takes, are accepted and mean the same), or another function decorated
            with ``psgfunc._rules.dispatchable`` that has a registered per-sample rule and
            takes ``conv2d``'s keywords.
        tuple_fn: turns an int or a tuple into one value per spatial dim
            (``torch.nn.modules.utils._single``/``_pair``/``_triple``); its length on an int
            fixes the number of spatial dims.

    Returns:
        A class (a subclass of ``torch.nn.modules.conv._ConvNd`` and of
        ``psgfunc.nn._base.ExpandedModule``) whose constructor is ``(in_channels,
        out_channels, kernel_size, max_batch_size, stride=1, padding=0, dilation=1, groups=1,
        bias=True, padding_mode='zeros', device=None, dtype=None)``, whose parameters and
        ``state_dict`` are those of ``torch.nn.ConvNd`` and whose forward takes
        ``[B, C, *spatial]`` with ``B <= max_batch_size``. The same arguments return the same
        class (so the classes pickle by name).

    Raises:
        ValueError: ``conv_fn`` has no per-sample rule, or its dimension disagrees with
            ``tuple_fn``.
    """
    conv_fn = _FROM_TORCH.get(conv_fn, conv_fn)
    key = (conv_fn, tuple_fn)
    if key in _CLASSES:
        return _CLASSES[key]
    if _rules.rule_for(conv_fn) is None:
        raise ValueError(
            f"expanded_convolution: conv_fn={conv_fn!r} has no per-sample rule; pass "
            "psgfunc.functional.conv1d/conv2d/conv3d (or torch.nn.functional.conv1d/2d/3d), "
            "or register a rule for it with psgfunc._rules.register_rule"
        )
    dim = len(tuple_fn(1))
    if _DIMS.get(conv_fn, dim) != dim or dim not in _SPATIAL:
        raise ValueError(
            f"expanded_convolution: tuple_fn gives {dim} values per int but conv_fn "
            f"{getattr(conv_fn, '__name__', conv_fn)} has {_DIMS.get(conv_fn)} spatial dims; "
            "pair conv1d with _single, conv2d with _pair, conv3d with _triple"
        )
    name = f"Conv{dim}d"
    doc = f"""``torch.nn.Conv{dim}d`` whose parameters get ``.grad_sample`` after backward.

    Shapes: ``[B, C, {_SPATIAL[dim]}] -> [B, O, {_SPATIAL[dim].replace(",", "',")}']``; dim 0
    is always the batch (one example must be passed as ``x.unsqueeze(0)``),
    ``B <= max_batch_size``. Every option of ``torch.nn.Conv{dim}d`` works (stride,
    dilation, groups, int/tuple/``"same"``/``"valid"`` padding, every ``padding_mode``).

    The input is padded once and convolved once with the shared weight (no per-example
    weight copies, no batch-sized grouped convolution in the forward); the backward gives
    the input gradient and, in one grouped convolution-gradient call with the batch as the
    groups, every example's weight gradient (the ``psgfunc.functional.conv{dim}d`` rule).
    Parameters, ``state_dict`` and initialisation are ``torch.nn.Conv{dim}d``'s.

    Built by ``expanded_convolution({getattr(conv_fn, "__name__", "conv_fn")}, {getattr(tuple_fn, "__name__", "tuple_fn")})``.
    """
    cls = type(
        name,
        (_ExpandedConvNd,),
        {
            "__doc__": doc,
            "__module__": __name__,
            "__qualname__": name,
            "_conv_fn": staticmethod(conv_fn),
            "_tuple_fn": staticmethod(tuple_fn),
            "_dim": dim,
        },
    )
    _CLASSES[key] = cls
    return cls


Conv1d = expanded_convolution(PF.conv1d, _single)
Conv2d = expanded_convolution(PF.conv2d, _pair)
Conv3d = expanded_convolution(PF.conv3d, _triple)
