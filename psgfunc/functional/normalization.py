"""Layer normalisation over the trailing dims (Ba, Kiros and Hinton, 2016, arXiv:1607.06450)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable
from psgfunc.functional import _autocast

__all__ = ["layer_norm", "init_layer_norm"]


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
