"""Transposed convolutions over 1, 2 or 3 spatial dims, as ``torch.nn.ConvTranspose1d/2d/3d``.

A transposed convolution is the adjoint of a convolution: with ``W [C_in, C_out/G, *k]``
(``G = groups``), stride ``s``, padding ``p``, dilation ``d``, every input position ``n``
spreads ``x[:, n]`` over the output positions ``n * s - p + k * d``::

    y[o, n * s - p + k * d] += sum_i x[i, n] W[i, o, k]        (within each group)

The output size per spatial dim is ``(S - 1) * s - 2 p + d (k - 1) + output_padding + 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable
from psgfunc.functional.conv import _SPATIAL, IntOrTuple, _kernel_dim, _ntuple
from psgfunc.functional.linear import _uniform

__all__ = ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "init_conv_transpose"]

_OPS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_groups(groups: Any, fn: str) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{fn}: groups={groups!r} must be a positive int")
    return groups


def _conf(
    dim: int, fn: str, stride: Any, padding: Any, output_padding: Any, dilation: Any
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stride, padding, output_padding, dilation)`` as ``dim``-tuples, checked.

    Raises:
        ValueError: a malformed value, a string padding, or an ``output_padding`` that is
            not smaller than the stride or the dilation of its dim.
    """
    if isinstance(padding, str):
        raise ValueError(
            f"{fn}: padding={padding!r}: a transposed convolution takes int padding only (an "
            f"int or a tuple of {dim} ints), as torch.nn.ConvTranspose{dim}d"
        )
    stride_t = _ntuple(stride, dim, "stride", fn, minimum=1)
    padding_t = _ntuple(padding, dim, "padding", fn, minimum=0)
    output_padding_t = _ntuple(output_padding, dim, "output_padding", fn, minimum=0)
    dilation_t = _ntuple(dilation, dim, "dilation", fn, minimum=1)
    for op, s, d in zip(output_padding_t, stride_t, dilation_t):
        if op >= s and op >= d:
            raise ValueError(
                f"{fn}: output_padding={output_padding_t} must be smaller than the stride "
                f"{stride_t} or the dilation {dilation_t} in every dim (it only picks one of "
                "the output sizes a strided transposed convolution can map from)"
            )
    return stride_t, padding_t, output_padding_t, dilation_t


def _check(params: dict[str, torch.Tensor], x: torch.Tensor, dim: int, groups: int, fn: str) -> None:
    """Raise a ValueError naming the fix when ``params``/``x`` do not fit the layer."""
    weight = params.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != dim + 2:
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise ValueError(
            f"{fn}: params['weight'] must be [C_in, C_out/groups, {'k, ' * (dim - 1)}k] "
            f"({dim + 2}-D), got {shape}; build params with init_conv_transpose(..., dim={dim})"
        )
    _check_groups(groups, fn)
    if not isinstance(x, torch.Tensor) or x.dim() not in (dim + 1, dim + 2):
        spatial = _SPATIAL[dim]
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{fn}: x must be [C_in, {spatial}] (one example) or [B, C_in, {spatial}] (a "
            f"batch), got {shape}"
        )
    in_channels = weight.shape[0]
    if in_channels % groups != 0:
        raise ValueError(
            f"{fn}: in_channels={in_channels} (weight.shape[0]) is not divisible by groups={groups}"
        )
    channels = x.shape[-dim - 1]
    if channels != in_channels:
        raise ValueError(
            f"{fn}: x has {channels} channels (dim {-dim - 1}) but the weight expects "
            f"weight.shape[0] = {in_channels}; pass x as [C_in, *spatial] or "
            "[B, C_in, *spatial] with matching C_in"
        )
    out_channels = weight.shape[1] * groups
    bias = params.get("bias")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"{fn}: params['bias'] must be [{out_channels}] (out_channels = weight.shape[1] * "
            f"groups), got {tuple(bias.shape)}"
        )


def _conv_transpose(
    dim: int,
    fn: str,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    stride: Any,
    padding: Any,
    output_padding: Any,
    groups: int,
    dilation: Any,
) -> torch.Tensor:
    _check(params, x, dim, groups, fn)
    s, p, op, d = _conf(dim, fn, stride, padding, output_padding, dilation)
    return _OPS[dim](x, params["weight"], params.get("bias"), s, p, op, groups, d)


_DOC = """{d}-D transposed convolution, as ``torch.nn.ConvTranspose{d}d``.

    Shapes: one example ``[C_in, {sp}] -> [C_out, {spo}]``, a batch
    ``[B, C_in, {sp}] -> [B, C_out, {spo}]``, with per spatial dim
    ``S' = (S - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.

    Args:
        params: ``{{"weight": [C_in, C_out/groups, {ks}], "bias": [C_out]}}``; ``bias`` may be
            absent or None.
        x: ``[C_in, {sp}]`` or ``[B, C_in, {sp}]``.
        stride: an int or a {d}-tuple.
        padding: an int or a {d}-tuple (``dilation * (k - 1) - padding`` zeros pad each side
            of the equivalent direct convolution).
        output_padding: an int or a {d}-tuple added to one side of each output dim; smaller
            than the stride or the dilation of that dim.
        groups: ``C_in`` and ``C_out`` are split into this many independent groups.
        dilation: an int or a {d}-tuple.

    Returns:
        ``[C_out, {spo}]`` or ``[B, C_out, {spo}]``.

    Raises:
        ValueError: wrong input rank, channel mismatch with the weight, ``C_in`` not
            divisible by ``groups``, a string padding, an ``output_padding`` too large.
    """


def _doc(d: int) -> str:
    sp = _SPATIAL[d]
    spo = ", ".join(f"{s}'" for s in sp.split(", "))
    return _DOC.format(d=d, sp=sp, spo=spo, ks=", ".join(["k"] * d))


@dispatchable
def conv_transpose1d(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
) -> torch.Tensor:
    return _conv_transpose(1, "conv_transpose1d", params, x, stride, padding, output_padding, groups, dilation)


@dispatchable
def conv_transpose2d(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
) -> torch.Tensor:
    return _conv_transpose(2, "conv_transpose2d", params, x, stride, padding, output_padding, groups, dilation)


@dispatchable
def conv_transpose3d(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
) -> torch.Tensor:
    return _conv_transpose(3, "conv_transpose3d", params, x, stride, padding, output_padding, groups, dilation)


for _d, _f in ((1, conv_transpose1d), (2, conv_transpose2d), (3, conv_transpose3d)):
    _f.__doc__ = _doc(_d)
    if hasattr(_f, "plain"):
        _f.plain.__doc__ = _f.__doc__


def init_conv_transpose(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    bias: bool = True,
    dilation: IntOrTuple = 1,
    *,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`conv_transpose1d`/``2d``/``3d`` with ``torch.nn.ConvTransposeNd``'s init.

    Weight and bias are drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with torch.nn's
    ``fan_in = weight.shape[1] * prod(kernel_size) = out_channels / groups * prod(kernel_size)``
    (kaiming_uniform with ``a=sqrt(5)`` for the weight), the weight first, then the bias.
    ``stride``, ``padding``, ``output_padding`` and ``dilation`` do not change the params;
    they are checked and accepted so that the constructor's arguments can be passed as they are.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: a tuple with one size per spatial dim (its length is the dimension), or
            an int together with ``dim``.
        stride: as the layer's (checked only).
        padding: as the layer's (checked only).
        output_padding: as the layer's (checked only).
        groups: must divide ``in_channels`` and ``out_channels``.
        bias: whether to include a ``"bias"`` entry.
        dilation: as the layer's (checked only).
        dim: 1, 2 or 3 spatial dims; needed when ``kernel_size`` is an int, and must agree
            with ``len(kernel_size)`` otherwise.
        dtype: floating dtype (default: torch's default dtype).
        device: where to allocate.
        generator: random generator (default: torch's global one).

    Returns:
        ``{"weight": [in_channels, out_channels / groups, *kernel_size], "bias": [out_channels]}``
        (no ``bias`` key when ``bias=False``).

    Raises:
        ValueError: an int ``kernel_size`` without ``dim``, a ``dim`` other than 1-3 or
            disagreeing with ``kernel_size``, channels not divisible by ``groups``, a
            malformed stride/padding/output_padding/dilation.
    """
    fn = "init_conv_transpose"
    dim, kernel = _kernel_dim(kernel_size, dim, fn)
    _conf(dim, fn, stride, padding, output_padding, dilation)
    _check_groups(groups, fn)
    if in_channels < 0 or out_channels < 0:
        raise ValueError(
            f"{fn}: in_channels={in_channels} and out_channels={out_channels} must be >= 0"
        )
    if in_channels % groups != 0:
        raise ValueError(f"{fn}: in_channels={in_channels} is not divisible by groups={groups}")
    if out_channels % groups != 0:
        raise ValueError(f"{fn}: out_channels={out_channels} is not divisible by groups={groups}")
    fan_in = out_channels // groups * math.prod(kernel)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    kwargs = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    shape = (in_channels, out_channels // groups, *kernel)
    params = {"weight": _uniform(shape, bound, generator, **kwargs)}
    if bias:
        params["bias"] = _uniform((out_channels,), bound, generator, **kwargs)
    return params
