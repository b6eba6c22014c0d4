"""Convolutions over 1, 2 or 3 spatial dims, with every option of ``torch.nn.ConvNd``.

The padding logic lives in :func:`_resolve_padding` alone, so that the per-sample rule for
convolutions (``psgfunc.per_sample``) pads the input exactly as the layer does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable
from psgfunc.functional.linear import _uniform

__all__ = ["conv1d", "conv2d", "conv3d", "init_conv"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV_OPS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}

IntOrTuple = int | tuple[int, ...]


def _ntuple(value: Any, dim: int, name: str, fn: str, *, minimum: int) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ``dim`` ints, each ``>= minimum``) as a ``dim``-tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        values: tuple[Any, ...] = (value,) * dim
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == dim:
        values = tuple(value)
    else:
        raise ValueError(
            f"{fn}: {name}={value!r} must be an int or a tuple of {dim} ints (one per spatial dim)"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise ValueError(f"{fn}: {name}={value!r} must hold ints >= {minimum}")
    return values


def _kernel_dim(kernel_size: Any, dim: int | None, fn: str) -> tuple[int, tuple[int, ...]]:
    """``(dim, kernel sizes)`` of an ``init_*`` call: the dimension from ``dim`` or from a
    ``kernel_size`` tuple's length (an int ``kernel_size`` needs ``dim``); ValueError naming
    ``fn`` otherwise."""
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        if dim is None:
            raise ValueError(
                f"{fn}: kernel_size={kernel_size} is an int, so the dimension is unknown; pass "
                "dim=1, 2 or 3, or a kernel_size tuple with one size per spatial dim"
            )
    elif isinstance(kernel_size, (tuple, list, torch.Size)):
        if dim is None:
            dim = len(kernel_size)
        elif dim != len(kernel_size):
            raise ValueError(
                f"{fn}: dim={dim} disagrees with kernel_size={tuple(kernel_size)} "
                f"({len(kernel_size)} sizes); pass one of them only"
            )
    else:
        raise ValueError(f"{fn}: kernel_size={kernel_size!r} must be an int or a tuple of ints")
    if dim not in (1, 2, 3):
        raise ValueError(f"{fn}: dim={dim} must be 1, 2 or 3 (spatial dims of the convolution)")
    return dim, _ntuple(kernel_size, dim, "kernel_size", fn, minimum=1)


def _resolve_padding(
    padding: str | IntOrTuple,
    kernel_size: tuple[int, ...],
    stride: IntOrTuple,
    dilation: IntOrTuple,
    padding_mode: str,
    fn: str = "conv",
) -> tuple[list[int] | None, tuple[int, ...]]:
    """Normalise a convolution's padding into an explicit ``F.pad`` step and an int conv padding.

    The convolution is then, for every option of ``torch.nn.ConvNd``::

        pad, conv_padding = _resolve_padding(padding, kernel_size, stride, dilation, mode)
        x = _pad_input(x, pad, mode)               # F.pad(x, pad, "constant" or mode)
        y = F.convNd(x, weight, bias, stride, conv_padding, dilation, groups)

    and ``y`` equals ``torch.nn.ConvNd``'s output bit for bit, because the same ops run:

    * ``padding_mode != "zeros"``: ``pad`` is ``nn.ConvNd._reversed_padding_repeated_twice``
      (for ``"same"``, ``left = d * (k - 1) // 2`` and ``right = d * (k - 1) - left`` per dim,
      which is asymmetric for even effective kernels) and ``conv_padding`` is all zeros;
      ``pad`` is None when every amount is zero (F.pad would be a copy).
    * ``padding_mode == "zeros"``: ints and ``"valid"`` go straight to the conv (``pad`` is
      None). For ``"same"`` the conv padding is ``left`` per dim and, where some dim is
      asymmetric, ``pad`` adds the extra ``right - left`` zeros at the end of that dim, as
      ``F.convNd(padding="same")`` does internally.

    The returned conv padding is always a tuple of ints, never a string, so that a rule can
    hand it to ops that take only ints (``F.unfold``, the weight-gradient convolution).

    Args:
        padding: an int, a tuple with one int per spatial dim, ``"same"`` or ``"valid"``.
        kernel_size: the weight's spatial shape ``weight.shape[2:]``; its length is the number
            of spatial dims.
        stride: an int or one int per spatial dim.
        dilation: an int or one int per spatial dim.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        fn: the public function's name, for error messages.

    Returns:
        ``(pad, conv_padding)``: ``pad`` in ``F.pad`` order (last dim first, ``[left, right]``
        per dim) or None; ``conv_padding`` with one int per spatial dim.

    Raises:
        ValueError: unknown ``padding_mode`` or padding string, ``"same"`` with a stride
            other than 1, or a malformed padding.
    """
    dim = len(kernel_size)
    stride = _ntuple(stride, dim, "stride", fn, minimum=1)
    dilation = _ntuple(dilation, dim, "dilation", fn, minimum=1)
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"{fn}: padding_mode={padding_mode!r} is not one of {_PADDING_MODES}")
    zeros = padding_mode == "zeros"
    if isinstance(padding, str):
        if padding == "valid":
            return None, (0,) * dim
        if padding != "same":
            raise ValueError(
                f"{fn}: padding={padding!r} must be 'same', 'valid', an int or a tuple of "
                f"{dim} ints"
            )
        if any(s != 1 for s in stride):
            raise ValueError(
                f"{fn}: padding='same' needs stride=1 (got stride={stride}); pass explicit "
                "padding amounts for a strided convolution"
            )
        left = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel_size))
        right = tuple(d * (k - 1) - lo for d, k, lo in zip(dilation, kernel_size, left))
        if zeros:
            extra = [0] * (2 * dim)
            for i in range(dim):
                extra[2 * (dim - 1 - i) + 1] = right[i] - left[i]
            return (extra if any(extra) else None), left
        pad = [0] * (2 * dim)
        for i in range(dim):
            pad[2 * (dim - 1 - i)] = left[i]
            pad[2 * (dim - 1 - i) + 1] = right[i]
        return (pad if any(pad) else None), (0,) * dim
    amounts = _ntuple(padding, dim, "padding", fn, minimum=0)
    if zeros:
        return None, amounts
    pad = [a for a in reversed(amounts) for _ in range(2)]
    return (pad if any(pad) else None), (0,) * dim


def _pad_input(x: torch.Tensor, pad: list[int] | None, padding_mode: str) -> torch.Tensor:
    """Apply the ``pad`` of :func:`_resolve_padding` (zeros mode pads with constant 0)."""
    if pad is None:
        return x
    return F.pad(x, pad, mode="constant" if padding_mode == "zeros" else padding_mode)


def _check_conv(
    params: dict[str, torch.Tensor], x: torch.Tensor, dim: int, groups: int, fn: str
) -> None:
    """Raise a ValueError naming the fix when ``params``/``x`` do not fit an N-d convolution."""
    weight = params.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != dim + 2:
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise ValueError(
            f"{fn}: params['weight'] must be [O, I/groups, {'k, ' * (dim - 1)}k] ({dim + 2}-D), "
            f"got {shape}; build params with init_conv(..., dim={dim})"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{fn}: groups={groups!r} must be a positive int")
    if x.dim() not in (dim + 1, dim + 2):
        spatial = _SPATIAL[dim]
        raise ValueError(
            f"{fn}: x must be [C, {spatial}] (one example) or [B, C, {spatial}] (a batch), "
            f"got a {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if out_channels % groups != 0:
        raise ValueError(
            f"{fn}: out_channels={out_channels} (weight.shape[0]) is not divisible by "
            f"groups={groups}"
        )
    channels = x.shape[-dim - 1]
    if channels % groups != 0:
        raise ValueError(
            f"{fn}: in_channels={channels} (x.shape[{-dim - 1}]) is not divisible by "
            f"groups={groups}"
        )
    if channels != in_per_group * groups:
        raise ValueError(
            f"{fn}: x has {channels} channels (dim {-dim - 1}) but the weight expects "
            f"weight.shape[1] * groups = {in_per_group} * {groups} = {in_per_group * groups}; "
            "pass x as [C, *spatial] or [B, C, *spatial] with matching C"
        )
    bias = params.get("bias")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"{fn}: params['bias'] must be [{out_channels}] (out_channels), got {tuple(bias.shape)}"
        )


def _conv(
    dim: int,
    fn: str,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    stride: IntOrTuple,
    padding: str | IntOrTuple,
    dilation: IntOrTuple,
    groups: int,
    padding_mode: str,
) -> torch.Tensor:
    _check_conv(params, x, dim, groups, fn)
    weight = params["weight"]
    stride_t = _ntuple(stride, dim, "stride", fn, minimum=1)
    dilation_t = _ntuple(dilation, dim, "dilation", fn, minimum=1)
    pad, conv_padding = _resolve_padding(
        padding, tuple(weight.shape[2:]), stride_t, dilation_t, padding_mode, fn
    )
    x = _pad_input(x, pad, padding_mode)
    return _CONV_OPS[dim](x, weight, params.get("bias"), stride_t, conv_padding, dilation_t, groups)


@dispatchable
def conv1d(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    stride: IntOrTuple = 1,
    padding: str | IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """1-D convolution, as ``torch.nn.Conv1d``.

    Shapes: one example ``[C, L] -> [O, L']``, a batch ``[B, C, L] -> [B, O, L']`` with
    ``L' = (L + pad_total - dilation * (k - 1) - 1) // stride + 1``.

    Args:
        params: ``{"weight": [O, C/groups, k], "bias": [O]}``; ``bias`` may be absent or None.
        x: ``[C, L]`` or ``[B, C, L]``.
        stride: an int or a 1-tuple.
        padding: an int, a 1-tuple, ``"valid"`` (no padding) or ``"same"`` (output length
            ``L``; needs ``stride=1``; an even effective kernel pads one more on the right).
        dilation: an int or a 1-tuple.
        groups: ``C`` and ``O`` are split into this many independent groups.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``[O, L']`` or ``[B, O, L']``.

    Raises:
        ValueError: wrong input rank, channel mismatch with the weight, channels not divisible
            by ``groups``, ``padding="same"`` with a stride, an unknown ``padding_mode``.
    """
    return _conv(1, "conv1d", params, x, stride, padding, dilation, groups, padding_mode)


@dispatchable
def conv2d(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    stride: IntOrTuple = 1,
    padding: str | IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """2-D convolution, as ``torch.nn.Conv2d``.

    Shapes: one example ``[C, H, W] -> [O, H', W']``, a batch ``[B, C, H, W] -> [B, O, H', W']``
    with ``H' = (H + pad_total_h - dilation_h * (k_h - 1) - 1) // stride_h + 1`` (same for W).

    Args:
        params: ``{"weight": [O, C/groups, k_h, k_w], "bias": [O]}``; ``bias`` may be absent or
            None.
        x: ``[C, H, W]`` or ``[B, C, H, W]``.
        stride: an int or a 2-tuple.
        padding: an int, a 2-tuple, ``"valid"`` (no padding) or ``"same"`` (output ``H, W``;
            needs ``stride=1``; an even effective kernel pads one more at the end).
        dilation: an int or a 2-tuple.
        groups: ``C`` and ``O`` are split into this many independent groups.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``[O, H', W']`` or ``[B, O, H', W']``.

    Raises:
        ValueError: wrong input rank, channel mismatch with the weight, channels not divisible
            by ``groups``, ``padding="same"`` with a stride, an unknown ``padding_mode``.
    """
    return _conv(2, "conv2d", params, x, stride, padding, dilation, groups, padding_mode)


@dispatchable
def conv3d(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    stride: IntOrTuple = 1,
    padding: str | IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """3-D convolution, as ``torch.nn.Conv3d``.

    Shapes: one example ``[C, D, H, W] -> [O, D', H', W']``, a batch
    ``[B, C, D, H, W] -> [B, O, D', H', W']`` with
    ``D' = (D + pad_total_d - dilation_d * (k_d - 1) - 1) // stride_d + 1`` (same for H, W).

    Args:
        params: ``{"weight": [O, C/groups, k_d, k_h, k_w], "bias": [O]}``; ``bias`` may be
            absent or None.
        x: ``[C, D, H, W]`` or ``[B, C, D, H, W]``.
        stride: an int or a 3-tuple.
        padding: an int, a 3-tuple, ``"valid"`` (no padding) or ``"same"`` (output
            ``D, H, W``; needs ``stride=1``; an even effective kernel pads one more at the end).
        dilation: an int or a 3-tuple.
        groups: ``C`` and ``O`` are split into this many independent groups.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``[O, D', H', W']`` or ``[B, O, D', H', W']``.

    Raises:
        ValueError: wrong input rank, channel mismatch with the weight, channels not divisible
            by ``groups``, ``padding="same"`` with a stride, an unknown ``padding_mode``.
    """
    return _conv(3, "conv3d", params, x, stride, padding, dilation, groups, padding_mode)


def init_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrTuple,
    *,
    groups: int = 1,
    bias: bool = True,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`conv1d`/:func:`conv2d`/:func:`conv3d` with ``torch.nn.ConvNd``'s init.

    Weight and bias are drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
    ``fan_in = in_channels / groups * prod(kernel_size)`` (kaiming_uniform with ``a=sqrt(5)``
    for the weight, as torch.nn), the weight first, then the bias.

    Args:
        in_channels: ``C``.
        out_channels: ``O``.
        kernel_size: a tuple with one size per spatial dim (its length is the dimension), or
            an int together with ``dim``.
        groups: must divide ``in_channels`` and ``out_channels``.
        bias: whether to include a ``"bias"`` entry.
        dim: 1, 2 or 3 spatial dims; needed when ``kernel_size`` is an int, and must agree
            with ``len(kernel_size)`` otherwise.
        dtype: floating dtype (default: torch's default dtype).
        device: where to allocate.
        generator: random generator (default: torch's global one).

    Returns:
        ``{"weight": [out_channels, in_channels / groups, *kernel_size], "bias": [out_channels]}``
        (no ``bias`` key when ``bias=False``).

    Raises:
        ValueError: an int ``kernel_size`` without ``dim``, a ``dim`` other than 1-3 or
            disagreeing with ``kernel_size``, channels not divisible by ``groups``.
    """
    fn = "init_conv"
    dim, kernel = _kernel_dim(kernel_size, dim, fn)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{fn}: groups={groups!r} must be a positive int")
    if in_channels < 0 or out_channels < 0:
        raise ValueError(
            f"{fn}: in_channels={in_channels} and out_channels={out_channels} must be >= 0"
        )
    if in_channels % groups != 0:
        raise ValueError(f"{fn}: in_channels={in_channels} is not divisible by groups={groups}")
    if out_channels % groups != 0:
        raise ValueError(f"{fn}: out_channels={out_channels} is not divisible by groups={groups}")
    fan_in = in_channels // groups * math.prod(kernel)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    kwargs = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    shape = (out_channels, in_channels // groups, *kernel)
    params = {"weight": _uniform(shape, bound, generator, **kwargs)}
    if bias:
        params["bias"] = _uniform((out_channels,), bound, generator, **kwargs)
    return params
