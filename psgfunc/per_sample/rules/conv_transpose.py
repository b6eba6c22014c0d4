"""Rules for :func:`psgfunc.functional.conv_transpose1d`, ``conv_transpose2d`` and ``conv_transpose3d``.

Forward: ONE ordinary transposed convolution with the shared weight ``w[0]`` (no per-example
weight copy). Backward, for ``x [B, C_in, *S]`` and ``g = dL/dy [B, C_out, *S']``:

* input gradient: ``aten.convolution_backward`` of the transposed convolution (a direct
  convolution of ``g``);
* per-sample weight gradient. Output position ``n * s - p + k * d`` receives ``x[:, n]
  W[:, :, k]`` (stride ``s``, padding ``p``, dilation ``d``), so

      dW_b[i, o, k] = sum_n x_b[i, n] g_b[o, n * s - p + k * d]

  (zero outside ``g``): the patch of ``g`` at input position ``n`` is exactly what
  ``F.unfold(g, k, dilation=d, padding=p, stride=s)`` extracts as its ``n``-th column (its
  first ``S`` columns per dim: with ``output_padding >= stride``, allowed when it is below the
  dilation, unfold finds more). With ``u_bn`` that patch ``[C_out * K]`` and ``x_bn`` the
  input's channels at ``n``, ``dW_b = sum_n x_bn^T u_bn``: an outer-product sum over the
  INPUT positions, the transpose of a convolution's (whose patches come from the input and
  whose positions are the output's). Hence (:class:`ConvTransposeWeight`):

  - norms: ``||dW_b||^2 = sum_{n,m} (x_bn . x_bm)(u_bn . u_bm)`` (two ``[T, T]`` Grams, ghost
    clipping) where ``2 T^2 < C_in * C_out/G * K`` for ungrouped 1-d/2-d layers, plus a
    rounding margin that keeps it from ever falling under the norm of what the clipped sum
    adds (:func:`_certified`: cancelling positions in float32), otherwise from the
    materialised gradient;
  - materialised: one ``bmm`` of the input positions with the unfolded patches (ungrouped
    1-d/2-d layers whose patches fit the unfold budget), else ONE grouped transposed
    convolution gradient with the batch as the groups (``x`` as ``[1, B*C_in, *S]``, ``g`` as
    ``[1, B*C_out, *S']``, ``B*G`` groups: weight gradient ``[B*C_in, C_out/G, *k]``), which
    also covers ``groups > 1`` and 3-d layers exactly;
  - clipped sum ``sum_b c_b dW_b``: the ORDINARY weight gradient of the transposed
    convolution with ``g_b`` scaled by ``c_b`` (one ``convolution_backward``), no per-sample
    tensor;

* per-sample bias gradient: ``g`` summed over its spatial dims (a row sum).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch.func import vmap

from psgfunc import _rules
from psgfunc.functional.conv import _SPATIAL
from psgfunc.functional.conv_transpose import (
    _check,
    _conf,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
)
from psgfunc.per_sample._expanded import Rule, apply_function, call_rule, is_shared
from psgfunc.per_sample._expanded import first as _first
from psgfunc.per_sample._kinds import GradKind, NormBound, SummedRows, emit, outer_bound, presum

__all__ = ["ConvTransposeRule", "ConvTransposeWeight", "per_sample_conv_transpose_weight_grad"]

_SUMMED = SummedRows()
_UNFOLD_MAX = 1 << 20
"""Largest unfolded output-gradient patch matrix (elements) built for the weight gradient's
``bmm`` or its Gram norms; larger layers use the grouped transposed-convolution gradient."""


def _as_2d(kernel, stride, padding, dilation):
    """A 1-d configuration as a 2-d one of height 1 (2-d: unchanged)."""
    if len(kernel) == 1:
        return (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    return kernel, stride, padding, dilation


def _patches(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...], conf: tuple[Any, ...]) -> torch.Tensor:
    """``g [N, B, C_out, *S'] -> [B, N*L, C_out*K]``: at every input position of ``x [N, B,
    C_in, *S]`` (``L = prod(S)``), the patch of ``g`` it spreads into (1-d/2-d)."""
    stride, padding, dilation = conf
    n, size, out_channels = g.shape[:3]
    spatial = tuple(x.shape[3:])
    flat = g.reshape(n * size, out_channels, *g.shape[3:])
    if len(kernel) == 1:
        flat, spatial = flat.unsqueeze(-2), (1, *spatial)
    k2, s2, p2, d2 = _as_2d(kernel, stride, padding, dilation)
    cols = torch.nn.functional.unfold(flat, k2, dilation=d2, padding=p2, stride=s2)  # [N*B, C_out*K, L']
    rows = [(flat.shape[2 + i] + 2 * p2[i] - d2[i] * (k2[i] - 1) - 1) // s2[i] + 1 for i in range(2)]
    if rows != list(spatial):  # output_padding >= stride (below the dilation): more windows
        cols = cols.view(n * size, -1, *rows)[:, :, : spatial[0], : spatial[1]].reshape(n * size, cols.shape[1], -1)
    length = cols.shape[-1]
    return cols.view(n, size, -1, length).permute(1, 0, 3, 2).reshape(size, n * length, -1)


def _positions(x: torch.Tensor) -> torch.Tensor:
    """``x [N, B, C_in, *S] -> [B, N*L, C_in]``: every example's input per position."""
    n, size, channels = x.shape[:3]
    return x.reshape(n, size, channels, -1).permute(1, 0, 3, 2).reshape(size, -1, channels)


def per_sample_conv_transpose_weight_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_shape: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """Per-example weight gradients of a transposed convolution.

    Shapes: ``x [N, B, C_in, *S]``, ``g [N, B, C_out, *S'] -> [B, C_in, C_out/groups, *k]``,
    summing over the ``N`` rows of each example (``N = 1`` for an ordinary batch).

    Args:
        x: the layer's input.
        g: the gradient of the loss with respect to the layer's output.
        weight_shape: ``(C_in, C_out/groups, *k)``.
        stride: one int per spatial dim.
        padding: one int per spatial dim.
        dilation: one int per spatial dim.
        groups: the layer's groups.

    Returns:
        ``dW [B, C_in, C_out/groups, *k]``: ``dW[b]`` is the weight gradient of example b alone.
    """
    n, size, in_channels = x.shape[:3]
    out_channels = g.shape[2]
    if size == 0 or n == 0:
        return g.new_zeros((size, *weight_shape))
    kernel = tuple(weight_shape[2:])
    if _unfolds(x, weight_shape, groups):
        u = _patches(x, g, kernel, (stride, padding, dilation))
        return torch.bmm(_positions(x).transpose(1, 2), u).view(size, *weight_shape)
    xr = x.reshape(n, size * in_channels, *x.shape[3:])
    gr = g.reshape(n, size * out_channels, *g.shape[3:])
    w_stub = g.new_empty(()).expand(size * in_channels, *weight_shape[1:])  # only its shape is read
    out_padding = _output_padding(x.shape[3:], g.shape[3:], kernel, stride, padding, dilation)
    _, gw, _ = torch.ops.aten.convolution_backward(
        gr, xr, w_stub, None, list(stride), list(padding), list(dilation), True,
        out_padding, size * groups, [False, True, False],
    )
    return gw.view(size, *weight_shape)


def _output_padding(spatial, out_spatial, kernel, stride, padding, dilation) -> list[int]:
    """The ``output_padding`` that maps input size ``spatial`` to ``out_spatial``."""
    return [
        o - ((s - 1) * st - 2 * p + d * (k - 1) + 1)
        for s, o, k, st, p, d in zip(spatial, out_spatial, kernel, stride, padding, dilation)
    ]


def _unfolds(x: torch.Tensor, weight_shape: tuple[int, ...], groups: int) -> bool:
    """Whether the unfolded patches serve this layer (ungrouped, 1-d/2-d, within budget)."""
    if groups != 1 or len(weight_shape) > 4:
        return False
    positions = x.numel() // max(x.shape[2], 1)  # N * B * L
    return positions * math.prod(weight_shape[1:]) <= _UNFOLD_MAX


class ConvTransposeWeight(GradKind):
    """``grad_b`` of a transposed-convolution weight from data ``(x [N, B, C_in, *S],
    g [N, B, C_out, *S'], conf)``, ``conf = (stride, padding, dilation)`` of that call.

    ``materialize``: :func:`per_sample_conv_transpose_weight_grad`. ``norm2``: the Gram form
    ``sum_{t,s} (x_bt . x_bs)(u_bt . u_bs)`` over the ``T`` input positions of all calls, with
    ``u`` the unfolded output-gradient patches, where ``2 T^2 < prod(weight_shape)`` for
    ungrouped 1-d/2-d layers within the unfold budget; otherwise materialised.
    ``weighted_sum``: the ordinary weight gradient with ``g_b`` scaled by ``c_b``.
    """

    def __init__(self, weight_shape: tuple[int, ...], groups: int):
        self.weight_shape, self.groups = weight_shape, groups

    def materialize(self, x: torch.Tensor, g: torch.Tensor, conf: tuple[Any, ...]) -> torch.Tensor:
        return per_sample_conv_transpose_weight_grad(x, g, self.weight_shape, *conf, self.groups)

    def prefers_dense(self, datas: Any) -> bool:
        if not all(_unfolds(x, self.weight_shape, self.groups) for x, _, _ in datas):
            return True
        positions = sum(x.numel() // max(x.shape[1] * x.shape[2], 1) for x, _, _ in datas)
        return 2 * positions**2 >= math.prod(self.weight_shape)

    def bound(self, datas: Any, cache: dict | None = None) -> NormBound:
        """The certified bound (``_kinds.outer_bound``): the weight gradient is the sum over
        input positions of ``u_t^T x_t`` (unfolded output-gradient patches, inputs), so the
        Gram form, its rounding bound and the float64 Grams for cancelling examples apply."""
        if self.prefers_dense(datas):
            return super().bound(datas, cache)
        kernel = tuple(self.weight_shape[2:])
        u = _cat1([_patches(x, g, kernel, conf) for x, g, conf in datas])
        x = _cat1([_positions(x) for x, _, _ in datas])
        return outer_bound(u, x, len(datas), None, True)

    def norm2(self, datas: Any, cache: dict | None = None) -> torch.Tensor:
        if self.prefers_dense(datas):
            return super().norm2(datas)
        kernel = tuple(self.weight_shape[2:])
        u = _cat1([_patches(x, g, kernel, conf) for x, g, conf in datas])
        x = _cat1([_positions(x) for x, _, _ in datas])
        gram = (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(u, u.transpose(1, 2))).sum((1, 2))
        return _certified(gram, x, u)

    def weighted_sum(self, datas: Any, c: torch.Tensor) -> torch.Tensor:
        total = None
        kernel = tuple(self.weight_shape[2:])
        for x, g, (stride, padding, dilation) in datas:
            n, size = x.shape[:2]
            scaled = g * c.to(g.dtype).view(1, size, *([1] * (g.dim() - 2)))
            w_stub = g.new_empty(()).expand(*self.weight_shape)
            out_padding = _output_padding(x.shape[3:], g.shape[3:], kernel, stride, padding, dilation)
            _, s, _ = torch.ops.aten.convolution_backward(
                scaled.reshape(n * size, *g.shape[2:]), x.reshape(n * size, *x.shape[2:]),
                w_stub, None, list(stride), list(padding), list(dilation),
                True, out_padding, self.groups, [False, True, False],
            )
            total = s if total is None else total + s
        return total


def _certified(gram: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An upper bound on the squared norm of what the clipped sum adds, from the Gram form.

    ``gram [B]`` is ``sum_{t,s} (x_t . x_s)(u_t . u_s)`` computed in ``x``'s dtype: where the
    positions' terms cancel (a small gradient made of large terms), rounding can put it
    under the true squared norm, even at zero. With ``S = sum_t ||x_t|| ||u_t||`` (float64),
    its error is at most ``gamma_gram * S^2`` and that of the weighted sum's own contraction
    (``weighted_sum``, in ``x``'s dtype) at most ``gamma_sum * S``, so the result,
    ``(sqrt(max(gram, 0) + gamma_gram S^2) + gamma_sum S)^2``, is never under the norm of the
    example's computed contribution. In float64 the margin is ~1e-13 relative or less.
    """
    unit = torch.finfo(x.dtype).eps / 2
    t = x.shape[1]
    s = (torch.linalg.vector_norm(x.double(), dim=2) * torch.linalg.vector_norm(u.double(), dim=2)).sum(1)
    gamma_gram = 2 * (x.shape[2] + u.shape[2] + t * t + 2) * unit
    gamma_sum = 2 * (t + 2) * unit
    bound = ((gram.double().clamp_min(0) + gamma_gram * s * s).sqrt() + gamma_sum * s).square()
    return (bound * (1 + 4 * unit)).to(gram.dtype)


def _cat1(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


@functools.lru_cache(maxsize=256)
def _weight_kind(weight_shape: tuple[int, ...], groups: int) -> ConvTransposeWeight:
    return ConvTransposeWeight(weight_shape, groups)


class _ConvTransposePerSample(torch.autograd.Function):
    """``x [B*N, C_in, *S], w [B, C_in, C_out/G, *k] (shared), b [B, C_out] -> [B*N, C_out, *S']``."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        n: int,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        output_padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> torch.Tensor:
        return torch.convolution(x, _first(w), _first(b), stride, padding, dilation, True, output_padding, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, b, n, stride, padding, output_padding, dilation, groups = inputs
        ctx.save_for_backward(x, w)
        # the expanded params by identity for emit too: a saved tensor may come back from
        # saved-tensor hooks (checkpoint, offloading) as another object, without its Collector
        ctx.has_bias = b is not None
        ctx.weight, ctx.bias = w, b
        ctx.conf = (n, stride, padding, output_padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        n, stride, padding, output_padding, dilation, groups = ctx.conf
        size = w.shape[0]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                g, x, _first(ctx.weight), None, list(stride), list(padding), list(dilation), True,
                list(output_padding), groups, [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            xs = x.view(size, n, *x.shape[1:]).transpose(0, 1)  # [N, B, C_in, *S]
            gs = g.view(size, n, *g.shape[1:]).transpose(0, 1)  # [N, B, C_out, *S']
            gw = emit(ctx.weight, _weight_kind(tuple(w.shape[1:]), groups), xs, gs, (stride, padding, dilation))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            spatial = tuple(range(2, g.dim()))
            # summed over the positions in float32 at least, with the bound of that sum's
            # rounding (as a conv's bias, review h13)
            s, a = presum(g, spatial)
            gb = emit(ctx.bias, _SUMMED, s.view(size, n, g.shape[1]), a.view(size, n).sum(1))
        return gx, gw, gb, None, None, None, None, None, None


class ConvTransposeRule(Rule):
    """Per-sample rule of an N-d :mod:`psgfunc.functional.conv_transpose` layer (batch dim 0)."""

    def __init__(self, plain: Any, dim: int, name: str):
        super().__init__(plain)
        self.dim, self.name = dim, name

    def _run(self, params: dict[str, torch.Tensor], x: torch.Tensor, n: int, kwargs: dict[str, Any]) -> torch.Tensor:
        """``x [B*N, C_in, *S]`` with shared params ``[B, ...]`` -> ``[B*N, C_out, *S']``."""
        w, b = params["weight"], params.get("bias")
        example = {"weight": _first(w)}
        if b is not None:
            example["bias"] = _first(b)
        groups = kwargs["groups"]
        _check(example, x, self.dim, groups, self.name)
        s, p, op, d = _conf(self.dim, self.name, kwargs["stride"], kwargs["padding"],
                            kwargs["output_padding"], kwargs["dilation"])
        return apply_function(_ConvTransposePerSample, x, w, b, n, s, p, op, d, groups)

    def batched(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        *,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        dilation: Any = 1,
    ) -> torch.Tensor:
        w = params["weight"]
        if not isinstance(x, torch.Tensor) or x.dim() != self.dim + 2 or x.shape[0] != w.shape[0]:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{self.name} on a batch of {w.shape[0]} examples needs x shaped "
                f"[B, C_in, {_SPATIAL[self.dim]}] with B = {w.shape[0]}, got {shape}; add the "
                "batch dim (x.unsqueeze(0) for one example)"
            )
        kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                      dilation=dilation)
        if not all(is_shared(p) for p in params.values() if p is not None):
            plain = self.plain
            return vmap(lambda p, xi: plain(p, xi, **kwargs))(params, x)
        return self._run(params, x, 1, kwargs)

    def vmapped(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        *,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        dilation: Any = 1,
    ) -> Any:
        kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                      dilation=dilation)
        if x.dim() == self.dim + 2:  # each example is [C_in, *S]
            return self._run(params, x, 1, kwargs)
        if x.dim() == self.dim + 3:  # each example is [N, C_in, *S]
            size, n = x.shape[:2]
            out = self._run(params, x.reshape(size * n, *x.shape[2:]), n, kwargs)
            return out.view(size, n, *out.shape[1:])
        return NotImplemented  # the plain layer under vmap raises its own error

    def tapped(
        self,
        tap: Any,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        *,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        dilation: Any = 1,
    ) -> Any:
        w, b = params.get("weight"), params.get("bias")
        iw, ib = tap.index(w), tap.index(b)
        if iw is None or (b is not None and ib is None) or not isinstance(x, torch.Tensor):
            return NotImplemented
        rows = x.dim() - self.dim - 1  # 0: one example [C_in, *S]; 1: [N, C_in, *S]
        if rows not in (0, 1) or w.dim() != self.dim + 2:
            return NotImplemented  # the plain layer raises its own errors
        detached = {"weight": w.detach(), "bias": None if b is None else b.detach()}
        y = self.plain(detached, x, stride=stride, padding=padding, output_padding=output_padding,
                       groups=groups, dilation=dilation)
        s, p, _, d = _conf(self.dim, self.name, stride, padding, output_padding, dilation)
        kind = ConvTransposeWeight(tuple(w.shape), groups)  # not the lru_cache: torch.compile traces this

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            size = g.shape[0]
            xb = saved[0].reshape(size, -1, *saved[0].shape[1 + rows:]).transpose(0, 1)  # [N, B, C_in, *S]
            gs = g.reshape(size, -1, *g.shape[1 + rows:]).transpose(0, 1)  # [N, B, C_out, *S']
            out = [(iw, kind, (xb, gs, (s, p, d)))]
            if ib is not None:
                spatial = tuple(range(3, gs.dim()))
                summed, a = presum(gs, spatial, lead=2)  # [N, B, C_out], [N, B]
                out.append((ib, _SUMMED, (summed.transpose(0, 1), a.sum(0))))
            return out

        return tap.out(y, (x,), build)


CONV_TRANSPOSE1D = ConvTransposeRule(conv_transpose1d.plain, 1, "conv_transpose1d")
CONV_TRANSPOSE2D = ConvTransposeRule(conv_transpose2d.plain, 2, "conv_transpose2d")
CONV_TRANSPOSE3D = ConvTransposeRule(conv_transpose3d.plain, 3, "conv_transpose3d")


@_rules.register_rule(conv_transpose1d)
def _conv_transpose1d(params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return call_rule(CONV_TRANSPOSE1D, params, x, **kwargs)


@_rules.register_rule(conv_transpose2d)
def _conv_transpose2d(params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return call_rule(CONV_TRANSPOSE2D, params, x, **kwargs)


@_rules.register_rule(conv_transpose3d)
def _conv_transpose3d(params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return call_rule(CONV_TRANSPOSE3D, params, x, **kwargs)
