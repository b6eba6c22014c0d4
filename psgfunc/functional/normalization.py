"""Normalisation layers that normalise each example on its own.

Layer normalisation over the trailing dims (Ba, Kiros and Hinton, 2016, arXiv:1607.06450),
group normalisation over groups of channels (Wu and He, 2018, arXiv:1803.08494), instance
normalisation over each channel's positions (Ulyanov, Vedaldi and Lempitsky, 2016,
arXiv:1607.08022) and root-mean-square normalisation over the trailing dims (Zhang and
Sennrich, 2019, arXiv:1910.07467). None of them keeps running statistics, so none mixes the
examples of a batch (BatchNorm does, and has no per-sample gradients).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable
from psgfunc.functional import _autocast

__all__ = [
    "layer_norm",
    "init_layer_norm",
    "group_norm",
    "init_group_norm",
    "instance_norm",
    "init_instance_norm",
    "rms_norm",
    "init_rms_norm",
]


def _normalized_shape(normalized_shape: Any, fn: str) -> tuple[int, ...]:
    """``normalized_shape`` (an int or a non-empty sequence of positive ints) as a tuple."""
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        shape: tuple[Any, ...] = (normalized_shape,)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)):
        shape = tuple(normalized_shape)
    else:
        raise ValueError(
            f"{fn}: normalized_shape={normalized_shape!r} must be an int or a tuple of ints"
        )
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(
            f"{fn}: normalized_shape={normalized_shape!r} must hold at least one int, all > 0"
        )
    return shape


@dispatchable
def layer_norm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Normalise over the trailing ``normalized_shape`` dims, as ``torch.nn.LayerNorm``.

    With ``N`` the trailing dims, ``y = (x - mean_N(x)) / sqrt(var_N(x) + eps) * weight + bias``
    (``var`` is the biased variance). Statistics are per position, so one example and a batch
    give the same rows. Shapes: ``[*, *N] -> [*, *N]`` (one example ``[T, D] -> [T, D]``, a
    batch ``[B, T, D] -> [B, T, D]`` with ``N = (D,)``).

    Args:
        params: ``{"weight": N, "bias": N}``, each optional: ``{}`` is no affine transform,
            ``{"weight": ...}`` alone is ``nn.LayerNorm(bias=False)``.
        x: input whose trailing dims equal ``normalized_shape``.
        normalized_shape: an int or a tuple, usually of 1 to 3 dims.
        eps: added to the variance.

    Returns:
        The normalised ``x``, same shape.

    Raises:
        ValueError: ``x``'s trailing dims or a param's shape differ from ``normalized_shape``.
    """
    shape = _normalized_shape(normalized_shape, "layer_norm")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise ValueError(
            f"layer_norm: x of shape {tuple(x.shape)} does not end in normalized_shape={shape}; "
            "pass the trailing dims of x as normalized_shape"
        )
    weight, bias = params.get("weight"), params.get("bias")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(
                f"layer_norm: params[{name!r}] has shape {tuple(p.shape)}, expected "
                f"normalized_shape={shape}; build params with init_layer_norm({shape})"
            )
    return F.layer_norm(_autocast.to_float32(x), shape, weight, bias, eps)  # autocast: float32


def init_layer_norm(
    normalized_shape: int | tuple[int, ...],
    *,
    elementwise_affine: bool = True,
    bias: bool = True,
    dtype: torch.dtype | None = None,
    device: Any = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`layer_norm`, as ``torch.nn.LayerNorm`` initialises them.

    Args:
        normalized_shape: an int or a tuple of the trailing dims.
        elementwise_affine: whether to have any params at all.
        bias: whether to include a ``"bias"`` (only with ``elementwise_affine``).
        dtype: floating dtype (default: torch's default dtype).
        device: where to allocate.

    Returns:
        ``{"weight": ones(N), "bias": zeros(N)}``; no ``bias`` key when ``bias=False``, and
        ``{}`` when ``elementwise_affine=False``.

    Raises:
        ValueError: a malformed ``normalized_shape``.
    """
    shape = _normalized_shape(normalized_shape, "init_layer_norm")
    if not elementwise_affine:
        return {}
    kwargs = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    params = {"weight": torch.ones(shape, **kwargs)}
    if bias:
        params["bias"] = torch.zeros(shape, **kwargs)
    return params


def _positive_int(value: Any, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: {name}={value!r} must be a positive int")
    return value


def _check_channel_params(params: dict[str, torch.Tensor], channels: int, fn: str, x: torch.Tensor, init: str) -> None:
    """``params``' ``weight``/``bias`` (each optional) must be ``[C]`` with ``C = x.shape[1]``."""
    for name in ("weight", "bias"):
        p = params.get(name)
        if p is not None and tuple(p.shape) != (channels,):
            hint = ""
            if x.dim() >= 1 and p.dim() == 1 and x.shape[0] == p.shape[0]:
                hint = (" (x looks like ONE example [C, *S]: torch's op reads dim 0 as the batch, "
                        "so pass x.unsqueeze(0))")
            raise ValueError(
                f"{fn}: params[{name!r}] has shape {tuple(p.shape)} but x of shape {tuple(x.shape)} "
                f"has C={channels} channels at dim 1{hint}; build params with {init}"
            )


@dispatchable
def group_norm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    num_groups: int,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Normalise each example over groups of channels, as ``torch.nn.GroupNorm``.

    The ``C`` channels are split into ``num_groups`` groups of ``C / num_groups``
    consecutive channels; each row's group is normalised over its channels and positions
    (biased variance), then ``y = x_hat * weight[c] + bias[c]`` per channel. Shapes:
    ``[N, C, *S] -> [N, C, *S]`` with dim 0 the rows, as torch's ``group_norm`` always reads
    it: one example of a CNN is ``[1, C, H, W]`` (``x.unsqueeze(0)``; a ``[C, H, W]`` tensor
    would be read as ``C`` rows of ``H`` channels). Rows never mix, so under
    ``per_sample_grads`` an example may hold any number of rows.

    Args:
        params: ``{"weight": [C], "bias": [C]}``, each optional: ``{}`` is ``affine=False``,
            ``{"weight": ...}`` alone is ``nn.GroupNorm(..., bias=False)``.
        x: ``[N, C, *S]`` (``S`` may be empty).
        num_groups: how many groups; must divide ``C``.
        eps: added to the variance.

    Returns:
        The normalised ``x``, same shape.

    Raises:
        ValueError: ``x`` with fewer than 2 dims, ``num_groups`` not dividing ``C``, or a
            param not shaped ``[C]``.
    """
    _positive_int(num_groups, "num_groups", "group_norm")
    if x.dim() < 2:
        raise ValueError(
            f"group_norm: x of shape {tuple(x.shape)} must be shaped [N, C, *S] (rows first, "
            "as torch's group_norm); for one example of C channels pass x.reshape(1, C, -1)"
        )
    channels = x.shape[1]
    _check_channel_params(params, channels, "group_norm", x, f"init_group_norm({num_groups}, {channels})")
    if channels % num_groups:
        raise ValueError(
            f"group_norm: num_groups={num_groups} must divide the C={channels} channels at dim 1 "
            f"of x (shape {tuple(x.shape)}); pick a divisor of {channels} (x is [N, C, *S]: one "
            "example [C, *S] is x.unsqueeze(0))"
        )
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None and bias is not None:  # torch's fused kernel fails its backward then
        return _channel_affine(F.group_norm(x, num_groups, None, None, eps), None, bias)
    return F.group_norm(x, num_groups, weight, bias, eps)


def _channel_init(channels: int, affine: bool, bias: bool, dtype: Any, device: Any) -> dict[str, torch.Tensor]:
    if not affine:
        return {}
    kwargs = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    params = {"weight": torch.ones(channels, **kwargs)}
    if bias:
        params["bias"] = torch.zeros(channels, **kwargs)
    return params


def init_group_norm(
    num_groups: int,
    num_channels: int,
    eps: float = 1e-5,
    affine: bool = True,
    device: Any = None,
    dtype: torch.dtype | None = None,
    *,
    bias: bool = True,
) -> dict[str, torch.Tensor]:
    """Params for :func:`group_norm`, as ``torch.nn.GroupNorm`` initialises them.

    Takes ``torch.nn.GroupNorm``'s constructor arguments in its order; ``eps`` is not a
    parameter (pass it to :func:`group_norm`) and is accepted so that the same arguments
    build both.

    Args:
        num_groups: how many groups; must divide ``num_channels``.
        num_channels: ``C``.
        eps: the layer's ``eps`` (checked, not stored).
        affine: whether to have any params at all.
        device: where to allocate.
        dtype: floating dtype (default: torch's default dtype).
        bias: whether to include a ``"bias"`` (only with ``affine``).

    Returns:
        ``{"weight": ones(C), "bias": zeros(C)}``; no ``bias`` key when ``bias=False``, and
        ``{}`` when ``affine=False``.

    Raises:
        ValueError: non-positive sizes, ``num_groups`` not dividing ``num_channels``, or a
            negative ``eps``.
    """
    _positive_int(num_groups, "num_groups", "init_group_norm")
    _positive_int(num_channels, "num_channels", "init_group_norm")
    if num_channels % num_groups:
        raise ValueError(
            f"init_group_norm: num_groups={num_groups} must divide num_channels={num_channels}"
        )
    _check_eps(eps, "init_group_norm")
    return _channel_init(num_channels, affine, bias, dtype, device)


def _check_eps(eps: Any, fn: str) -> None:
    if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
        raise ValueError(f"{fn}: eps={eps!r} must be a float >= 0")


@dispatchable
def instance_norm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Normalise each row's channels over their positions, as ``torch.nn.InstanceNorm1d/2d/3d``
    (``track_running_stats=False``: no running statistics, in training and evaluation alike).

    ``y[n, c] = (x[n, c] - mean_S) / sqrt(var_S + eps) * weight[c] + bias[c]`` (biased
    variance over the positions ``S``). Shapes: ``[N, C, *S] -> [N, C, *S]`` with dim 0 the
    rows, as torch's ``instance_norm`` always reads it (the functional op cannot tell
    ``InstanceNorm1d``'s one example ``[C, L]`` from a batch, so it never guesses): one example
    is ``x.unsqueeze(0)``. Under ``per_sample_grads`` an example may hold any number of rows.

    Args:
        params: ``{"weight": [C], "bias": [C]}``, each optional (``{}``: ``affine=False``,
            the torch.nn default).
        x: ``[N, C, *S]`` with at least one position dim and more than one position.
        eps: added to the variance.

    Returns:
        The normalised ``x``, same shape.

    Raises:
        ValueError: ``x`` with fewer than 3 dims, a single position, or a param not shaped
            ``[C]``.
    """
    if x.dim() < 3:
        raise ValueError(
            f"instance_norm: x of shape {tuple(x.shape)} must be shaped [N, C, *S] with at "
            "least one position dim (rows first, as torch's instance_norm); for one example "
            "[C, *S] pass x.unsqueeze(0)"
        )
    _check_channel_params(params, x.shape[1], "instance_norm", x, f"init_instance_norm({x.shape[1]}, affine=True)")
    weight, bias = params.get("weight"), params.get("bias")
    if x.shape[0] == 0 and (weight is not None or bias is not None):
        # torch's instance_norm fails on an empty batch with affine params (it indexes row 0)
        return _channel_affine(F.instance_norm(x, eps=eps), weight, bias)
    return F.instance_norm(x, weight=weight, bias=bias, eps=eps)


def _channel_affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y [N, C, *S] * weight[c] + bias[c]`` (either may be None)."""
    view = (y.shape[1], *(1,) * (y.dim() - 2))
    if weight is not None:
        y = y * weight.reshape(view)
    return y if bias is None else y + bias.reshape(view)


def init_instance_norm(
    num_features: int,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = False,
    track_running_stats: bool = False,
    device: Any = None,
    dtype: torch.dtype | None = None,
    *,
    bias: bool = True,
) -> dict[str, torch.Tensor]:
    """Params for :func:`instance_norm`, as ``torch.nn.InstanceNorm1d/2d/3d`` initialise them.

    Takes their constructor arguments in their order; ``eps`` and ``momentum`` are not
    parameters (``momentum`` only matters with running statistics, which psgfunc refuses).

    Args:
        num_features: ``C``.
        eps: the layer's ``eps`` (checked, not stored).
        momentum: unused (no running statistics).
        affine: whether to have params (torch.nn's default: no).
        track_running_stats: must be False: running statistics average over the examples of
            each batch (they mix examples and release data outside DP accounting).
        device: where to allocate.
        dtype: floating dtype (default: torch's default dtype).
        bias: whether to include a ``"bias"`` (only with ``affine``).

    Returns:
        ``{"weight": ones(C), "bias": zeros(C)}`` when ``affine``, else ``{}``.

    Raises:
        ValueError: a non-positive ``num_features``, a negative ``eps`` or
            ``track_running_stats=True``.
    """
    _positive_int(num_features, "num_features", "init_instance_norm")
    _check_eps(eps, "init_instance_norm")
    if track_running_stats:
        raise ValueError(
            "init_instance_norm: track_running_stats=True is not supported: running statistics "
            "average over the examples of each batch (they mix examples and would release "
            "data outside DP-SGD's accounting); use track_running_stats=False"
        )
    return _channel_init(num_features, affine, bias, dtype, device)


@dispatchable
def rms_norm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    *,
    eps: float | None = None,
) -> torch.Tensor:
    """Root-mean-square normalisation over the trailing dims, as ``torch.nn.RMSNorm``.

    With ``N`` the trailing dims, ``y = x / sqrt(mean_N(x^2) + eps) * weight``. Statistics
    are per position, so one example and a batch give the same rows. Shapes:
    ``[*, *N] -> [*, *N]`` (one example ``[T, D]``, a batch ``[B, T, D]`` with ``N = (D,)``).

    Args:
        params: ``{"weight": N}``, or ``{}`` (``elementwise_affine=False``).
        x: input whose trailing dims equal ``normalized_shape``.
        normalized_shape: an int or a tuple, usually of 1 to 3 dims.
        eps: added to the mean square; None (default) is ``torch.finfo(x.dtype).eps``, as
            ``torch.nn.RMSNorm``.

    Returns:
        The normalised ``x``, same shape.

    Raises:
        ValueError: ``x``'s trailing dims or the weight's shape differ from
            ``normalized_shape``, or a ``"bias"`` (RMSNorm has none).
    """
    shape = _normalized_shape(normalized_shape, "rms_norm")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise ValueError(
            f"rms_norm: x of shape {tuple(x.shape)} does not end in normalized_shape={shape}; "
            "pass the trailing dims of x as normalized_shape"
        )
    _check_rms_params(params, shape)
    return F.rms_norm(x, shape, params.get("weight"), eps)


def _check_rms_params(params: dict[str, Any], shape: tuple[int, ...]) -> None:
    if params.get("bias") is not None:
        raise ValueError(
            "rms_norm: params has a 'bias', but RMSNorm has a weight only; drop it (or use "
            "layer_norm)"
        )
    weight = params.get("weight")
    if weight is not None and tuple(weight.shape) != shape:
        raise ValueError(
            f"rms_norm: params['weight'] has shape {tuple(weight.shape)}, expected "
            f"normalized_shape={shape}; build params with init_rms_norm({shape})"
        )


def init_rms_norm(
    normalized_shape: int | tuple[int, ...],
    eps: float | None = None,
    elementwise_affine: bool = True,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`rms_norm`, as ``torch.nn.RMSNorm`` initialises them (its
    constructor's arguments in its order; ``eps`` is checked, not stored).

    Returns:
        ``{"weight": ones(N)}``, or ``{}`` when ``elementwise_affine=False``.

    Raises:
        ValueError: a malformed ``normalized_shape`` or a negative ``eps``.
    """
    shape = _normalized_shape(normalized_shape, "init_rms_norm")
    _check_eps(eps, "init_rms_norm")
    if not elementwise_affine:
        return {}
    return {"weight": torch.ones(shape, dtype=dtype or torch.get_default_dtype(), device=device)}
