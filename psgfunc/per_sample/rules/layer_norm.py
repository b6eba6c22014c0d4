"""Rule for :func:`psgfunc.functional.layer_norm`.

LayerNorm is ``y = x_hat * weight + bias`` with ``x_hat`` the input normalised over the
trailing ``N`` dims. The normalisation has no parameters and its statistics are per
position, so it runs as the ordinary ``F.layer_norm`` without affine (ordinary autograd).
Only the elementwise affine step needs per-sample gradients; for ``x_hat, g = dL/dy`` shaped
``[B, *, *N]``::

    dweight_b = sum over the middle dims * of g_b * x_hat_b        [B, *N]
    dbias_b   = sum over the middle dims * of g_b                  [B, *N]

computed in the affine op's backward with the forward run on the shared ``weight[0]``.
Under ``torch.autocast`` the input is cast to float32 first, as the layer does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vmap

from psgfunc import _rules
from psgfunc.functional import _autocast
from psgfunc.functional.normalization import _normalized_shape, layer_norm
from psgfunc.per_sample._expanded import Rule, apply_function, call_rule, is_shared
from psgfunc.per_sample._expanded import first as _first
from psgfunc.per_sample._kinds import RowSum, emit, presum, summed_rows

__all__ = ["LayerNormRule"]


def _affine(x_hat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``x_hat * weight + bias`` (either may be None)."""
    if weight is None:
        return x_hat + bias
    if bias is None:
        return x_hat * weight
    return torch.addcmul(bias, x_hat, weight)


class _LayerNormPerSample(torch.autograd.Function):
    """``x [B, *, *N], w [B, *N], b [B, *N] (shared) -> (layer_norm(x) * w[0] + b[0], mean,
    rstd)`` in one kernel, saving what ``torch``'s own layer norm saves (``x`` and the
    per-position statistics): ``x_hat`` is recomputed in the backward rather than kept
    next to the output from the forward to the backward (a second ``[B, *, *N]`` tensor per
    layer, as large as the output itself)."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
                shape: tuple[int, ...], eps: float) -> Any:  # type: ignore[override]
        w0, b0 = (None if p is None else _first(p).to(x.dtype) for p in (w, b))
        return torch.native_layer_norm(x, shape, w0, b0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, b, shape, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, w, b)
        # the expanded params by identity for emit too: a saved tensor may come back from
        # saved-tensor hooks (checkpoint, offloading) as another object, without its Collector
        ctx.shape = shape
        ctx.weight, ctx.bias = w, b

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _mean: Any, _rstd: Any) -> Any:
        x, mean, rstd, w, b = ctx.saved_tensors
        norm = ctx.shape
        size = x.shape[0]
        positions = math.prod(g.shape[1 : g.dim() - len(norm)])
        g3 = g.reshape(size, positions, math.prod(norm))  # [B, positions, K]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w0, b0 = (None if p is None else _first(p).to(x.dtype) for p in (ctx.weight, ctx.bias))
            gx = torch.ops.aten.native_layer_norm_backward(g, x, list(norm), mean, rstd, w0, b0,
                                                           [True, False, False])[0]
        # each example's sum over its positions, [B, 1, K]: what fast clipping records is
        # then K numbers per example, not the [B, positions, K] product (nor g, which no
        # other piece keeps) held until the clip factors are known
        if w is not None and ctx.needs_input_grad[1]:
            x_hat = ((x - mean) * rstd).reshape(g3.shape)
            s, a = presum(g3 * x_hat, (1,))  # with the bound of the sum's rounding
            gw = emit(ctx.weight, summed_rows(norm), s.unsqueeze(1), a)
        if b is not None and ctx.needs_input_grad[2]:
            s, a = presum(g3, (1,))
            gb = emit(ctx.bias, summed_rows(norm), s.unsqueeze(1), a)
        return gx, gw, gb, None, None


class LayerNormRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.layer_norm` (batch dim 0 of ``x``)."""

    def batched(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        normalized_shape: int | tuple[int, ...],
        *,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        shape = _normalized_shape(normalized_shape, "layer_norm")
        w, b = params.get("weight"), params.get("bias")
        present = [p for p in (w, b) if p is not None]
        if x.dim() < len(shape) + 1 or tuple(x.shape[x.dim() - len(shape) :]) != shape:
            raise ValueError(
                f"layer_norm on a batch needs x shaped [B, *, {', '.join(map(str, shape))}], "
                f"got {tuple(x.shape)}; pass the trailing dims of x as normalized_shape and "
                "keep the batch dim first"
            )
        for name, p in (("weight", w), ("bias", b)):
            if p is not None and (tuple(p.shape[1:]) != shape or p.shape[0] != x.shape[0]):
                raise ValueError(
                    f"layer_norm: params[{name!r}] has per-example shape {tuple(p.shape[1:])} "
                    f"for {p.shape[0]} examples, expected normalized_shape={shape} for the "
                    f"{x.shape[0]} examples of x; build params with init_layer_norm({shape})"
                )
        x = _autocast.to_float32(x)  # autocast: in float32, as the layer
        if not present:
            return F.layer_norm(x, shape, None, None, eps)
        if not all(is_shared(p) for p in present):
            return vmap(lambda p, xi: self.plain(p, xi, shape, eps=eps))(params, x)
        return apply_function(_LayerNormPerSample, x, w, b, shape, eps)[0]

    def tapped(
        self,
        tap: Any,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        normalized_shape: int | tuple[int, ...],
        *,
        eps: float = 1e-5,
    ) -> Any:
        w, b = params.get("weight"), params.get("bias")
        iw, ib = tap.index(w), tap.index(b)
        if (w is None and b is None) or (w is not None and iw is None) or (b is not None and ib is None):
            return NotImplemented
        shape = _normalized_shape(normalized_shape, "layer_norm")
        if (x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape
                or any(p is not None and tuple(p.shape) != shape for p in (w, b))):
            return NotImplemented  # the plain layer raises its own error
        x_hat = F.layer_norm(_autocast.to_float32(x), shape, None, None, eps)  # autocast: as the layer
        y = _affine(x_hat, None if w is None else w.detach(), None if b is None else b.detach())
        kind = RowSum(shape)  # not the lru_cache: torch.compile traces this

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            g3 = g.reshape(g.shape[0], -1, math.prod(shape))  # [B, positions, K]
            out = [] if iw is None else [(iw, kind, (g3 * saved[0].reshape(g3.shape),))]
            return out + ([] if ib is None else [(ib, kind, (g3,))])

        return tap.out(y, (x_hat,), build)


LAYER_NORM = LayerNormRule(layer_norm.plain)


@_rules.register_rule(layer_norm)
def _layer_norm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    return call_rule(LAYER_NORM, params, x, normalized_shape, eps=eps)
