"""Linear layer: ``y = x W^T + b``."""

from __future__ import annotations

import math
from typing import Any

import torch

from psgfunc._rules import dispatchable
from psgfunc.functional import _autocast

__all__ = ["linear", "init_linear"]


@dispatchable
def linear(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Affine map over the last dimension, as ``torch.nn.Linear``.

    Shapes: ``[*, I] -> [*, O]`` (one example ``[I] -> [O]``, a batch ``[B, I] -> [B, O]``,
    a sequence ``[B, T, I] -> [B, T, O]``).

    Args:
        params: ``{"weight": [O, I], "bias": [O]}``; ``bias`` may be absent or None.
        x: input whose last dimension is ``I``.

    Returns:
        ``x @ weight.T + bias``.
    """
    return _autocast.linear(x, params["weight"], params.get("bias"))


def init_linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`linear` with ``torch.nn.Linear``'s default initialisation.

    Weight and bias are drawn from ``U(-1/sqrt(in_features), 1/sqrt(in_features))`` (what
    kaiming_uniform with ``a=sqrt(5)`` gives for the weight).

    Returns:
        ``{"weight": [out_features, in_features], "bias": [out_features]}`` (no ``bias`` key
        when ``bias=False``).
    """
    if in_features < 0 or out_features < 0:
        raise ValueError(
            f"init_linear: in_features={in_features} and out_features={out_features} must be >= 0"
        )
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    kwargs = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    params = {"weight": _uniform((out_features, in_features), bound, generator, **kwargs)}
    if bias:
        params["bias"] = _uniform((out_features,), bound, generator, **kwargs)
    return params


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None, **kwargs: Any) -> torch.Tensor:
    """``U(-bound, bound)`` of ``shape``; shared by every ``init_*`` of the package."""
    t = torch.empty(shape, **kwargs)
    return t.uniform_(-bound, bound, generator=generator)
