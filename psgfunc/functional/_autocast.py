"""``torch.autocast`` for code that runs ops autocast does not cast (hand-written loops, custom
``autograd.Function`` s, ``torch.convolution``).

Autocast decides per op: matmul-like ops (linear, convolutions, ``mm``/``bmm``, the LSTM's
cells) run in the autocast dtype (bfloat16 on CPU, float16 on GPU by default), a few ops in
float32, the rest in their inputs' dtype. It casts an op's floating inputs except float64.
Layers that do their own work (a fused recurrence, a per-sample rule) follow the same policy
with these helpers: cast the inputs once, compute in that dtype, and let the differentiable
casts bring the gradients back to the inputs' dtypes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autocast_dtype", "cast", "disabled", "to_float32", "off", "linear"]


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a matmul-like op in when ``t`` is its input, or None.

    None when no autocast is enabled for ``t``'s device type, or when autocast leaves ``t``
    as it is (float64 and non-floating tensors).
    """
    if not torch._C._is_any_autocast_enabled() or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    device = t.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return None
        return torch.get_autocast_dtype(device)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return None


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` in ``dtype`` (differentiable); unchanged when ``dtype`` is None, ``t`` is None,
    not floating, float64, or already in ``dtype``.

    Never pass a stride-0 expanded ``[B, *shape]`` view: casting copies it B times; cast the
    one tensor it repeats instead.
    """
    if t is None or dtype is None or t.dtype == dtype or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def to_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as autocast's float32 ops take it: cast to float32 (differentiable) when autocast
    is on for its device, else unchanged. For normalisations, whose statistics bfloat16
    would round (CPU autocast leaves ``layer_norm`` in its input's dtype, GPU autocast runs
    it in float32; here it is float32 on both)."""
    return t if autocast_dtype(t) is None else cast(t, torch.float32)


_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextlib.contextmanager
def off() -> Iterator[None]:
    """A block (or, as ``@off()``, a function) with autocast off on every device type: for
    per-example norms, clip factors and clipped sums, which must not run in half precision
    when a caller's ``torch.autocast`` block encloses them."""
    if not torch._C._is_any_autocast_enabled():
        yield
        return
    with contextlib.ExitStack() as stack:
        for device in _DEVICE_TYPES:
            try:
                enabled = torch.is_autocast_enabled(device)
            except RuntimeError:  # not a device type this build knows
                continue
            if enabled:
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def disabled(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A block with autocast off for ``t``'s device type (code whose inputs are already cast
    computes in their dtype), or a no-op block when autocast is off there anyway."""
    if autocast_dtype(t) is None:
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with autocast's cast made explicit (``[*, I] -> [*, O]``).

    Under ``torch.func`` transforms with a grad-tracked weight, autocast returns float32 from
    ``F.linear`` where the same eager call returns the autocast dtype; casting the operands
    first gives the autocast dtype on every route (the compiled route's plan, made eagerly,
    must match its traced pass)."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight, bias = cast(x, dtype), cast(weight, dtype), cast(bias, dtype)
    return torch.nn.functional.linear(x, weight, bias)
