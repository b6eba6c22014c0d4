"""Rule for :func:`psgfunc.functional.linear`.

Forward: the ordinary ``F.linear`` with the shared weight. Backward: the input gradient
``g W`` and, per example b, ``dW_b = sum_n g_bn^T x_bn`` (sum over any sequence dims n),
one batched contraction (Goodfellow 2015, "Efficient per-example gradient computations").

Under ``torch.autocast`` the layer runs as autocast runs ``F.linear``: the input and the
shared weight and bias are cast to the autocast dtype (the input by a differentiable cast
before the function, the weights inside it), and the backward computes in that dtype;
:func:`emit` gives the per-sample gradients in the parameters' dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from psgfunc import _rules
from psgfunc.functional import _autocast
from psgfunc.functional.linear import linear
from psgfunc.per_sample._expanded import (
    Rule,
    apply_function,
    call_collected,
    call_rule,
    check_versions,
    is_shared,
    repeated,
    shared,
    versions,
)
from psgfunc.per_sample._kinds import Outer, RowSum, _as, emit, output_collector

_OUTER, _ROWSUM = Outer(), RowSum()


class _LinearPerSample(torch.autograd.Function):
    """``x [B, *, I], w [B, O, I] (shared), b [B, O] -> [B, *, O]`` with per-sample grads."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        dtype = _autocast.autocast_dtype(x)  # x is already in it (LinearRule casts it)
        if dtype is None:  # (no context manager: a small layer's step pays per call)
            return _own(F.linear(x, repeated(w), None if b is None else repeated(b)))
        with _autocast.disabled(x):
            return _own(F.linear(x, _autocast.cast(repeated(w), dtype), None if b is None else _autocast.cast(repeated(b), dtype)))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, b = inputs
        ctx.save_for_backward(x)
        # the params by identity, not saved: emit finds a Collector's record on the tensor
        # object itself, which a saved tensor's unpacked copy (saved_tensors_hooks) lacks
        ctx.weight, ctx.bias = w, b
        ctx.versions = versions(w)  # (not saved: autograd does not check it for us)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        w, b = ctx.weight, ctx.bias
        check_versions(ctx.versions, "linear", w)
        need = ctx.needs_input_grad
        # (create_graph: the shared view of w, so that the input gradient reaches w too)
        wm = shared(w) if torch.is_grad_enabled() else repeated(w)
        gx = g @ _as(wm, g.dtype) if need[0] else None  # autocast: in g's dtype
        g3, x3 = _positions(g, x, w.shape[0])
        gw = emit(w, _OUTER, g3, x3) if need[1] else None
        gb = emit(b, _ROWSUM, g3) if b is not None and need[2] else None
        return gx, gw, gb


def _own(out: torch.Tensor) -> torch.Tensor:
    """``out``, not as a view: ``F.linear`` of a ``[B, *, I]`` input returns a view of its
    ``[B * N, O]`` product, and autograd refuses in-place changes to a view made inside a
    custom Function (``nn.ReLU(inplace=True)`` after an ``nn.Linear``, which plain torch
    allows). Same storage and version counter; the forward runs without autograd."""
    return out if out._base is None else out.detach()


def _positions(g: torch.Tensor, x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``g [B, *, O], x [B, *, I] -> [B, N, O], [B, N, I]`` (N positions per example; explicit
    sizes: B may be 0)."""
    n = math.prod(x.shape[1:-1])
    return g.reshape(size, n, g.shape[-1]), x.reshape(size, n, x.shape[-1])


def _output_tapped(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """The layer for fast clipping's own backward (:meth:`~psgfunc.per_sample._kinds.Collector.output`),
    or None where that does not apply (other callers, autocast, mixed dtypes, an inference
    tensor).

    ``y = addmm(z, x, W^T)`` (as ``F.linear(x, W, z)``) with ``z`` a leaf holding the bias
    broadcast over the rows (zero without one; stride 0, no memory): torch's backward gives
    the input gradient, the gradient of ``z`` is the output gradient ``g`` (``y`` is ``z``
    plus a term without it, also after in-place ops on ``y``), and the pieces are ``(g, x)``
    as the backward of :class:`_LinearPerSample` would emit them. ``x`` changed in place
    between this forward and the backward raises, as a saved tensor does."""
    found = output_collector(w, b)
    weight = repeated(w)
    if found is None or _autocast.autocast_dtype(x) is not None or x.dtype != weight.dtype or x.is_inference():
        return None  # (an inference tensor: the Function's save raises autograd's own error)
    collector, (iw, ib) = found
    size, n_out = w.shape[0], weight.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    base = weight.new_zeros(()) if b is None else repeated(b)
    z = base.expand(x2.shape[0], n_out)
    z = (z.detach() if z.requires_grad else z).requires_grad_(True)
    y = F.linear(x2, weight, z)  # (addmm(z, x2, weight.t()), the transpose inside)
    saved, version = x.detach(), x._version

    def build(g: torch.Tensor) -> list[tuple[int, Any, Any]]:
        if saved._version != version:
            raise RuntimeError(
                "psgfunc linear: the input of a linear layer was modified in place after the "
                "layer used it (fast clipping needs it for the per-example norms); use an "
                "out-of-place op (e.g. torch.relu(x), not x.relu_()) on a layer's input"
            )
        g3, x3 = _positions(g, saved, size)
        return [(iw, _OUTER, (g3, x3))] + ([] if ib is None else [(ib, _ROWSUM, (g3,))])

    collector.output(z, build)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)


class LinearRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.linear` (batch dim 0 of ``x``)."""

    def batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        w, b = params["weight"], params.get("bias")
        if x.dim() < 2 or x.shape[0] != w.shape[0]:
            raise ValueError(
                f"linear on a batch of {w.shape[0]} examples needs x shaped [B, ..., "
                f"{w.shape[-1]}] with B = {w.shape[0]}, got {tuple(x.shape)}"
            )
        if is_shared(w) and (b is None or is_shared(b)):
            out = _output_tapped(x, w, b)
            if out is not None:
                return out
            x = _autocast.cast(x, _autocast.autocast_dtype(x))  # autocast: x in its dtype
            return apply_function(_LinearPerSample, x, w, b)
        out = torch.einsum("bni,boi->bno", x.reshape(x.shape[0], -1, x.shape[-1]), w)
        out = out.reshape(*x.shape[:-1], w.shape[1])
        if b is not None:
            out = out + b.reshape(b.shape[0], *([1] * (x.dim() - 2)), b.shape[1])
        return out

    def tapped(self, tap: Any, params: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        w, b = params["weight"], params.get("bias")
        iw, ib = tap.index(w), tap.index(b)
        if iw is None or (b is not None and ib is None):
            return NotImplemented
        y = self.plain({"weight": w.detach(), "bias": None if b is None else b.detach()}, x)

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            g3, x3 = _positions(g.to(w.dtype), saved[0].to(w.dtype), g.shape[0])  # autocast: as emit
            return [(iw, _OUTER, (g3, x3))] + ([] if ib is None else [(ib, _ROWSUM, (g3,))])

        return tap.out(y, (x,), build)


LINEAR = LinearRule(linear.plain)


def _collected(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The tapped layer on the batch (:func:`~psgfunc.per_sample._expanded.call_collected`),
    or None where the rule's checks or its other routes are needed."""
    w = params.get("weight")
    if w is None or len(params) > 2 or x.dim() < 2 or x.shape[0] != w.shape[0]:
        return None
    return _output_tapped(x, w, params.get("bias"))


@_rules.register_rule(linear)
def _linear(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # (eager fast clipping's pass: straight to the tapped layer; anything else: the rule)
    out = call_collected(_collected, params, x)
    return call_rule(LINEAR, params, x) if out is NotImplemented else out
